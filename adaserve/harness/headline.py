"""The headline table: AdaServe against the best baseline, per figure and model.

For every sweep point where AdaServe and at least one baseline (every system registered with the
role "baseline" in ``scheduling.policies.SYSTEM_REGISTRY``: ``vllm``, ``sarathi``,
``vllm_spec_*``, ``specinfer``, ``priority``) have complete results:

- best baseline = the baseline with the highest SLO attainment at that point (ties: higher goodput,
  then the name);
- violation ratio = best baseline's violations / AdaServe's, violations = 1 − attainment (computed
  from the attained / completed counts when present); ``inf`` when AdaServe has no violation and the
  baseline has some, 1.0 when neither has any;
- goodput ratio = AdaServe's goodput / the best baseline's (``inf`` when the baseline's is 0).

Reported at the hardest point of the sweep (highest RPS for Figures 8/9, highest urgent share for
Figure 10, lowest SLO scale for Figure 11; the single point of Figure 14) and as the maximum of each
ratio over the sweep (with the x where it occurs). Figure 12 adds AdaServe's and vLLM-Spec's mean
tokens per step at the lowest and highest RPS; Figure 15 the scheduling (CPU) share.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adaserve.harness.figures import EXPERIMENTS
from adaserve.harness.plot import (
    FIG_DIRS, Dataset, Point, choose_variant, single_points, label_of,
    load_dataset, model_sort_key, overhead_shares, parse_figures)
from adaserve.scheduling.policies import BASELINES

#: rows with an attainment comparison ("8,9", "10", ...): the folder they read, how the table
#: names x, and which x is hardest (None: a single point)
COMPARED = {e.row_label: (e.folder, e.headline_x, e.hardest_of())
            for e in EXPERIMENTS.values() if e.compared}


@dataclass
class Comparison:
    """AdaServe vs the best baseline at one point."""
    x: float | None
    adaserve_attainment: float
    adaserve_goodput: float
    baseline: str
    baseline_attainment: float
    baseline_goodput: float
    violation_ratio: float | None
    goodput_ratio: float | None
    # TTFT beside attainment, so that no setting buys attainment with queueing unseen (NaN: absent)
    adaserve_ttft_s: tuple[float, float] = (math.nan, math.nan)   # p50, p90
    baseline_ttft_s: tuple[float, float] = (math.nan, math.nan)
    # joint (TTFT and TPOT SLO) attainment beside the paper's metric (issue 15; NaN: absent)
    adaserve_joint: float = math.nan
    baseline_joint: float = math.nan


def ttft_s(summary: dict[str, Any]) -> tuple[float, float]:
    """(p50, p90) TTFT in seconds from a summary's ``ttft_ms`` distribution; NaN when absent."""
    dist = summary.get("ttft_ms")
    dist = dist if isinstance(dist, dict) else {}
    return tuple(float(dist[q]) / 1e3 if isinstance(dist.get(q), (int, float)) else math.nan
                 for q in ("p50", "p90"))


@dataclass
class HeadlineRow:
    figure: str
    model: str
    x_name: str | None
    points: int                    # sweep points compared
    hardest: Comparison
    max_violation_ratio: float | None
    max_violation_ratio_x: float | None
    max_goodput_ratio: float | None
    max_goodput_ratio_x: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Headline:
    rows: list[HeadlineRow]
    extras: list[str]              # Figure 12 / 15 lines
    notes: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"rows": [r.as_dict() for r in self.rows], "extras": list(self.extras),
                "notes": list(self.notes)}


# ------------------------------------------------------------------------------- computation

def violations(summary: dict[str, Any]) -> float | None:
    """1 − attainment, exactly (from the counts) when the summary has them."""
    done, ok = summary.get("completed"), summary.get("attained")
    if isinstance(done, int) and isinstance(ok, int) and done > 0:
        return (done - ok) / done
    att = summary.get("slo_attainment")
    if not isinstance(att, (int, float)) or isinstance(att, bool) or not math.isfinite(att):
        return None
    v = 1.0 - float(att)
    return 0.0 if abs(v) < 1e-12 else v


def violation_ratio(baseline_viol: float, adaserve_viol: float) -> float:
    if adaserve_viol <= 0:
        return math.inf if baseline_viol > 0 else 1.0
    return baseline_viol / adaserve_viol


def goodput_ratio(adaserve: float, baseline: float) -> float | None:
    if not (math.isfinite(adaserve) and math.isfinite(baseline)):
        return None
    if baseline <= 0:
        return math.inf if adaserve > 0 else None
    return adaserve / baseline


def compare(ada: Point, baselines: Sequence[Point]) -> Comparison | None:
    """AdaServe vs the best of ``baselines`` (by attainment) at one point; None if undefined."""
    a_att, a_viol = ada.metric("slo_attainment"), violations(ada.summary)
    if math.isnan(a_att) or a_viol is None:
        return None
    cands = [b for b in baselines if not math.isnan(b.metric("slo_attainment"))
             and violations(b.summary) is not None]
    if not cands:
        return None
    best = sorted(cands, key=lambda b: (-b.metric("slo_attainment"),
                                        -_finite_or(b.metric("goodput"), -math.inf), b.system))[0]
    return Comparison(
        x=ada.x, adaserve_attainment=a_att, adaserve_goodput=ada.metric("goodput"),
        baseline=best.system, baseline_attainment=best.metric("slo_attainment"),
        baseline_goodput=best.metric("goodput"),
        violation_ratio=violation_ratio(violations(best.summary), a_viol),
        goodput_ratio=goodput_ratio(ada.metric("goodput"), best.metric("goodput")),
        adaserve_ttft_s=ttft_s(ada.summary), baseline_ttft_s=ttft_s(best.summary),
        adaserve_joint=ada.metric("joint_attainment"), baseline_joint=best.metric("joint_attainment"))


def _finite_or(v: float, default: float) -> float:
    return v if math.isfinite(v) else default


def _argmax(comps: Sequence[Comparison], key: Callable[[Comparison], float | None]):
    vals = [(key(c), c.x) for c in comps if key(c) is not None]
    if not vals:
        return None, None
    return max(vals, key=lambda t: t[0])


def figure_rows(figure: str, data: Dataset) -> tuple[list[HeadlineRow], list[str]]:
    """Headline rows of one compared figure (``"8,9"``, ``"10"``, ``"11"``, ``"14"``)."""
    _, x_name, hardest_of = COMPARED[figure]
    rows: list[HeadlineRow] = []
    notes: list[str] = []
    for model in data.models():
        if hardest_of is None:
            chosen, n = single_points(data, model)
            groups = {None: chosen}
        else:
            pts = data.select(model=model)
            variant, n = choose_variant(pts, f"{data.fig_dir}/{model}")
            groups = {}
            for p in sorted(pts, key=lambda p: p.name):
                if p.variant == variant:
                    groups.setdefault(round(p.x, 6), {}).setdefault(p.system, p)
        notes.extend(n)
        comps: list[Comparison] = []
        for _, by_sys in sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or 0.0)):
            ada = by_sys.get("adaserve")
            if ada is None:
                continue
            c = compare(ada, [p for s, p in by_sys.items() if s in BASELINES])
            if c is not None:
                comps.append(c)
        if not comps:
            notes.append(f"figure {figure} / {model}: no point with both AdaServe and a baseline")
            continue
        hardest = comps[0] if hardest_of is None else hardest_of(comps, key=lambda c: c.x)
        mv, mvx = _argmax(comps, lambda c: c.violation_ratio)
        mg, mgx = _argmax(comps, lambda c: c.goodput_ratio)
        rows.append(HeadlineRow(figure, model, x_name, len(comps), hardest, mv, mvx, mg, mgx))
    return rows, notes


def _fig12_extras(data: Dataset) -> list[str]:
    out = []
    for model in data.models():
        pts = data.select(model=model)
        variant, _ = choose_variant(pts, data.fig_dir)
        parts = []
        key = "mean_generated_tokens_per_step"
        for system in ("adaserve", "vllm_spec_4", "vllm_spec_6", "vllm_spec_8"):
            sp = sorted((p for p in pts if p.system == system and p.variant == variant
                         and not math.isnan(p.metric(key))), key=lambda p: p.x)
            if sp:
                lo, hi = sp[0], sp[-1]
                parts.append(f"{label_of(system)} {lo.metric(key):.2f} @{_x(lo.x)} -> "
                             f"{hi.metric(key):.2f} @{_x(hi.x)}")
        if parts:
            out.append(f"figure 12  {model:<6} tokens/step (lowest -> highest rps): "
                       + ", ".join(parts))
    return out


def _fig15_extras(data: Dataset) -> list[str]:
    out = []
    for model in data.models():
        chosen, _ = single_points(data, model)
        p = chosen.get("adaserve")
        s = None if p is None else overhead_shares(p.summary)
        if s is None:
            continue
        oh = p.summary["overhead"]
        total = oh.get("total_us") or sum(oh["us"].values())
        sched_of_all = oh["us"].get("scheduling", 0.0) / total if total else math.nan
        out.append(f"figure 15  {model:<6} speculation {100 * s['speculation']:.1f}%, "
                   f"verification {100 * s['verification']:.1f}%, scheduling "
                   f"{100 * s['scheduling']:.2f}% (of the three); scheduling = "
                   f"{100 * sched_of_all:.2f}% of all measured time")
    return out


def headline(results_dir: str | Path = "results",
             figures: str | Sequence[str] | None = None,
             datasets: dict[str, Dataset] | None = None) -> Headline:
    """The headline table as data. ``figures`` as for ``adaserve plot --figures`` (8 or 9 both
    select the Figure 8/9 rows)."""
    ids = parse_figures(figures)
    datasets = {} if datasets is None else datasets

    def data(fig_dir: str) -> Dataset:
        if fig_dir not in datasets:
            datasets[fig_dir] = load_dataset(results_dir, fig_dir)
        return datasets[fig_dir]

    rows: list[HeadlineRow] = []
    notes: list[str] = []
    for figure, (fig_dir, _, _) in COMPARED.items():
        if not set(figure.split(",")) & set(ids):
            continue
        r, n = figure_rows(figure, data(fig_dir))
        rows.extend(r)
        notes.extend(n)
    extras: list[str] = []
    if "12" in ids:
        extras += _fig12_extras(data(FIG_DIRS["12"]))
    if "15" in ids:
        extras += _fig15_extras(data(FIG_DIRS["15"]))
    rows.sort(key=lambda r: (list(COMPARED).index(r.figure), model_sort_key(r.model)))
    return Headline(rows, extras, notes)


# ---------------------------------------------------------------------------------- printing

def fmt_ratio(v: float | None) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "inf"
    return f"{v:.2f}x"


def _pct(v: float) -> str:
    return "-" if math.isnan(v) else f"{100 * v:.1f}%"


def _tok(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.0f}"


def _x(v: float | None) -> str:
    """1 -> "1.0", 0.25 -> "0.25" (sweep values as the point names write them)."""
    if v is None:
        return ""
    text = f"{v:.6g}"
    return text + ".0" if text.lstrip("-").isdigit() else text


HEADER = ("figure", "model", "hardest point", "AdaServe att", "joint", "goodput", "TTFT p50/p90",
          "best baseline", "att", "joint", "goodput", "TTFT p50/p90", "viol. ratio", "goodput ratio",
          "max viol. ratio", "max goodput ratio")


def _ttft(v: tuple[float, float]) -> str:
    return "-" if any(math.isnan(x) for x in v) else f"{v[0]:.1f}/{v[1]:.1f}s"


def _at(v: float | None, x: float | None) -> str:
    return fmt_ratio(v) if x is None or v is None else f"{fmt_ratio(v)} @{_x(x)}"


def table_cells(h: Headline) -> list[tuple[str, ...]]:
    """The table's rows as strings (goodput in tokens/s, TTFT p50/p90 in s)."""
    rows = []
    for r in h.rows:
        c = r.hardest
        where = "single point" if r.x_name is None else f"{r.x_name} {_x(c.x)}"
        rows.append((r.figure, r.model, where, _pct(c.adaserve_attainment), _pct(c.adaserve_joint),
                     _tok(c.adaserve_goodput), _ttft(c.adaserve_ttft_s), label_of(c.baseline),
                     _pct(c.baseline_attainment), _pct(c.baseline_joint), _tok(c.baseline_goodput),
                     _ttft(c.baseline_ttft_s), fmt_ratio(c.violation_ratio),
                     fmt_ratio(c.goodput_ratio),
                     _at(r.max_violation_ratio, r.max_violation_ratio_x),
                     _at(r.max_goodput_ratio, r.max_goodput_ratio_x)))
    return rows


def format_headline(h: Headline) -> str:
    """The table as text: one line per figure and model, then the Figure 12 / 15 lines."""
    if not h.rows and not h.extras:
        return "headline table: no figure has both AdaServe and baseline results yet"
    lines: list[str] = []
    if h.rows:
        lines += ["Headline: AdaServe vs the best baseline (the baseline with the highest SLO "
                  "attainment at each point);",
                  "violation ratio = baseline violations / AdaServe's, goodput ratio = AdaServe "
                  "/ baseline (tokens/s); 'max' = over the sweep, @ where."]
        cells = [HEADER] + table_cells(h)
        widths = [max(len(row[i]) for row in cells) for i in range(len(HEADER))]
        left = {0, 1, 2, 7}
        fmt = lambda row: "  ".join(v.ljust(w) if i in left else v.rjust(w)  # noqa: E731
                                    for i, (v, w) in enumerate(zip(row, widths))).rstrip()
        lines += [fmt(cells[0]), "-" * len(fmt(cells[0]))] + [fmt(row) for row in cells[1:]]
    if h.extras:
        lines += [""] * bool(lines) + h.extras
    return "\n".join(lines)


def print_headline(results_dir: str | Path = "results", figures: str | Sequence[str] | None = None,
                   *, echo: Callable[[str], None] = print,
                   datasets: dict[str, Dataset] | None = None) -> Headline:
    """Compute, print and return the headline table."""
    h = headline(results_dir, figures, datasets)
    echo(format_headline(h))
    return h


__all__ = ["Comparison", "Headline", "HeadlineRow", "compare", "figure_rows", "format_headline",
           "headline", "print_headline", "violation_ratio", "goodput_ratio", "violations"]
