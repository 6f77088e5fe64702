"""Drafters: grow one candidate token tree per request and return them as a ``CandidateForest``.

Both drafters share the tree growth (``adaserve.drafting.trees.TreeSet``), level by level from the
root (the last committed token), and differ only in where a node's next-token distribution comes
from:

* ``ModelDrafter``: a small draft LM with its own runner and paged KV cache; one batched forward per
  level over the frontier nodes of every request (docs/definitions.md §4, step 3).
* ``NgramDrafter`` (``adaserve.drafting.ngram``, torch-free, so that the simulator can replay it):
  prompt / suffix lookup over the request's own tokens; a node's continuations are the tokens that
  followed the longest matching n-gram earlier in the request, with confidence
  ``count / (occurrences + prior)``.

Shapes (``SpecShape``): beam search keeps, per request and level, the ``width`` children with the
highest path probability f̂ among the top-``width`` children of every frontier node; a static shape
expands every node of level ``l`` with its top ``widths[l]`` children (chains: ``(1,) * k``).

The forest's ``extra`` carries, for every node the drafter expanded, the draft's top-``RECORD_K``
next tokens and their (conditional) probabilities: the acceptance recorder reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from adaserve.drafting.ngram import NgramDrafter
from adaserve.drafting.trees import RECORD_K, Expansion, TreeSet, level_plan
from adaserve.scheduling.plan import SpecShape
from adaserve.scheduling.trees import CandidateForest

from .batch import BatchBuilder
from .kv_cache import BLOCK_SIZE, OutOfBlocks
from .model import Transformer
from .sequence import SeqState


__all__ = ["Drafter", "ModelDrafter", "NgramDrafter"]


class Drafter(Protocol):
    name: str

    def draft(self, seqs: Sequence[SeqState], shape: SpecShape) -> CandidateForest: ...

    def release(self, seq_id: int) -> None: ...



# ---- draft model ------------------------------------------------------------------------------

class ModelDrafter:
    """An independent small LM (same vocabulary as the target) with its own paged KV cache.

    The draft KV follows the committed tokens lazily: the first forward of every ``draft`` call
    prefixes each request's root with the committed tokens the draft has not seen yet (the whole
    prompt the first time, the accepted tokens after that). Tree nodes are tentative and released
    when ``draft`` returns."""

    name = "model"

    def __init__(self, model: Transformer, num_blocks: int, block_size: int = BLOCK_SIZE):
        self.model = model
        self.cache = model.make_cache(num_blocks, block_size)
        self.device = model.lm_head.weight.device

    def draft(self, seqs: Sequence[SeqState], shape: SpecShape) -> CandidateForest:
        trees = TreeSet([s.last for s in seqs])
        try:
            for level in range(shape.depth):
                live = trees.live()
                if not live:
                    break
                keep, cols = level_plan(shape, level)
                exps = self._expand(seqs, trees, live, level == 0, max(cols, RECORD_K))
                if exps is None:  # out of draft KV blocks: stop growing, the trees stay valid
                    break
                trees.grow_level(np.concatenate([e[0] for e in exps]), np.concatenate([e[1] for e in exps]),
                                 keep, cols)
        finally:
            for s in seqs:
                if s.seq_id in self.cache.alloc:
                    self.cache.truncate(s.seq_id, self.cache.length(s.seq_id))
        return trees.to_forest()

    def _expand(self, seqs: Sequence[SeqState], trees: TreeSet, live: list[int], catch_up: bool,
                k: int) -> list[Expansion] | None:
        b = BatchBuilder(self.cache)
        rows = []
        try:
            for i, (tokens, parents, cached) in zip(live, trees.local_trees(live)):
                s = seqs[i]
                if catch_up:
                    self._catch_up(b, s)
                rows.append(b.add_tree(s.seq_id, tokens, parents, num_cached=cached))
        except OutOfBlocks:
            b.abort()
            return None
        logits = self.model(b.build(self.device), self.cache)
        p, t = torch.softmax(logits.float(), dim=-1).topk(min(k, logits.shape[-1]), dim=-1)
        p, t = p.cpu().numpy().astype(np.float64), t.cpu().numpy()
        return [(t[r.start:r.stop], p[r.start:r.stop]) for r in rows]

    def _catch_up(self, b: BatchBuilder, s: SeqState) -> None:
        """Committed tokens (all but the root) whose draft KV is missing go into the same forward."""
        have = self.cache.length(s.seq_id) if s.seq_id in self.cache.alloc else 0
        context = len(s.ids) - 1
        if context > have:
            b.add_prefill(s.seq_id, s.ids[have:context], logits="none")

    def release(self, seq_id: int) -> None:
        if seq_id in self.cache.alloc:
            self.cache.free(seq_id)
