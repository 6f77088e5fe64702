"""``adaserve serve``: the OpenAI-compatible server with per-request SLOs (docs/server.md)."""

from __future__ import annotations

import argparse
import logging
import sys

from adaserve.config import EngineConfig
from adaserve.core.errors import UserError
from adaserve.scheduling.policies import SYSTEMS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with per-request TPOT SLOs")
    EngineConfig.add_arguments(p)
    p.add_argument("--system", default="adaserve", help=f"scheduling policy (default adaserve): {', '.join(SYSTEMS)}")
    p.add_argument("--baseline-ms", type=float,
                   help="baseline decode latency for relative SLOs (default: the profile's, else measured)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--served-model-name", help="model id clients use (default: --model)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="default sampling temperature for requests that set none (default 0: greedy)")
    p.add_argument("--ignore-eos", action="store_true", help="default for requests that do not set ignore_eos: generate max_tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request body may take to arrive (else 408; default 30)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body in MiB (else 413; default 32)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    if args.api_key is not None and not args.api_key.strip():
        raise UserError("--api-key must not be empty")
    if not (0 < args.body_timeout < float("inf")) or not (0 < args.max_body_mb < float("inf")):
        raise UserError(f"--body-timeout and --max-body-mb must be positive numbers, got {args.body_timeout} "
                        f"and {args.max_body_mb}")
    cfg = EngineConfig.from_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("adaserve.server")

    import uvicorn

    from adaserve.server import EngineThread, ServerConfig, create_app
    from adaserve.server.build import build_server_engine

    built = build_server_engine(cfg, args.system, baseline_ms=args.baseline_ms, temperature=args.temperature,
                                ignore_eos=args.ignore_eos, seed=args.seed, say=log.info)
    name = args.served_model_name or args.model
    config = ServerConfig(model_name=name, baseline_ms=built.baseline_ms, api_key=args.api_key,
                          temperature=args.temperature, ignore_eos=args.ignore_eos, system=args.system,
                          baseline_source=built.baseline_source, body_timeout_s=args.body_timeout,
                          max_body_bytes=int(args.max_body_mb * 2**20))
    app = create_app(EngineThread(built.policy, built.executor), built.codec, config)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this address can use the server",
                    args.host)
    log.info("serving %r on http://%s:%d (baseline %.2f ms, %s)", name, args.host, args.port,
             built.baseline_ms, built.baseline_source)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    failure = getattr(getattr(built.executor.model, "channel", None), "failure", None)  # tensor parallel
    if failure is not None:
        print(f"adaserve: error: {failure}", file=sys.stderr)
        return 1
    return 0
