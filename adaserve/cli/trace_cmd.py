"""``adaserve trace``: work with workload trace files (format: docs/definitions.md, section 6).
``adaserve trace inspect FILE [--json]`` validates a trace and prints its statistics.
``adaserve trace generate --kind KIND ... --out FILE`` writes a deterministic synthetic trace."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from adaserve.core.trace import load_trace, save_trace, trace_stats
from adaserve.workload.generate import (ARRIVALS, DEFAULT_DURATION_S, KINDS, TraceSpec,
                                        generate_from_spec)
from adaserve.workload.prompts import load_pool


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="inspect (and generate) workload traces",
                       description="Validate a trace and print its statistics (inspect), or write "
                                   "a deterministic synthetic one (generate). The trace format is "
                                   "in docs/definitions.md, section 6.")
    trace_sub = p.add_subparsers(dest="trace_command", required=True, metavar="ACTION")
    add_inspect(trace_sub)
    add_generate(trace_sub)


def add_inspect(trace_sub: argparse._SubParsersAction) -> None:
    p = trace_sub.add_parser("inspect", help="validate a trace file and print its statistics")
    p.add_argument("file", help="trace JSON file (artifact emission format)")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    stats = trace_stats(load_trace(args.file, keep_prompts=False))  # lengths and times only
    if args.json:
        print(json.dumps({"file": args.file, **stats}, indent=2))
    else:
        print(format_stats(stats, args.file))
    return 0


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _lengths(s: dict[str, Any]) -> str:
    return " / ".join(_fmt(s[k], 1 if k == "mean" else 0) for k in ("mean", "p50", "p90", "max"))


def format_stats(stats: dict[str, Any], name: str = "") -> str:
    """A readable table: one row per category plus an ``all`` row."""
    cv = _fmt(stats["interarrival_cv"], 3)
    lines = [f"trace      {name}",
             f"requests   {stats['requests']} over {stats['duration_s']:.1f} s: "
             f"{_fmt(stats['rps'], 3)} req/s, inter-arrival CV {cv} (Poisson = 1)", ""]
    head = (f"{'category':<16}{'count':>6}{'share':>8}{'req/s':>8}  {'slo_ratio':<12}"
            f"{'input len mean/p50/p90/max':<30}{'output len mean/p50/p90/max'}")
    lines += [head, "-" * len(head)]
    for cat, c in stats["categories"].items():
        ratios = ",".join(f"{r:g}" for r in c["slo_ratios"])
        lines.append(f"{cat:<16}{c['count']:>6}{c['share']:>8.1%}{_fmt(c['rps'], 3):>8}  "
                     f"{ratios:<12}{_lengths(c['input_length']):<30}{_lengths(c['output_length'])}")
    lines.append(f"{'all':<16}{stats['requests']:>6}{1:>8.1%}{_fmt(stats['rps'], 3):>8}  {'':<12}"
                 f"{_lengths(stats['input_length']):<30}{_lengths(stats['output_length'])}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ generate

GENERATE_EPILOG = """kinds (defaults in brackets):
  rps       Fig. 8/9/12: bursty arrivals, 60/20/20 coding/chat/summarization [--rps required, 256]
  prop      Fig. 10: coding share --prop, the rest split evenly [RPS 4.0, 256]
  slo       Fig. 11: coding SLO ratio 1.2 * --slo-scale [RPS 4.0, 256]
  fluc      Fig. 14: bell-shaped per-category bumps peaking at --rps req/s at 1/4, 1/2, 3/4 of
            the trace for chat, coding, summarization [peak 4.0, 256]
  overhead  Fig. 15: 60/20/20 [RPS 3.6, 128]
fixed-count kinds have round(RPS * duration) requests rounded to the nearest 100, as the
artifact's traces (use --exact-count for the plain rounding)."""


def add_generate(trace_sub: argparse._SubParsersAction) -> None:
    p = trace_sub.add_parser("generate", help="write a deterministic synthetic trace",
                             epilog=GENERATE_EPILOG,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", required=True, choices=KINDS, help="which experiment's trace")
    p.add_argument("--rps", type=float,
                   help="average requests per second (fluc: the peak of each category)")
    p.add_argument("--prop", type=float, help="coding (urgent) share in (0, 1), --kind prop only")
    p.add_argument("--slo-scale", type=float, help="coding SLO multiplier, --kind slo only")
    p.add_argument("--output-len", type=int, help="output tokens per request (max new tokens)")
    p.add_argument("--duration-s", type=float, default=DEFAULT_DURATION_S,
                   help="trace length in seconds (default %(default)g)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    p.add_argument("--pool", default="offline",
                   help="prompts: offline (ShareGPT + MT-Bench wheels), trace:PATH, or hf "
                        "(HumanEval/Alpaca/CNN-DailyMail; needs the hub), or synthetic-text (a built-in word list, no "
                        "package; not natural language) (default %(default)s)")
    p.add_argument("--arrival", choices=ARRIVALS,
                   help="arrival process of fixed-count kinds (default bursty, artifact-like)")
    p.add_argument("--cv", type=float, help="inter-arrival CV for --arrival gamma (default 1.2)")
    p.add_argument("--exact-count", action="store_true",
                   help="round RPS * duration to the nearest request, not the nearest 100")
    p.add_argument("--out", required=True, help="trace file to write (JSON, artifact format)")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    spec = TraceSpec(args.kind, args.rps, args.prop, args.slo_scale, args.output_len,
                     args.duration_s, args.seed, args.arrival, args.cv, not args.exact_count)
    spec.resolved()  # validate the flags before loading any prompts
    pool = load_pool(args.pool)
    for note in pool.notes:
        print(f"adaserve: note: {note}", file=sys.stderr)
    records = generate_from_spec(spec, pool)
    save_trace(args.out, records)
    stats = trace_stats(records)
    mix = ", ".join(f"{k} {c['count']}" for k, c in stats["categories"].items())
    print(f"wrote {args.out}: {len(records)} requests ({mix}) over {stats['duration_s']:.1f} s, "
          f"inter-arrival CV {_fmt(stats['interarrival_cv'], 3)}; prompts from {pool.source}")
    return 0
