"""The one registry of the paper's figures and of the experiments (sweeps) that produce them.

Two spellings, each used for one thing:

- a **figure id** is the paper's figure number as a string: ``"8"``, ``"9"``, ``"10"``, ``"11"``,
  ``"12"``, ``"14"``, ``"15"`` (plots are ``plots/fig<ID>.png``);
- an **experiment** is one sweep, named by its folder as the original artifact names it:
  ``fig8,9`` (Figures 8, 9 and 12), ``fig10``, ``fig11``, ``fig14``, ``fig15``. The folder is the
  ``exps/<folder>/`` scripts' folder and the ``results/<folder>/`` results folder.

Users may write a figure as ``8``, ``fig8`` or ``figure 8`` and a list as ``8,9,15`` or
``fig8,9,fig15``; ``parse_figures`` turns any of these into figure ids, ``experiment_of`` and
``experiments_for`` into experiments. Everything else (the sweep variables, the plot axes, the
headline table's rows) reads this module, so a new figure is one entry here plus its drawing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from adaserve.core.errors import UserError


@dataclass(frozen=True)
class Experiment:
    """One sweep: which trace kind it generates, which variable it sweeps, what it draws."""
    folder: str                         # results/<folder>/, exps/<folder>/
    kind: str                           # trace kind of ``workload.generate``
    figures: tuple[str, ...]            # figure ids drawn from its results
    output_len: int = 256               # default OUTPUT_LENGTH
    x_name: str | None = None           # the swept value's name in ``meta.sweep.x_name``
    x_token: str | None = None          # its token in point names (``rps`` in ``rps4.8_ol256``)
    env: tuple[str, str, str] | None = None   # its MIN, MAX, STEP variables
    defaults: Mapping[str, tuple[float, float, float]] = field(default_factory=dict)  # per model
    bounds: tuple[float, float] = (0.0, math.inf)  # open interval of valid x values
    x_label: str = ""                   # plot axis label
    x_scale: float = 1.0                # plot x = x * x_scale (shares drawn in %)
    reverse_x: bool = False             # plot tighter settings to the right
    compared: tuple[str, ...] = ()      # figures of its headline-table row (attainment compared)
    headline_x: str | None = None       # how the headline table names x
    hardest: str | None = None          # "max" / "min": which x is the hardest point
    preferred_point: str | None = None  # single-point experiments: the point to draw

    def point_name(self, x: float | None, output_len: int) -> str:
        """The artifact's name of a point: ``rps4.8_ol256``, ``prop0.2_rps4.0``, ``fluc``..."""
        if self.kind == "rps":
            return f"rps{x:.1f}_ol{output_len}"
        if self.kind == "prop":
            return f"prop{x:.1f}_rps4.0"
        if self.kind == "slo":
            return f"slo{x:.1f}_ol{output_len}"
        if self.kind == "fluc":
            return "fluc"
        return f"rps3.6_ol{output_len}"

    def artifact_trace_names(self, x: float | None, output_len: int) -> tuple[str, ...]:
        """File names the artifact's trace of a point may have: ours (``emission_<point>.json``)
        and, for fig10 and fig14, the artifact's own (``emission_rps4.0_prop0.2.json``,
        ``emission_fluc_6m_peak4.0.json``), which differ from their results' point names."""
        ours = f"emission_{self.point_name(x, output_len)}.json"
        if self.kind == "prop":
            return ours, f"emission_rps4.0_prop{x:.1f}.json"
        if self.kind == "fluc":
            return ours, "emission_fluc_6m_peak4.0.json"
        return (ours,)

    @property
    def row_label(self) -> str:
        """Its row in the headline table: ``"8,9"``, ``"10"``..."""
        return ",".join(self.compared)

    def hardest_of(self) -> Callable | None:
        return {"max": max, "min": min, None: None}[self.hardest]


EXPERIMENTS: dict[str, Experiment] = {e.folder: e for e in (
    Experiment("fig8,9", "rps", ("8", "9", "12"), x_name="rps", x_token="rps",
               env=("RPS_MIN", "RPS_MAX", "RPS_STEP"),
               defaults={"llama": (2.6, 4.8, 0.2), "qwen": (2.4, 4.2, 0.2)},
               x_label="RPS (requests/s)", compared=("8", "9"), headline_x="rps", hardest="max"),
    Experiment("fig10", "prop", ("10",), x_name="prop", x_token="prop",
               env=("PROP_MIN", "PROP_MAX", "PROP_STEP"),
               defaults={"llama": (0.1, 0.9, 0.1), "qwen": (0.1, 0.9, 0.1)}, bounds=(0.0, 1.0),
               x_label="Urgent Requests (%)", x_scale=100.0, compared=("10",),
               headline_x="urgent share", hardest="max"),
    Experiment("fig11", "slo", ("11",), x_name="slo_scale", x_token="slo",
               env=("SLO_SCALE_MIN", "SLO_SCALE_MAX", "SLO_SCALE_STEP"),
               defaults={"llama": (0.6, 1.6, 0.2), "qwen": (0.6, 1.6, 0.2)},
               x_label="SLO Scale", reverse_x=True, compared=("11",), headline_x="SLO scale",
               hardest="min"),
    Experiment("fig14", "fluc", ("14",), compared=("14",), preferred_point="fluc"),
    Experiment("fig15", "overhead", ("15",), output_len=128, preferred_point="rps3.6_ol128"),
)}

#: figure id -> the experiment whose results it draws
EXPERIMENT_OF_FIGURE: dict[str, Experiment] = {f: e for e in EXPERIMENTS.values() for f in e.figures}
#: every figure id, in the paper's order
FIGURE_IDS: tuple[str, ...] = tuple(sorted(EXPERIMENT_OF_FIGURE, key=int))


def parse_figures(spec: str | Sequence[str] | None) -> list[str]:
    """``"8,9,15"``, ``"fig8,9,fig15"``, ``"figure 8"``, ``"all"`` or None → figure ids in the
    paper's order."""
    if spec is None:
        return list(FIGURE_IDS)
    items = spec.split(",") if isinstance(spec, str) else [str(s) for s in spec]
    out: list[str] = []
    for raw in items:
        item = raw.strip().lower()
        if not item:
            continue
        if item == "all":
            return list(FIGURE_IDS)
        item = item.removeprefix("figure").removeprefix("fig").strip()
        if item not in EXPERIMENT_OF_FIGURE:
            raise UserError(f"unknown figure {raw.strip()!r}; valid figures: "
                            f"{', '.join(FIGURE_IDS)} (or 'all')")
        if item not in out:
            out.append(item)
    if not out:
        raise UserError("no figure given; valid figures: " + ", ".join(FIGURE_IDS))
    return sorted(out, key=FIGURE_IDS.index)


def experiments_for(spec: str | Sequence[str] | None) -> list[Experiment]:
    """The experiments that produce the given figures, in registry order."""
    wanted = {EXPERIMENT_OF_FIGURE[f].folder for f in parse_figures(spec)}
    return [e for e in EXPERIMENTS.values() if e.folder in wanted]


def experiment_of(spec: str) -> Experiment:
    """One experiment from its folder (``fig8,9``) or the figures it draws (``8``, ``fig12``)."""
    if spec in EXPERIMENTS:
        return EXPERIMENTS[spec]
    found = experiments_for(spec)
    if len(found) != 1:
        raise UserError(f"{spec!r} names {len(found)} experiments; give one of "
                        f"{', '.join(EXPERIMENTS)}")
    return found[0]
