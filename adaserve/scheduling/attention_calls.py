"""How the engine splits a step's shared attention call on a CPU, shared with the simulator.

A step's entries without an attention call of their own (all but prefill chunks of
``SOLO_QUERY_THRESHOLD`` tokens or more) would share one call padded to the longest keys and the
most new tokens among them, so that a long context beside short ones, or a large tree beside one-token
steps, makes every entry pay for the longest. On a CPU, where attention time is this padded work,
the engine cuts the entries into several calls where that is cheaper (``padding_groups``); the
simulator prices the same calls (``sim/executor.py``). On a GPU the engine keeps one call (CUDA
graphs replay one call per bucket).

The estimate, in units of one padded key row (reading its K and V): a call costs ``fixed`` key
rows of its own (the K/V gather, the padding and scattering of the queries, the call), and every
entry in it ``keys * (1 + query_key * queries)``. Measured on the 2-core dev VM with SmolLM2-135M's
shapes (9 query heads, 3 KV heads, head dim 64), one thread, per layer: 16 entries x 512 keys took
2.5 ms with one query each and 5.2 ms with eight (so 0.055 per query and key per query head per KV
head), one call ~50 us (~170 key rows).
"""

from __future__ import annotations

import functools

import numpy as np

from adaserve.core import jit

FIXED_KEYS = 170.0
QUERY_KEY_PER_HEAD_RATIO = 0.055


def cpu_call_costs(num_heads: int = 9, num_kv_heads: int = 3) -> tuple[float, float]:
    """(``fixed``, ``query_key``) of ``padding_groups`` for a model's attention heads (default: SmolLM2's)."""
    return FIXED_KEYS, QUERY_KEY_PER_HEAD_RATIO * num_heads / num_kv_heads


def padding_groups(keys: np.ndarray, queries: np.ndarray, fixed: float, query_key: float
                   ) -> list[np.ndarray]:
    """Entries (padded key length, new tokens) split into attention calls: sorted by keys, cut into
    runs minimizing the summed ``fixed + entries * max keys * (1 + query_key * max queries)``
    (exact over runs, by dynamic programming). Returns index arrays, one per call."""
    keys, queries = np.asarray(keys, np.int64), np.asarray(queries, np.int64)
    order = np.lexsort((queries, keys))
    run_starts = _compiled_run_starts() if jit.enabled() else _run_starts
    start = run_starts(keys[order], queries[order], float(fixed), float(query_key))
    cuts = [len(order)]
    while cuts[-1] > 0:  # the cheapest split of the first j entries ends with the run start[j]..j-1
        cuts.append(int(start[cuts[-1]]))
    return [order[a:b] for a, b in zip(cuts[-1:0:-1], cuts[-2::-1])]


def _run_starts(keys: np.ndarray, queries: np.ndarray, fixed: float, query_key: float) -> np.ndarray:
    """For j = 1..n entries (sorted by keys): where the last run of their cheapest split starts.
    One array operation per entry (the numpy path; ``_run_starts_loop`` compiled gives the same)."""
    n = len(keys)
    best = np.zeros(n + 1)
    start = np.zeros(n + 1, np.int64)
    for j in range(1, n + 1):
        i = np.arange(j - 1, -1, -1)  # the run i..j-1, nearest first (ties keep the nearest)
        q = np.maximum.accumulate(queries[i])
        cost = best[i] + fixed + (j - i) * keys[j - 1] * (1.0 + query_key * q)
        k = int(np.argmin(cost))
        best[j], start[j] = cost[k], i[k]
    return start


def _run_starts_loop(keys, queries, fixed, query_key):
    """``_run_starts`` as loops (compiled by ``_compiled_run_starts``)."""
    n = len(keys)
    best = np.full(n + 1, np.inf)
    start = np.zeros(n + 1, np.int64)
    best[0] = 0.0
    for j in range(1, n + 1):
        q = 0
        for i in range(j - 1, -1, -1):  # the run i..j-1: its keys are keys[j-1] (sorted)
            q = max(q, queries[i])
            cost = best[i] + fixed + (j - i) * keys[j - 1] * (1.0 + query_key * q)
            if cost < best[j]:
                best[j], start[j] = cost, i
    return start


@functools.cache
def _compiled_run_starts():
    """``_run_starts_loop`` compiled on first use: importing this module must not import numba
    (the simulator's numpy path, ``ADASERVE_NUMBA=0``, never pays for it)."""
    return jit.njit(_run_starts_loop)
