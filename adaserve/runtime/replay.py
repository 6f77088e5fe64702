"""``adaserve run``: replay a trace in real time through a policy on the torch engine.

The trace's prompts are tokenized with the target's tokenizer (input lengths are recomputed), the
requests arrive on the wall clock (optionally stretched by ``time_scale``), the same
``ServingLoop`` as the simulator's drives a ``TorchExecutor``, and the result files (docs/definitions.md, "Result files") are
written by ``core.results``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from adaserve.config import EngineConfig
from adaserve.core.errors import UserError
from adaserve.core.metrics import summarize
from adaserve.core.progress import progress as progress_bar
from adaserve.core.request import Request
from adaserve.core.trace import TraceRecord, load_trace, prepare_records, to_requests
from adaserve.engine.batch import window_masks
from adaserve.engine.executor import TorchExecutor
from adaserve.engine.paged_attention import paged_attention_enabled
from adaserve.engine.recorder import AcceptanceRecorder
from adaserve.iteration import ServingLoop
from adaserve.scheduling.policies import SYSTEMS, make_policy

from .build import Engine, build_engine
from .warmup import WarmUp, warm_serving

@dataclass
class RunConfig:
    trace: str
    system: str
    engine: EngineConfig
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

    def validate(self) -> None:
        if self.system not in SYSTEMS:
            raise UserError(f"unknown system {self.system!r}; valid systems: {', '.join(SYSTEMS)}")
        for name in ("max_requests", "output_len_cap"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if not self.time_scale > 0:
            raise UserError(f"--time-scale must be positive, got {self.time_scale}")
        if self.baseline_ms is not None and not self.baseline_ms > 0:
            raise UserError(f"--baseline-ms must be positive, got {self.baseline_ms}")
        if not self.temperature >= 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")
        self.engine.validate()


@dataclass
class EngineResult:
    summary: dict
    requests: list[Request]
    meta: dict = field(default_factory=dict)


def tokenize(tokenizer, records: list[TraceRecord], chat_template: bool) -> list[list[int]]:
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("--chat-template: this model's tokenizer has no chat template")
        return [list(tokenizer.apply_chat_template([{"role": "user", "content": r.prompt}],
                                                   add_generation_prompt=True, tokenize=True, return_dict=False))
                for r in records]
    return [list(tokenizer(r.prompt).input_ids) for r in records]


def run_engine(cfg: RunConfig, say=None) -> EngineResult:
    cfg.validate()
    trace = load_trace(cfg.trace)  # read once; a bad trace fails before the model loads
    recorder = AcceptanceRecorder(cfg.record_acceptance) if cfg.record_acceptance else None
    try:
        eng = build_engine(cfg.engine, baseline_ms=cfg.baseline_ms, temperature=cfg.temperature, seed=cfg.seed,
                           ignore_eos=cfg.ignore_eos, recorder=recorder, say=say or (lambda s: None),
                           progress=cfg.progress, system=cfg.system)
        records = prepare_records(trace, baseline_ms=eng.baseline_ms, scale_slos=cfg.scale_slos,
                                  max_requests=cfg.max_requests, time_scale=cfg.time_scale,
                                  output_len_cap=cfg.output_len_cap)
        prompts = tokenize(eng.tokenizer, records, cfg.chat_template)
        requests = to_requests(records, eng.baseline_ms, input_lengths=[len(p) for p in prompts])
        warm = warm_serving(eng, cfg.system)
        if say is not None:
            say(warm.describe(cfg.system))
        eng.executor.set_prompts({r.rid: p for r, p in zip(requests, prompts)})
        loop, wall = replay(cfg, eng.executor, requests)
    finally:
        if recorder is not None:
            recorder.close()
    summary = summarize(requests, committed_tokens=loop.stats.committed_tokens,
                        request_steps=loop.stats.request_steps, overhead_ms=loop.stats.overhead_ms,
                        registered=len(requests))
    return EngineResult(summary, requests, run_meta(cfg, eng, loop, wall, warm))


def replay(cfg: RunConfig, ex: TorchExecutor, requests: list[Request]) -> tuple[ServingLoop, float]:
    family = ex.model.config.family  # picks the artifact's speculation constants (Llama / Qwen)
    with progress_bar(len(requests), f"{cfg.system} on {cfg.engine.model}", "req", enabled=cfg.progress) as bar:
        loop = ServingLoop(make_policy(cfg.system, family), ex, requests, on_finish=lambda r: bar.update())
        ex.reset_clock()
        start = time.perf_counter()
        with torch.inference_mode():
            loop.run()
        wall = time.perf_counter() - start
    return loop, wall


def run_meta(cfg: RunConfig, eng: Engine, loop: ServingLoop, wall: float, warm: WarmUp) -> dict:
    ec, profile, ex = cfg.engine, eng.profile, eng.executor
    return {"backend": "engine", "system": cfg.system, "model": ec.model, "drafter": eng.drafter_kind,
            "draft": ec.draft, "trace": str(cfg.trace), "profile": ec.profile or "quick-measured",
            "profile_name": profile.name, "profile_source": profile.source, "hardware": profile.hardware,
            "baseline_ms": eng.baseline_ms, "baseline_source": eng.baseline_source,
            "hardware_scaled_slos": cfg.scale_slos, "time_scale": cfg.time_scale,
            "max_requests": cfg.max_requests, "output_len_cap": cfg.output_len_cap,
            "ignore_eos": cfg.ignore_eos, "chat_template": cfg.chat_template, "temperature": cfg.temperature,
            "seed": cfg.seed, "dtype": ec.dtype_name, "device": ec.device,
            "tensor_parallel": ec.tensor_parallel_size,
            "cuda_graphs": dict(ex.graphs.stats) if ex.graphs is not None else None,
            "graph_parts": ex.graphs.max_parts if ex.graphs is not None else None,
            "mask_windows": window_masks(ex.cache.device),
            "paged_attention": paged_attention_enabled(ex.cache.device),
            "threads": torch.get_num_threads(), "limits": asdict(profile.limits),
            "iterations": loop.stats.iterations, "wall_s": round(wall, 3),
            "warmup": {k: round(v, 3) for k, v in asdict(warm).items()},
            "kv_blocks": ex.num_blocks, "kv_capacity_tokens": ex.kv_capacity_tokens,
            "acceptance_records": cfg.record_acceptance,
            "note": "real engine: wall-clock replay; scheduling overhead is measured CPU time"}


def write(result: EngineResult, out: str | Path) -> None:
    from adaserve.core.results import write_results

    write_results(out, result.summary, result.requests, result.meta)
