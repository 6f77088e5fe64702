"""The engine behind the server, built by ``adaserve.runtime.build`` from the same ``EngineConfig``
as ``adaserve run``, so ``serve`` runs exactly what ``run`` runs (profile, baseline, KV sizing).

``--temperature`` / ``--ignore-eos`` are the defaults of requests that do not set their own.
Baseline latency (docs/definitions.md): ``--baseline-ms``, else the profile's ``baseline_ms``, else
measured at start-up (one short decode)."""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable

from adaserve.config import EngineConfig
from adaserve.core.errors import UserError
from adaserve.core.profile import LatencyProfile
from adaserve.scheduling.admission import SPEC_HEADROOM
from adaserve.server.tokenizer import ByteTokenizer, Codec, HFCodec

log = logging.getLogger("adaserve.server")


@dataclass
class Built:
    executor: Any
    policy: Any
    codec: Codec
    baseline_ms: float
    baseline_source: str
    profile: LatencyProfile


def codec_for(name: str, tokenizer) -> Codec:
    """The server's codec for the engine's tokenizer: the tiny random models' ``ByteTokenizer`` as it
    is (the one ``adaserve run`` uses), a Hugging Face tokenizer wrapped."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer
    if tokenizer is None:
        raise UserError(f"{name}: no tokenizer found next to the model")
    return HFCodec(tokenizer)


def build_server_engine(cfg: EngineConfig, system: str, *, baseline_ms: float | None = None,
                        temperature: float = 0.0, ignore_eos: bool = False, seed: int = 0,
                        say: Callable[[str], None] = log.info) -> Built:
    """Everything ``adaserve serve`` needs: executor, policy, codec, baseline."""
    from adaserve.runtime.build import build_engine
    from adaserve.runtime.warmup import warm_serving
    from adaserve.scheduling.policies import SYSTEMS, make_policy

    if system not in SYSTEMS:
        raise UserError(f"unknown system {system!r}; valid systems: {', '.join(SYSTEMS)}")
    if not temperature >= 0:
        raise UserError(f"--temperature must be >= 0, got {temperature}")
    eng = build_engine(cfg, baseline_ms=baseline_ms, temperature=temperature, seed=seed, ignore_eos=ignore_eos,
                       say=say, system=system)
    profile, ex = eng.profile, eng.executor
    profile.baseline_ms = eng.baseline_ms
    codec = codec_for(cfg.model, eng.tokenizer)
    ex.tokenizer = None  # the server hands the executor token ids only
    longest = ex.kv_capacity_tokens - SPEC_HEADROOM
    if longest < profile.limits.max_seq_len:
        log.warning("the KV pool holds %d tokens: requests with prompt + max_tokens above %d are refused "
                    "(raise --kv-cache-gb)", ex.kv_capacity_tokens, longest)
    channel = getattr(eng.model, "channel", None)  # tensor parallel: a failed rank ends the server
    if channel is not None:
        channel.on_failure.append(_stop_server)
    say(warm_serving(eng, system).describe(system))
    say(f"baseline latency {eng.baseline_ms:.2f} ms/token ({eng.baseline_source}); system {system}; "
        f"KV pool {ex.num_blocks} blocks; {profile.limits}")
    return Built(ex, make_policy(system, eng.model.config.family), codec, eng.baseline_ms, eng.baseline_source,
                 profile)


def _stop_server(error: Exception) -> None:
    """A tensor-parallel rank failed: the engine cannot serve any more, so the server shuts down
    (SIGTERM to itself: uvicorn's graceful exit; ``adaserve serve`` then exits non-zero)."""
    log.error("%s; shutting the server down", error)
    os.kill(os.getpid(), signal.SIGTERM)
