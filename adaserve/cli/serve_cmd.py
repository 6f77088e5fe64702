"""``adaserve serve``: the OpenAI-compatible server with per-request SLOs (docs/server.md)."""

from __future__ import annotations

import argparse
import logging


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with per-request TPOT SLOs")
    p.add_argument("--model", required=True,
                   help="smollm2-135m (built in), a Hugging Face folder or hub id, a .gguf file, or tiny-llama / "
                        "tiny-qwen2 (random weights, UTF-8 bytes as tokens; for tests)")
    p.add_argument("--draft", help="draft model (same tokenizer as the target) for the model drafter")
    p.add_argument("--drafter", choices=("ngram", "model"),
                   help="candidate-tree drafter (default: model with --draft, else ngram prompt lookup)")
    p.add_argument("--system", default="adaserve", help="scheduling policy (SPEC §4 names); default adaserve")
    p.add_argument("--profile", help="latency profile JSON (adaserve profile) or built-in name; "
                                     "default: measure a quick profile at start-up")
    p.add_argument("--baseline-ms", type=float,
                   help="baseline decode latency for relative SLOs (default: the profile's, else measured)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--served-model-name", help="model id clients use (default: --model)")
    g = p.add_argument_group("limits (default: the profile's, else the engine's: 16 requests, 256 tokens per "
                             "iteration, chunk 256, 2048 tokens per sequence on CPU; 64/1024/1024/2048 on CUDA)")
    g.add_argument("--max-seq-len", type=int, help="prompt + output tokens per request")
    g.add_argument("--max-num-seqs", type=int, help="requests per batch")
    g.add_argument("--max-batch-tokens", type=int, help="tokens per iteration")
    g.add_argument("--prefill-chunk", type=int, help="prompt tokens per request per iteration")
    g.add_argument("--kv-cache-gb", type=float, help="cap the KV pool (target + draft) at this size")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="default sampling temperature for requests that set none (default 0: greedy)")
    p.add_argument("--ignore-eos", action="store_true", help="default for requests that do not set ignore_eos: generate max_tokens")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key must not be empty")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("adaserve.server")

    import uvicorn

    from adaserve.server import EngineThread, ServerConfig, create_app
    from adaserve.server.build import EngineOptions, build_engine

    opts = EngineOptions(model=args.model, draft=args.draft, drafter=args.drafter, system=args.system,
                         profile=args.profile, baseline_ms=args.baseline_ms, max_seq_len=args.max_seq_len,
                         max_num_seqs=args.max_num_seqs, max_batch_tokens=args.max_batch_tokens,
                         prefill_chunk=args.prefill_chunk, kv_cache_gb=args.kv_cache_gb,
                         temperature=args.temperature, ignore_eos=args.ignore_eos, device=args.device,
                         dtype=args.dtype, threads=args.threads, seed=args.seed)
    built = build_engine(opts, say=log.info)
    name = args.served_model_name or args.model
    config = ServerConfig(model_name=name, baseline_ms=built.baseline_ms, api_key=args.api_key,
                          temperature=args.temperature, ignore_eos=args.ignore_eos, system=args.system,
                          baseline_source=built.baseline_source)
    app = create_app(EngineThread(built.policy, built.executor), built.codec, config)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this address can use the server",
                    args.host)
    log.info("serving %r on http://%s:%d (baseline %.2f ms, %s)", name, args.host, args.port,
             built.baseline_ms, built.baseline_source)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
