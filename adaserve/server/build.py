"""Build the engine behind the server from command-line options, with the engine's own helpers
(``engine.builder``: models, drafters, executor; ``engine.profiler``: latency profiles;
``engine.run``: limits and KV sizing), so ``adaserve serve`` runs exactly what ``adaserve run`` runs.

Latency profile: ``--profile FILE`` (from ``adaserve profile``) or a built-in profile name; without
one, a quick profile is measured at start-up so the scheduler predicts with this machine's numbers
(``engine.profiler.quick_profile``: minimum over passes, tables non-decreasing in tokens).
``--temperature`` / ``--ignore-eos`` are the defaults of requests that do not set their own.
Baseline latency (SPEC §2: per-token decode latency of one request without speculation):
``--baseline-ms``, else the profile's ``baseline_ms``, else measured at start-up (one short decode).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from adaserve.core.profile import LatencyProfile, Limits
from adaserve.scheduling.admission import SPEC_HEADROOM
from adaserve.server.tokenizer import ByteTokenizer, Codec, HFCodec

log = logging.getLogger("adaserve.server")

BASELINE_REPEAT = 7


@dataclass
class EngineOptions:
    model: str
    draft: str | None = None            # draft model for the model drafter
    drafter: str | None = None          # "ngram" | "model"; default: model with a draft, else ngram
    system: str = "adaserve"
    profile: str | None = None          # JSON profile file or built-in profile name
    baseline_ms: float | None = None
    max_seq_len: int | None = None      # limits: None keeps the profile's / the engine's defaults
    max_num_seqs: int | None = None
    max_batch_tokens: int | None = None
    prefill_chunk: int | None = None
    kv_cache_gb: float | None = None    # cap of the KV pool (target + draft)
    temperature: float = 0.0
    ignore_eos: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    seed: int = 0


@dataclass
class Built:
    executor: Any
    policy: Any
    codec: Codec
    baseline_ms: float
    baseline_source: str
    profile: LatencyProfile


def check_options(o: EngineOptions) -> None:
    from adaserve.scheduling.policies import SYSTEMS

    if o.system not in SYSTEMS:
        raise ValueError(f"unknown system {o.system!r}; valid systems: {', '.join(SYSTEMS)}")
    if o.baseline_ms is not None and not o.baseline_ms > 0:
        raise ValueError(f"--baseline-ms must be positive, got {o.baseline_ms}")
    if o.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {o.temperature}")
    if o.kv_cache_gb is not None and not o.kv_cache_gb > 0:
        raise ValueError(f"--kv-cache-gb must be positive, got {o.kv_cache_gb}")
    for name in ("max_seq_len", "max_num_seqs", "max_batch_tokens", "prefill_chunk", "threads"):
        v = getattr(o, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def codec_for(name: str, tokenizer) -> Codec:
    """The server's codec for the engine's tokenizer: the tiny random models' ``ByteTokenizer`` as it
    is (the one ``adaserve run`` uses), a Hugging Face tokenizer wrapped."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer
    if tokenizer is None:
        raise ValueError(f"{name}: no tokenizer found next to the model")
    return HFCodec(tokenizer)


def build_engine(o: EngineOptions, say: Callable[[str], None] = log.info) -> Built:
    """Everything ``adaserve serve`` needs: executor, policy, codec, baseline."""
    from adaserve.engine.builder import EngineSpec, load_pair, make_executor
    from adaserve.engine.run import warm_up
    from adaserve.scheduling.policies import make_policy

    check_options(o)
    spec = EngineSpec(o.model, o.draft, o.drafter, o.dtype, o.device, o.threads)
    kind = spec.drafter_kind()
    t0 = time.perf_counter()
    model, tok, draft = load_pair(spec)
    cfg = model.config
    say(f"loaded {o.model} ({cfg.family}, {cfg.num_layers} layers, vocab {cfg.vocab_size}) "
        f"in {time.perf_counter() - t0:.1f} s; drafter {kind}")
    profile = _profile(o, model, draft, kind, say)
    baseline, source = _baseline(o, profile, model)
    profile.baseline_ms = baseline
    executor = make_executor(model, None, draft, kind, profile, temperature=o.temperature, seed=o.seed,
                             ignore_eos=o.ignore_eos)
    warm_up(model)
    longest = executor.kv_capacity_tokens - SPEC_HEADROOM
    if longest < profile.limits.max_seq_len:
        log.warning("the KV pool holds %d tokens: requests with prompt + max_tokens above %d are refused "
                    "(raise --kv-cache-gb)", executor.kv_capacity_tokens, longest)
    say(f"baseline latency {baseline:.2f} ms/token ({source}); system {o.system}; "
        f"KV pool {executor.num_blocks} blocks; {profile.limits}")
    return Built(executor, make_policy(o.system, cfg.family), codec_for(o.model, tok), baseline, source,
                 profile)


def limits_for(o: EngineOptions, base: Limits, model, draft) -> Limits:
    """``base`` with the explicit options applied, the sequence length capped by the model's
    positions, and the KV capacity sized for the pool (optionally memory-capped)."""
    from adaserve.engine.run import kv_bytes_per_token, with_kv_capacity

    lim = replace(base, max_seq_len=min(o.max_seq_len or base.max_seq_len, model.config.max_position_embeddings),
                  max_batch_requests=o.max_num_seqs or base.max_batch_requests,
                  max_batch_tokens=o.max_batch_tokens or base.max_batch_tokens)
    lim = replace(lim, prefill_chunk=min(o.prefill_chunk or lim.prefill_chunk, lim.max_batch_tokens))
    return with_kv_capacity(lim, o.kv_cache_gb, kv_bytes_per_token(model, draft))


def _profile(o: EngineOptions, model, draft, kind: str, say: Callable[[str], None]) -> LatencyProfile:
    from adaserve.engine.profiler import quick_profile
    from adaserve.engine.run import default_limits

    if o.profile is not None:
        from adaserve.sim.profiles import get_profile

        profile = get_profile(o.profile)
        profile.limits = limits_for(o, profile.limits, model, draft)
        return profile
    limits = limits_for(o, default_limits(o.device), model, draft)
    t0 = time.perf_counter()
    profile = quick_profile(f"{o.model} (quick, at start-up)", model, limits, draft if kind == "model" else None)
    say(f"measured a quick latency profile in {time.perf_counter() - t0:.1f} s "
        f"(verify at 1/8/64 tokens: {[round(float(profile.verify_ms(t)), 2) for t in (1, 8, 64)]} ms)")
    return profile


def _baseline(o: EngineOptions, profile: LatencyProfile, model) -> tuple[float, str]:
    if o.baseline_ms is not None:
        return float(o.baseline_ms), "--baseline-ms"
    if profile.baseline_ms:
        where = f"profile {o.profile}" if o.profile else "the start-up profile"
        return float(profile.baseline_ms), f"{where}: one request decoding, no speculation"
    return measure_baseline(model), "measured at start-up: one short decode, batch 1, no speculation"


def measure_baseline(model) -> float:
    """Median time of one decode step of one sequence (the engine profiler's baseline point)."""
    from adaserve.engine.profiler import BASELINE_CONTEXT, StepBench

    return StepBench(model, BASELINE_CONTEXT + 64).step_ms(1, 1, BASELINE_CONTEXT, BASELINE_REPEAT)
