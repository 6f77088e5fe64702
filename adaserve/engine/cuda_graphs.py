"""CUDA graphs for the engine's steps: decode, tree verification and prefill chunks.

Why: on a GPU a step of a small model is bound by kernel launches, not by the GPU (issue 12: a
1B-shaped decode step took 10.2 ms against a 0.83 ms weight-read floor, and verifying 256 tokens
cost about the same as 1; on an H200 a prefill step of a ~250-token prompt took 12.7-19.4 ms in a
serving run, eager, against a graphed decode step of 2.1 ms). A CUDA graph replays all of a
forward's kernels with one launch.

**Which steps.** Each attention group of a step (``batch.py``: decode tokens and trees of fewer
than ``SOLO_QUERY_THRESHOLD`` nodes share one; a prefill chunk or a larger tree has its own) is
one SDPA call: queries ``[B, Q]``, keys gathered from ``B`` block tables of ``nblk`` blocks, a
boolean mask ``[B, 1, Q, nblk * block_size]`` (sent as a ``MaskWindow`` on a GPU). A step of one group replays that group's
graph. A step of several groups (a prefill chunk beside decoding rows) runs as one graphed
forward per group, at most ``MAX_GRAPH_PARTS`` of them, one after the other, when every group has a
bucket: the groups are different sequences, and every operation but attention acts row by row, so
the parts compute what the whole step would; they read the weights once each, which on a
launch-bound GPU costs less than one eager forward. Steps beyond that (more groups, chunks of more
than ``MAX_GRAPH_TOKENS`` padded rows, contexts past the largest bucket) run eagerly.

**Static layout.** A graph replays fixed kernels on fixed addresses, so each of the three sizes is
rounded up to a bucket ``(requests B', queries per request Q', context blocks NB')`` and the inputs
are copied into static buffers of that shape:

- flat rows: token ``j`` of request ``i`` sits at row ``i * Q' + j`` of ``[B' * Q']`` (token ids,
  positions, KV slots);
- block tables ``[B', NB']`` and the mask's window (``batch.MaskWindow``: context lengths
  ``[B', Q']``, window starts ``[B']``, the trees' and chains' own keys ``[B', Q', Q']``), the
  real ones in the top-left corner, spelled out to ``[B', 1, Q', NB' * block_size]`` inside the
  graph (with ``ADASERVE_DEVICE_MASK=0``, the dense mask itself is the buffer). The KV gather is
  thus padded to the bucket's context (powers of two of blocks), and the extra keys are masked
  out;
- padded rows (rows ``j >= num_new`` of a request, and whole padded requests) hold token 0 at
  position 0, write their K/V to the **scratch block** (one block of KV storage that the allocator
  never hands out, ``cache_with_scratch_block``) and attend to key 0 only, so they never write a
  real sequence's KV and never produce NaN. Real rows attend only to their own keys, and every
  other operation acts row by row, so padding does not change the real rows' results.

The graph computes the last hidden state of every row; the final norm and the LM head run eagerly
on the real logits rows only (one GEMM: inside the graph each bucket would hold a
``[B' * Q', vocab]`` output and compute logits for padded rows).

Graphs are captured on padding-only inputs (so a capture never touches real KV) into one shared
memory pool; at most ``max_graphs`` of them. ``capture_ahead`` captures every bucket within the
limits before serving (``adaserve run`` and ``serve`` call it in their warm-up, with the query sizes
their policy uses): a capture costs about 20-25 ms on an H200 (1B shape), and captured lazily, the first
time a bucket is needed, each one stalled every running request (an AdaServe run of 40 requests met
36-43 of them, docs/engine.md). A bucket beyond the start-up budget is captured on first use. A failed
capture is logged once and that bucket runs eagerly from then on.

Tests on the CPU replace the CUDA capture by ``eager_capture`` (the same padded buffers, run
eagerly at replay), which checks the layout, the padding, the split and the bucket choice without
a GPU.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from adaserve.core.errors import UserError
from adaserve.scheduling.admission import MAX_GRAPH_PARTS, MAX_GRAPH_TOKENS, graph_rows
from adaserve.scheduling.graph_shapes import graph_packs, request_buckets, round_up

from .batch import AttnGroup, FlatBatch, MaskWindow, window_masks
from .kv_cache import BlockAllocator, KVCache
from .model import Transformer

log = logging.getLogger("adaserve.engine")

QUERY_BUCKETS = (1, 2, 4, 8, 16, 32)  # nodes per tree (and short prompt tails beside them)
CHUNK_QUERY_BUCKETS = (64, 128, 256, 512, 1024)  # groups of their own: prefill chunks, trees of >= 32 nodes
ALL_QUERY_BUCKETS = QUERY_BUCKETS + CHUNK_QUERY_BUCKETS
MIN_CONTEXT_BLOCKS = 4
MAX_GRAPHS = 512  # every bucket of the default limits (441 with 64 requests and 2k-token sequences)
CAPTURE_BUDGET_S = 60.0  # start-up captures stop after this long; the rest are captured on first use

Replay = Callable[[], None]
# capture(fn) -> (replay, output): ``fn`` runs the forward on the static buffers and returns its
# output tensor; ``replay()`` recomputes that output in place
Capture = Callable[[Callable[[], torch.Tensor]], tuple[Replay, torch.Tensor]]


GRAPH_PARTS_ENV = "ADASERVE_GRAPH_PARTS"


def graph_parts_setting() -> int:
    """``ADASERVE_GRAPH_PARTS``: the most graphed forwards one step may run as (one per attention
    group; 1: a step of several groups runs eagerly, as before prefill chunks were graphed);
    unset: ``MAX_GRAPH_PARTS``. Each part reads the weights again: on a bigger model than the
    launch-bound ones measured, fewer parts may pay (the GPU check can compare)."""
    value = os.environ.get(GRAPH_PARTS_ENV, "").strip()
    if not value:
        return MAX_GRAPH_PARTS
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{GRAPH_PARTS_ENV}={value!r}: use a whole number >= 1 (1: never split a step; "
                        f"unset: {MAX_GRAPH_PARTS})")
    return int(value)


# ---- buckets --------------------------------------------------------------------------------

def block_buckets(max_blocks: int) -> tuple[int, ...]:
    """Powers of two of KV blocks from ``MIN_CONTEXT_BLOCKS``, ending with ``max_blocks``."""
    out, p = [], MIN_CONTEXT_BLOCKS
    while p < max_blocks:
        out.append(p)
        p *= 2
    return tuple(out) + (max_blocks,)


@dataclass(frozen=True)
class Bucket:
    requests: int  # B'
    queries: int  # Q'
    blocks: int  # NB'

    @property
    def rows(self) -> int:
        return self.requests * self.queries


@dataclass(frozen=True)
class BucketLimits:
    max_requests: int
    max_blocks: int
    max_tokens: int = MAX_GRAPH_TOKENS

    def __post_init__(self):
        if min(self.max_requests, self.max_blocks, self.max_tokens) < 1:
            raise ValueError(f"bucket limits must be positive: {self}")

    def choose(self, requests: int, queries: int, blocks: int) -> Bucket | None:
        """The bucket of a step with these sizes, None when one of them is beyond the buckets (a
        group of more than ``QUERY_BUCKETS[-1]`` queries is one sequence's: a chunk or a large tree)."""
        b = round_up(requests, request_buckets(self.max_requests))
        q = round_up(queries, ALL_QUERY_BUCKETS)
        n = round_up(blocks, block_buckets(self.max_blocks))
        if b is None or q is None or n is None or b * q > self.max_tokens or (q > QUERY_BUCKETS[-1] and b > 1):
            return None
        return Bucket(b, q, n)


def graph_groups(batch: FlatBatch, max_parts: int = MAX_GRAPH_PARTS) -> list[AttnGroup] | None:
    """The step's attention groups, each to run as a graphed forward of its own, or None when it
    has more than ``max_parts`` of them (or groups whose entries are unknown: a tensor-parallel
    worker's batch)."""
    groups = batch.groups
    if not 0 < len(groups) <= max_parts or any(g.num_new is None for g in groups):
        return None
    if len(groups) == 1 and not groups[0].all_rows:
        return None
    return groups


def pack_groups(g: AttnGroup, packs: list[np.ndarray], staging) -> list[AttnGroup]:
    """``g``'s entries ``packs[k]`` (indices into the group, in order) as groups of their own: their
    rows, block tables and masks gathered on the device (index arrays sent in one copy), their
    queries cut to the pack's largest entry (its mask window too: a pack's windows are no wider
    than its rows, which ``GraphRunner.plan`` checks)."""
    starts = np.cumsum(g.num_new) - g.num_new
    host = []
    for p in packs:
        nn = g.num_new[p]
        host += [np.asarray(p, np.int64), np.repeat(starts[p], nn) + padded_within(nn), padded_rows(nn, int(nn.max()))]
    index = staging.to_device(host)
    out = []
    for k, p in enumerate(packs):
        entries, rows, pad = index[3 * k: 3 * k + 3]
        q = int(g.num_new[p].max())
        w = int(g.window_len[p].max()) if g.window_len is not None else q
        window = mask = None
        if g.window is not None:
            window = MaskWindow(g.window.prefix[entries][:, :q], g.window.start[entries],
                                g.window.local[entries][:, :q, :w])
        else:
            mask = g.mask[entries][:, :, :q]
        out.append(AttnGroup(g.rows[rows], pad, g.block_tables[entries], mask, q,
                             entry_index=g.entry_index[p] if g.entry_index is not None else None,
                             num_new=g.num_new[p], window=window, window_len=g.window_len[p]
                             if g.window_len is not None else None))
    return out


def padded_within(num_new: np.ndarray) -> np.ndarray:
    """Each token's place within its entry (0, 1, ... per entry)."""
    num_new = np.asarray(num_new, dtype=np.int64)
    return np.arange(int(num_new.sum())) - np.repeat(np.cumsum(num_new) - num_new, num_new)


def padded_rows(num_new: np.ndarray, queries: int) -> np.ndarray:
    """Row of every real token in the padded ``[B' * Q']`` layout: token ``j`` of request ``i`` ->
    ``i * queries + j`` (tokens in the flat batch's order: request by request)."""
    num_new = np.asarray(num_new, dtype=np.int64)
    return np.repeat(np.arange(len(num_new)) * queries, num_new) + padded_within(num_new)


# ---- the scratch block ------------------------------------------------------------------------

def cache_with_scratch_block(model: Transformer, num_blocks: int, block_size: int) -> tuple[KVCache, int]:
    """A KV cache whose storage holds one block more than its allocator: that last block (index
    ``num_blocks``) is never handed out to a sequence, and padded rows write their KV there."""
    cache = model.make_cache(num_blocks + 1, block_size)
    cache.alloc = BlockAllocator(num_blocks, block_size)
    return cache, num_blocks


# ---- capture --------------------------------------------------------------------------------

def eager_capture(fn: Callable[[], torch.Tensor]) -> tuple[Replay, torch.Tensor]:
    """A stand-in for a CUDA graph: ``replay`` runs ``fn`` eagerly on the same static buffers and
    writes its result into the same output tensor. Used on the CPU (tests)."""
    out = fn().clone()

    def replay() -> None:
        out.copy_(fn())

    return replay, out


class CudaCapture:
    """``torch.cuda.CUDAGraph`` capture; every graph of one runner shares one memory pool (steps
    run one after the other on one stream, and each output is copied out before the next replay)."""

    def __init__(self):
        self.pool = None

    def __call__(self, fn: Callable[[], torch.Tensor]) -> tuple[Replay, torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph: lazy initialisation, kernel choice
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        if self.pool is None:
            self.pool = graph.pool()
        return graph.replay, out


# ---- the runner -------------------------------------------------------------------------------

@dataclass
class _Graph:
    replay: Replay
    hidden: torch.Tensor  # [B' * Q', hidden] output of the captured forward
    batch: FlatBatch  # the static inputs (views of the runner's buffers)
    keep: list = field(default_factory=list)  # tensors the graph reads that must outlive it


EAGER = object()  # a bucket whose capture failed or came after max_graphs


class GraphRunner:
    """``runner(batch) -> logits``, the same as ``model(batch, cache)``: graphable steps replay the
    graph of their bucket, the others run eagerly."""

    def __init__(self, model: Transformer, cache: KVCache, scratch_block: int, limits: BucketLimits, *,
                 capture: Capture | None = None, max_graphs: int = MAX_GRAPHS, max_parts: int | None = None):
        if not cache.alloc.num_blocks <= scratch_block < cache.k.shape[1]:
            raise ValueError(f"scratch block {scratch_block} must be a block of the KV storage that the allocator "
                             f"never hands out (it has {cache.alloc.num_blocks})")
        self.model, self.cache, self.scratch, self.limits = model, cache, scratch_block, limits
        self.capture = capture if capture is not None else (
            CudaCapture() if cache.device.type == "cuda" else eager_capture)
        self.max_graphs = max_graphs
        self.max_parts = graph_parts_setting() if max_parts is None else max_parts
        self.windowed = window_masks(cache.device)  # the batches' masks come as windows (batch.py)
        self.graphs: dict[Bucket, _Graph | object] = {}
        self.stats = {"graph_steps": 0, "split_steps": 0, "packed_steps": 0, "eager_steps": 0, "captured": 0, "failed": 0}
        self._buffers = self._allocate()

    def _allocate(self) -> dict[str, torch.Tensor]:
        """One set of flat buffers sized for the largest bucket; each bucket uses views of them."""
        lim, dev = self.limits, self.cache.device
        rows = lim.max_tokens
        long = dict(dtype=torch.long, device=dev)
        with torch.inference_mode():
            buffers = {"token_ids": torch.zeros(rows, **long), "positions": torch.zeros(rows, **long),
                       "slot_mapping": torch.zeros(rows, **long), "index": torch.arange(rows, **long),
                       "block_tables": torch.zeros(lim.max_requests * lim.max_blocks, **long)}
            if self.windowed:  # a window is at most as wide as the bucket's queries
                most = max(q for q in ALL_QUERY_BUCKETS if q <= rows)
                buffers |= {"prefix": torch.zeros(rows, **long), "start": torch.zeros(lim.max_requests, **long),
                            "local": torch.zeros(rows * most, dtype=torch.bool, device=dev)}
            else:
                buffers["mask"] = torch.zeros(rows * lim.max_blocks * self.cache.block_size, dtype=torch.bool, device=dev)
            return buffers

    # ---- choosing --------------------------------------------------------------------------
    def plan(self, batch: FlatBatch) -> list[tuple[Bucket, AttnGroup]] | None:
        """Every attention group of the step with its bucket, None when the step runs eagerly (too
        many groups, or a group beyond the buckets)."""
        groups = graph_groups(batch, self.max_parts)
        if groups is None:
            return None
        out = []
        for g in groups:
            if (g.window is not None) != self.windowed:
                return None
            bucket = self._bucket(g)
            parts = [(bucket, g)] if bucket is not None else [(self._bucket(p), p) for p in self._packs(g)]
            if not parts or any(b is None or (p.window_len is not None and p.window_len.max() > b.queries)
                                for b, p in parts):
                return None  # beyond the buckets, or a tree grown over several forwards (the draft model's)
            out += parts
        return out if len(out) <= self.max_parts else None

    def _bucket(self, g: AttnGroup) -> Bucket | None:
        return self.limits.choose(len(g.num_new), g.num_queries, int(g.block_tables.shape[1]))

    def _packs(self, g: AttnGroup) -> list[AttnGroup]:
        """A shared call with more padded rows than one graph holds as its packs (``graph_packs``:
        each a group of its own, gathered on the device); none when it cannot be cut into at most
        ``max_parts`` of them."""
        lim = self.limits
        packs = graph_packs(g.num_new, lim.max_tokens, lim.max_requests) if len(g.num_new) > 1 else None
        if packs is None or len(packs) == 1 or len(packs) > self.max_parts:
            return []
        return pack_groups(g, packs, self.cache.staging)

    def bucket_for(self, batch: FlatBatch) -> Bucket | None:
        """The bucket of a step of one attention group (None otherwise)."""
        plan = self.plan(batch)
        return plan[0][0] if plan is not None and len(plan) == 1 else None

    def buckets(self, queries: tuple[int, ...] = ALL_QUERY_BUCKETS) -> list[Bucket]:
        """Every bucket within the limits whose query size is in ``queries``: by query size (plain
        decode steps first), then requests, then context."""
        lim = self.limits
        return [Bucket(b, q, n) for q in queries for b in request_buckets(lim.max_requests)
                for n in block_buckets(lim.max_blocks) if b * q <= lim.max_tokens and (q <= QUERY_BUCKETS[-1] or b == 1)]

    def _workspace_need(self, bucket: Bucket) -> int:
        """Elements of the K/V gather workspace a bucket's graph uses (K and V of every block)."""
        return 2 * bucket.requests * bucket.blocks * self.cache.k[0, 0].numel()

    def capture_ahead(self, queries: tuple[int, ...] = ALL_QUERY_BUCKETS, budget_s: float = CAPTURE_BUDGET_S) -> int:
        """Capture the buckets of ``queries`` not captured yet, before serving, until ``max_graphs``,
        ``budget_s`` seconds or a failed capture (e.g. out of memory: the rest wait for their first
        use); the number captured. The gather workspace is first grown to the largest bucket's, so
        that every graph shares one (grown bucket by bucket, each size would stay alive with the
        graphs captured on it: up to twice the largest)."""
        t0, n = time.perf_counter(), 0
        todo = [b for b in self.buckets(queries) if b not in self.graphs]
        if todo:
            with torch.inference_mode():
                self.cache.workspace(max(self._workspace_need(b) for b in todo))
        for bucket in todo:
            if len(self.graphs) >= self.max_graphs or time.perf_counter() - t0 > budget_s:
                break
            if self._capture(bucket) is EAGER:
                break
            n += 1
        return n

    # ---- running ---------------------------------------------------------------------------
    def __call__(self, batch: FlatBatch) -> torch.Tensor:
        plan = self.plan(batch)
        graphs = [] if plan is None else [self._graph(bucket) for bucket, _ in plan]
        if plan is None or any(g is EAGER for g in graphs):
            self.stats["eager_steps"] += 1
            return self.model(batch, self.cache)
        self.stats["graph_steps"] += 1
        with torch.inference_mode():
            # the padded row of every real row, per part, sent to the device in one copy
            padded = self.cache.staging.to_device([padded_rows(g.num_new, bucket.queries) for bucket, g in plan])
            if len(plan) == 1:  # one group over every row: the graph's rows are the batch's
                self._replay(graphs[0], batch.token_ids, batch.positions, batch.slot_mapping, plan[0][1], padded[0])
                return self.model.head(graphs[0].hidden[padded[0][batch.logits_rows]])
            self.stats["split_steps"] += 1
            if len(plan) > len(batch.groups):  # a shared call cut into packs
                self.stats["packed_steps"] += 1
            hidden = None
            for graph, (_, group), rows in zip(graphs, plan, padded):
                r = group.rows
                self._replay(graph, batch.token_ids[r], batch.positions[r], batch.slot_mapping[r], group, rows)
                if hidden is None:
                    hidden = graph.hidden.new_empty(batch.num_tokens, graph.hidden.shape[1])
                hidden[r] = graph.hidden[rows]  # copied out before the next replay reuses the pool
            return self.model.head(hidden[batch.logits_rows])

    def _graph(self, bucket: Bucket):
        graph = self.graphs.get(bucket)
        return self._capture(bucket) if graph is None else graph

    def _replay(self, graph: _Graph, token_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                group: AttnGroup, rows: torch.Tensor) -> None:
        """Fill the graph's inputs with one group's rows (in the group's order; ``rows``: the
        padded row of each) and replay it."""
        self._fill(graph.batch, (token_ids, positions, slots, group, rows))
        graph.replay()

    def _static_batch(self, bucket: Bucket) -> FlatBatch:
        buf, n = self._buffers, bucket.rows
        bs = self.cache.block_size
        index = buf["index"][:n]
        tables = buf["block_tables"][: bucket.requests * bucket.blocks].view(bucket.requests, bucket.blocks)
        b, q = bucket.requests, bucket.queries
        if self.windowed:  # spelled out inside the graph (MaskWindow.dense)
            window = MaskWindow(buf["prefix"][:n].view(b, q), buf["start"][:b], buf["local"][: n * q].view(b, q, q))
            group = AttnGroup(index, index, tables, None, q, all_rows=True, window=window)
        else:
            mask = buf["mask"][: n * bucket.blocks * bs].view(b, 1, q, bucket.blocks * bs)
            group = AttnGroup(index, index, tables, mask, q, all_rows=True)
        return FlatBatch(buf["token_ids"][:n], buf["positions"][:n], buf["slot_mapping"][:n], index, index,
                         [], [group])

    def _fill(self, static: FlatBatch, real: tuple | None) -> None:
        """Copy one group's rows ``(token_ids, positions, slots, group, padded rows)`` into the
        static buffers (None: padding only), padding every other row."""
        g = static.groups[0]
        static.token_ids.zero_()
        static.positions.zero_()
        static.slot_mapping.fill_(self.scratch * self.cache.block_size)
        g.block_tables.fill_(self.scratch)
        w = g.window
        if w is not None:  # padded rows attend to key 0 only (no NaN)
            w.prefix.fill_(1)
            w.start.zero_()
            w.local.zero_()
        else:
            g.mask.zero_()
            g.mask[:, :, :, 0] = True  # padded rows attend to key 0 (a real row's own mask is copied over it)
        if real is None:
            return
        token_ids, positions, slots, group, rows = real
        b, q = group.block_tables.shape[0], group.num_queries
        static.token_ids.index_copy_(0, rows, token_ids)
        static.positions.index_copy_(0, rows, positions)
        static.slot_mapping.index_copy_(0, rows, slots)
        g.block_tables[:b, : group.block_tables.shape[1]].copy_(group.block_tables)
        if w is not None:
            real_w = group.window
            w.prefix[:b, :q].copy_(real_w.prefix)
            w.start[:b].copy_(real_w.start)
            w.local[:b, :q, : real_w.local.shape[-1]].copy_(real_w.local)
        else:
            g.mask[:b, :, :q, : group.mask.shape[-1]].copy_(group.mask)

    def _capture(self, bucket: Bucket):
        if len(self.graphs) >= self.max_graphs:
            log.warning("CUDA graphs: %d buckets captured already (the maximum); bucket %s runs eagerly",
                        self.max_graphs, bucket)
            self.graphs[bucket] = EAGER
            return EAGER
        static = self._static_batch(bucket)
        need = self._workspace_need(bucket)
        try:
            with torch.inference_mode():
                # the workspace the graph gathers K/V into must outlive it: an eager step may later
                # replace the cache's workspace with a larger one
                keep = [self.cache.workspace(need)]
                self._fill(static, None)
                replay, hidden = self.capture(lambda: self.model.hidden(static, self.cache))
        except Exception as e:  # noqa: BLE001 - any capture failure: this bucket stays eager
            log.warning("CUDA graph capture failed for %s (%s: %s); this bucket runs eagerly",
                        bucket, type(e).__name__, e)
            self.stats["failed"] += 1
            self.graphs[bucket] = EAGER
            return EAGER
        self.stats["captured"] += 1
        graph = self.graphs[bucket] = _Graph(replay, hidden, static, keep)
        return graph


class GraphedModel:
    """The target model behind a ``GraphRunner``: called like the model, ``(batch, cache) ->
    logits`` (graphs for the runner's cache, eager for any other); every other attribute is the
    model's. What ``TorchExecutor.model`` is with CUDA graphs on, so wrappers that time the
    executor's forward (``adaserve bench engine``) time the replays."""

    def __init__(self, runner: GraphRunner):
        self.runner = runner

    def __call__(self, batch: FlatBatch, cache: KVCache) -> torch.Tensor:
        if cache is not self.runner.cache:
            return self.runner.model(batch, cache)
        return self.runner(batch)

    def __getattr__(self, name: str):
        return getattr(self.runner.model, name)


def make_graph_runner(model: Transformer, cache: KVCache, scratch_block: int, max_requests: int,
                      max_seq_len: int, max_tokens: int, **kw) -> GraphRunner:
    """A runner whose buckets cover ``max_requests`` requests, ``max_tokens`` padded rows and
    sequences of ``max_seq_len`` tokens plus a tree."""
    from adaserve.scheduling.admission import SPEC_HEADROOM

    max_blocks = cache.alloc.blocks_for(max_seq_len + SPEC_HEADROOM) + 1
    limits = BucketLimits(max_requests, max_blocks, graph_rows(max_tokens))
    return GraphRunner(model, cache, scratch_block, limits, **kw)
