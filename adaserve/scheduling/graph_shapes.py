"""The shapes of the engine's CUDA graphs, torch-free: the engine's graph runner
(engine/cuda_graphs.py) replays them and the simulator prices steps by them (sim/executor.py), so
both read the same rules from here.

A graphed forward holds ``B'`` requests of ``Q'`` query rows each: the step's request count rounded
up to a request bucket, its largest entry's new tokens up to a power of two. A shared attention call
(trees and short chains beside each other) with more padded rows than one graph holds is cut into
*packs*, each one graphed forward (``graph_packs``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def request_buckets(max_requests: int) -> tuple[int, ...]:
    """1, 2, 4, 8, 12, 16, 24, 32, 48, 64, ... (powers of two and 1.5x them: at most a third of
    the rows are padding), ending with ``max_requests`` itself."""
    out, p = [], 1
    while p < max_requests:
        out.append(p)
        if p >= 8 and p * 3 // 2 < max_requests:
            out.append(p * 3 // 2)
        p *= 2
    return tuple(out) + (max_requests,)


def round_up(value: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket >= ``value``, None when ``value`` is beyond the largest."""
    for b in buckets:
        if b >= value:
            return b
    return None


def query_rows(queries: int) -> int:
    """The query rows per request of a graph holding entries of at most ``queries`` new tokens."""
    return 1 << (int(queries) - 1).bit_length()


def graph_packs(queries: Sequence[int], max_rows: int, max_requests: int) -> list[np.ndarray] | None:
    """A shared attention call's entries (``queries``: each one's new tokens) cut into packs that
    each fit one graph of ``max_rows`` padded rows (requests rounded up to ``request_buckets``,
    rows per request to ``query_rows``): the entries by most new tokens first (ties: batch order),
    each pack as many as fit. One pack (all entries, in batch order) when the call fits as it is;
    None when one entry alone is too large. Why largest first: a pack's rows are padded to its
    largest entry, so big trees together and small ones together pad least."""
    q = np.asarray(queries, np.int64)
    buckets = request_buckets(max_requests)

    def fits(n: int, most: int) -> bool:
        b = round_up(n, buckets)
        return b is not None and b * query_rows(most) <= max_rows

    if len(q) == 0 or fits(len(q), int(q.max())):
        return [np.arange(len(q))]
    if not fits(1, int(q.max())):
        return None
    order = np.argsort(-q, kind="stable")
    packs, start = [], 0
    while start < len(order):
        end = start + 1
        while end < len(order) and fits(end + 1 - start, int(q[order[start]])):
            end += 1
        packs.append(np.sort(order[start:end]))  # batch order within a pack
        start = end
    return packs
