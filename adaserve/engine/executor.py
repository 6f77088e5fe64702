"""The torch ``Executor``: real models, real drafting, tree verification, wall-clock time.

Each ``execute`` is one target forward over a flat batch holding the prefill chunks and every
decoding request's selected tree (root = its last committed token). Verification walks each tree
(greedy or stochastic, see verify.py), the accepted path's KV is kept and the rejected nodes' KV
released (``KVCache.commit``), and the committed tokens are appended to the request's own token list.

KV memory: the serving loop admits a request only if its reservation (prompt + maximum output +
``SPEC_HEADROOM`` tree tokens) fits ``kv_capacity_tokens``. We set that capacity to the block pool
minus one block per request slot (block rounding), so the reserved requests always fit and blocks
never run out. Should a tree still not fit (e.g. speculation shapes beyond the headroom), the step
falls back to verifying the roots only: one token per request, inside every reservation.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from adaserve.core.profile import LatencyProfile, Limits
from adaserve.core.request import Request
from adaserve.iteration import StepOutput
from adaserve.scheduling.admission import SPEC_HEADROOM
from adaserve.scheduling.plan import SpecShape
from adaserve.scheduling.trees import CandidateForest

from .batch import BatchBuilder, FlatBatch
from .drafters import Drafter
from .kv_cache import OutOfBlocks
from .model import Transformer
from .recorder import AcceptanceRecorder
from .sequence import SeqState
from .verify import cut, greedy_walk, stochastic_walk


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

    @classmethod
    def root(cls, token: int, node: int) -> "Tree":
        return cls([int(token)], [-1], np.array([node], np.int64))


def selected_trees(forest: CandidateForest, selected: np.ndarray, roots: Sequence[int]) -> list[Tree]:
    """The selected nodes of every request as a tree whose root token is the request's last token."""
    if forest.n_requests != len(roots):
        raise ValueError(f"forest has {forest.n_requests} trees for {len(roots)} decoding requests")
    sel = np.asarray(selected, bool)
    out = []
    for i, root in enumerate(roots):
        lo, hi = int(forest.offsets[i]), int(forest.offsets[i + 1])
        nodes = lo + np.flatnonzero(sel[lo:hi])
        if len(nodes) == 0 or nodes[0] != lo:
            nodes = np.concatenate(([lo], nodes[nodes != lo]))
        local = {int(g): j for j, g in enumerate(nodes)}
        try:
            parents = [-1] + [local[int(p)] for p in forest.parent[nodes[1:]]]
        except KeyError:
            raise ValueError(f"selection of request {i} is not connected (a node without its parent)") from None
        out.append(Tree([int(root)] + forest.token[nodes[1:]].tolist(), parents, nodes))
    return out


@dataclass
class _Step:
    batch: FlatBatch
    prefill_rows: list[range]
    tree_rows: list[range]


class TorchExecutor:
    """``Executor`` of iteration.py on a ``Transformer`` (fp32 CPU or any torch device)."""

    def __init__(self, model: Transformer, latency: LatencyProfile, drafter: Drafter | None = None, *,
                 tokenizer=None, num_blocks: int | None = None, block_size: int = 16,
                 temperature: float = 0.0, seed: int = 0, recorder: AcceptanceRecorder | None = None,
                 ignore_eos: bool = False, kv_capacity: int | None = None):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.model, self.latency, self.drafter, self.tokenizer = model, latency, drafter, tokenizer
        self.device = model.lm_head.weight.device
        self.num_blocks = num_blocks or default_num_blocks(latency.limits, block_size)
        self.cache = model.make_cache(self.num_blocks, block_size)
        self.kv_capacity_tokens = kv_capacity if kv_capacity is not None else kv_capacity_tokens(
            self.num_blocks, block_size, latency.limits.max_batch_requests)
        self.temperature = temperature
        self.rng = np.random.default_rng(seed)
        self.recorder = recorder
        self.eos = frozenset(() if ignore_eos else model.config.eos_token_ids)
        self.seqs: dict[int, SeqState] = {}
        self.outputs: dict[int, list[int]] = {}  # released requests' output tokens
        self.prompts: dict[int, list[int]] = {}
        self.fallbacks = 0  # steps that verified roots only because a tree did not fit in KV
        self._t0 = time.perf_counter()

    # ---- clock ----------------------------------------------------------------------------------
    def reset_clock(self) -> None:
        self._t0 = time.perf_counter()

    def now(self) -> float:
        return (time.perf_counter() - self._t0) * 1e3

    def wait_until(self, t_ms: float) -> None:
        delay = (t_ms - self.now()) / 1e3
        if delay > 0:
            time.sleep(delay)

    # ---- requests -------------------------------------------------------------------------------
    def set_prompts(self, prompts: Mapping[int, Sequence[int]]) -> None:
        """Prompt token ids by request id (else prompts are tokenized on first prefill)."""
        self.prompts.update({int(k): [int(t) for t in v] for k, v in prompts.items()})

    def _seq(self, r: Request) -> SeqState:
        seq = self.seqs.get(r.rid)
        if seq is None:
            ids = self.prompts.pop(r.rid, None)
            if ids is None:
                if self.tokenizer is None:
                    raise ValueError(f"request {r.rid}: no prompt token ids and no tokenizer")
                ids = list(self.tokenizer(r.prompt).input_ids)
            if len(ids) != r.input_len:
                raise ValueError(f"request {r.rid}: {len(ids)} prompt tokens but input_len {r.input_len} "
                                 "(build requests with the tokenizer's lengths)")
            seq = self.seqs[r.rid] = SeqState(r.rid, ids, len(ids))
        return seq

    def release(self, request: Request) -> None:
        seq = self.seqs.pop(request.rid, None)
        if seq is not None:
            self.outputs[request.rid] = seq.output
        if request.rid in self.cache.alloc:
            self.cache.free(request.rid)
        if self.drafter is not None:
            self.drafter.release(request.rid)

    # ---- speculation ----------------------------------------------------------------------------
    def speculate(self, requests: list[Request], shape: SpecShape) -> CandidateForest:
        seqs = [self._seq(r) for r in requests]
        if self.drafter is None or not shape.speculative:
            return CandidateForest.roots_only(len(seqs), np.array([s.last for s in seqs], np.int64))
        return self.drafter.draft(seqs, shape)

    # ---- one target forward ---------------------------------------------------------------------
    def execute(self, prefill: list[tuple[Request, int]], decode: list[Request],
                forest: CandidateForest, selected: np.ndarray, max_commit: np.ndarray) -> StepOutput:
        seqs = [self._seq(r) for r in decode]
        trees = selected_trees(forest, selected, [s.last for s in seqs])
        try:
            step = self._build(prefill, seqs, trees)
        except OutOfBlocks:
            self.fallbacks += 1
            trees = [Tree.root(s.last, int(forest.offsets[i])) for i, s in enumerate(seqs)]
            step = self._build(prefill, seqs, trees)  # within the loop's reservations: always fits
        logits = self.model(step.batch, self.cache)
        greedy = logits.argmax(-1).tolist() if self.temperature == 0 else None
        prefill_eos = self._first_tokens(prefill, step.prefill_rows, logits, greedy)
        committed = np.zeros(len(decode), np.int64)
        eos = np.zeros(len(decode), bool)
        for i, (r, seq, tree) in enumerate(zip(decode, seqs, trees)):
            rows = step.tree_rows[i]
            path, out = self._walk(tree, rows, logits, greedy)
            path, out = cut(path, out, int(max_commit[i]), self.eos)
            if self.recorder is not None:
                self._record(r, seq, tree, path, out, forest)
            self.cache.commit(seq.seq_id, path)
            seq.ids.extend(out)
            committed[i], eos[i] = len(out), out[-1] in self.eos
        return StepOutput(committed, eos, prefill_eos)

    def _build(self, prefill: list[tuple[Request, int]], seqs: list[SeqState], trees: list[Tree]) -> _Step:
        b = BatchBuilder(self.cache)
        try:
            prefill_rows = []
            for r, chunk in prefill:
                seq = self._seq(r)
                if seq.prefilled != r.prefilled:
                    raise RuntimeError(f"request {r.rid}: engine prefilled {seq.prefilled}, loop {r.prefilled}")
                end = seq.prefilled + chunk
                prefill_rows.append(b.add_prefill(r.rid, seq.ids[seq.prefilled:end],
                                                  logits="last" if end >= seq.n_prompt else "none"))
            tree_rows = [b.add_tree(s.seq_id, t.tokens, t.parents) for s, t in zip(seqs, trees)]
            batch = b.build(self.device)
        except BaseException:
            b.abort()
            raise
        for r, chunk in prefill:
            self.seqs[r.rid].prefilled += chunk
        return _Step(batch, prefill_rows, tree_rows)

    def _first_tokens(self, prefill, rows: list[range], logits: torch.Tensor, greedy) -> list[bool]:
        """The token of every prompt-completing chunk; returns whether each is EOS."""
        out = []
        for (r, _), rr in zip(prefill, rows):
            if len(rr) == 0:
                continue
            row = rr[-1]
            tok = greedy[row] if greedy is not None else self._sample(logits[row])
            self.seqs[r.rid].ids.append(int(tok))
            out.append(tok in self.eos)
        return out

    def _probs(self, row: torch.Tensor) -> np.ndarray:
        return torch.softmax(row.double() / self.temperature, dim=-1).cpu().numpy()

    def _sample(self, row: torch.Tensor) -> int:
        p = self._probs(row)
        return int(self.rng.choice(len(p), p=p / p.sum()))

    def _walk(self, tree: Tree, rows: range, logits: torch.Tensor, greedy) -> tuple[list[int], list[int]]:
        if greedy is not None:
            return greedy_walk(tree.tokens, tree.parents, greedy[rows.start:rows.stop])
        return stochastic_walk(tree.tokens, tree.parents, lambda j: self._probs(logits[rows[j]]), self.rng)

    def _record(self, r: Request, seq: SeqState, tree: Tree, path: list[int], out: list[int],
                forest: CandidateForest) -> None:
        extra = forest.extra
        if "expanded" not in extra:
            return
        for j, node in enumerate(path):
            g = int(tree.nodes[node])
            if extra["expanded"][g]:
                self.recorder.record(r.rid, r.category, seq.num_output + j, extra["next_probs"][g],
                                     extra["next_tokens"][g], out[j])
