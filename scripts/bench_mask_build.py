"""Host cost of a tree-verification batch with dense attention masks against mask windows.

    PYTHONPATH=. python scripts/bench_mask_build.py [--device cpu|cuda] [--requests 64]
        [--contexts 1024,4096] [--depth 8] [--width 3] [--rounds 40] [--json]

Builds the batch of one AdaServe verification step (``--requests`` beam trees of depth ``--depth``
and width ``--width`` over ``--contexts`` committed tokens each) the way the engine does for
``--device`` — numba kernels, one packed copy (on the CPU forced, so that it packs as on a GPU) —
with ``ADASERVE_DEVICE_MASK=0`` (a dense mask, written on the host and copied) and ``=1`` (the
mask's window, spelled out on the device), alternating. Prints per context the median host time of
``BatchBuilder.build`` (the device is synchronised before each build, so the time is the host's),
the bytes sent and, on a GPU, the median device time of spelling the window out
(``MaskWindow.dense``). Every context is built a few times first, unmeasured, so that the first
growth of the host allocator and of the staging buffers (page faults) is not in the medians. A
benchmark, not a test: nothing is asserted."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from adaserve.engine.batch import DEVICE_MASK_ENV, BatchBuilder
from adaserve.engine.loader import tiny_random_model
from adaserve.engine.kv_cache import KVCache
from adaserve.engine.staging import Staging


def beam_parents(depth: int, width: int) -> np.ndarray:
    """A root, then ``depth`` levels of ``width`` nodes, each level's nodes children of the previous
    level's first node (the shape of a full D x W beam tree: 1 + D * W nodes)."""
    parents = [-1]
    prev = 0
    for _ in range(depth):
        first = len(parents)
        parents += [prev] * width
        prev = first
    return np.array(parents, np.int64)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(device: torch.device, requests: int, context: int, depth: int, width: int, rounds: int) -> dict:
    config = tiny_random_model("llama").config
    block = 16
    per_seq = -(-(context + 1 + depth * width) // block) + 1
    cache = KVCache(config, num_blocks=requests * per_seq + 4, block_size=block, device=device)
    cache.staging = Staging(device, force=True)
    for s in range(requests):
        cache.add(s)
        cache.alloc.reserve(s, context)
        cache.alloc.lengths[cache.alloc.row_of(s)] = context  # committed context (its K/V never read here)
    parents = beam_parents(depth, width)
    n = len(parents)
    tokens = np.arange(requests * n, dtype=np.int64) % 200 + 3
    offsets = np.arange(requests + 1, dtype=np.int64) * n
    times = {"0": [], "1": []}
    staged = {}
    expand = []
    for r in range(rounds + 2):
        for mode in ("0", "1"):
            os.environ[DEVICE_MASK_ENV] = mode
            b = BatchBuilder(cache)
            b.add_trees(list(range(requests)), tokens, np.tile(parents, requests), offsets)
            sync(device)
            t0 = time.perf_counter()
            batch = b.build(device)
            dt = time.perf_counter() - t0
            g = batch.groups[0]
            staged[mode] = sum(t.numel() * t.element_size() for t in (
                (g.mask,) if g.window is None else (g.window.prefix, g.window.start, g.window.local)))
            if r >= 2:
                times[mode].append(dt)
                if mode == "1" and device.type == "cuda":
                    sync(device)
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    g.attention_mask(block)
                    end.record()
                    end.synchronize()
                    expand.append(start.elapsed_time(end))
            b.abort()
    os.environ.pop(DEVICE_MASK_ENV, None)
    out = {"context": context, "requests": requests, "tree_nodes": n,
           "dense_build_ms": 1e3 * statistics.median(times["0"]), "window_build_ms": 1e3 * statistics.median(times["1"]),
           "dense_mask_bytes": staged["0"], "window_bytes": staged["1"]}
    if expand:
        out["window_expand_device_ms"] = statistics.median(expand)
    return out


def size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB" if nbytes >= 100_000 else f"{nbytes / 1e3:.1f} kB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--contexts", default="1024,4096")
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--width", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    contexts = [int(c) for c in args.contexts.split(",")]
    for c in contexts:  # unmeasured: the allocator's and the staging ring's first growth (page faults)
        measure(device, args.requests, c, args.depth, args.width, 2)
    rows = [measure(device, args.requests, c, args.depth, args.width, args.rounds) for c in contexts]
    if args.json:
        print(json.dumps(rows))
        return
    print("| device | requests x tree nodes | context | build, dense mask | build, window | bytes, dense | "
          "bytes, window | window spelled out (device) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        spelled = f"{r['window_expand_device_ms']:.3f} ms" if "window_expand_device_ms" in r else "-"
        print(f"| {device.type} | {r['requests']} x {r['tree_nodes']} | {r['context']} | {r['dense_build_ms']:.3f} ms | "
              f"{r['window_build_ms']:.3f} ms | {size(r['dense_mask_bytes'])} | {size(r['window_bytes'])} | "
              f"{spelled} |")


if __name__ == "__main__":
    main()
