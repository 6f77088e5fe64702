"""``adaserve profile`` (measure a latency profile on this hardware) and ``adaserve run`` (replay a
trace in real time on the torch engine and write SPEC §7 results)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from adaserve.scheduling.policies import SYSTEMS


# Kept here rather than imported from adaserve.engine, which imports torch: building the parser
# must stay cheap for every other command. engine.builder validates the same names.
DRAFTERS = ("ngram", "model")
MODEL_HELP = ("built-in: smollm2-135m; random tiny models for tests: tiny-llama, tiny-qwen2; "
              "or a local Hugging Face folder, a .gguf file or a hub id")


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=f"target model ({MODEL_HELP})")
    p.add_argument("--draft", help="draft model for --drafter model (same vocabulary as the target)")
    p.add_argument("--drafter", choices=DRAFTERS,
                   help="candidate-tree drafter (default: model with --draft, else ngram)")
    p.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def _limit_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("limits (default: 16 requests, 256 tokens, chunk 256 on CPU; 64/1024/1024 on CUDA)")
    g.add_argument("--max-batch-requests", type=int)
    g.add_argument("--max-batch-tokens", type=int)
    g.add_argument("--prefill-chunk", type=int)
    g.add_argument("--max-seq-len", type=int, default=2048)
    g.add_argument("--kv-memory-gb", type=float, help="cap the KV pool (target + draft) at this size")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure verification / draft / prefill latency of a model on this "
                       "hardware and write a latency profile JSON")
    _engine_args(p)
    _limit_args(p)
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--name", help="profile name (default: the model name)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per point (median)")
    p.add_argument("--quick", action="store_true", help="fewer points")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_profile)

    r = sub.add_parser("run", help="replay a trace in real time on the torch engine (SPEC §7 results)")
    r.add_argument("--trace", required=True, help="emission JSON trace")
    r.add_argument("--system", required=True, help=f"one of: {', '.join(SYSTEMS)}")
    _engine_args(r)
    r.add_argument("--profile", help="latency profile JSON from `adaserve profile` (default: measure a quick "
                   "one first); its limits apply")
    r.add_argument("--out", required=True, help="result path prefix: writes PREFIX.txt and PREFIX.json")
    r.add_argument("--baseline-ms", type=float, help="baseline decode latency for relative SLOs "
                   "(default: the profile's measured one)")
    r.add_argument("--scale-slos", action="store_true",
                   help="scale absolute SLOs by baseline_ms / 30 (hardware-scaled SLOs, SPEC §2)")
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
    _limit_args(r)
    r.set_defaults(func=_run)


def _spec(args: argparse.Namespace):
    from adaserve.engine.builder import EngineSpec

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    return EngineSpec(args.model, args.draft, args.drafter, args.dtype, args.device, args.threads)


def _limits(args: argparse.Namespace):
    from adaserve.engine.run import default_limits

    limits = default_limits(args.device)
    for name in ("max_batch_requests", "max_batch_tokens", "prefill_chunk", "max_seq_len"):
        v = getattr(args, name)
        if v is not None:
            if v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
            limits = replace(limits, **{name: v})
    return limits


def _profile(args: argparse.Namespace) -> int:
    from adaserve.engine.builder import load_pair
    from adaserve.engine.profiler import Grid, measure_profile
    from adaserve.engine.run import kv_bytes_per_token, with_kv_capacity

    spec = _spec(args)
    kind = spec.drafter_kind()
    if args.repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {args.repeat}")
    model, _, draft = load_pair(spec)
    limits = with_kv_capacity(_limits(args), args.kv_memory_gb, kv_bytes_per_token(model, draft))
    grid = Grid.for_limits(limits, repeat=args.repeat, quick=args.quick)
    profile = measure_profile(args.name or args.model, model, limits, grid, draft if kind == "model" else None,
                              progress=not args.no_progress)
    profile.save(args.out)
    print(json.dumps({"out": args.out, "name": profile.name, "hardware": profile.hardware,
                      "baseline_ms": profile.baseline_ms, "drafter": kind,
                      "verify_ms_at_1_8_64": [round(float(profile.verify_ms(t)), 2) for t in (1, 8, 64)],
                      "kv_capacity_tokens": profile.limits.kv_capacity_tokens}))
    return 0


def _run(args: argparse.Namespace) -> int:
    from adaserve.engine.run import RunConfig, run_engine, write

    cfg = RunConfig(trace=args.trace, system=args.system, engine=_spec(args), profile=args.profile,
                    baseline_ms=args.baseline_ms, max_requests=args.max_requests,
                    output_len_cap=args.output_len_cap, time_scale=args.time_scale, scale_slos=args.scale_slos,
                    temperature=args.temperature, seed=args.seed, ignore_eos=args.ignore_eos,
                    chat_template=args.chat_template, record_acceptance=args.record_acceptance,
                    progress=not args.no_progress, limits=_limits(args))
    if cfg.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {cfg.temperature}")
    if args.profile and any(getattr(args, k) is not None for k in
                            ("max_batch_requests", "max_batch_tokens", "prefill_chunk", "kv_memory_gb")):
        print("adaserve: note: limits come from the profile file; the limit options are ignored", file=sys.stderr)
    result = run_engine(cfg)
    write(result, args.out)
    s = result.summary
    keys = ("slo_attainment", "goodput", "mean_generated_tokens_per_step", "throughput_tokens_per_sec")
    line = {k: s.get(k) for k in keys}
    line.update(system=args.system, requests=len(result.requests), iterations=result.meta["iterations"],
                wall_s=result.meta["wall_s"], out=args.out)
    print(json.dumps(line))
    return 0
