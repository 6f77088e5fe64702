"""Decode and verification steps of real model shapes against the weight-read floor (issue 12).

    python -m adaserve.runtime.weight_floor [--shapes llama-3.2-1b,llama-3.1-8b] [--device cuda]
                                            [--graphs on,off] [--json OUT]

A decode step must read every weight once, so weight bytes / memory bandwidth is the least a step
can cost (the floor). The bandwidth is measured here (a device-to-device copy, bytes read plus
written), not taken from a datasheet. Each shape gets random bf16 weights drawn on the device (no
checkpoint, no download) and ``StepBench`` times the target forward of a few step shapes, eagerly
and as the engine replays them with CUDA graphs; every step is reported in ms, as a multiple of the
floor and as a multiple of the one-token step (what verifying a tree costs beyond decoding).

Prefill steps are timed twice over: one length repeated (what ``adaserve profile`` measures) and a
new length at every call (what a serving run meets), the latter with cuDNN attention allowed and
kept out (``engine.model.configure_attention_backends``): on a GPU a kernel that plans per shape
shows up as the difference.

Two more readings say where a step's time goes, for the next change to aim at: the kernels of one
eager decode step by device time (``torch.profiler``; on the CPU, operators by CPU time), and the
attention kernel SDPA picks for the engine's decode and prefill calls (on CUDA query heads folded
onto their KV head with an additive bias, ``engine.model.fold_gqa``; the graphed steps are timed
unfolded too)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch

from adaserve.core.profile import Limits
from adaserve.engine.cuda_graphs import CHUNK_QUERY_BUCKETS, MAX_GRAPH_TOKENS
from adaserve.engine.config import ModelConfig
from adaserve.engine.model import GQA_FOLD_ENV, Transformer, fold_gqa, folded_attention_bias

from .profiler import StepBench, sync
from .random_checkpoint import SHAPES

# (label, sequences, new tokens in all, context tokens in all): chains of tokens/sequences each
STEPS = (("decode 1 seq x 1 token", 1, 1, 128),
         ("decode 16 seqs x 1 token", 16, 16, 16 * 128),
         ("verify 64 tokens: 8 seqs x 8", 8, 64, 8 * 128),
         ("decode 64 seqs x 1 token", 64, 64, 64 * 128),
         ("verify 256 tokens: 32 seqs x 8", 32, 256, 32 * 128))
# prefill lengths, each run once per process: one set with cuDNN attention allowed, one without
COLD_LENGTHS = {"on": (97, 211, 333, 457, 589, 701, 823, 947), "off": (101, 223, 347, 461, 593, 709, 827, 953)}
WARM_PREFILL = 512
GRAPH_LIMITS = Limits(max_batch_requests=64, max_batch_tokens=1024, prefill_chunk=1024, max_seq_len=2048)


def random_model(config: ModelConfig, dtype: torch.dtype, device: str | torch.device) -> Transformer:
    """Random weights N(0, 0.02) (norms 1) allocated directly on the device (no fp32 copy)."""
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.tie_weights()
    return model.eval()


def weight_bytes_per_decode_step(model: Transformer) -> int:
    """Bytes of weights one decode step reads: every matrix once (the embedding only as the LM head)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights counted once
    if not model.config.tie_word_embeddings:
        emb = model.model.embed_tokens.weight
        total -= emb.numel() * emb.element_size()  # a lookup reads a few rows
    return total


def measured_copy_bandwidth(device: str | torch.device, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), median of 5 after a warm-up."""
    device = torch.device(device)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()  # never time zeros
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / statistics.median(times[1:])


def step_times(model: Transformer, graphs: bool, repeat: int = 20) -> dict[str, float]:
    """Median ms of each of ``STEPS`` (target forward only)."""
    bench = StepBench(model, 64 * 128 + 1024, graphs=GRAPH_LIMITS if graphs else None)
    out = {label: bench.step_ms(seqs, tokens, context, repeat) for label, seqs, tokens, context in STEPS}
    if bench.runner is not None:
        out["graphed steps"] = bench.runner.stats["graph_steps"]
    return out


@contextlib.contextmanager
def cudnn_attention(allowed: bool):
    """SDPA may (or may not) pick cuDNN's attention inside the block; the setting is restored after
    (``engine.model.configure_attention_backends`` keeps it out by default)."""
    has_switch = hasattr(torch.backends.cuda, "enable_cudnn_sdp")
    before = torch.backends.cuda.cudnn_sdp_enabled() if has_switch else False
    if has_switch:
        torch.backends.cuda.enable_cudnn_sdp(allowed)
    try:
        yield
    finally:
        if has_switch:
            torch.backends.cuda.enable_cudnn_sdp(before)


@contextlib.contextmanager
def gqa_folded(on: bool):
    """Grouped-query attention folded (``engine.model.fold_gqa``: the default on CUDA) or not, inside
    the block; the setting is restored after."""
    before = os.environ.get(GQA_FOLD_ENV)
    os.environ[GQA_FOLD_ENV] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(GQA_FOLD_ENV, None)
        else:
            os.environ[GQA_FOLD_ENV] = before


def prefill_times(model: Transformer, graphs: bool = False, repeat: int = 5) -> dict[str, float]:
    """ms of a ``WARM_PREFILL``-token prefill (median, one length repeated), and the median over
    ``COLD_LENGTHS`` of one call per new length, with cuDNN attention allowed and kept out; with
    ``graphs``, both again as the engine with CUDA graphs runs them (labels ending in "graphed"):
    every chunk bucket captured first, then lengths of up to ``MAX_GRAPH_TOKENS`` tokens."""
    max_tokens = max(max(v) for v in COLD_LENGTHS.values()) + 64
    bench = StepBench(model, max_tokens)
    out = {f"prefill {WARM_PREFILL} tokens, same length repeated": bench.prefill_ms(WARM_PREFILL, repeat)}
    for cudnn, lengths in COLD_LENGTHS.items():
        with cudnn_attention(cudnn == "on"):
            times = [bench.prefill_once_ms(n) for n in lengths]
        out[f"prefill, a new length each call, cuDNN attention {cudnn}"] = statistics.median(times)
    if graphs:
        bench = StepBench(model, max_tokens, graphs=GRAPH_LIMITS)
        bench.runner.capture_ahead(CHUNK_QUERY_BUCKETS)
        out[f"prefill {WARM_PREFILL} tokens, same length repeated, graphed"] = bench.prefill_ms(WARM_PREFILL, repeat)
        times = [bench.prefill_once_ms(n) for n in COLD_LENGTHS["off"] if n <= MAX_GRAPH_TOKENS]
        out["prefill, a new length each call, graphed"] = statistics.median(times)
    return out


def kernel_breakdown(model: Transformer, steps: int = 5, top: int = 12) -> list[dict]:
    """The ``top`` kernels (CUDA; operators on the CPU) of an eager 1-sequence decode step (128
    context tokens) by time: ms and calls per step, averaged over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    bench = StepBench(model, 1024)
    bench.step_ms(1, 1, 128, 2)  # warm-up
    on_cuda = model.lm_head.weight.is_cuda
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=acts) as prof:
        bench.step_ms(1, 1, 128, steps - 1)  # one warm-up call + steps - 1 timed: ``steps`` forwards
    rows = []
    for e in prof.key_averages():
        t = e.self_device_time_total if on_cuda else e.self_cpu_time_total
        if t > 0 and (not on_cuda or e.device_type == torch.autograd.DeviceType.CUDA):
            rows.append({"name": e.key[:90], "ms_per_step": t / 1e3 / steps, "calls_per_step": e.count / steps})
    rows.sort(key=lambda r: -r["ms_per_step"])
    total = sum(r["ms_per_step"] for r in rows)
    return [{"name": "(all)", "ms_per_step": total, "calls_per_step": sum(r["calls_per_step"] for r in rows)}] \
        + rows[:top]


def sdpa_choice(model: Transformer, queries: int, keys: int) -> str:
    """The backend ``scaled_dot_product_attention`` picks for one request's call as the engine makes
    it (``queries`` rows against ``keys`` gathered keys): query heads folded onto their KV head with an
    additive bias where ``fold_gqa`` says so, else a boolean mask and grouped K/V heads."""
    from torch.nn.attention import SDPBackend

    c, w = model.config, model.lm_head.weight
    k = torch.randn(1, c.num_kv_heads, keys, c.head_dim, dtype=w.dtype, device=w.device)
    mask = torch.ones(1, 1, queries, keys, dtype=torch.bool, device=w.device)
    fold = c.num_heads > c.num_kv_heads and fold_gqa(w.device)
    if fold:
        group = c.num_heads // c.num_kv_heads
        q = torch.randn(1, c.num_kv_heads, group * queries, c.head_dim, dtype=w.dtype, device=w.device)
        mask = folded_attention_bias(mask, group, w.dtype)
    else:
        q = torch.randn(1, c.num_heads, queries, c.head_dim, dtype=w.dtype, device=w.device)
    try:
        choice = int(torch._fused_sdp_choice(q, k, k, mask, 0.0, False, scale=None, enable_gqa=not fold))
    except (AttributeError, TypeError, RuntimeError) as e:  # a private function: may change
        return f"unknown ({type(e).__name__})"
    names = {int(getattr(SDPBackend, n)): n for n in dir(SDPBackend) if n.isupper()}
    return names.get(choice, str(choice))


def measure_shape(shape: str, device: str, graph_modes: list[bool], nbytes: int = 2 << 30) -> dict:
    model = random_model(SHAPES[shape], torch.bfloat16, device)
    weights = weight_bytes_per_decode_step(model)
    bandwidth = measured_copy_bandwidth(device, nbytes)
    result = {"shape": shape, "weight_gb": weights / 1e9, "copy_tb_s": bandwidth / 1e12,
              "floor_ms": weights / bandwidth * 1e3, "steps": {}}
    for graphs in graph_modes:
        result["steps"]["graphs on" if graphs else "graphs off"] = step_times(model, graphs)
    if True in graph_modes:  # what keeping cuDNN attention out costs the graphed steps, if anything
        with cudnn_attention(True):
            result["steps"]["graphs on, cuDNN attention allowed"] = step_times(model, True)
        if fold_gqa(model.lm_head.weight.device):  # against the unfolded call (cuDNN's, the only fused
            with gqa_folded(False), cudnn_attention(True):  # kernel that takes enable_gqa with a mask)
                result["steps"]["graphs on, GQA unfolded, cuDNN attention allowed"] = step_times(model, True)
    result["prefill"] = prefill_times(model, graphs=True in graph_modes)
    try:  # the profiler needs CUPTI on a GPU, which a sandboxed machine may lack: keep the rest
        result["kernels"] = kernel_breakdown(model)
    except Exception as e:  # noqa: BLE001
        result["kernels"] = [{"name": f"(profiler failed: {type(e).__name__}: {e})"[:90], "ms_per_step": 0.0,
                              "calls_per_step": 0.0}]
    result["sdpa"] = {"decode (1 x 128 keys)": sdpa_choice(model, 1, 128),
                      "tree (8 x 1024 keys)": sdpa_choice(model, 8, 1024),
                      "prefill (512 x 512 keys)": sdpa_choice(model, 512, 512)}
    with cudnn_attention(True):
        result["sdpa"]["decode, cuDNN attention allowed"] = sdpa_choice(model, 1, 128)
    with gqa_folded(False):
        result["sdpa"]["decode, GQA unfolded"] = sdpa_choice(model, 1, 128)
    del model
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return result


def table(results: list[dict]) -> str:
    lines = ["| shape | step | graphs | ms | x floor | x 1-token step |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['shape']} | weights {r['weight_gb']:.2f} GB / copy {r['copy_tb_s']:.2f} TB/s = "
                     f"floor | | {r['floor_ms']:.3f} | 1.00 | |")
        for mode, steps in r["steps"].items():
            one = steps[STEPS[0][0]]
            for label, *_ in STEPS:
                ms = steps[label]
                lines.append(f"| {r['shape']} | {label} | {mode.removeprefix('graphs ')} | {ms:.3f} | "
                             f"{ms / r['floor_ms']:.2f} | {ms / one:.2f} |")
        for label, ms in r.get("prefill", {}).items():
            mode = "on" if label.endswith("graphed") else "off"
            lines.append(f"| {r['shape']} | {label.removesuffix(', graphed')} | {mode} | {ms:.3f} | "
                         f"{ms / r['floor_ms']:.2f} | |")
    for r in results:
        if r.get("sdpa"):
            lines.append("")
            lines.append(f"{r['shape']}: SDPA picks " + ", ".join(f"{k}: {v}" for k, v in r["sdpa"].items()))
        if r.get("kernels"):
            lines += ["", f"{r['shape']}: eager decode step (1 x 1 token, 128 context), kernels by time",
                      "| kernel | ms per step | calls per step |", "|---|---|---|"]
            lines += [f"| {k['name']} | {k['ms_per_step']:.3f} | {k['calls_per_step']:.0f} |" for k in r["kernels"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adaserve.runtime.weight_floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="llama-3.2-1b,llama-3.1-8b", help=f"comma-separated, of {sorted(SHAPES)}")
    p.add_argument("--device", default="cuda")
    p.add_argument("--graphs", default="on,off", help="on, off or both (CUDA graphs need --device cuda; "
                                                      "on the CPU 'on' runs the same padded steps eagerly)")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    args = p.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in shapes if s not in SHAPES]
    modes = [m.strip() for m in args.graphs.split(",") if m.strip()]
    if bad or not shapes:
        p.error(f"--shapes: unknown {bad or args.shapes!r}; choose from {sorted(SHAPES)}")
    if not modes or any(m not in ("on", "off") for m in modes):
        p.error(f"--graphs must be on, off or on,off; got {args.graphs!r}")
    nbytes = (2 << 30) if torch.device(args.device).type == "cuda" else (64 << 20)
    results = []
    for shape in shapes:
        results.append(measure_shape(shape, args.device, [m == "on" for m in modes], nbytes))
        print(table(results[-1:]), flush=True)
        if args.json:  # after every shape: a later one that fails or runs out of time loses only itself
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
