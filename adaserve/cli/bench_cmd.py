"""``adaserve bench scheduler``: benchmarks that print JSON lines."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (print JSON lines)")
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    s = bsub.add_parser("scheduler", help="time AdaServe's per-iteration decision on random trees")
    s.add_argument("--requests", type=int, default=96)
    s.add_argument("--depth", type=int, default=8)
    s.add_argument("--width", type=int, default=3)
    s.add_argument("--iterations", type=int, default=300)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_scheduler)


def _scheduler(args: argparse.Namespace) -> int:
    from adaserve.bench.scheduler import bench_scheduler

    for name in ("requests", "depth", "width", "iterations"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    print(json.dumps(bench_scheduler(args.requests, args.depth, args.width, args.iterations,
                                     args.seed)))
    return 0
