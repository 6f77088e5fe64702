"""``adaserve simulate``: replay a trace on the simulator and write result files
(docs/definitions.md, section 7)."""

from __future__ import annotations

import argparse
import json
import math

from adaserve.core.errors import UserError
from adaserve.scheduling.policies import SYSTEMS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="replay a trace through a policy on the simulator")
    p.add_argument("--trace", required=True, help="emission JSON trace")
    p.add_argument("--system", required=True, help=f"one of: {', '.join(SYSTEMS)}")
    p.add_argument("--profile", default="llama-3.1-70b",
                   help="built-in profile name (see `adaserve profiles`) or a profile JSON file")
    p.add_argument("--out", help="result path prefix: writes PREFIX.txt and PREFIX.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline-ms", type=float, help="baseline decode latency for relative SLOs "
                   "(default: the profile's)")
    p.add_argument("--scale-slos", action="store_true",
                   help="scale absolute SLOs by baseline_ms / 30 (hardware-scaled SLOs, docs/definitions.md)")
    p.add_argument("--acceptance", metavar="FILE",
                   help="replay acceptance recorded by `adaserve run --record-acceptance` (JSONL) "
                        "instead of the calibrated synthetic model; when the trace's requests are the "
                        "recording's own and it holds their token ids from the n-gram drafter, the "
                        "simulator runs that drafter over them (exact replay, docs/simulator.md)")
    p.add_argument("--prefill-mode", choices=("eager", "buffer", "slack"),
                   help="AdaServe's prefill mixing (default eager; see docs/scheduler.md)")
    p.add_argument("--pricing", choices=("per-engine", "shared"), default="per-engine",
                   help="per-engine (default): each system on the engine the paper ran it on "
                        "(vLLM baselines on a vLLM roofline, docs/simulator.md); shared: every "
                        "system on the named profile")
    p.add_argument("--fix-input-length", action="store_true",
                   help="give records whose input_length is more than 2x away from their prompt's "
                        "token count that token count (a warning names them either way)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from adaserve.sim.run import simulate_file

    if args.system not in SYSTEMS:
        raise UserError(f"unknown system {args.system!r}; valid systems: {', '.join(SYSTEMS)}")
    if args.baseline_ms is not None and not (math.isfinite(args.baseline_ms) and args.baseline_ms > 0):
        raise UserError(f"--baseline-ms must be a positive number, got {args.baseline_ms}")
    result = simulate_file(args.trace, args.system, args.profile, args.out, seed=args.seed,
                           baseline_ms=args.baseline_ms, scale_slos=args.scale_slos,
                           progress=not args.no_progress, acceptance=args.acceptance,
                           fix_input_lengths=args.fix_input_length, pricing=args.pricing,
                           policy_options={"prefill_mode": args.prefill_mode} if args.prefill_mode else None)
    s = result.summary
    keys = ("slo_attainment", "goodput", "mean_generated_tokens_per_step", "throughput_tokens_per_sec")
    line = {k: s.get(k) for k in keys}
    line.update(system=args.system, requests=result.registered, iterations=result.iterations,
                wall_s=round(result.wall_s, 3),
                simulated_requests_per_s=round(result.registered / max(result.wall_s, 1e-9), 1))
    if args.out:
        line["out"] = args.out
    print(json.dumps(line))
    return 0
