"""``adaserve plot``: draw Figures 8–15 from ``results/`` and print the headline table."""

from __future__ import annotations

import argparse
import json

from adaserve.harness.plot import FIGURES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw the paper's Figures 8-15 (PNG + PDF) from results/ "
                       "and print the headline table")
    p.add_argument("--results", default="results", help="results directory (default: results)")
    p.add_argument("--out", default="plots", help="output directory (default: plots)")
    p.add_argument("--figures", default="all",
                   help=f"comma-separated figures among {','.join(FIGURES)} (default: all)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--table-only", action="store_true",
                   help="print the headline table without drawing")
    g.add_argument("--no-table", action="store_true", help="draw without the headline table")
    p.add_argument("--json", metavar="FILE",
                   help="also write the headline table as JSON to FILE")
    p.add_argument("--quiet", action="store_true", help="do not print notes on skipped points")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    draw_and_report(args.results, args.out, args.figures, draw=not args.table_only,
                    table=not args.no_table, json_path=args.json, quiet=args.quiet)
    return 0


def draw_and_report(results: str, out: str, figures: str = "all", *, draw: bool = True,
                    table: bool = True, json_path: str | None = None, quiet: bool = False) -> None:
    """Draw the figures and print the headline table (``adaserve plot`` and ``reproduce``)."""
    from pathlib import Path

    from adaserve.harness.headline import print_headline
    from adaserve.harness.plot import parse_figures, plot_all

    chosen = parse_figures(figures)
    if not Path(results).is_dir():
        raise ValueError(f"results directory '{results}' does not exist (run the "
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
        Path(json_path).write_text(json.dumps(_json_safe(h.as_dict()), indent=1) + "\n",
                                   encoding="utf-8")


def _json_safe(obj):
    """Strict JSON: infinite ratios become the string "inf", NaN becomes null."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, float) and obj in (float("inf"), float("-inf")):
        return "inf" if obj > 0 else "-inf"
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
