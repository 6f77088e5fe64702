"""Llama / Qwen2 forward over one flat batch (see batch.py) with a paged KV cache (see kv_cache.py).

Parameter names follow Hugging Face (``model.layers.0.self_attn.q_proj.weight`` ...), so a Hugging Face
state dict loads as is.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from adaserve.core import jit
from adaserve.core.environment import env_switch
from adaserve.core.errors import UserError
from adaserve.scheduling.admission import SOLO_QUERY_THRESHOLD

from . import cpu_decode
from .batch import FlatBatch
from .config import ModelConfig
from .kv_cache import BLOCK_SIZE, KVCache
from .paged_attention import PagedCall, paged_attention_enabled, paged_call


# CPU linears through oneDNN with prepacked weights (``torch.ops.mkldnn._reorder_linear_weight`` +
# ``_linear_pointwise``, what inductor uses for frozen CPU linears) or plain F.linear (MKL's GEMM).
# Which is faster depends on the CPU, the dtype, the threads and the number of rows: on the 2-core
# AMD EPYC VM prepacked is faster from 2 rows on and slower at 1 row; on an Intel CPU it was slower
# (docs/engine.md, "CPU kernels"). So nothing here guesses: the runtime times both on the
# model's own weights at load time (runtime/kernels.py) and records, per dtype, from how many rows
# on the prepacked path wins (``set_prepack``). Until then, and for dtypes this CPU cannot pack (bf16
# needs AVX512 or AVX-NE-CONVERT), linears are plain F.linear. ``ADASERVE_PREPACK=0/1`` (read at model
# load) forces it.
# The packed copy lives next to the parameter (state dicts, tying and loading are unchanged) and is
# rebuilt whenever the parameter is replaced or modified in place.
PACK_BATCH_HINT = 256
PREPACK_ENV = "ADASERVE_PREPACK"
PREPACKED, PLAIN = "onednn-prepacked", "plain"
_packed: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_min_rows: dict[torch.dtype, int] = {}  # prepacked from this many rows on, per dtype (set_prepack)
# Few-row fp32 CPU linears (a batch-1 decode step: a matrix-vector product, memory-bound; a small
# tree: a few rows) can run a compiled loop instead (``cpu_decode.matmul_rows``: each weight row read
# once for all input rows): on the development VM the load-time timing of SmolLM2's weights gave it
# 0.81 of F.linear's time at one row. Chosen by measurement too (runtime/kernels.py,
# ``set_compiled_rows``: one row by timing the linears, 2 and 4 by timing whole steps), never by
# default; steps of at most that many tokens then run every decoder layer as one compiled call
# (``cpu_decode``).
GEMV = "numba-gemv"
MAX_COMPILED_ROWS = 4  # the most rows the measurement tries (1, 2, 4) and ADASERVE_CPU_DECODE=1 allows
_compiled_rows: dict[torch.dtype, int] = {}


@functools.lru_cache(maxsize=None)
def prepack_supported(dtype: torch.dtype = torch.float32) -> bool:
    """Decided once per process and dtype, by trying it: oneDNN's prepacked linear works in this torch
    build on this CPU for weights of ``dtype``."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 2, dtype=dtype), PACK_BATCH_HINT)
        torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2, dtype=dtype), w, None, "none", [], "")
        return True
    except (RuntimeError, AttributeError):
        return False


def prepack_forced() -> bool | None:
    """``ADASERVE_PREPACK``, read when a model is loaded (runtime/kernels.py): 1 forces the prepacked
    path at every row count (where supported), 0 forces F.linear, unset or empty lets the load-time
    measurement decide."""
    return env_switch(PREPACK_ENV, "prepacked oneDNN linears", "plain F.linear", "measured at model load")


def set_prepack(dtype: torch.dtype, min_rows: int | None) -> None:
    """Set the kernel of CPU linears of ``dtype``: the prepacked path for inputs of at least
    ``min_rows`` rows (1: always), plain F.linear below; None, or a dtype this CPU cannot pack:
    always plain."""
    if min_rows is None or not prepack_supported(dtype):
        _min_rows.pop(dtype, None)
    else:
        _min_rows[dtype] = max(1, int(min_rows))


def prepack_min_rows(dtype: torch.dtype = torch.float32) -> int | None:
    """From how many input rows CPU linears of ``dtype`` run prepacked now (None: never)."""
    return _min_rows.get(dtype)


def prepack_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether CPU linears of ``dtype`` use prepacked oneDNN weights at all now."""
    return dtype in _min_rows


def set_compiled_rows(dtype: torch.dtype, rows: int) -> None:
    """Run CPU linears of ``dtype`` with inputs of at most ``rows`` rows (0: none) with the compiled
    kernel, and steps of at most that many tokens with ``cpu_decode`` (fp32 only, and only where
    numba is enabled); larger inputs keep their kernel."""
    if rows >= 1 and dtype == torch.float32 and jit.enabled():
        _compiled_rows[dtype] = min(int(rows), MAX_COMPILED_ROWS)
    else:
        _compiled_rows.pop(dtype, None)


def set_gemv(dtype: torch.dtype, on: bool) -> None:
    """``set_compiled_rows`` for one-row inputs only (on) or none (off)."""
    set_compiled_rows(dtype, 1 if on else 0)


def compiled_rows(dtype: torch.dtype = torch.float32) -> int:
    return _compiled_rows.get(dtype, 0)


def gemv_enabled(dtype: torch.dtype = torch.float32) -> bool:
    return compiled_rows(dtype) >= 1


CPU_DECODE_ENV = "ADASERVE_CPU_DECODE"


def cpu_decode_setting() -> bool | None:
    """``ADASERVE_CPU_DECODE``: 1 runs every eligible step of up to ``MAX_COMPILED_ROWS`` tokens with
    the compiled layers (``cpu_decode``), 0 none; unset: steps of up to as many tokens as the
    load-time measurement chose the compiled linear for (the layers' products are that kernel)."""
    return env_switch(CPU_DECODE_ENV, f"compiled CPU steps of up to {MAX_COMPILED_ROWS} tokens", "operator path",
                      "as many tokens as the compiled linear measured faster for")


def cpu_decode_tokens(dtype: torch.dtype, rows: int) -> int:
    """Up to how many tokens CPU steps in ``dtype`` run ``cpu_decode`` (0: none) when the compiled
    linear is used up to ``rows`` rows: fp32, numba enabled, and ``cpu_decode_setting``."""
    if dtype != torch.float32 or not jit.enabled():
        return 0
    setting = cpu_decode_setting()
    return rows if setting is None else MAX_COMPILED_ROWS if setting else 0


def cpu_decode_limit(weight: torch.Tensor) -> int:
    """``cpu_decode_tokens`` for a model with weights like ``weight``, now (0 off the CPU)."""
    return cpu_decode_tokens(weight.dtype, compiled_rows(weight.dtype)) if weight.device.type == "cpu" else 0


def fused_cpu_decode(model: "Transformer", batch: FlatBatch, cache: KVCache) -> bool:
    """Whether ``model.hidden`` runs ``batch`` with ``cpu_decode``: at most ``cpu_decode_limit``
    tokens (any mix of decodes, chunks and trees: each row attends where its mask says), an fp32
    CPU cache, dense boolean masks, no tensor parallelism."""
    if batch.token_ids.shape[0] > cpu_decode_limit(model.lm_head.weight):
        return False
    if cache.k.dtype != torch.float32 or cache.k.device.type != "cpu":
        return False
    if any(g.mask is None or g.mask.dtype != torch.bool for g in batch.groups):
        return False
    return type(model.model.layers[0].self_attn.o_proj) is Linear  # a sharded layer all-reduces


def kernel_description(dtype: torch.dtype, min_rows: int | None, compiled: int) -> str:
    """``plain``, ``onednn-prepacked`` or ``onednn-prepacked from N rows`` (plain below), prefixed by
    ``numba-gemv at 1 row, `` (or ``up to N rows``) when inputs of so few rows run the compiled
    kernel, followed by ``, compiled 1-token layers`` (or ``layers up to N tokens``) when steps of
    that many tokens run ``cpu_decode``. Profiles record it: it changes what a decode step costs."""
    kind = PLAIN if min_rows is None else PREPACKED if min_rows == 1 else f"{PREPACKED} from {min_rows} rows"
    if compiled:
        kind = f"{GEMV} at 1 row, {kind}" if compiled == 1 else f"{GEMV} up to {compiled} rows, {kind}"
    tokens = cpu_decode_tokens(dtype, compiled)
    if tokens:
        kind += ", compiled 1-token layers" if tokens == 1 else f", compiled layers up to {tokens} tokens"
    return kind


def linear_kernel(weight: torch.Tensor) -> str:
    """What a ``Linear`` with this weight runs at inference now (``kernel_description``)."""
    if weight.device.type != "cpu":
        return PLAIN
    return kernel_description(weight.dtype, prepack_min_rows(weight.dtype), compiled_rows(weight.dtype))


@contextlib.contextmanager
def kernel_settings_restored(dtype: torch.dtype):
    """Run a block that changes the CPU kernel settings of ``dtype`` (``set_prepack``,
    ``set_compiled_rows``, ``ADASERVE_CPU_DECODE``) to time them, and put them back afterwards."""
    rows, compiled, env = prepack_min_rows(dtype), compiled_rows(dtype), os.environ.get(CPU_DECODE_ENV)
    try:
        yield
    finally:
        set_prepack(dtype, rows)
        set_compiled_rows(dtype, compiled)
        if env is None:
            os.environ.pop(CPU_DECODE_ENV, None)
        else:
            os.environ[CPU_DECODE_ENV] = env


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters) whose CPU inference forward can run oneDNN on a prepacked weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        few = _compiled_rows.get(w.dtype)
        if few is not None and x.numel() <= few * w.shape[1] and x.dtype == w.dtype and w.device.type == "cpu" \
                and not torch.is_grad_enabled():
            return self.gemv(x)
        rows = _min_rows.get(w.dtype)  # a dict lookup: this runs ~200 times per step
        if rows is not None and w.dtype == x.dtype and w.device.type == "cpu" and not torch.is_grad_enabled():
            if rows == 1 or x.numel() >= rows * x.shape[-1]:
                return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight(), self.bias, "none", [], "")
        return F.linear(x, w, self.bias)

    def gemv(self, x: torch.Tensor) -> torch.Tensor:
        """The forward of a few-row input with the compiled kernel (CPU, no autograd)."""
        w = self.weight.detach()
        out = torch.empty(*x.shape[:-1], w.shape[0], dtype=w.dtype)
        bias = cpu_decode.EMPTY if self.bias is None else self.bias.detach().numpy()
        xs = x.detach().reshape(-1, w.shape[1]).contiguous().numpy()
        cpu_decode.matmul_rows(w.numpy(), xs, bias, out.view(-1, w.shape[0]).numpy())
        return out

    def packed_weight(self) -> torch.Tensor:
        """The oneDNN-prepacked copy of the weight, built on first use and again whenever the
        parameter was replaced or modified in place."""
        w = self.weight
        key = (w.data_ptr(), w._version, tuple(w.shape))
        hit = _packed.get(self)
        if hit is None or hit[0] != key:
            hit = _packed[self] = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_BATCH_HINT))
        return hit[1]

    def drop_packed(self) -> None:
        """Free the packed copy (it is rebuilt on the next prepacked forward)."""
        _packed.pop(self, None)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused op in fp32 instead of seven (a decode step runs this 2 * layers + 1 times); other
        # dtypes normalize in fp32 and scale in their own, as Hugging Face's Llama does
        if (x.dtype == torch.float32 or x.is_cuda) and self.weight.dtype == x.dtype:
            # on CUDA one fused kernel in bf16/fp16 too (it normalizes in fp32 and rounds once, where
            # the unfused form rounds the normalized value before scaling): three kernels fewer per norm
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos, signed_sin [T, 1, head_dim] from ``Transformer.rope``.

    Hugging Face's ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)``: the halves
    swapped by one ``roll`` and the sign folded into ``signed_sin = cat(-sin, sin)`` (3 ops, not 6)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """cache [num_blocks, bs, kv_heads, hd], block_tables [B, n] -> [B, kv_heads, n * bs, hd].

    Gathers into a reused buffer: fresh multi-megabyte CPU allocations cost more than the copy."""
    b, n = block_tables.shape
    out = buffer[: b * n * math.prod(cache.shape[1:])].view(b * n, *cache.shape[1:])
    torch.index_select(cache, 0, block_tables.view(-1), out=out)
    return out.view(b, n * cache.shape[1], *cache.shape[2:]).transpose(1, 2)


class FusedLinear:
    """Several ``Linear``s of the same input run as one GEMM: their weights (and biases) are
    concatenated once and the parts' parameters become views of the concatenation, so memory, state
    dicts and in-place updates are unchanged. One call instead of several per layer matters at decode,
    where each call's fixed cost is a visible share of a memory-bound step.

    Rebuilt when a part's parameter was replaced or moved (loading, tying, tensor-parallel sharding,
    ``.to``). Not a module: the fused ``Linear`` is not registered, nothing new appears in the state
    dict."""

    def __init__(self, *parts: Linear):
        self.parts = parts
        self.linear: Linear | None = None
        self._weights: tuple = ()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The parts' outputs side by side ``[..., sum(out_features)]``."""
        return self.fused()(x)

    def fused(self) -> Linear:
        """The ``Linear`` over the concatenated weights, fused again if a part changed."""
        lin = self.linear
        if lin is None or not self._current():
            lin = self._fuse()
        return lin

    def _current(self) -> bool:
        ws = self._weights
        return (all(p.weight is w for p, w in zip(self.parts, ws))
                and ws[0].data_ptr() == self.linear.weight.data_ptr())

    def _fuse(self) -> Linear:
        parts = self.parts
        sizes = [p.weight.shape[0] for p in parts]
        w0 = parts[0].weight
        has_bias = parts[0].bias is not None
        if any(p.weight.dtype != w0.dtype or p.weight.device != w0.device or (p.bias is not None) != has_bias
               or p.weight.shape[1] != w0.shape[1] for p in parts):
            raise ValueError("fused linears need one input size, dtype, device and bias setting")
        with torch.inference_mode(False), torch.no_grad():
            with torch.device("meta"):
                lin = Linear(w0.shape[1], sum(sizes), bias=has_bias)
            lin.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
            if has_bias:
                lin.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
            off = 0
            for p, n in zip(parts, sizes):
                p.weight.data = lin.weight.data[off:off + n]
                if has_bias:
                    p.bias.data = lin.bias.data[off:off + n]
                p.drop_packed()
                off += n
        self.linear, self._weights = lin, tuple(p.weight for p in parts)
        return lin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.qkv = FusedLinear(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x, cos, sin, batch: FlatBatch, k_cache: torch.Tensor, v_cache: torch.Tensor, workspace,
                masks: list[torch.Tensor]):
        """``masks``: per group, its boolean mask, or with query heads folded onto their KV head
        (``fold_gqa``) the additive bias ``[B, 1, G * Q, keys]`` of ``folded_attention_bias``, or
        the group's ``PagedCall`` (paged_attention.py)."""
        t, h, kv = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = self.qkv(x).view(t, h + 2 * kv, self.head_dim)
        qk = apply_rope(qkv[:, :h + kv], cos, sin)  # q and k rotated together
        q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + kv:]
        # write the new K/V first: every query then reads its keys (context + new tokens) from the cache
        k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, batch.slot_mapping, k)
        v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, batch.slot_mapping, v)
        out = q if len(batch.groups) == 1 else torch.empty_like(q)
        for g, mask in zip(batch.groups, masks):
            b, nq = g.block_tables.shape[0], g.num_queries
            qg = q if g.all_rows else q[g.rows]
            if b * nq != qg.shape[0]:  # pad to [B * Q]
                qg = qg.new_zeros(b * nq, self.num_heads, self.head_dim).index_copy_(0, g.pad_index, qg)
            if isinstance(mask, PagedCall):  # read from the paged cache through the mask window
                out = self._scatter(out, mask(qg, k_cache, v_cache), g, b * nq)
                continue
            kg = gather_blocks(k_cache, g.block_tables, workspace[0])  # [B, kv_heads, S, head_dim]
            vg = gather_blocks(v_cache, g.block_tables, workspace[1])
            if mask.dtype == torch.bool:
                qg = qg.view(b, nq, h, self.head_dim).transpose(1, 2)
                og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, enable_gqa=True).transpose(1, 2)
            else:  # query head kv * G + j attends as query row j * Q + i of KV head kv
                grp = h // kv
                qg = qg.view(b, nq, kv, grp, self.head_dim).permute(0, 2, 3, 1, 4).reshape(b, kv, grp * nq, -1)
                og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask).unflatten(2, (grp, nq))
                og = og.permute(0, 3, 1, 2, 4)  # [B, Q, kv, G, head_dim]: heads back in order
            out = self._scatter(out, og.reshape(b * nq, self.num_heads, self.head_dim), g, b * nq)
        return self.o_proj(out.reshape(t, -1))

    @staticmethod
    def _scatter(out: torch.Tensor, og: torch.Tensor, g, padded: int) -> torch.Tensor:
        """A group's attention output ``og`` [padded rows, heads, head_dim] into the step's rows."""
        if padded != len(g.rows):
            og = og[g.pad_index]
        if g.all_rows:
            return og
        out[g.rows] = og
        return out


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.gate_up = FusedLinear(self.gate_proj, self.up_proj)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, batch, k_cache, v_cache, workspace, masks):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, k_cache, v_cache, workspace, masks)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


CUDNN_SDPA_ENV = "ADASERVE_CUDNN_SDPA"


def configure_attention_backends() -> None:
    """Keep cuDNN's attention out of ``scaled_dot_product_attention`` unless ``ADASERVE_CUDNN_SDPA=1``
    (flash, memory-efficient and math kernels stay). Process-wide: PyTorch has no per-call switch
    short of a context manager in every attention call.

    Why: cuDNN builds an execution graph for every new attention shape it meets, and the engine's
    eager steps (prefill chunks, large trees, mixed batches) bring a new query or key length almost
    every time. On an H200 (issue 12, 2026-11-26) every step holding a prefill chunk took 60-180 ms
    where the profile, which repeats each shape, measured 8-14 ms; on an H100 (2026-11-27,
    ``python -m adaserve.runtime.weight_floor``) a prefill of a new length took 70.6 ms with cuDNN
    attention allowed and 8.9 ms without (1B shape). A no-op without CUDA."""
    value = os.environ.get(CUDNN_SDPA_ENV, "0").strip()
    if value not in ("0", "1", ""):
        raise UserError(f"{CUDNN_SDPA_ENV}={value!r}: use 1 (let SDPA choose cuDNN attention) or 0 (keep it out)")
    if value != "1" and hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)


GQA_FOLD_ENV = "ADASERVE_GQA_FOLD"


def fold_gqa(device: torch.device) -> bool:
    """Whether grouped-query attention folds each KV head's query heads into its query rows
    (``ADASERVE_GQA_FOLD``: 1 / 0; unset: on CUDA only).

    Why: on CUDA, ``scaled_dot_product_attention`` with a mask and ``enable_gqa`` has only the math
    kernel and cuDNN's (measured on an H100: SDPA picked the math kernel for decode, tree and prefill
    calls, and a graphed decode step of 64 sequences took 12.4 ms against 3.2 ms with cuDNN
    attention). Folded, the call has as many query heads as KV heads, which the memory-efficient
    kernel accepts with a mask, and it plans nothing per shape: that step took 2.87 ms. CPUs keep
    ``enable_gqa``: their kernels take it with a mask, and the CPU timings were measured that way."""
    setting = env_switch(GQA_FOLD_ENV, "fold query heads onto their KV head", "enable_gqa", "fold on CUDA")
    return device.type == "cuda" if setting is None else setting


def folded_attention_bias(mask: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """A group's boolean mask ``[B, 1, Q, keys]`` as the additive bias of folded attention: ``[B, 1,
    group * Q, keys]``, row ``j * Q + i`` = query row ``i`` (the same for each of a KV head's
    ``group`` query heads), 0 where it may attend, -inf elsewhere. Built once per forward, not per
    layer (SDPA would convert a boolean mask in every call)."""
    b, _, q, keys = mask.shape
    bias = torch.full((b, 1, group, q, keys), float("-inf"), dtype=dtype, device=mask.device)
    return bias.masked_fill_(mask.unsqueeze(2), 0.0).view(b, 1, group * q, keys)


class Transformer(nn.Module):
    """``forward(batch, cache) -> logits [len(batch.logits_rows), vocab]``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        configure_attention_backends()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self._inv_freq = config.rope_inv_freq()  # fp32 on the CPU; a plain attribute so .to(dtype) leaves it alone

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        freqs = positions[:, None].float() * self._inv_freq
        cos, sin = freqs.cos(), freqs.sin()
        return (torch.cat((cos, cos), dim=-1)[:, None, :].to(dtype),
                torch.cat((-sin, sin), dim=-1)[:, None, :].to(dtype))  # see apply_rope

    @torch.inference_mode()
    def forward(self, batch: FlatBatch, cache: KVCache) -> torch.Tensor:
        return self.head(self.hidden(batch, cache)[batch.logits_rows])

    def _attention_input(self, g, device: torch.device, block_size: int):
        """A group's dense mask, or with ``ADASERVE_PAGED_ATTENTION=1`` for decodes and trees its
        paged kernel's launch (paged_attention.py), which reads the mask window itself."""
        if g.window is not None and g.num_queries < SOLO_QUERY_THRESHOLD and paged_attention_enabled(device):
            a, w = self.model.layers[0].self_attn, g.window
            return paged_call(g.block_tables, w.prefix, w.start, w.local, a.num_heads, a.num_kv_heads, a.head_dim,
                              block_size)
        return g.attention_mask(block_size)

    @torch.inference_mode()
    def hidden(self, batch: FlatBatch, cache: KVCache) -> torch.Tensor:
        """The last layer's output for every row ``[T, hidden]`` (before the final norm); the part
        of the forward that CUDA graphs capture (engine/cuda_graphs.py)."""
        if fused_cpu_decode(self, batch, cache):
            return cpu_decode.step_hidden(self, batch, cache)
        x = self.model.embed_tokens(batch.token_ids)
        cos, sin = self.rope(batch.positions, x.dtype)
        block_numel = cache.k[0, 0].numel()
        need = max(g.block_tables.numel() for g in batch.groups) * block_numel
        workspace = cache.workspace(2 * need).view(2, need).unbind(0)
        attn = self.model.layers[0].self_attn
        masks = [self._attention_input(g, x.device, cache.block_size) for g in batch.groups]
        if attn.num_heads > attn.num_kv_heads and fold_gqa(x.device):
            masks = [m if isinstance(m, PagedCall) else
                     folded_attention_bias(m, attn.num_heads // attn.num_kv_heads, x.dtype) for m in masks]
        for layer, k, v in zip(self.model.layers, cache.k.unbind(0), cache.v.unbind(0)):
            x = layer(x, cos, sin, batch, k, v, workspace, masks)
        return x

    @torch.inference_mode()
    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of hidden rows (final norm, then the LM head; both act row by row)."""
        return self.lm_head(self.model.norm(x))

    def make_cache(self, num_blocks: int, block_size: int = BLOCK_SIZE) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, num_blocks, block_size, dtype=p.dtype, device=p.device)
