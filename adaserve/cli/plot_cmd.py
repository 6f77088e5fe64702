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
    from pathlib import Path

    from adaserve.harness.headline import print_headline
    from adaserve.harness.plot import parse_figures, plot_all

    figures = parse_figures(args.figures)
    if not Path(args.results).is_dir():
        raise ValueError(f"results directory '{args.results}' does not exist (run the "
                         "experiments first, e.g. `make reproduce`, or pass --results DIR)")
    datasets: dict = {}
    if not args.table_only:
        drawn = plot_all(args.results, args.out, figures, verbose=not args.quiet,
                         datasets=datasets)
        if all(d.empty for d in drawn.values()):
            print(f"no figure drawn: no complete results under '{args.results}'")
    if args.no_table:
        return 0
    if not args.table_only:
        print()
    h = print_headline(args.results, figures, datasets=datasets)
    if args.json:
        Path(args.json).write_text(json.dumps(_json_safe(h.as_dict()), indent=1) + "\n",
                                   encoding="utf-8")
    return 0


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
