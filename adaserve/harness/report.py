"""Figures and the headline table from a results folder: what ``adaserve plot`` and the end of
``adaserve reproduce`` do."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from adaserve.core.errors import UserError
from adaserve.core.files import atomic_write_text


def draw_and_report(results: str | Path, out: str | Path, figures: str = "all", *,
                    draw: bool = True, table: bool = True, json_path: str | Path | None = None,
                    quiet: bool = False) -> None:
    """Draw the figures into ``out`` and print the headline table (and write it as JSON)."""
    from adaserve.harness.headline import print_headline
    from adaserve.harness.plot import parse_figures, plot_all

    chosen = parse_figures(figures)
    if not Path(results).is_dir():
        raise UserError(f"results directory '{results}' does not exist (run the "
                        "experiments first, e.g. `make reproduce`, or pass --results DIR)")
    datasets: dict = {}
    if draw:
        drawn = plot_all(results, out, chosen, verbose=not quiet, datasets=datasets)
        if all(d.empty for d in drawn.values()):
            print(f"no figure drawn: no complete results under '{results}'")
    if not table:
        return
    if draw:
        print()
    h = print_headline(results, chosen, datasets=datasets)
    if json_path:
        atomic_write_text(json_path, json.dumps(json_safe(h.as_dict()), indent=1) + "\n")


def json_safe(obj: Any) -> Any:
    """Strict JSON: infinite ratios become the string "inf", NaN becomes null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, float) and math.isinf(obj):
        return "inf" if obj > 0 else "-inf"
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
