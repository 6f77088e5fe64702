"""``adaserve plot``: draw Figures 8–15 from ``results/`` and print the headline table."""

from __future__ import annotations

import argparse

from adaserve.harness.figures import FIGURE_IDS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw the paper's Figures 8-15 (PNG + PDF) from results/ "
                       "and print the headline table")
    p.add_argument("--results", default="results", help="results directory (default: results)")
    p.add_argument("--out", default="plots", help="output directory (default: plots)")
    p.add_argument("--figures", default="all",
                   help=f"comma-separated figures among {','.join(FIGURE_IDS)} (default: all)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--table-only", action="store_true",
                   help="print the headline table without drawing")
    g.add_argument("--no-table", action="store_true", help="draw without the headline table")
    p.add_argument("--json", metavar="FILE",
                   help="also write the headline table as JSON to FILE")
    p.add_argument("--quiet", action="store_true", help="do not print notes on skipped points")
    p.add_argument("--claims", action="store_true",
                   help="only print every claim of the paper's evaluation text beside ours (no drawing; "
                        "docs/fidelity.md)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from adaserve.core.errors import UserError
    from adaserve.harness.report import draw_and_report

    if args.claims:
        from adaserve.harness.claims import table

        if not Path(args.results).is_dir():
            raise UserError(f"--results {args.results}: no such results directory")
        print(table(args.results))
        return 0

    draw_and_report(args.results, args.out, args.figures, draw=not args.table_only,
                    table=not args.no_table, json_path=args.json, quiet=args.quiet)
    return 0
