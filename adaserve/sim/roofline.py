"""Roofline latency model: GPU datasheet numbers × model shapes × tensor parallelism → step time.

One forward step over ``tokens`` new tokens with ``context_tokens`` KV tokens already cached (summed
over all requests in the batch) costs, per layer and per GPU::

    compute = flops / (peak_flops · FLOP_EFFICIENCY)
    memory  = (weight bytes + KV bytes read + KV bytes written) / (peak_hbm · BW_EFFICIENCY)
    layer   = max(compute, memory) + (1 − OVERLAP) · min(compute, memory)
            + 2 all-reduces (ring, tokens·hidden·2 bytes, NVLink) + LAYER_OVERHEAD_US

plus the LM head (same roofline) and a fixed STEP_OVERHEAD_MS per step. ``OVERLAP = 1`` is the pure
roofline max(compute, memory); the tuned value below (see ``fit_constants`` and
docs/simulator.md) says how much of the smaller term the measured tables hide.

Run ``python -m adaserve.sim.roofline`` to print the comparison with the artifact's measured
verification tables (docs/definitions.md §8); ``--fit`` also refits the tuned constants and prints those fits.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import IO

import numpy as np

from adaserve.core.errors import UserError
from adaserve.core.profile import LatencyProfile, Limits, Table
from adaserve.sim.artifact import ARTIFACT_VERIFY_MS, FAMILIES, GPU_80G

GB = 1e9

# --------------------------------------------------------------------------------------------------
# GPUs (public datasheet values; dense = without 2:4 sparsity; NVLink per direction = half the
# bidirectional total the datasheets quote).


@dataclass(frozen=True)
class GPUSpec:
    name: str
    hbm_bytes_per_s: float
    flops: float  # dense fp16/bf16 tensor-core FLOP/s
    nvlink_bytes_per_s: float  # per direction, per GPU
    memory_bytes: float


GPUS: dict[str, GPUSpec] = {
    # NVIDIA A100 Tensor Core GPU datasheet (2021): A100 40GB SXM: 1,555 GB/s HBM2, FP16 tensor core
    # 312 TFLOPS (624 with sparsity), NVLink 600 GB/s (bidirectional), 40 GB.
    "a100-40gb": GPUSpec("A100-SXM4-40GB", 1555 * GB, 312e12, 300 * GB, 40 * GB),
    # Same datasheet: A100 80GB SXM: 2,039 GB/s HBM2e, 312 TFLOPS FP16, NVLink 600 GB/s, 80 GB.
    "a100-80gb": GPUSpec("A100-SXM4-80GB", 2039 * GB, 312e12, 300 * GB, 80 * GB),
    # NVIDIA H100 Tensor Core GPU datasheet: H100 SXM: 3.35 TB/s HBM3, BF16/FP16 tensor core
    # 1,979 TFLOPS with sparsity (989.4 dense), NVLink 900 GB/s, 80 GB.
    "h100-sxm": GPUSpec("H100-SXM5-80GB", 3350 * GB, 989.4e12, 450 * GB, 80 * GB),
    # NVIDIA H200 datasheet: H200 SXM: 4.8 TB/s HBM3e, BF16/FP16 1,979 TFLOPS with sparsity
    # (989 dense), NVLink 900 GB/s, 141 GB.
    "h200": GPUSpec("H200-SXM-141GB", 4800 * GB, 989.4e12, 450 * GB, 141 * GB),
}


def get_gpu(gpu: GPUSpec | str) -> GPUSpec:
    if isinstance(gpu, GPUSpec):
        return gpu
    try:
        return GPUS[gpu.lower()]
    except KeyError:
        raise UserError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}") from None


def with_interconnect(gpu: GPUSpec | str, gb_per_s: float | None) -> GPUSpec:
    """``gpu`` with its GPU-to-GPU bandwidth (per direction, per GPU, GB/s) replaced: NVLink of
    another generation, or PCIe (e.g. 32 GB/s for PCIe 4.0 x16) when the GPUs have no NVLink.
    None: the datasheet's NVLink."""
    g = get_gpu(gpu)
    if gb_per_s is None:
        return g
    if not (math.isfinite(gb_per_s) and gb_per_s > 0):
        raise UserError(f"interconnect bandwidth must be a positive number of GB/s, got {gb_per_s}")
    return replace(g, name=f"{g.name} ({gb_per_s:g} GB/s link)", nvlink_bytes_per_s=gb_per_s * GB)


# --------------------------------------------------------------------------------------------------
# Model shapes


@dataclass(frozen=True)
class ModelShape:
    """The shape numbers of a decoder-only transformer (Llama / Qwen2 family: GQA + SwiGLU MLP)."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    bytes_per_param: int = 2
    head_dim: int | None = None  # None: hidden // heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        """Linear weights of one layer (q, k, v, o, gate, up, down); norms and biases are noise."""
        q_out = self.heads * self.dim_per_head
        kv_out = self.kv_heads * self.dim_per_head
        return self.hidden * (2 * q_out + 2 * kv_out) + 3 * self.hidden * self.intermediate

    @property
    def lm_head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        embeddings = self.lm_head_params * (1 if self.tied_embeddings else 2)
        return self.layers * self.layer_params + embeddings

    @property
    def weight_bytes(self) -> int:
        """Bytes the weights occupy in GPU memory (all GPUs together)."""
        return self.params * self.bytes_per_param

    def kv_heads_per_gpu(self, tp: int) -> int:
        """KV heads each GPU holds; with tp > kv_heads the heads are replicated."""
        return math.ceil(self.kv_heads / tp)

    def kv_bytes_per_token(self, tp: int = 1) -> int:
        """KV-cache bytes per cached token on *one* GPU of a TP group of ``tp``."""
        per_layer = 2 * self.kv_heads_per_gpu(tp) * self.dim_per_head * self.bytes_per_param
        return self.layers * per_layer

    @classmethod
    def from_hf_config(cls, path_or_dict: str | Path | dict, name: str | None = None,
                       bytes_per_param: int = 2) -> "ModelShape":
        """Read a Hugging Face ``config.json`` (a path to the file, to its folder, or the dict)."""
        if isinstance(path_or_dict, dict):
            cfg, where = path_or_dict, name or "config"
        else:
            path = Path(path_or_dict)
            if path.is_dir():
                path = path / "config.json"
            try:
                cfg = json.loads(path.read_text())
            except FileNotFoundError:
                raise UserError(f"{path}: config.json not found") from None
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: not valid JSON ({e})") from None
            where = str(path)
        cfg = cfg.get("text_config", cfg)  # multimodal configs nest the language model
        try:
            heads = int(cfg["num_attention_heads"])
            shape = cls(
                name=name or str(cfg.get("_name_or_path") or cfg.get("model_type") or where),
                layers=int(cfg["num_hidden_layers"]),
                hidden=int(cfg["hidden_size"]),
                heads=heads,
                kv_heads=int(cfg.get("num_key_value_heads") or heads),
                intermediate=int(cfg["intermediate_size"]),
                vocab=int(cfg["vocab_size"]),
                tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                bytes_per_param=bytes_per_param,
                head_dim=int(cfg["head_dim"]) if cfg.get("head_dim") else None,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: not a decoder-only transformer config ({e!r})") from None
        return shape


MODELS: dict[str, ModelShape] = {
    # meta-llama/Llama-3.1-70B-Instruct config.json
    "llama-3.1-70b": ModelShape("llama-3.1-70b", layers=80, hidden=8192, heads=64, kv_heads=8,
                                intermediate=28672, vocab=128256, tied_embeddings=False),
    # meta-llama/Llama-3.2-1B-Instruct config.json (head_dim 64)
    "llama-3.2-1b": ModelShape("llama-3.2-1b", layers=16, hidden=2048, heads=32, kv_heads=8,
                               intermediate=8192, vocab=128256, tied_embeddings=True),
    # Qwen/Qwen2.5-32B-Instruct config.json
    "qwen2.5-32b": ModelShape("qwen2.5-32b", layers=64, hidden=5120, heads=40, kv_heads=8,
                              intermediate=27648, vocab=152064, tied_embeddings=False),
    # Qwen/Qwen2.5-0.5B-Instruct config.json
    "qwen2.5-0.5b": ModelShape("qwen2.5-0.5b", layers=24, hidden=896, heads=14, kv_heads=2,
                               intermediate=4864, vocab=151936, tied_embeddings=True),
}


def get_model(model: ModelShape | str | Path) -> ModelShape:
    """A built-in shape by name, or a shape read from a config.json path."""
    if isinstance(model, ModelShape):
        return model
    if str(model).lower() in MODELS:
        return MODELS[str(model).lower()]
    if Path(model).exists():
        return ModelShape.from_hf_config(model)
    raise UserError(f"unknown model {model!r}; known: {', '.join(MODELS)} (or a config.json path)")


# --------------------------------------------------------------------------------------------------
# Efficiency and overhead constants: one set for every model and GPU. BW/FLOP efficiency, OVERLAP
# and STEP_OVERHEAD_MS were tuned by ``fit_constants()`` against the artifact's two verification
# tables plus the two baseline latencies (docs/definitions.md §8); the others are fixed at typical published
# measurements (NCCL small-message all-reduce latency on NVLink ≈ 10–20 µs, NCCL bus bandwidth
# ≈ 75–80% of NVLink, a handful of ~5 µs kernel launches per layer, vLLM's 0.9 memory utilization).

BW_EFFICIENCY = 0.65  # achievable fraction of peak HBM bandwidth (large GEMV / weight streaming)
FLOP_EFFICIENCY = 0.70  # achievable fraction of dense tensor-core peak (large GEMMs)
OVERLAP = 0.0  # fraction of min(compute, memory) hidden under the larger term (1 = pure roofline)
NVLINK_EFFICIENCY = 0.75  # NCCL ring bus bandwidth / NVLink per-direction peak
ALLREDUCE_LATENCY_US = 15.0  # fixed cost of one all-reduce (launch + synchronisation)
LAYER_OVERHEAD_US = 20.0  # kernel launches of one layer (norms, rotary, attention, activations)
STEP_OVERHEAD_MS = 1.0  # per forward step: framework, batch preparation, sampling, host sync
MEM_UTILIZATION = 0.90  # fraction of GPU memory the server may use (weights + KV)


@dataclass(frozen=True)
class Efficiency:
    bw: float = BW_EFFICIENCY
    flops: float = FLOP_EFFICIENCY
    overlap: float = OVERLAP
    nvlink: float = NVLINK_EFFICIENCY
    allreduce_latency_us: float = ALLREDUCE_LATENCY_US
    layer_overhead_us: float = LAYER_OVERHEAD_US
    step_overhead_ms: float = STEP_OVERHEAD_MS
    mem_utilization: float = MEM_UTILIZATION


DEFAULT_EFFICIENCY = Efficiency()

# vLLM (the engine the paper's vLLM, Sarathi-Serve and vLLM-Spec baselines ran on): the same
# hardware efficiencies, but each GEMM bounded by its slower resource, as a roofline has it
# (OVERLAP = 1). The fitted OVERLAP = 0 describes the artifact's FlexFlow tables (compute *plus*
# weight streaming); nothing measured says vLLM pays that, and first principles say a memory-bound
# GEMM hides its FLOPs under its weight reads (docs/simulator.md, "Each system on its own engine").
VLLM_EFFICIENCY = replace(DEFAULT_EFFICIENCY, overlap=1.0)


@dataclass(frozen=True)
class StepBreakdown:
    """Milliseconds of one forward step, split by what bounds it (summed over layers + LM head)."""

    compute_ms: float
    memory_ms: float
    roofline_ms: float  # max/overlap combination of the two above
    comm_ms: float
    overhead_ms: float

    @property
    def total_ms(self) -> float:
        return self.roofline_ms + self.comm_ms + self.overhead_ms


def _combine(compute: float, memory: float, overlap: float) -> float:
    return max(compute, memory) + (1.0 - overlap) * min(compute, memory)


def allreduce_ms(message_bytes: float, gpu: GPUSpec, tp: int, eff: Efficiency) -> float:
    """Ring all-reduce: each GPU sends and receives 2(p−1)/p of the message, plus a fixed
    latency."""
    if tp <= 1:
        return 0.0
    moved = 2.0 * (tp - 1) / tp * message_bytes
    return 1e3 * moved / (gpu.nvlink_bytes_per_s * eff.nvlink) + eff.allreduce_latency_us * 1e-3


def step_breakdown(model: ModelShape | str, gpu: GPUSpec | str, tp: int, tokens: float,
                   context_tokens: float = 0.0,
                   eff: Efficiency = DEFAULT_EFFICIENCY) -> StepBreakdown:
    """Time of one forward over ``tokens`` new tokens with ``context_tokens`` cached KV tokens.

    Attention FLOPs assume each new token attends to the context of its own request, with one new
    token per request (4·heads·head_dim·context per layer); for trees and prefill chunks this
    undercounts FLOPs that are negligible next to the linear layers at these context lengths. The KV
    of the whole context is read once per layer (tokens of the same request share the read).
    """
    m, g = get_model(model), get_gpu(gpu)
    if tokens <= 0:
        return StepBreakdown(0.0, 0.0, 0.0, 0.0, 0.0)
    peak_flops = g.flops * eff.flops
    peak_bw = g.hbm_bytes_per_s * eff.bw
    q_dim = m.heads * m.dim_per_head
    layer_flops = (2.0 * tokens * m.layer_params + 4.0 * q_dim * context_tokens) / tp
    kv_per_token = m.kv_bytes_per_token(tp) / m.layers  # one layer, one GPU
    layer_bytes = (m.layer_params * m.bytes_per_param / tp
                   + kv_per_token * (context_tokens + tokens))
    layer_compute = 1e3 * layer_flops / peak_flops
    layer_memory = 1e3 * layer_bytes / peak_bw
    head_compute = 1e3 * 2.0 * tokens * m.lm_head_params / tp / peak_flops
    head_memory = 1e3 * m.lm_head_params * m.bytes_per_param / tp / peak_bw
    roof = (m.layers * _combine(layer_compute, layer_memory, eff.overlap)
            + _combine(head_compute, head_memory, eff.overlap))
    comm = m.layers * 2 * allreduce_ms(tokens * m.hidden * m.bytes_per_param, g, tp, eff)
    overhead = m.layers * eff.layer_overhead_us * 1e-3 + eff.step_overhead_ms
    return StepBreakdown(m.layers * layer_compute + head_compute,
                         m.layers * layer_memory + head_memory, roof, comm, overhead)


def step_ms(model: ModelShape | str, gpu: GPUSpec | str, tp: int, tokens: float,
            context_tokens: float = 0.0, eff: Efficiency = DEFAULT_EFFICIENCY) -> float:
    return step_breakdown(model, gpu, tp, tokens, context_tokens, eff).total_ms


def kv_capacity_tokens(model: ModelShape | str, gpu: GPUSpec | str, tp: int,
                       draft: ModelShape | str | None = None, draft_tp: int = 1,
                       eff: Efficiency = DEFAULT_EFFICIENCY) -> int:
    """KV tokens that fit: (tp · memory · utilization − weights) / KV bytes per token.

    With a draft model, it sits on the first ``draft_tp`` GPUs of the group and needs its own KV for
    every cached token, so those GPUs bound the capacity.
    """
    m, g = get_model(model), get_gpu(gpu)
    free = g.memory_bytes * eff.mem_utilization - m.weight_bytes / tp
    per_token = m.kv_bytes_per_token(tp)
    if draft is not None:
        d = get_model(draft)
        free -= d.weight_bytes / draft_tp
        per_token += d.kv_bytes_per_token(draft_tp)
    if free <= 0:
        raise UserError(f"{m.name} does not fit on {tp}x {g.name} "
                         f"({m.weight_bytes / GB:.1f} GB of weights)")
    return int(free // per_token)


# --------------------------------------------------------------------------------------------------
# Profiles

TOKENS_GRID: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 640,
                                768, 896, 1024, 1280, 1536, 2048, 3072, 4096)


def context_grid(max_context: int) -> list[int]:
    """0, 4096, 4× steps, … up to the first value ≥ max_context (the step is linear in context
    between grid points except where the bound switches, so a coarse grid is enough)."""
    grid, c = [0], 4096
    while grid[-1] < max_context:
        grid.append(c)
        c *= 2
    return grid


def roofline_table(model: ModelShape | str, gpu: GPUSpec | str, tp: int,
                   tokens: tuple[int, ...] | list[int] = TOKENS_GRID,
                   contexts: list[int] | None = None, eff: Efficiency = DEFAULT_EFFICIENCY,
                   scale: float = 1.0) -> Table:
    """Step time over ``tokens`` (row ``ms`` at context 0) and, if given, over ``contexts``."""
    tok = np.asarray(tokens, dtype=np.float64)

    def row(context: float) -> np.ndarray:
        return scale * np.array([step_ms(model, gpu, tp, t, context, eff) for t in tok])

    if not contexts:
        return Table(tok, row(0.0))
    ctx = np.asarray(contexts, dtype=np.float64)
    return Table(tok, row(0.0), ctx, np.stack([row(c) for c in ctx]))


def roofline_profile(target: ModelShape | str, draft: ModelShape | str | None, gpu: GPUSpec | str,
                     tp: int, draft_tp: int = 1, *, name: str | None = None,
                     eff: Efficiency = DEFAULT_EFFICIENCY,
                     limits: Limits | None = None, tokens: tuple[int, ...] = TOKENS_GRID,
                     with_context: bool = True, source: str = "roofline") -> LatencyProfile:
    """A LatencyProfile computed from the roofline: verify and draft tables over ``tokens`` and a
    KV-context axis up to the KV capacity; prefill = the verify table; baseline = the 1-token step
    at context 0. Target and draft use the same method and constants. ``draft`` None: no draft
    model (all the memory holds the target's KV; the draft table is all zeros)."""
    t, g = get_model(target), get_gpu(gpu)
    d = get_model(draft) if draft is not None else None
    capacity = kv_capacity_tokens(t, g, tp, d, draft_tp, eff)
    contexts = context_grid(capacity) if with_context else None
    lim = replace(limits or Limits(), kv_capacity_tokens=capacity)
    verify = roofline_table(t, g, tp, tokens, contexts, eff)
    if d is not None:
        draft_table = roofline_table(d, g, draft_tp, tokens, contexts, eff)
        hardware = f"{tp}x {g.name} TP{tp}; draft {d.name} TP{draft_tp}"
    else:
        draft_table = Table(np.array([0.0, 1.0]), np.zeros(2))
        hardware = f"{tp}x {g.name} TP{tp}; no draft model"
    return LatencyProfile(
        name=name or f"{t.name}-{g.name.lower()}-tp{tp}",
        verify=verify,
        draft=draft_table,
        baseline_ms=round(float(verify(1)), 3),
        source=source,
        hardware=hardware,
        limits=lim,
    )


# --------------------------------------------------------------------------------------------------
# Calibration against the artifact (docs/definitions.md §8)

COMPARE_TOKENS = (128, 256, 384, 512, 640, 768, 896, 1024)


def table_errors(eff: Efficiency = DEFAULT_EFFICIENCY, context_tokens: float = 0.0,
                 ) -> list[tuple[str, int, float, float, float]]:
    """Rows (case, tokens, artifact ms, roofline ms, relative error) for the 128–1024 points of each
    artifact model on its 4x A100-80GB set-up; the 1-token baseline is included as tokens = 1."""
    return [(case, *row) for case, fam in FAMILIES.items()
            for row in artifact_differences(fam.target, GPU_80G, fam.tp_80g, eff, context_tokens)]


def artifact_differences(model: ModelShape | str, gpu: GPUSpec | str, tp: int,
                         eff: Efficiency = DEFAULT_EFFICIENCY, context_tokens: float = 0.0,
                         ) -> list[tuple[int, float, float, float]]:
    """Rows (tokens, artifact ms, roofline ms, relative error) of ``model`` on ``tp`` x ``gpu``
    against the artifact's measured table of that model (4x A100-80GB for Llama-3.1-70B, 2x for
    Qwen2.5-32B), the 1-token baseline as tokens = 1; [] for a model the artifact did not measure.
    Other hardware is compared with the same table, to show what it would change."""
    name = get_model(model).name
    if name not in FAMILIES:
        return []
    table = dict(zip(*ARTIFACT_VERIFY_MS[name]))
    points = [(1, FAMILIES[name].baseline_ms)] + [(n, table[n]) for n in COMPARE_TOKENS]
    rows = []
    for n, ref in points:
        est = step_ms(model, gpu, tp, n, context_tokens, eff)
        rows.append((n, ref, est, (est - ref) / ref))
    return rows


def fit_constants(base: Efficiency = DEFAULT_EFFICIENCY, overlap: float | None = None,
                  ) -> Efficiency:
    """Grid search of bw, flops, overlap and step_overhead_ms minimising the mean squared relative
    error over both artifact tables and both baselines (one shared set; the rest stay fixed).
    ``overlap`` pins that constant (1.0: the best a pure max(compute, memory) roofline can do)."""
    grid = {"bw": np.arange(0.60, 0.951, 0.05), "flops": np.arange(0.50, 0.951, 0.05),
            "overlap": np.arange(0.0, 1.01, 0.1) if overlap is None else [overlap],
            "step_overhead_ms": np.arange(0.0, 30.1, 1.0)}
    best, best_loss = base, math.inf
    for values in itertools.product(*grid.values()):
        eff = replace(base, **{k: round(float(v), 3) for k, v in zip(grid, values)})
        loss = float(np.mean([e * e for *_, e in table_errors(eff)]))
        if loss < best_loss:
            best, best_loss = eff, loss
    return best


def compare_with_table(eff: Efficiency = DEFAULT_EFFICIENCY, context_tokens: float = 0.0,
                       out: IO[str] | None = None) -> dict[str, dict[str, float]]:
    """Print the roofline vs the artifact's verification tables; return max/mean |relative error|
    per case over 128–1024 tokens (``*-baseline`` entries: the 1-token step vs the baseline)."""
    out = out or sys.stdout
    rows = table_errors(eff, context_tokens)
    print(f"roofline vs artifact verification table (context {context_tokens:g} tokens); "
          "constants: "
          + ", ".join(f"{f.name}={getattr(eff, f.name)}" for f in fields(eff)), file=out)
    header = f"{'profile':<15}{'tokens':>7}{'table ms':>10}{'roofline ms':>13}{'rel err':>9}"
    print(header, file=out)
    summary: dict[str, dict[str, float]] = {}
    for case in FAMILIES:
        errs = []
        for c, n, ref, est, err in rows:
            if c != case:
                continue
            label = f"{n} (base)" if n == 1 else str(n)
            print(f"{c:<15}{label:>7}{ref:>10.1f}{est:>13.1f}{err:>+9.1%}", file=out)
            if n == 1:
                summary[f"{case}-baseline"] = {"max": abs(err), "mean": abs(err)}
            else:
                errs.append(abs(err))
        summary[case] = {"max": max(errs), "mean": float(np.mean(errs))}
    all_errs = [abs(e) for _, n, _, _, e in rows if n != 1]
    summary["all"] = {"max": max(all_errs), "mean": float(np.mean(all_errs))}
    for case, s in summary.items():
        print(f"{case:<24} max |err| {s['max']:6.1%}   mean |err| {s['mean']:6.1%}", file=out)
    return summary


def _main(argv: list[str]) -> None:
    """No flag: the shipped constants at context 0; ``--context N``: at N KV context tokens;
    ``--fit``: also refit the constants (free overlap, then pure max) and compare those."""
    context = float(argv[argv.index("--context") + 1]) if "--context" in argv else 0.0
    compare_with_table(context_tokens=context)
    if "--fit" in argv:
        for pinned in (None, 1.0):
            print()
            compare_with_table(fit_constants(overlap=pinned), context_tokens=context)


if __name__ == "__main__":
    _main(sys.argv[1:])
