"""Figures 8–15 of the paper from a ``results/`` tree (docs/definitions.md §7), as PNG and PDF.

Layout read: ``RESULTS/<fig dir>/<model>/<system>/<point>.{txt,json}`` with fig dir ``fig8,9``
(Figures 8, 9 and 12), ``fig10``, ``fig11``, ``fig14``, ``fig15`` (``fig15/<model>/<point>`` without
a system folder is read as AdaServe too); the folders are those of ``harness.figures``. A point
counts only when ``results.result_complete`` says so, its ``meta.sweep`` (when present) names the
place it was found in, and its text statistics agree with its JSON. Its x value comes from ``meta.sweep.x`` when present, else from the point's name
(``rps4.8_ol256``, ``prop0.6_rps4.0``, ``slo0.8_ol256``).

What is drawn (as in the paper):

- Figure 8 / 9: SLO attainment (%) / goodput (tokens/s) vs RPS, one panel per model, one line per
  system.
- Figure 10: attainment and goodput vs the urgent share (%), Figure 11: the same vs the urgent
  category's SLO scale, x axis reversed (tighter SLOs to the right).
- Figure 12: mean tokens committed per request per verification step vs RPS, AdaServe and
  vLLM-Spec (4/6/8).
- Figure 14: bars per system for the fluctuating trace (attainment and goodput).
- Figure 15: a 100% stacked bar per model of speculation / verification / scheduling, as shares
  of the sum of those three (prefill and "other" are left out, as in the paper).

Missing data stays missing: every system's line is sampled on the union of the x values of its
panel and a point without a complete result (or without the metric) is NaN, so the line breaks
there; nothing is interpolated. A figure without any data is skipped with a note. When a sweep
folder holds several variants of a point (e.g. ``rps4.8_ol256`` and ``rps4.8_ol128``), the variant
with the most points is drawn and the others are named in a note.

Drawing uses matplotlib's object API with the Agg canvas (no pyplot, no global state).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from adaserve.core.errors import UserError
from adaserve.core.results import load_result, result_complete
from adaserve.harness.figures import EXPERIMENT_OF_FIGURE, EXPERIMENTS, FIGURE_IDS, parse_figures
from adaserve.harness.record import stats_disagreement
from adaserve.scheduling.policies import SYSTEM_REGISTRY, SYSTEMS

# ----------------------------------------------------------------------------------- constants

FIGURES = FIGURE_IDS

#: results folder of each figure (Figure 12 reuses the Figure 8/9 runs, as in the artifact)
FIG_DIRS = {f: e.folder for f, e in EXPERIMENT_OF_FIGURE.items()}

#: sweep variable of each results folder: (meta.sweep x_name, point-name token)
SWEEP_X = {e.folder: (e.x_name, e.x_token) for e in EXPERIMENTS.values()}

MODELS = ("llama", "qwen")
MODEL_LABELS = {"llama": "Llama-3.1-70B-Instruct", "qwen": "Qwen2.5-32B-Instruct"}

SYSTEM_ORDER = SYSTEMS


@dataclass(frozen=True)
class Style:
    label: str
    color: str
    marker: str
    linestyle: str = "-"
    linewidth: float = 1.6


#: color, marker, line style, width per system (labels come from the system registry)
_LOOKS: dict[str, tuple] = {
    "adaserve": ("#d62728", "o", "-", 2.4),
    "adaserve_plus": ("#ff9896", "*", "-", 2.4),
    "vllm": ("#1f77b4", "s"),
    "sarathi": ("#ff7f0e", "^"),
    "vllm_spec_4": ("#98df8a", "v", "--"),
    "vllm_spec_6": ("#2ca02c", "D", "--"),
    "vllm_spec_8": ("#0b5d1e", "P", "--"),
    "specinfer": ("#9467bd", "X", "-."),
    "priority": ("#8c564b", "h", ":"),
    "greedy": ("#e377c2", "<", ":"),
    "equal": ("#7f7f7f", ">", ":"),
}
_FALLBACK_COLORS = ("#17becf", "#bcbd22", "#393b79", "#637939", "#8c6d31", "#843c39")


def _fallback_look(name: str) -> tuple:
    return _FALLBACK_COLORS[sum(map(ord, name)) % len(_FALLBACK_COLORS)], "*", "-."


#: one look per system, the same in every figure
SYSTEM_STYLES: dict[str, Style] = {
    s.name: Style(s.label, *_LOOKS.get(s.name, _fallback_look(s.name))) for s in SYSTEM_REGISTRY}

OVERHEAD_PARTS = ("speculation", "verification", "scheduling")
OVERHEAD_LABELS = {"speculation": "Speculation", "verification": "Verification",
                   "scheduling": "Scheduling"}
OVERHEAD_COLORS = {"speculation": "#4c72b0", "verification": "#dd8452", "scheduling": "#c44e52"}

PREFERRED_POINT = {e.folder: e.preferred_point for e in EXPERIMENTS.values() if e.preferred_point}


def style_of(system: str) -> Style:
    """The system's label, color and marker (unknown systems get a stable fallback look)."""
    if system in SYSTEM_STYLES:
        return SYSTEM_STYLES[system]
    return Style(system, *_fallback_look(system))


def label_of(system: str) -> str:
    return style_of(system).label


def system_sort_key(system: str) -> tuple[int, str]:
    if system in SYSTEM_ORDER:
        return SYSTEM_ORDER.index(system), ""
    return len(SYSTEM_ORDER), system


def model_sort_key(model: str) -> tuple[int, str]:
    return (MODELS.index(model), "") if model in MODELS else (len(MODELS), model)


def model_label(model: str) -> str:
    return MODEL_LABELS.get(model, model)


# ---------------------------------------------------------------------------------- loading

@dataclass
class Point:
    """One complete sweep point."""
    fig_dir: str
    model: str
    system: str
    name: str            # file name without suffix, e.g. "rps4.8_ol256"
    x: float | None      # sweep value (None for fig14 / fig15)
    variant: str         # the name without its x token, e.g. "ol256"
    summary: dict[str, Any]

    def metric(self, key: str) -> float:
        """A summary value as a float; NaN when absent or null."""
        v = self.summary.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


@dataclass
class Dataset:
    """The complete points of one results folder, plus notes on what was left out."""
    fig_dir: str
    points: list[Point] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def models(self) -> list[str]:
        return sorted({p.model for p in self.points}, key=model_sort_key)

    def systems(self, model: str | None = None) -> list[str]:
        return sorted({p.system for p in self.points if model is None or p.model == model},
                      key=system_sort_key)

    def select(self, model: str | None = None, system: str | None = None) -> list[Point]:
        return [p for p in self.points if (model is None or p.model == model)
                and (system is None or p.system == system)]


_NUM = r"([-+]?\d+(?:\.\d+)?)"


def parse_point_name(name: str, token: str | None) -> tuple[float | None, str]:
    """``(x, variant)`` from a point name: ``parse_point_name("rps4.8_ol256", "rps")`` is
    ``(4.8, "ol256")``. x is None when the name has no ``<token><number>`` part."""
    if token is None:
        return None, name
    m = re.search(rf"(?:^|_){re.escape(token)}{_NUM}(?=_|$)", name)
    if not m:
        return None, name
    rest = (name[:m.start()] + "_" + name[m.end():]).strip("_")
    return float(m.group(1)), re.sub(r"_+", "_", rest)


def _sweep_x(doc: Mapping[str, Any], x_name: str | None) -> float | None:
    meta = doc.get("meta")
    sweep = meta.get("sweep") if isinstance(meta, Mapping) else None
    if not isinstance(sweep, Mapping):
        return None
    x = sweep.get("x")
    if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
        if x_name is None or sweep.get("x_name") in (None, x_name):
            return float(x)
    return None


def _misplaced(doc: Mapping[str, Any], where: tuple[str, str, str, str]) -> str | None:
    """Why a result's recorded identity (``meta.sweep``) does not match the place it was found
    (e.g. a file copied from another point); None when it matches or records none."""
    meta = doc.get("meta")
    sweep = meta.get("sweep") if isinstance(meta, Mapping) else None
    if not isinstance(sweep, Mapping):
        return None
    for key, found in zip(("figure", "model", "system", "point"), where):
        if key in sweep and sweep[key] != found:
            return f"its meta.sweep.{key} is {sweep[key]!r}, not {found!r}"
    return None


def _prefixes(folder: Path) -> list[Path]:
    return sorted({p.with_suffix("") for p in folder.glob("*.txt") if not p.name.startswith(".")}
                  | {p.with_suffix("") for p in folder.glob("*.json")
                     if not p.name.startswith(".")})


def load_dataset(results_dir: str | Path, fig_dir: str) -> Dataset:
    """Every complete point under ``results_dir/fig_dir``; incomplete ones are noted, not read."""
    root = Path(results_dir) / fig_dir
    data = Dataset(fig_dir)
    if not root.is_dir():
        return data
    x_name, token = SWEEP_X.get(fig_dir, (None, None))
    incomplete = 0
    folders: list[tuple[str, str, Path]] = []
    for model_dir in sorted(d for d in root.iterdir() if d.is_dir()):
        for sys_dir in sorted(d for d in model_dir.iterdir() if d.is_dir()):
            folders.append((model_dir.name, sys_dir.name, sys_dir))
        if fig_dir == "fig15":  # the artifact's results/fig15/<model>/<point>
            folders.append((model_dir.name, "adaserve", model_dir))
    seen: set[tuple[str, str, str]] = set()
    for model, system, folder in folders:
        for prefix in _prefixes(folder):
            if not result_complete(prefix):
                incomplete += 1
                continue
            key = (model, system, prefix.name)
            if key in seen:
                continue
            seen.add(key)
            try:
                doc = load_result(prefix)
            except (OSError, ValueError) as e:
                data.notes.append(f"{prefix}: unreadable ({e})")
                continue
            summary = doc.get("summary")
            if not isinstance(summary, dict):
                data.notes.append(f"{prefix}: no summary, skipped")
                continue
            problem = (_misplaced(doc, (fig_dir, model, system, prefix.name))
                       or stats_disagreement(prefix, doc))
            if problem:
                data.notes.append(f"{prefix}: {problem}, skipped")
                continue
            x_meta = _sweep_x(doc, x_name)
            x_parsed, variant = parse_point_name(prefix.name, token)
            x = x_meta if x_meta is not None else x_parsed
            if token is not None and x is None:
                data.notes.append(f"{prefix}: cannot tell its {x_name} (no meta.sweep.x and the "
                                  f"name is not like {token}<number>_...), skipped")
                continue
            data.points.append(Point(fig_dir, model, system, prefix.name, x, variant, summary))
    if incomplete:
        data.notes.append(f"{root}: {incomplete} incomplete point(s) ignored")
    return data


def choose_variant(points: Sequence[Point], fig_dir: str) -> tuple[str | None, list[str]]:
    """The variant with the most points (ties: the lexicographically first); notes on the rest."""
    counts: dict[str, int] = {}
    for p in points:
        counts[p.variant] = counts.get(p.variant, 0) + 1
    if not counts:
        return None, []
    best = sorted(counts, key=lambda v: (-counts[v], v))[0]
    notes = []
    if len(counts) > 1:
        others = ", ".join(f"{v or '(none)'} ({counts[v]} points)" for v in counts if v != best)
        notes.append(f"{fig_dir}: several point variants; drawing {best or '(none)'} "
                     f"({counts[best]} points), not {others}")
    return best, notes


# --------------------------------------------------------------------------- series (data)

@dataclass
class Panel:
    """One axes' worth of data: x grid and per-system y values (NaN = missing)."""
    title: str
    model: str
    metric: str
    xlabel: str
    ylabel: str
    x: list[float]
    lines: dict[str, list[float]]  # system -> y on the x grid
    reverse_x: bool = False


def _x_key(x: float) -> float:
    return round(x, 6)


def sweep_panel(data: Dataset, model: str, metric: str, systems: Iterable[str] | None, *,
                title: str, xlabel: str, ylabel: str, x_scale: float = 1.0,
                y_scale: float = 1.0, reverse_x: bool = False) -> tuple[Panel, list[str]]:
    """The lines of one model: each system sampled on the union of its panel's x values."""
    pts = [p for p in data.select(model=model) if systems is None or p.system in systems]
    variant, notes = choose_variant(pts, f"{data.fig_dir}/{model}")
    pts = [p for p in pts if p.variant == variant]
    grid = sorted({_x_key(p.x) for p in pts if p.x is not None})
    by_sys: dict[str, dict[float, float]] = {}
    for p in sorted(pts, key=lambda p: p.name):
        slot = by_sys.setdefault(p.system, {})
        k = _x_key(p.x)
        if k in slot:
            notes.append(f"{data.fig_dir}/{model}/{p.system}: two points at x={k}; kept the first")
            continue
        slot[k] = p.metric(metric) * y_scale
    lines = {s: [by_sys[s].get(k, math.nan) for k in grid]
             for s in sorted(by_sys, key=system_sort_key)}
    xs = [round(k * x_scale, 6) for k in grid]
    panel = Panel(title, model, metric, xlabel, ylabel, xs, lines, reverse_x)
    return panel, notes


def single_points(data: Dataset, model: str) -> tuple[dict[str, Point], list[str]]:
    """One point per system (figures 14 and 15): the preferred name, else the first sorted."""
    out: dict[str, Point] = {}
    notes: list[str] = []
    pref = PREFERRED_POINT.get(data.fig_dir)
    for system in data.systems(model):
        pts = sorted(data.select(model=model, system=system), key=lambda p: p.name)
        chosen = next((p for p in pts if p.name == pref), pts[0])
        if len(pts) > 1:
            notes.append(f"{data.fig_dir}/{model}/{system}: {len(pts)} points; drawing "
                         f"{chosen.name}")
        out[system] = chosen
    return out, notes


# -------------------------------------------------------------------------------- drawing

@dataclass
class Drawn:
    """The outcome of one figure: the matplotlib Figure, the numbers drawn, files written."""
    figure_id: str
    figure: Any | None = None
    data: Any = None
    paths: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.figure is None


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _legend(fig, systems: Sequence[str]) -> None:
    """One legend for the whole figure, above the panels, as many columns as fit."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=style_of(s).color, marker=style_of(s).marker,
                      linestyle=style_of(s).linestyle, linewidth=style_of(s).linewidth,
                      label=label_of(s)) for s in systems]
    if handles:
        fit = max(1, int(fig.get_figwidth() / 1.45))
        rows = math.ceil(len(handles) / fit)
        fig.legend(handles=handles, loc="outside upper center",
                   ncol=math.ceil(len(handles) / rows), frameon=False, fontsize=9)


def _caption(fig, text: str) -> None:
    """The paper's caption under the figure (saved with bbox_inches="tight", so it is kept)."""
    fig.text(0.5, -0.01, text, ha="center", va="top", fontsize=10)


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no data\n({what})", ha="center", va="center", transform=ax.transAxes,
            color="0.4", fontsize=10)


def _draw_lines(ax, panel: Panel, *, percent: bool = False) -> None:
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    if not panel.lines:
        _no_data(ax, model_label(panel.model))
    for system, ys in panel.lines.items():
        st = style_of(system)
        ax.plot(panel.x, ys, color=st.color, marker=st.marker, linestyle=st.linestyle,
                linewidth=st.linewidth, markersize=5, label=st.label,
                zorder=3 if system == "adaserve" else 2)
    if panel.x:
        ax.set_xticks(panel.x)
        ax.tick_params(axis="x", labelsize=8)
        if len(panel.x) > 8:
            for lab in ax.get_xticklabels():
                lab.set_rotation(45)
        pad = 0.05 * (max(panel.x) - min(panel.x) or 1.0)
        ax.set_xlim(min(panel.x) - pad, max(panel.x) + pad)
    if percent:
        ax.set_ylim(0, 105)
    else:
        ys = [y for v in panel.lines.values() for y in v if not math.isnan(y)]
        ax.set_ylim(0, max(ys) * 1.1 if ys and max(ys) > 0 else 1.0)
    if panel.reverse_x:
        ax.invert_xaxis()


METRIC_LABELS = {"slo_attainment": "SLO Attainment (%)", "goodput": "Goodput (tokens/s)",
                 "mean_generated_tokens_per_step": "Mean tokens per step"}
X_LABELS = {e.folder: e.x_label for e in EXPERIMENTS.values() if e.x_label}


def _line_figure(fig_id: str, data: Dataset, metrics: Sequence[str],
                 systems: Sequence[str] | None, title: str) -> Drawn:
    """Panels (model × metric) in one row, lines per system, a shared legend on top."""
    drawn = Drawn(fig_id, notes=list(data.notes))
    models = [m for m in MODELS] + [m for m in data.models() if m not in MODELS]
    if not any(p for p in data.points if systems is None or p.system in systems):
        return drawn
    reverse, x_scale = EXPERIMENTS[data.fig_dir].reverse_x, EXPERIMENTS[data.fig_dir].x_scale
    panels: list[Panel] = []
    for model in models:
        for metric in metrics:
            panel, notes = sweep_panel(
                data, model, metric, systems, title=model_label(model),
                xlabel=X_LABELS[data.fig_dir], ylabel=METRIC_LABELS[metric], x_scale=x_scale,
                y_scale=100.0 if metric == "slo_attainment" else 1.0, reverse_x=reverse)
            panels.append(panel)
            drawn.notes.extend(notes)
    fig = _new_figure(4.2 * len(panels), 3.9)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        _draw_lines(ax, panel, percent=panel.metric == "slo_attainment")
    _caption(fig, title)
    _legend(fig, sorted({s for p in panels for s in p.lines}, key=system_sort_key))
    drawn.figure, drawn.data = fig, panels
    return drawn


def draw_fig8(data: Dataset) -> Drawn:
    return _line_figure("8", data, ["slo_attainment"], None, "Figure 8. SLO attainment w.r.t. RPS.")


def draw_fig9(data: Dataset) -> Drawn:
    return _line_figure("9", data, ["goodput"], None, "Figure 9. Goodput w.r.t. RPS.")


def draw_fig10(data: Dataset) -> Drawn:
    return _line_figure("10", data, ["slo_attainment", "goodput"], None,
                        "Figure 10. SLO attainment and goodput w.r.t. urgent request proportion.")


def draw_fig11(data: Dataset) -> Drawn:
    return _line_figure("11", data, ["slo_attainment", "goodput"], None,
                        "Figure 11. SLO attainment and goodput w.r.t. SLO scale.")


def draw_fig12(data: Dataset) -> Drawn:
    return _line_figure("12", data, ["mean_generated_tokens_per_step"],
                        ["adaserve", "vllm_spec_4", "vllm_spec_6", "vllm_spec_8"],
                        "Figure 12. Mean tokens committed per request per verification step.")


def draw_fig14(data: Dataset) -> Drawn:
    """Bars per system: attainment (top row) and goodput (bottom row), one column per model."""
    drawn = Drawn("14", notes=list(data.notes))
    if not data.points:
        return drawn
    models = [m for m in MODELS] + [m for m in data.models() if m not in MODELS]
    systems = data.systems()  # the same slots in every panel; a missing bar is labelled n/a
    table: dict[str, dict[str, dict[str, float]]] = {}
    for model in models:
        chosen, notes = single_points(data, model)
        drawn.notes.extend(notes)
        table[model] = {s: {"slo_attainment": p.metric("slo_attainment") * 100.0,
                            "goodput": p.metric("goodput")} for s, p in chosen.items()}
    fig = _new_figure(max(4.5, 0.75 * len(systems) + 1.5) * len(models), 6.4)
    axes = fig.subplots(2, len(models), squeeze=False)
    for col, model in enumerate(models):
        for row, metric in enumerate(("slo_attainment", "goodput")):
            ax = axes[row][col]
            vals = [table[model].get(s, {}).get(metric, math.nan) for s in systems]
            finite = [v for v in vals if not math.isnan(v)]
            top = 100.0 if metric == "slo_attainment" else (max(finite) if finite else 1.0) or 1.0
            for i, (s, v) in enumerate(zip(systems, vals)):
                if math.isnan(v):
                    ax.text(i, 0.02 * top, "n/a", ha="center", va="bottom", fontsize=8,
                            color="0.4")
                    continue
                ax.bar(i, v, color=style_of(s).color, edgecolor="black", linewidth=0.5,
                       label=label_of(s))
                ax.text(i, v + 0.01 * top, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
            ax.set_xticks(range(len(systems)))
            ax.set_xticklabels([label_of(s) for s in systems], rotation=35, ha="right",
                               fontsize=8)
            ax.set_xlim(-0.6, len(systems) - 0.4)
            ax.set_ylim(0, top * 1.15)
            ax.set_ylabel(METRIC_LABELS[metric])
            ax.grid(True, axis="y", alpha=0.3)
            if row == 0:
                ax.set_title(model_label(model), fontsize=10)
            if not table[model]:
                _no_data(ax, model_label(model))
    _caption(fig, "Figure 14. SLO attainment and goodput under the fluctuating trace.")
    drawn.figure, drawn.data = fig, table
    return drawn


def overhead_shares(summary: Mapping[str, Any]) -> dict[str, float] | None:
    """Speculation / verification / scheduling as shares (0–1) of their sum; None if unknown."""
    oh = summary.get("overhead")
    us = oh.get("us") if isinstance(oh, Mapping) else None
    if not isinstance(us, Mapping):
        return None
    vals = {k: float(us.get(k) or 0.0) for k in OVERHEAD_PARTS}
    total = sum(vals.values())
    if not total > 0:
        return None
    return {k: v / total for k, v in vals.items()}


def draw_fig15(data: Dataset) -> Drawn:
    """A horizontal 100% stacked bar per model, the scheduling (CPU) share written beside it."""
    drawn = Drawn("15", notes=list(data.notes))
    shares: dict[str, dict[str, float]] = {}
    for model in [m for m in MODELS] + [m for m in data.models() if m not in MODELS]:
        chosen, notes = single_points(data, model)
        drawn.notes.extend(notes)
        p = chosen.get("adaserve")
        if p is None:
            continue
        s = overhead_shares(p.summary)
        if s is None:
            drawn.notes.append(f"fig15/{model}/adaserve/{p.name}: no overhead breakdown")
            continue
        shares[model] = s
    if not shares:
        return drawn
    models = list(shares)[::-1]  # first model on top
    fig = _new_figure(8.0, 1.9 + 0.7 * len(models))
    ax = fig.subplots()
    for i, model in enumerate(models):
        left = 0.0
        for part in OVERHEAD_PARTS:
            w = 100.0 * shares[model][part]
            ax.barh(i, w, left=left, color=OVERHEAD_COLORS[part], edgecolor="black",
                    linewidth=0.5, height=0.6, label=OVERHEAD_LABELS[part] if i == 0 else None)
            if w >= 8:
                ax.text(left + w / 2, i, f"{w:.1f}%", ha="center", va="center", fontsize=8,
                        color="white")
            left += w
        ax.text(101, i, f"scheduling {100.0 * shares[model]['scheduling']:.2f}%", ha="left",
                va="center", fontsize=9)
    ax.set_yticks(range(len(models)))
    ax.set_yticklabels([model_label(m) for m in models], fontsize=9)
    ax.set_xlim(0, 100)
    ax.set_xlabel("Percentage (%) of speculation + verification + scheduling time")
    _caption(fig, "Figure 15. Latency breakdown of AdaServe.")
    fig.legend(loc="outside upper center", ncol=3, frameon=False, fontsize=9)
    drawn.figure, drawn.data = fig, shares
    return drawn


DRAWERS: dict[str, Callable[[Dataset], Drawn]] = {
    "8": draw_fig8, "9": draw_fig9, "10": draw_fig10, "11": draw_fig11, "12": draw_fig12,
    "14": draw_fig14, "15": draw_fig15}


# ------------------------------------------------------------------------------ read-back

def figure_series(figure) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """The lines drawn in a matplotlib Figure: ``{axes title: {line label: (xs, ys)}}``, missing
    points as NaN (useful to check what a figure really shows)."""
    out: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for i, ax in enumerate(figure.axes):
        lines = {ln.get_label(): ([float(v) for v in ln.get_xdata()],
                                  [float(v) for v in ln.get_ydata()])
                 for ln in ax.get_lines() if not ln.get_label().startswith("_")}
        if lines:
            key = f"{ax.get_title()} | {ax.get_ylabel()}"
            out[key if key not in out else f"{key} #{i}"] = lines
    return out


# ------------------------------------------------------------------------------- top level

def draw_figure(fig_id: str, results_dir: str | Path, out_dir: str | Path | None = None,
                *, datasets: dict[str, Dataset] | None = None) -> Drawn:
    """Draw one figure; write ``out_dir/fig<ID>.png`` and ``.pdf`` when ``out_dir`` is given.
    The matplotlib Figure stays in the result (``Drawn.figure``) for inspection."""
    fig_dir = FIG_DIRS[fig_id]
    if datasets is not None and fig_dir in datasets:
        data = datasets[fig_dir]
    else:
        data = load_dataset(results_dir, fig_dir)
        if datasets is not None:
            datasets[fig_dir] = data
    drawn = DRAWERS[fig_id](data)
    if drawn.figure is not None and out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for ext in ("png", "pdf"):
            path = out / f"fig{fig_id}.{ext}"
            tmp = out / f".fig{fig_id}.tmp.{ext}"
            drawn.figure.savefig(tmp, dpi=150, bbox_inches="tight", format=ext)
            tmp.replace(path)
            drawn.paths.append(path)
    return drawn


def plot_all(results_dir: str | Path = "results", out_dir: str | Path = "plots",
             figures: str | Sequence[str] | None = None, *, echo: Callable[[str], None] = print,
             verbose: bool = True, datasets: dict[str, Dataset] | None = None) -> dict[str, Drawn]:
    """Draw the chosen figures; print one line per figure (files written, or why none).
    ``datasets`` caches the loaded results folders (shared with ``headline.headline``)."""
    ids = parse_figures(figures)
    results = Path(results_dir)
    if not results.is_dir():
        raise UserError(f"results directory '{results}' does not exist (run the experiments "
                         "first, e.g. `make reproduce`, or pass --results DIR)")
    datasets = {} if datasets is None else datasets
    out: dict[str, Drawn] = {}
    printed_notes: set[str] = set()
    for fig_id in ids:
        drawn = draw_figure(fig_id, results, out_dir, datasets=datasets)
        out[fig_id] = drawn
        if drawn.empty:
            echo(f"figure {fig_id}: no complete results under {results / FIG_DIRS[fig_id]} "
                 "- not drawn")
        else:
            echo(f"figure {fig_id}: " + ", ".join(str(p) for p in drawn.paths))
        if verbose:
            for note in drawn.notes:
                if note not in printed_notes:
                    printed_notes.add(note)
                    echo(f"  note: {note}")
    return out
