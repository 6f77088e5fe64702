"""Batch-1 decode step on the CPU against the weight-read floor, per dtype and linear kernel.

    .venv/bin/python scripts/bench_cpu_decode.py [--model smollm2-135m] [--threads 1]
        [--dtypes float32,bfloat16] [--rounds 7] [--context 128] [--json]

For each dtype: the step (1 sequence, 1 new token over 128 context tokens, ``--context``, as the
profile's baseline; and 2, 4 and 8 tokens of a chain, small trees) with plain ``F.linear``, with oneDNN
prepacked linears (where the CPU can pack that dtype), with the compiled one-row linear, with every
layer of steps up to 4 tokens as one compiled call (``engine/cpu_decode.py``, fp32) and with what the
engine runs after the load-time measurement (runtime/kernels.py, not cached here); the floor = bytes
of the weights one decode step reads / memory bandwidth, measured with a large tensor copy ((read +
write) bytes per second, as tests/test_engine_cuda.py does on a GPU). Kernels, copies and rounds are
interleaved so that load from other processes hits all alike; every number is a median over rounds.
A benchmark, not a test: nothing is asserted."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from adaserve.engine import model as model_mod
from adaserve.engine.loader import resolve_model
from adaserve.runtime.kernels import choose_linear_kernels, gemv_candidate
from adaserve.runtime.profiler import BASELINE_CONTEXT, StepBench, cpu_name

COPY_BYTES = 512 * 2**20
STEP_TOKENS = (1, 2, 4, 8)  # tokens of a step: one chain of that many over the context


def copy_bandwidth(src: torch.Tensor, dst: torch.Tensor) -> float:
    """(read + write) bytes per second of one large copy."""
    t0 = time.perf_counter()
    dst.copy_(src)
    return 2 * src.numel() * src.element_size() / (time.perf_counter() - t0)


def decode_weight_bytes(model: model_mod.Transformer) -> int:
    """Bytes of the weights one decode step reads: every layer, the final norm and the LM head (a
    tied embedding counted once, as the LM head; the input embedding reads one row)."""
    seen = {id(p): p for p in (*model.model.layers.parameters(), *model.model.norm.parameters(),
                               model.lm_head.weight)}
    return sum(p.numel() * p.element_size() for p in seen.values())


def bench_dtype(name: str, dtype: torch.dtype, rounds: int, say, context: int = BASELINE_CONTEXT) -> dict:
    model, _ = resolve_model(name, dtype, "cpu")
    choice = choose_linear_kernels(model, say=say, cache=False)
    top = model_mod.MAX_COMPILED_ROWS
    # name -> (prepacked from rows, compiled linear up to rows, ADASERVE_CPU_DECODE)
    kernels = {"plain": (None, 0, "0")}
    if model_mod.prepack_supported(dtype):
        kernels["prepacked"] = (1, 0, "0")
    if gemv_candidate(dtype):
        kernels["plain + numba-gemv at 1 row"] = (None, 1, "0")
        kernels[f"compiled layers up to {top} tokens"] = (choice.min_rows, top, "1")
    # what the engine runs after the measurement, with the caller's ADASERVE_CPU_DECODE
    measured = (choice.min_rows, choice.compiled_rows, os.environ.get(model_mod.CPU_DECODE_ENV, ""))
    if choice.compiled_rows or measured[:2] not in [k[:2] for k in kernels.values()]:
        kernels[f"measured ({choice.kernel})"] = measured
    bench = StepBench(model, context + 64)
    src = torch.ones(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    times = {(k, t): [] for k in kernels for t in STEP_TOKENS}
    bandwidth = []
    with model_mod.kernel_settings_restored(dtype):
        for r in range(rounds + 1):  # round 0 warms up (packing, allocator)
            bw = copy_bandwidth(src, dst)
            for k, (rows, compiled, fused) in kernels.items():
                model_mod.set_prepack(dtype, rows)
                model_mod.set_compiled_rows(dtype, compiled)
                os.environ[model_mod.CPU_DECODE_ENV] = fused
                for t in STEP_TOKENS:
                    ms = bench.step_ms(1, t, context, 3)
                    if r:
                        times[(k, t)].append(ms)
            if r:
                bandwidth.append(bw)
    bw = statistics.median(bandwidth)
    weight_bytes = decode_weight_bytes(model)
    floor_ms = weight_bytes / bw * 1e3
    rows = []
    for k in kernels:
        med = {t: statistics.median(times[(k, t)]) for t in STEP_TOKENS}
        rows.append({"kernel": k, "decode_ms": round(med[1], 2), "ratio_to_floor": round(med[1] / floor_ms, 2),
                     "steps_ms": {str(t): round(med[t], 2) for t in STEP_TOKENS[1:]},
                     "range_ms": [round(min(times[(k, 1)]), 2), round(max(times[(k, 1)]), 2)]})
    return {"dtype": str(dtype).replace("torch.", ""), "weight_bytes": weight_bytes,
            "copy_bandwidth_gbs": round(bw / 1e9, 2), "floor_ms": round(floor_ms, 2),
            "choice": {"kernel": choice.kernel, "reason": choice.reason, "ratios": choice.ratios,
                       "gemv_ratio": choice.gemv_ratio, "compiled_ratios": choice.compiled_ratios},
            "steps": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--context", type=int, default=BASELINE_CONTEXT, help="KV tokens before the new ones")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    say = (lambda s: print(s, file=sys.stderr))
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    out = {"model": args.model, "cpu": cpu_name(), "threads": args.threads, "context": args.context,
           "torch": torch.__version__, "loadavg_before": load_before, "dtypes": []}
    for d in args.dtypes.split(","):
        out["dtypes"].append(bench_dtype(args.model, getattr(torch, d.strip()), args.rounds, say, args.context))
    with open("/proc/loadavg") as f:
        out["loadavg_after"] = f.read().split()[:3]
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"{args.model} on {out['cpu']}, {args.threads} thread(s), {args.context} context tokens, "
          f"torch {torch.__version__}; load average {' '.join(load_before)} -> {' '.join(out['loadavg_after'])}")
    for d in out["dtypes"]:
        print(f"{d['dtype']}: {d['weight_bytes'] / 1e6:.0f} MB of weights per decode step, copy bandwidth "
              f"{d['copy_bandwidth_gbs']} GB/s -> floor {d['floor_ms']} ms; measured choice: {d['choice']['kernel']} "
              f"({d['choice']['ratios']})")
        for r in d["steps"]:
            more = "  ".join(f"{t}-token {ms:7.2f}" for t, ms in r["steps_ms"].items())
            print(f"  {r['kernel']:<40} decode {r['decode_ms']:7.2f} ms [{r['range_ms'][0]}-{r['range_ms'][1]}]"
                  f"  = {r['ratio_to_floor']:.2f}x floor   steps (ms): {more}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
