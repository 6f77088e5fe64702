"""``adaserve profile`` (measure a latency profile on this hardware) and ``adaserve run`` (replay a
trace in real time on the torch engine and write result files). Both take the engine options of
``adaserve.config.EngineConfig``."""

from __future__ import annotations

import argparse
import json
import sys

from adaserve.config import EngineConfig
from adaserve.core.errors import UserError
from adaserve.scheduling.policies import SYSTEMS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure verification / draft / prefill latency of a model on this "
                       "hardware and write a latency profile JSON")
    EngineConfig.add_arguments(p, exclude=("profile",))
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--name", help="profile name (default: the model name)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per point (median)")
    p.add_argument("--passes", type=int, default=1,
                   help="measure the whole grid this many times and keep each point's median over the passes "
                        "(steadier on a shared machine; each pass takes as long as one profile)")
    p.add_argument("--quick", action="store_true", help="fewer points")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_profile)

    r = sub.add_parser("run", help="replay a trace in real time on the torch engine (result files as in "
                       "docs/definitions.md)")
    r.add_argument("--trace", required=True, help="emission JSON trace")
    r.add_argument("--system", required=True, help=f"one of: {', '.join(SYSTEMS)}")
    EngineConfig.add_arguments(r)
    r.add_argument("--out", required=True, help="result path prefix: writes PREFIX.txt and PREFIX.json")
    r.add_argument("--baseline-ms", type=float, help="baseline decode latency for relative SLOs "
                   "(default: the profile's measured one)")
    r.add_argument("--scale-slos", action="store_true",
                   help="scale absolute SLOs by baseline_ms / 30 (hardware-scaled SLOs, docs/definitions.md)")
    r.add_argument("--max-requests", type=int, help="serve only the first N requests of the trace")
    r.add_argument("--output-len-cap", type=int, help="cap every request's output length")
    r.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply arrival times (e.g. 4 = a 4x slower arrival rate, for CPU speed)")
    r.add_argument("--ignore-eos", action="store_true", help="always generate the trace's output length")
    r.add_argument("--chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    r.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (lossless); > 0 = sampling with stochastic tree verification")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--record-acceptance", metavar="PATH",
                   help="write per-position draft acceptance records (JSONL) for the simulator")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=_run)


def _say(msg: str) -> None:
    print(f"adaserve: {msg}", file=sys.stderr)


def _profile(args: argparse.Namespace) -> int:
    from adaserve.runtime.build import load_models, sized_limits
    from adaserve.runtime.profiler import Grid, measure_profile

    cfg = EngineConfig.from_args(args)
    if args.repeat < 1:
        raise UserError(f"--repeat must be >= 1, got {args.repeat}")
    kind = cfg.drafter_kind()
    model, _, draft = load_models(cfg, say=_say)
    limits = sized_limits(cfg, cfg.default_limits(), model, draft)
    grid = Grid.for_limits(limits, repeat=args.repeat, quick=args.quick)
    profile = measure_profile(args.name or args.model, model, limits, grid, draft if kind == "model" else None,
                              progress=not args.no_progress, cuda_graphs=cfg.use_cuda_graphs,
                              passes=args.passes)
    profile.save(args.out)
    print(json.dumps({"out": args.out, "name": profile.name, "hardware": profile.hardware,
                      "baseline_ms": profile.baseline_ms, "drafter": kind, "measured_with": profile.measured_with,
                      "verify_ms_at_1_8_64": [round(float(profile.verify_ms(t)), 2) for t in (1, 8, 64)],
                      "kv_capacity_tokens": profile.limits.kv_capacity_tokens}))
    return 0


def _run(args: argparse.Namespace) -> int:
    from adaserve.runtime.replay import RunConfig, run_engine, write

    cfg = RunConfig(trace=args.trace, system=args.system, engine=EngineConfig.from_args(args),
                    baseline_ms=args.baseline_ms, max_requests=args.max_requests,
                    output_len_cap=args.output_len_cap, time_scale=args.time_scale, scale_slos=args.scale_slos,
                    temperature=args.temperature, seed=args.seed, ignore_eos=args.ignore_eos,
                    chat_template=args.chat_template, record_acceptance=args.record_acceptance,
                    progress=not args.no_progress)
    result = run_engine(cfg, say=_say)
    write(result, args.out)
    s = result.summary
    keys = ("slo_attainment", "goodput", "mean_generated_tokens_per_step", "throughput_tokens_per_sec")
    line = {k: s.get(k) for k in keys}
    line.update(system=args.system, requests=len(result.requests), iterations=result.meta["iterations"],
                wall_s=result.meta["wall_s"], out=args.out)
    print(json.dumps(line))
    return 0
