"""Assemble an engine from an ``EngineConfig``: models, drafter, KV pool, latency profile, executor.

``adaserve run``, ``serve``, ``profile`` and ``bench engine`` all build through here, so they run the
same engine with the same defaults (threads, dtype, limits, KV sizing).

Latency profile: ``--profile`` names a JSON file (from ``adaserve profile``) or a built-in profile;
without one, a quick profile is measured on first use and cached per (model, draft, device, dtype,
threads, limits, hardware), so the second start is immediate. A profile measured with other
threads, dtype or device than the engine's is used with a warning: its times do not describe this
engine."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from adaserve.config import EngineConfig
from adaserve.core.errors import UserError
from adaserve.core.files import cache_dir
from adaserve.core.profile import LatencyProfile, Limits
from adaserve.core.request import Request
from adaserve.drafting.ngram import NgramDrafter
from adaserve.engine.drafters import Drafter, ModelDrafter
from adaserve.engine.executor import TorchExecutor, default_num_blocks, kv_capacity_tokens
from adaserve.engine.kv_cache import BLOCK_SIZE
from adaserve.engine.loader import TINY_DRAFT_SEED, resolve_model
from adaserve.engine.model import Transformer, prepack_forced
from adaserve.engine.recorder import AcceptanceRecorder
from adaserve.scheduling.admission import kv_reservation

from .kernels import choose_linear_kernels
from .profiler import BASELINE_CONTEXT, StepBench, measured_with, quick_profile

log = logging.getLogger("adaserve")
Say = Callable[[str], None]
BASELINE_REPEAT = 7


@dataclass
class Engine:
    """A built engine: what ``run`` and ``serve`` drive through the ``ServingLoop``."""

    config: EngineConfig
    model: Transformer
    tokenizer: object
    draft: Transformer | None
    drafter_kind: str
    profile: LatencyProfile
    executor: TorchExecutor
    baseline_ms: float
    baseline_source: str


# ---- models -----------------------------------------------------------------------------------------

def torch_dtype(cfg: EngineConfig) -> torch.dtype:
    return getattr(torch, cfg.dtype_name)


def setup_torch(cfg: EngineConfig) -> None:
    if cfg.on_cuda and not torch.cuda.is_available():
        raise UserError(f"--device {cfg.device}: no CUDA device is available")
    torch.set_num_threads(cfg.threads)


def load_models(cfg: EngineConfig, say: Say = log.info) -> tuple[Transformer, object, Transformer | None]:
    """Target, tokenizer and (for the model drafter) the draft model. On the CPU, the linear kernel
    for the dtype is chosen by measuring the target's weights (kernels.py; cached, reported)."""
    cfg.validate()
    setup_torch(cfg)
    prepack_forced()  # a bad ADASERVE_PREPACK is a user error before minutes of loading
    kind = cfg.drafter_kind()
    if cfg.tensor_parallel_size > 1:  # rank 0 from here on; other ranks serve as workers (and exit) there
        from .distributed import load_sharded

        model, tok = load_sharded(cfg, say)
    else:
        model, tok = resolve_model(cfg.model, torch_dtype(cfg), cfg.device)
    choose_linear_kernels(model, say=say, cache=profile_cache_enabled())
    draft = None
    if kind == "model":
        draft, _ = resolve_model(cfg.draft, torch_dtype(cfg), cfg.device, seed=TINY_DRAFT_SEED)
        if draft.config.vocab_size > model.config.vocab_size:
            raise UserError(f"draft vocabulary ({draft.config.vocab_size}) is larger than the target's "
                            f"({model.config.vocab_size}): the models must share a tokenizer")
    return model, tok, draft


# ---- KV pool and limits ----------------------------------------------------------------------------

def kv_bytes_per_token(model: Transformer, draft: Transformer | None = None) -> int:
    """Target (plus draft) KV bytes per token: the pool is allocated for both."""
    total = 0
    for m in (model, draft):
        if m is not None:
            c = m.config
            total += 2 * c.num_layers * c.num_kv_heads * c.head_dim * m.lm_head.weight.element_size()
    return total


def num_blocks_for(limits: Limits) -> int:
    """The KV pool: the profile's ``kv_capacity_tokens`` plus one block per request slot (rounding),
    or room for ``max_batch_requests`` full-length sequences when the capacity is unset/larger."""
    full = default_num_blocks(limits, BLOCK_SIZE)
    from_capacity = limits.kv_capacity_tokens // BLOCK_SIZE + limits.max_batch_requests
    return max(1, min(full, from_capacity))


def sized_limits(cfg: EngineConfig, base: Limits, model: Transformer, draft: Transformer | None) -> Limits:
    """``base`` with the configuration's limits applied and ``kv_capacity_tokens`` set to what the
    block pool holds (capped by ``--kv-cache-gb``). Refuses a pool that cannot hold one request."""
    lim = cfg.apply_limits(base, model.config.max_position_embeddings)
    blocks = num_blocks_for(replace(lim, kv_capacity_tokens=10**12))
    per_token = kv_bytes_per_token(model, draft)
    if cfg.kv_cache_gb is not None:
        blocks = min(blocks, int(cfg.kv_cache_gb * 2**30) // (per_token * BLOCK_SIZE))
    lim = replace(lim, kv_capacity_tokens=kv_capacity_tokens(blocks, BLOCK_SIZE, lim.max_batch_requests))
    smallest = kv_reservation(Request(0, 0.0, 1, 1, 1000.0, float("inf"), "probe"), lim.max_seq_len)
    if lim.kv_capacity_tokens < smallest:
        need_blocks = -(-smallest // BLOCK_SIZE) + lim.max_batch_requests
        need_gb = need_blocks * BLOCK_SIZE * per_token / 2**30
        raise UserError(f"--kv-cache-gb {cfg.kv_cache_gb}: the KV pool holds {lim.kv_capacity_tokens} tokens, "
                        f"not enough for even a one-token request ({smallest} tokens with the tree headroom); "
                        f"give at least {need_gb:.3g} GiB")
    return lim


# ---- latency profile ------------------------------------------------------------------------------

def profile_cache_enabled() -> bool:
    return os.environ.get("ADASERVE_PROFILE_CACHE", "1") != "0"


def profile_cache_path(cfg: EngineConfig, model: Transformer, draft: Transformer | None, limits: Limits) -> Path:
    key = {"model": cfg.model, "draft": cfg.draft, "drafter": cfg.drafter_kind(), "shape": asdict(model.config),
           "draft_shape": asdict(draft.config) if draft is not None else None, "limits": asdict(limits),
           **measured_with(model, cfg.use_cuda_graphs), "hardware": _hardware(model),
           "engine": {"device": cfg.device, "dtype": cfg.dtype_name, "threads": cfg.threads}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(cfg.model).name)[:40]
    return cache_dir() / "profiles" / f"{slug}-{digest}.json"


def _hardware(model: Transformer) -> str:
    from .profiler import hardware_string

    return hardware_string(model)


def resolve_profile(cfg: EngineConfig, model: Transformer, draft: Transformer | None, *,
                    say: Say = log.info, progress: bool = True, system: str | None = None) -> LatencyProfile:
    """The profile file or built-in profile named by ``--profile`` (with the configuration's limits
    applied; as ``system`` pays it, ``LatencyProfile.for_system``, the simulator's view of the same
    file), else the cached or freshly measured quick profile. ``draft``: the draft model of the
    model drafter (None for the n-gram drafter)."""
    if cfg.profile is not None:
        from adaserve.sim.profiles import get_profile

        profile = get_profile(cfg.profile)
        if system is not None:
            profile = profile.for_system(system)
        warn_if_measured_elsewhere(profile, model, say, cfg.use_cuda_graphs)
        profile.limits = sized_limits(cfg, profile.limits, model, draft)
        return profile
    limits = sized_limits(cfg, cfg.default_limits(), model, draft)
    path = profile_cache_path(cfg, model, draft, limits) if profile_cache_enabled() else None
    if path is not None and path.is_file():
        try:
            profile = LatencyProfile.load(path)
            say(f"latency profile: cached quick profile {path}")
            return profile
        except ValueError as e:  # a damaged cache file is measured again
            say(f"ignoring the cached profile {path}: {e}")
    say(f"measuring a quick latency profile of {cfg.model} ({_hardware(model)}); it is cached"
        + (f" in {path}" if path else " nowhere (ADASERVE_PROFILE_CACHE=0)"))
    t0 = time.perf_counter()
    profile = quick_profile(f"{cfg.model} (quick)", model, limits, draft, progress=progress,
                            cuda_graphs=cfg.use_cuda_graphs)
    say(f"measured the quick profile in {time.perf_counter() - t0:.1f} s (verify at 1/8/64 tokens: "
        f"{[round(float(profile.verify_ms(t)), 2) for t in (1, 8, 64)]} ms)")
    if path is not None:
        profile.save(path)
    return profile


def warn_if_measured_elsewhere(profile: LatencyProfile, model: Transformer, say: Say,
                               cuda_graphs: bool = False) -> None:
    here = measured_with(model, cuda_graphs)
    then = profile.measured_with
    diff = [f"{k} {then[k]} (now {here[k]})"
            for k in ("device", "dtype", "threads", "linear", "tensor_parallel", "cuda_graphs", "graph_parts",
                      "paged_attention")
            if then.get(k) is not None and here.get(k) is not None and then[k] != here[k]]
    if diff:
        say(f"warning: profile {profile.name!r} was measured with {', '.join(diff)}: its latencies do not "
            "describe this engine; measure one with `adaserve profile` using the same options")


def resolve_baseline(profile: LatencyProfile, model: Transformer, override: float | None,
                     where: str) -> tuple[float, str]:
    """Baseline decode latency (docs/definitions.md): an explicit value, else the profile's, else
    one short decode measured now."""
    if override is not None:
        if not override > 0:
            raise UserError(f"--baseline-ms must be positive, got {override}")
        return float(override), "--baseline-ms"
    if profile.baseline_ms:
        return float(profile.baseline_ms), f"{where}: one request decoding, no speculation"
    ms = StepBench(model, BASELINE_CONTEXT + 64).step_ms(1, 1, BASELINE_CONTEXT, BASELINE_REPEAT)
    return ms, "measured at start-up: one short decode, batch 1, no speculation"


# ---- executor --------------------------------------------------------------------------------------

def make_drafter(kind: str, draft: Transformer | None, num_blocks: int) -> Drafter:
    if kind == "model":
        return ModelDrafter(draft, num_blocks, BLOCK_SIZE)
    return NgramDrafter()


def make_executor(model: Transformer, tokenizer, draft: Transformer | None, kind: str,
                  profile: LatencyProfile, *, temperature: float = 0.0, seed: int = 0,
                  recorder: AcceptanceRecorder | None = None, ignore_eos: bool = False,
                  cuda_graphs: bool = False) -> TorchExecutor:
    blocks = num_blocks_for(profile.limits)
    return TorchExecutor(model, profile, make_drafter(kind, draft, blocks), tokenizer=tokenizer,
                         num_blocks=blocks, block_size=BLOCK_SIZE, temperature=temperature, seed=seed,
                         recorder=recorder, ignore_eos=ignore_eos, cuda_graphs=cuda_graphs)


def warm_up(model: Transformer) -> None:
    """First forwards pay one-off costs (allocator, kernels); keep them out of measured serving."""
    bench = StepBench(model, 256)
    bench.step_ms(2, 8, 64, 2)
    bench.prefill_ms(64, 1)


def build_engine(cfg: EngineConfig, *, baseline_ms: float | None = None, temperature: float = 0.0,
                 seed: int = 0, ignore_eos: bool = False, recorder: AcceptanceRecorder | None = None,
                 say: Say = log.info, progress: bool = True, system: str | None = None) -> Engine:
    """Models, profile, baseline, executor, warmed up: everything ``run`` and ``serve`` need;
    ``system``: the one the engine serves (its own host row of a measured profile)."""
    kind = cfg.validate().drafter_kind()
    t0 = time.perf_counter()
    model, tok, draft = load_models(cfg, say)
    c = model.config
    say(f"loaded {cfg.model} ({c.family}, {c.num_layers} layers, vocab {c.vocab_size}, {cfg.dtype_name}, "
        f"{cfg.device}, {torch.get_num_threads()} thread(s)) in {time.perf_counter() - t0:.1f} s; drafter {kind}")
    profile = resolve_profile(cfg, model, draft, say=say, progress=progress, system=system)
    where = f"profile {cfg.profile}" if cfg.profile else "the quick profile"
    baseline, source = resolve_baseline(profile, model, baseline_ms, where)
    executor = make_executor(model, tok, draft, kind, profile, temperature=temperature, seed=seed,
                             recorder=recorder, ignore_eos=ignore_eos, cuda_graphs=cfg.use_cuda_graphs)
    for m in (model, draft):
        if m is not None:
            warm_up(m)
    return Engine(cfg, model, tok, draft, kind, profile, executor, baseline, source)
