"""The torch ``Executor``: real models, real drafting, tree verification, wall-clock time.

Each ``execute`` is one target forward over a flat batch holding the prefill chunks and every
decoding request's selected tree (root = its last committed token). Verification walks each tree
(greedy or stochastic, see verify.py), the accepted path's KV is kept and the rejected nodes' KV
released (``KVCache.commit``), and the committed tokens are appended to the request's own token list.

KV memory: the serving loop admits a request only if its reservation (prompt + maximum output +
``SPEC_HEADROOM`` tree tokens) fits ``kv_capacity_tokens``. We set that capacity to the block pool
minus one block per request slot (block rounding), so the reserved requests always fit and blocks
never run out: the pool is the one source of the capacity, and running out of blocks is a bug.

Sampling is per request (``SamplingOptions``: temperature, top-p, top-k, seed, ignore-EOS), set with
``set_options`` next to ``set_prompts`` before the request's first step; the constructor's
``temperature`` / ``ignore_eos`` are the default. Greedy and sampled requests share a batch: each
tree is verified with its own request's rule, so greedy requests stay token-identical to plain
greedy decoding.

Per-request state: ``release`` (the loop calls it when a request finishes or is cancelled) frees
the KV and the drafter's state and keeps the output tokens in ``outputs`` so that an offline
caller (``adaserve run``, tests) can read them afterwards. ``forget(rid)`` drops everything the
executor still holds for a request (its kept output, an unused prompt or options): a long-running
caller (the server) calls it once it has read what it needs, so nothing grows with the number of
requests served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from adaserve.core import jit
from adaserve.core.profile import LatencyProfile, Limits
from adaserve.core.request import Request
from adaserve.iteration import StepOutput
from adaserve.scheduling.admission import SPEC_HEADROOM, kv_reservation
from adaserve.scheduling.plan import SpecShape
from adaserve.scheduling.trees import CandidateForest

from .batch import BatchBuilder, FlatBatch
from .cuda_graphs import GraphedModel, GraphRunner, cache_with_scratch_block, make_graph_runner
from .drafters import Drafter
from .kv_cache import BLOCK_SIZE, OutOfBlocks
from .model import Transformer
from .recorder import AcceptanceRecorder
from .sequence import SamplingOptions, SeqState
from .verify import (Walks, cut_walks, greedy_walk, greedy_walks_flat, gumbel_noise, softmax, stochastic_walk,
                     target_logits)

log = logging.getLogger("adaserve.engine")


def default_num_blocks(limits: Limits, block_size: int) -> int:
    """Blocks for ``max_batch_requests`` sequences of ``max_seq_len`` tokens plus tree headroom."""
    per_seq = -(-(limits.max_seq_len + SPEC_HEADROOM) // block_size) + 1
    return limits.max_batch_requests * per_seq


def kv_capacity_tokens(num_blocks: int, block_size: int, max_batch_requests: int) -> int:
    """Tokens the loop may reserve: one block per request slot is kept for block rounding."""
    return max(0, (num_blocks - max_batch_requests) * block_size)


@dataclass
class Tree:
    """One request's selected tree: local tokens/parents (node 0 = root) and global forest indices."""

    tokens: list[int]
    parents: list[int]
    nodes: np.ndarray


@dataclass
class TreeBatch:
    """Every decoding request's selected tree as flat arrays: tree ``i`` is ``[offsets[i], offsets[i+1])``;
    ``tokens`` (node 0 = the request's last token), local ``parents`` (-1 for the root), and the
    nodes' global forest indices."""

    offsets: np.ndarray
    tokens: np.ndarray
    parents: np.ndarray
    nodes: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def tree(self, i: int) -> Tree:
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return Tree(self.tokens[lo:hi].tolist(), self.parents[lo:hi].tolist(), self.nodes[lo:hi])


def select_trees(forest: CandidateForest, selected: np.ndarray, roots: Sequence[int]) -> TreeBatch:
    """The selected nodes of every request (its root always included) as one ``TreeBatch``
    (compiled: one pass over the nodes; else array operations)."""
    if forest.n_requests != len(roots):
        raise ValueError(f"forest has {forest.n_requests} trees for {len(roots)} decoding requests")
    selected = np.asarray(selected)
    if selected.shape != (forest.n_nodes,):
        raise ValueError(f"selection has shape {selected.shape}, the forest {forest.n_nodes} nodes")
    roots = np.asarray(roots, np.int64)
    if jit.enabled():
        offsets, tokens, parents, nodes, bad = _select_trees_kernel(forest.offsets, forest.parent, forest.token,
                                                                    selected.astype(bool, copy=False), roots)
    else:
        offsets, tokens, parents, nodes, bad = _select_trees_arrays(forest, selected, roots)
    if bad >= 0:
        raise ValueError(f"selection of request {bad} is not connected (a node without its parent)")
    return TreeBatch(offsets, tokens, parents, nodes)


def _select_trees_arrays(forest: CandidateForest, selected: np.ndarray, roots: np.ndarray):
    """``select_trees`` with array operations: (offsets, tokens, local parents, nodes, first
    request with a node whose parent is not selected or -1)."""
    sel = np.array(selected, bool)
    sel[forest.offsets[:-1]] = True
    nodes = np.flatnonzero(sel)
    parent = forest.parent[nodes]
    has = parent >= 0
    orphan = has & ~sel[np.where(has, parent, 0)]
    if orphan.any():
        return None, None, None, None, int(np.searchsorted(forest.offsets, nodes[np.argmax(orphan)], "right") - 1)
    offsets = np.searchsorted(nodes, forest.offsets)  # every tree's first selected node (its root)
    new = np.cumsum(sel) - 1  # each selected node's index in ``nodes``
    start = np.repeat(offsets[:-1], np.diff(offsets))
    parents = np.where(has, new[np.where(has, parent, 0)] - start, -1)
    tokens = forest.token[nodes].astype(np.int64, copy=True)
    tokens[offsets[:-1]] = roots
    return offsets.astype(np.int64), tokens, parents.astype(np.int64), nodes, -1


@jit.njit
def _select_trees_kernel(offsets, parent, token, selected, roots):
    """``_select_trees_arrays`` compiled: one pass over the nodes (parents come before children)."""
    n = len(offsets) - 1
    where = np.full(len(parent), -1, np.int64)  # each selected node's index in ``nodes``
    out_off = np.zeros(n + 1, np.int64)
    tokens = np.empty(len(parent), np.int64)
    parents = np.empty(len(parent), np.int64)
    nodes = np.empty(len(parent), np.int64)
    at = 0
    for i in range(n):
        lo = offsets[i]
        for g in range(lo, offsets[i + 1]):
            if g != lo and not selected[g]:
                continue
            p = parent[g]
            if p >= 0 and where[p] < 0:
                return out_off, tokens, parents, nodes, i
            parents[at] = -1 if p < 0 else where[p] - out_off[i]
            tokens[at] = roots[i] if g == lo else token[g]
            nodes[at] = g
            where[g] = at
            at += 1
        out_off[i + 1] = at
    return out_off, tokens[:at], parents[:at], nodes[:at], -1


def selected_trees(forest: CandidateForest, selected: np.ndarray, roots: Sequence[int]) -> list[Tree]:
    """The selected nodes of every request as a tree whose root token is the request's last token."""
    tb = select_trees(forest, selected, roots)
    return [tb.tree(i) for i in range(len(tb))]


def argmax_rows(logits: torch.Tensor) -> np.ndarray:
    """The argmax of every row as int64 numpy (first maximum, as ``torch.argmax``). CPU float32/64
    logits go through numpy, whose argmax is ~10x faster than torch's on CPU for these shapes."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):
        return logits.detach().numpy().argmax(-1)
    return logits.argmax(-1).cpu().numpy()


@dataclass
class _Step:
    batch: FlatBatch
    prefill_rows: list[range]
    tree_rows: np.ndarray  # first logits row of every tree (its node j is row tree_rows[i] + j)
    trees: TreeBatch


def _eos_flags(seqs: Sequence[SeqState], walks: Walks) -> np.ndarray:
    """Whether each token of ``walks.out`` is an EOS of its own request (requests mostly share one
    EOS set: one comparison per EOS id of each distinct set; ``np.isin`` costs ~25 us a call)."""
    groups: dict[frozenset[int], list[int]] = {}
    for i, s in enumerate(seqs):
        if s.eos:
            groups.setdefault(s.eos, []).append(i)
    flags = np.zeros(len(walks.out), bool)
    owner = None
    for eos, members in groups.items():
        hit = np.zeros(len(walks.out), bool)
        for t in eos:
            hit |= walks.out == t
        if len(members) < len(seqs):
            if owner is None:
                owner = np.repeat(np.arange(len(seqs)), np.diff(walks.bounds))
            sel = np.zeros(len(seqs), bool)
            sel[members] = True
            hit &= sel[owner]
        flags |= hit
    return flags


class TorchExecutor:
    """``Executor`` of iteration.py on a ``Transformer`` (fp32 CPU or any torch device)."""

    def __init__(self, model: Transformer, latency: LatencyProfile, drafter: Drafter | None = None, *,
                 tokenizer=None, num_blocks: int | None = None, block_size: int = BLOCK_SIZE,
                 temperature: float = 0.0, seed: int = 0, recorder: AcceptanceRecorder | None = None,
                 ignore_eos: bool = False, cuda_graphs: bool = False):
        self.model, self.latency, self.drafter, self.tokenizer = model, latency, drafter, tokenizer
        self.device = model.lm_head.weight.device
        self.num_blocks = num_blocks or default_num_blocks(latency.limits, block_size)
        # decode and verification steps replay CUDA graphs (engine/cuda_graphs.py): ``self.model``
        # is then the model behind a graph runner, called the same way; on the CPU the same padded
        # path runs eagerly (tests)
        self.graphs: GraphRunner | None = None
        if cuda_graphs:
            self.cache, scratch = cache_with_scratch_block(model, self.num_blocks, block_size)
            lim = latency.limits
            self.graphs = make_graph_runner(model, self.cache, scratch, lim.max_batch_requests, lim.max_seq_len,
                                            lim.max_batch_tokens)
            self.model = GraphedModel(self.graphs)
        else:
            self.cache = model.make_cache(self.num_blocks, block_size)
        self.kv_capacity_tokens = kv_capacity_tokens(self.num_blocks, block_size, latency.limits.max_batch_requests)
        # the default for requests without options of their own (raises on a negative temperature)
        self.default_options = SamplingOptions(temperature=float(temperature), ignore_eos=bool(ignore_eos))
        self.rng = np.random.default_rng(seed)  # unseeded sampled requests
        self.recorder = recorder
        self.model_eos = frozenset(model.config.eos_token_ids)
        self.seqs: dict[int, SeqState] = {}
        self.outputs: dict[int, list[int]] = {}  # released requests' output tokens, until forget()
        self.prompts: dict[int, list[int]] = {}  # prompts set for requests not started yet
        self.options: dict[int, SamplingOptions] = {}  # options set for requests not started yet
        # requests whose own sampling raised (e.g. NaN probabilities): rid -> reason. Such a request
        # ends at that step (reported as EOS, nothing more committed); the others go on
        self._t0 = time.perf_counter()

    # ---- clock ----------------------------------------------------------------------------------
    def reset_clock(self) -> None:
        self._t0 = time.perf_counter()

    def now(self) -> float:
        return (time.perf_counter() - self._t0) * 1e3

    def wait_until(self, t_ms: float) -> None:
        if self.recorder is not None and t_ms > self.now():  # idle: write the held acceptance records
            self.recorder.flush()
        delay = (t_ms - self.now()) / 1e3
        if delay > 0:
            time.sleep(delay)

    # ---- requests -------------------------------------------------------------------------------
    def set_prompts(self, prompts: Mapping[int, Sequence[int]]) -> None:
        """Prompt token ids by request id (else prompts are tokenized on first prefill)."""
        self.prompts.update({int(k): [int(t) for t in v] for k, v in prompts.items()})

    def set_options(self, options: Mapping[int, SamplingOptions | Mapping]) -> None:
        """Sampling options by request id (a ``SamplingOptions`` or a mapping of its fields); requests
        without any use ``default_options``. Set them before the request's first step (like
        ``set_prompts``); a request already running takes them from its next step on."""
        for rid, o in options.items():
            opts = o if isinstance(o, SamplingOptions) else SamplingOptions(**o)
            seq = self.seqs.get(int(rid))
            if seq is None:
                self.options[int(rid)] = opts
            else:
                seq.options, seq.eos = opts, self._eos(opts)

    def _eos(self, opts: SamplingOptions) -> frozenset[int]:
        return frozenset() if opts.ignore_eos else self.model_eos

    def _seq(self, r: Request) -> SeqState:
        seq = self.seqs.get(r.rid)
        if seq is None:
            ids = self.prompts.get(r.rid)
            if ids is None:
                if self.tokenizer is None:
                    raise ValueError(f"request {r.rid}: no prompt token ids and no tokenizer")
                ids = list(self.tokenizer(r.prompt).input_ids)
            if len(ids) != r.input_len:
                raise ValueError(f"request {r.rid}: {len(ids)} prompt tokens but input_len {r.input_len} "
                                 "(build requests with the tokenizer's lengths)")
            self.prompts.pop(r.rid, None)
            opts = self.options.pop(r.rid, self.default_options)
            seq = self.seqs[r.rid] = SeqState(r.rid, ids, len(ids), options=opts, eos=self._eos(opts))
        return seq

    def release(self, request: Request) -> None:
        """The request left the loop: free its KV and drafter state; its output tokens stay readable
        in ``outputs[rid]`` until ``forget(rid)``."""
        seq = self.seqs.pop(request.rid, None)
        if seq is not None:
            self.outputs[request.rid] = seq.output
            if self.recorder is not None:
                self.recorder.record_tokens(request.rid, request.category, seq.ids, seq.n_prompt,
                                            self.drafter.name if self.drafter is not None else None)
        self._free(request.rid)

    def forget(self, rid: int) -> None:
        """Drop everything held for request ``rid`` (kept output, unused prompt or options; KV and
        drafter state too, should it still hold any). Idempotent; call it once the loop is done with
        the request and its output has been read."""
        self.seqs.pop(rid, None)
        self.outputs.pop(rid, None)
        self.prompts.pop(rid, None)
        self.options.pop(rid, None)
        self._free(rid)

    def _free(self, rid: int) -> None:
        if rid in self.cache.alloc:
            self.cache.free(rid)
        if self.drafter is not None:
            self.drafter.release(rid)

    def state_size(self) -> dict[str, int]:
        """How many requests each per-request structure holds (leak checks)."""
        return {"seqs": len(self.seqs), "outputs": len(self.outputs), "prompts": len(self.prompts),
                "options": len(self.options), "kv_sequences": len(self.cache.alloc.seq_ids())}

    # ---- speculation ----------------------------------------------------------------------------
    def speculate(self, requests: list[Request], shape: SpecShape) -> CandidateForest:
        seqs = [self._seq(r) for r in requests]
        if self.drafter is None or not shape.speculative:
            return CandidateForest.roots_only(len(seqs), np.array([s.last for s in seqs], np.int64))
        forest = self.drafter.draft(seqs, shape)
        if self.recorder is not None:
            lo = forest.offsets[:-1].tolist()
            for r, seq, a, b in zip(requests, seqs, lo, forest.offsets[1:].tolist()):
                self.recorder.record_tree(r.rid, r.category, seq.num_output, b - a - 1, forest.prob[a + 1:b])
        return forest

    # ---- one target forward ---------------------------------------------------------------------
    def execute(self, prefill: list[tuple[Request, int]], decode: list[Request],
                forest: CandidateForest, selected: np.ndarray, max_commit: np.ndarray) -> StepOutput:
        seqs = [self._seq(r) for r in decode]
        step = self._build(prefill, seqs, forest, selected)
        logits = self.model(step.batch, self.cache)
        failed: dict[int, str] = {}  # requests whose own sampling failed: they alone end
        greedy, walks = self._verify(decode, seqs, step, logits, failed)
        first, first_eos = self._first_tokens(prefill, step.prefill_rows, logits, greedy, failed)
        committed, eos, tokens = self._commit_trees(decode, seqs, step.trees, walks, max_commit, forest)
        return StepOutput(committed, eos, first_eos, tokens, first, failed)

    # The phases of ``execute`` are methods of their own so that ``adaserve bench engine --only host``
    # can time each one (draft, batch build, forward, verification, commit).

    def _build(self, prefill: list[tuple[Request, int]], seqs: list[SeqState], forest: CandidateForest,
               selected: np.ndarray) -> _Step:
        """The selected trees and the flat batch (prefill chunks first, then one tree per request)."""
        trees = select_trees(forest, selected, [s.last for s in seqs])
        b = BatchBuilder(self.cache)
        try:
            prefill_rows = []
            for r, chunk in prefill:
                if r.rid not in self.cache.alloc:
                    self._claim(r)
                seq = self._seq(r)
                end = r.prefilled + chunk  # the loop owns prefill progress; it advances after the step
                prefill_rows.append(b.add_prefill(r.rid, seq.ids[r.prefilled:end],
                                                  logits="last" if end >= seq.n_prompt else "none"))
            tree_rows = (b.add_trees([s.seq_id for s in seqs], trees.tokens, trees.parents, trees.offsets)
                         if seqs else np.zeros(0, np.int64))
            batch = b.build(self.device)
        except BaseException:
            b.abort()
            raise
        return _Step(batch, prefill_rows, tree_rows, trees)

    def _claim(self, r: Request) -> None:
        """Register a request's sequence in the KV pool holding its whole admission reservation
        (prompt, output and tree headroom) in one pop, so that its blocks lie consecutive however
        it grows (``BlockAllocator.claim``). The loop admits a request only where its reservation
        fits, so the claims never starve a running sequence; a caller that drives the executor
        without that accounting and runs short gets no claim (the blocks come one by one)."""
        alloc = self.cache.alloc
        alloc.add(r.rid)
        try:
            alloc.claim(r.rid, kv_reservation(r, self.latency.limits.max_seq_len))
        except OutOfBlocks:
            pass

    def _verify(self, decode: list[Request], seqs: list[SeqState], step: _Step, logits: torch.Tensor,
                failed: dict[int, str]) -> tuple[np.ndarray, Walks]:
        """The target's argmax of every logits row, and every tree's walk (empty for a request whose
        own sampling failed; it is added to ``failed``). The greedy trees are walked all at once
        (``greedy_walks_flat``), the sampled ones one by one."""
        greedy = argmax_rows(logits)
        tb = step.trees
        plain = np.fromiter((s.options.greedy for s in seqs), bool, len(seqs))
        walks = greedy_walks_flat(tb.tokens, tb.parents, tb.offsets, greedy, step.tree_rows, plain)
        if plain.all():
            return greedy, walks
        per: list[tuple[list[int], list[int]] | None] = walks.lists()
        for i in np.flatnonzero(~plain).tolist():
            r, seq = decode[i], seqs[i]
            try:
                rows = range(int(step.tree_rows[i]), int(step.tree_rows[i]) + int(tb.offsets[i + 1] - tb.offsets[i]))
                per[i] = self._walk(seq, tb.tree(i), rows, logits)
            except Exception as e:  # this request's own sampling: it alone fails
                failed[r.rid] = self._failure(r, e)
                per[i] = None
        return greedy, Walks.from_lists(per)

    def _commit_trees(self, decode: list[Request], seqs: list[SeqState], trees: TreeBatch, walks: Walks,
                      max_commit: np.ndarray, forest: CandidateForest
                      ) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
        """Cap every walk (``cut_walks``), keep the accepted paths' KV (one ``KVCache.commit_rows``),
        append the tokens to the requests."""
        m, kept, eos = cut_walks(walks, np.asarray(max_commit, np.int64), _eos_flags(seqs, walks))
        out, bounds = kept.out.tolist(), kept.bounds.tolist()
        tokens = [out[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        if self.recorder is not None:  # before the tokens are appended: it reads the output positions
            self._record(decode, seqs, trees, kept, forest)
        for seq, t in zip(seqs, tokens):
            seq.ids.extend(t)
        ids = [s.seq_id for s in seqs]
        self.cache.commit_rows(self.cache.alloc.rows(ids), kept.path, m, ids)
        return m, eos, tokens

    def _first_tokens(self, prefill, rows: list[range], logits: torch.Tensor, greedy: np.ndarray,
                      failed: dict[int, str]) -> tuple[list[int], list[bool]]:
        """The token of every prompt-completing chunk, and whether each is EOS."""
        tokens, eos = [], []
        for (r, _), rr in zip(prefill, rows):
            if len(rr) == 0:
                continue
            row = rr[-1]
            seq = self.seqs[r.rid]
            o = seq.options
            try:
                if o.greedy:
                    tok = greedy[row]
                elif o.seed is not None:
                    tok = self._seeded(seq, logits[row:row + 1], [0])[0]
                else:
                    tok = self._sample(logits[row], o)
            except Exception as e:  # this request's own sampling: it alone fails
                failed[r.rid] = self._failure(r, e)
                tok = greedy[row]  # the loop counts one first token; the request ends with it
            seq.ids.append(int(tok))
            tokens.append(int(tok))
            eos.append(tok in seq.eos)
        return tokens, eos

    @staticmethod
    def _failure(r: Request, e: Exception) -> str:
        reason = f"sampling failed for this request: {type(e).__name__}: {e}"
        log.warning("request %d: %s; it ends here, the rest of the batch goes on", r.rid, reason)
        return reason

    @staticmethod
    def _probs(row: torch.Tensor, o: SamplingOptions) -> np.ndarray:
        """The request's target distribution at one node (temperature, top-k, top-p)."""
        if o.top_k == 0 and o.top_p >= 1:
            return torch.softmax(row.double() / o.temperature, dim=-1).cpu().numpy()
        return softmax(target_logits(row.double().cpu().numpy(), o.temperature, o.top_k, o.top_p))

    def _sample(self, row: torch.Tensor, o: SamplingOptions) -> int:
        p = self._probs(row, o)
        return int(self.rng.choice(len(p), p=p / p.sum()))

    @staticmethod
    def _seeded(seq: SeqState, rows: torch.Tensor, depths: Sequence[int]) -> list[int]:
        """Gumbel-max tokens of a seeded request at nodes of these depths below its last token
        (output position ``num_output + depth``): a function of the seed, position and logits only."""
        o = seq.options
        z = rows.double().cpu().numpy()
        noise: dict[int, np.ndarray] = {}
        out = []
        for j, d in enumerate(depths):
            pos = seq.num_output + int(d)
            if pos not in noise:
                noise[pos] = gumbel_noise(o.seed, pos, z.shape[1])
            out.append(int(np.argmax(target_logits(z[j], o.temperature, o.top_k, o.top_p) + noise[pos])))
        return out

    def _walk(self, seq: SeqState, tree: Tree, rows: range, logits: torch.Tensor) -> tuple[list[int], list[int]]:
        """One sampled request's walk (greedy requests are walked together in ``_verify``)."""
        o = seq.options
        if o.seed is not None:
            depth = [0] * len(tree.parents)
            for j, p in enumerate(tree.parents):
                if p >= 0:
                    depth[j] = depth[p] + 1  # parents come before their children
            return greedy_walk(tree.tokens, tree.parents, self._seeded(seq, logits[rows.start:rows.stop], depth))
        return stochastic_walk(tree.tokens, tree.parents, lambda j: self._probs(logits[rows[j]], o), self.rng)

    def _record(self, decode: list[Request], seqs: list[SeqState], trees: TreeBatch, kept: Walks,
                forest: CandidateForest) -> None:
        """Every committed token whose tree node the drafter had expanded: that node's draft
        proposals beside the token the target produced (one ``record_batch`` per step)."""
        extra = forest.extra
        if "expanded" not in extra or not len(kept.path):
            return
        owner = np.repeat(np.arange(len(seqs)), np.diff(kept.bounds))
        node = trees.nodes[trees.offsets[owner] + kept.path]  # global forest index of each path node
        keep = np.asarray(extra["expanded"], bool)[node]
        if not keep.any():
            return
        at = np.arange(len(node)) - kept.bounds[owner]  # place along the request's committed path
        first = np.array([s.num_output for s in seqs], np.int64)
        owner, node = owner[keep], node[keep]
        who = owner.tolist()
        self.recorder.record_batch([decode[k].rid for k in who], [decode[k].category for k in who],
                                   first[owner] + at[keep], extra["next_probs"][node], extra["next_tokens"][node],
                                   kept.out[keep])
