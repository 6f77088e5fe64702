"""Helpers shared by the engine and server tests."""

import socket
import subprocess
import time

import numpy as np

from adaserve.engine import BatchBuilder
from adaserve.engine.verify import greedy_walks_flat


def plain_greedy(model, prompt, n, eos=()):
    """Greedy decoding one token at a time through our own forward: the reference output."""
    cache = model.make_cache(num_blocks=(len(prompt) + n) // 16 + 2, block_size=16)
    b = BatchBuilder(cache)
    b.add_prefill(0, prompt)
    out = []
    for _ in range(n):
        out.append(int(model(b.build(), cache)[-1].argmax()))
        if out[-1] in eos:
            break
        b = BatchBuilder(cache)
        b.add_decode(0, out[-1])
    return out


def root_path(parents, node):
    """Node indices from the root (parent -1) down to ``node``."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(proc: subprocess.Popen, url: str, timeout_s: float = 60) -> None:
    """Until ``url``/health answers 200; fails with the process's output if it exits first."""
    import httpx

    deadline = time.time() + timeout_s
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "adaserve serve did not come up"
        time.sleep(0.2)


def greedy_walks(tokens, parents, offsets, argmax) -> list[tuple[list[int], list[int]]]:
    """``greedy_walk`` of many trees through the engine's batched walk: tree ``i`` is
    ``[offsets[i], offsets[i+1])`` of ``tokens`` / local ``parents`` / ``argmax`` (the target's token
    at each node); per tree ``(path, out)``."""
    tokens, parents, argmax = (np.asarray(x, np.int64) for x in (tokens, parents, argmax))
    offsets = np.asarray(offsets, np.int64)
    return greedy_walks_flat(tokens, parents, offsets, argmax, offsets[:-1],
                             np.ones(len(offsets) - 1, bool)).lists()


def cut(path: list[int], out: list[int], max_commit: int, eos: frozenset[int]) -> tuple[list[int], list[int]]:
    """The per-walk reference of ``verify.cut_walks``: at most ``max_commit`` tokens, ending at the
    first EOS; returns (kv path, committed tokens)."""
    m = max(1, min(len(out), int(max_commit)))
    for j in range(m):
        if out[j] in eos:
            m = j + 1
            break
    return path[:m], out[:m]
