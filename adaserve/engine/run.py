"""``adaserve run``: replay a trace in real time through a policy on the torch engine.

The trace's prompts are tokenized with the target's tokenizer (input lengths are recomputed), the
requests arrive on the wall clock (optionally stretched by ``time_scale``), the same
``ServingLoop`` as the simulator's drives a ``TorchExecutor``, and the SPEC §7 result files are
written by ``core.results``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from adaserve.core.metrics import summarize
from adaserve.core.profile import LatencyProfile, Limits
from adaserve.core.request import Request
from adaserve.core.slo import category_of
from adaserve.core.trace import TraceRecord, load_trace, to_requests
from adaserve.iteration import ServingLoop
from adaserve.scheduling.policies import SYSTEMS, make_policy

from .builder import BLOCK_SIZE, EngineSpec, load_pair, make_executor, num_blocks_for
from .executor import TorchExecutor, kv_capacity_tokens
from .profiler import StepBench, quick_profile
from .recorder import AcceptanceRecorder

ARTIFACT_BASELINE_MS = 30.0  # SPEC §2: absolute SLOs scale by baseline_ms / 30
CPU_LIMITS = Limits(max_batch_requests=16, max_batch_tokens=256, prefill_chunk=256, max_seq_len=2048)
GPU_LIMITS = Limits(max_batch_requests=64, max_batch_tokens=1024, prefill_chunk=1024, max_seq_len=2048)


def default_limits(device: str) -> Limits:
    return replace(GPU_LIMITS if str(device).startswith("cuda") else CPU_LIMITS)


def with_kv_capacity(limits: Limits, kv_memory_gb: float | None, bytes_per_token: int) -> Limits:
    """Limits whose ``kv_capacity_tokens`` is what the block pool holds (optionally memory-capped)."""
    blocks = num_blocks_for(replace(limits, kv_capacity_tokens=10**12))
    if kv_memory_gb:
        blocks = min(blocks, int(kv_memory_gb * 2**30) // (bytes_per_token * BLOCK_SIZE))
    return replace(limits, kv_capacity_tokens=kv_capacity_tokens(blocks, BLOCK_SIZE, limits.max_batch_requests))


def kv_bytes_per_token(model, draft=None) -> int:
    """Target (plus draft) KV bytes per token: the pool is allocated for both."""
    total = 0
    for m in (model, draft):
        if m is not None:
            c = m.config
            total += 2 * c.num_layers * c.num_kv_heads * c.head_dim * m.lm_head.weight.element_size()
    return total


@dataclass
class RunConfig:
    trace: str
    system: str
    engine: EngineSpec
    profile: str | None = None
    baseline_ms: float | None = None
    max_requests: int | None = None
    output_len_cap: int | None = None
    time_scale: float = 1.0
    scale_slos: bool = False
    temperature: float = 0.0
    seed: int = 0
    ignore_eos: bool = False
    chat_template: bool = False
    record_acceptance: str | None = None
    progress: bool = True
    limits: Limits | None = None  # for the quick profile when no profile file is given

    def validate(self) -> None:
        if self.system not in SYSTEMS:
            raise ValueError(f"unknown system {self.system!r}; valid systems: {', '.join(SYSTEMS)}")
        for name in ("max_requests", "output_len_cap"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if not self.time_scale > 0:
            raise ValueError(f"--time-scale must be positive, got {self.time_scale}")
        if self.baseline_ms is not None and not self.baseline_ms > 0:
            raise ValueError(f"--baseline-ms must be positive, got {self.baseline_ms}")
        self.engine.drafter_kind()


@dataclass
class EngineResult:
    summary: dict
    requests: list[Request]
    meta: dict = field(default_factory=dict)


def prepare_records(records: list[TraceRecord], cfg: RunConfig, baseline_ms: float) -> list[TraceRecord]:
    """First ``max_requests`` records, output lengths capped, arrivals stretched, SLOs scaled
    (categories keep the names of their unscaled SLOs)."""
    out = records[: cfg.max_requests] if cfg.max_requests else list(records)
    slo_factor = baseline_ms / ARTIFACT_BASELINE_MS if cfg.scale_slos else 1.0
    return [replace(r, emission_time_ms=r.emission_time_ms * cfg.time_scale,
                    output_length=min(r.output_length, cfg.output_len_cap or r.output_length),
                    slo_ratio=r.slo_ratio * slo_factor if r.slo_ratio < 0 else r.slo_ratio,
                    category=category_of(r.slo_ratio, r.category))
            for r in out]


def tokenize(tokenizer, records: list[TraceRecord], chat_template: bool) -> list[list[int]]:
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat-template: this model's tokenizer has no chat template")
        return [list(tokenizer.apply_chat_template([{"role": "user", "content": r.prompt}],
                                                   add_generation_prompt=True, tokenize=True, return_dict=False))
                for r in records]
    return [list(tokenizer(r.prompt).input_ids) for r in records]


def get_profile(cfg: RunConfig, model, draft, kind: str) -> LatencyProfile:
    if cfg.profile:
        return LatencyProfile.load(cfg.profile)
    limits = cfg.limits or default_limits(cfg.engine.device)
    limits = with_kv_capacity(limits, None, kv_bytes_per_token(model, draft))
    return quick_profile(f"{cfg.engine.model} (quick)", model, limits, draft if kind == "model" else None,
                         progress=cfg.progress)


def warm_up(model) -> None:
    """First forwards pay one-off costs (allocator, kernels); keep them out of the replay."""
    bench = StepBench(model, 256)
    bench.step_ms(2, 8, 64, 2)
    bench.prefill_ms(64, 1)


def run_engine(cfg: RunConfig) -> EngineResult:
    cfg.validate()
    kind = cfg.engine.drafter_kind()
    model, tok, draft = load_pair(cfg.engine)
    profile = get_profile(cfg, model, draft, kind)
    baseline = cfg.baseline_ms or profile.decode_baseline_ms
    records = prepare_records(load_trace(cfg.trace), cfg, baseline)
    prompts = tokenize(tok, records, cfg.chat_template)
    requests = to_requests(records, baseline, input_lengths=[len(p) for p in prompts])
    recorder = AcceptanceRecorder(cfg.record_acceptance) if cfg.record_acceptance else None
    try:
        ex = make_executor(model, tok, draft, kind, profile, temperature=cfg.temperature, seed=cfg.seed,
                           recorder=recorder, ignore_eos=cfg.ignore_eos)
        ex.set_prompts({r.rid: p for r, p in zip(requests, prompts)})
        for m in (model, draft):
            if m is not None:
                warm_up(m)
        loop, wall = replay(cfg, ex, requests)
    finally:
        if recorder is not None:
            recorder.close()
    summary = summarize(requests, committed_tokens=loop.stats.committed_tokens,
                        request_steps=loop.stats.request_steps, overhead_ms=loop.stats.overhead_ms,
                        registered=len(requests))
    return EngineResult(summary, requests, run_meta(cfg, kind, profile, baseline, ex, loop, wall))


def replay(cfg: RunConfig, ex: TorchExecutor, requests: list[Request]) -> tuple[ServingLoop, float]:
    family = ex.model.config.family  # picks the artifact's speculation constants (Llama / Qwen)
    bar = None
    if cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=len(requests), desc=f"{cfg.system} on {cfg.engine.model}", unit="req")
    loop = ServingLoop(make_policy(cfg.system, family), ex, requests,
                       on_finish=(lambda r: bar.update()) if bar else None)
    ex.reset_clock()
    start = time.perf_counter()
    with torch.inference_mode():
        loop.run()
    wall = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return loop, wall


def run_meta(cfg: RunConfig, kind: str, profile: LatencyProfile, baseline: float, ex: TorchExecutor,
             loop: ServingLoop, wall: float) -> dict:
    return {"backend": "engine", "system": cfg.system, "model": cfg.engine.model, "drafter": kind,
            "draft": cfg.engine.draft, "trace": str(cfg.trace), "profile": cfg.profile or "quick-measured",
            "profile_name": profile.name, "profile_source": profile.source, "hardware": profile.hardware,
            "baseline_ms": baseline, "hardware_scaled_slos": cfg.scale_slos, "time_scale": cfg.time_scale,
            "max_requests": cfg.max_requests, "output_len_cap": cfg.output_len_cap,
            "ignore_eos": cfg.ignore_eos, "chat_template": cfg.chat_template, "temperature": cfg.temperature,
            "seed": cfg.seed, "dtype": cfg.engine.dtype, "device": cfg.engine.device,
            "threads": torch.get_num_threads(), "iterations": loop.stats.iterations, "wall_s": round(wall, 3),
            "kv_blocks": ex.num_blocks, "kv_capacity_tokens": ex.kv_capacity_tokens,
            "kv_fallback_steps": ex.fallbacks, "acceptance_records": cfg.record_acceptance,
            "note": "real engine: wall-clock replay; scheduling overhead is measured CPU time"}


def write(result: EngineResult, out: str | Path) -> None:
    from adaserve.core.results import write_results

    write_results(out, result.summary, result.requests, result.meta)
