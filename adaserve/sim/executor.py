"""An ``Executor`` whose clock is advanced by a latency profile and whose verification outcome is
decided by an acceptance model (the simulated drafter's hidden ground truth).

A target step is priced by the profile's ``step_model`` (core/profile.py): ``"table"`` looks the
whole step up in the verify (or prefill) table at the batch's total KV context; ``"engine"``
prices the parts of our engine's step separately (``engine_step_ms``, docs/fidelity.md)."""

from __future__ import annotations

import numpy as np

from adaserve.core.profile import LatencyProfile
from adaserve.core.request import Request
from adaserve.iteration import StepOutput
from adaserve.scheduling.admission import (BLOCK_SIZE, MAX_GRAPH_PARTS, MAX_GRAPH_TOKENS, SOLO_QUERY_THRESHOLD,
                                           graph_rows)
from adaserve.scheduling.attention_calls import padding_groups
from adaserve.scheduling.graph_shapes import graph_packs, query_rows
from adaserve.scheduling.plan import SpecShape
from adaserve.scheduling.trees import CandidateForest
from adaserve.sim.acceptance import accepted_ends


# How our engine batches attention (adaserve/engine/batch.py; both read the constants from
# scheduling/admission.py and the split from scheduling/attention_calls.py): an entry with at least
# SOLO_QUERY_THRESHOLD new tokens gets an attention call of its own, the others share calls padded to
# their most new tokens and longest key length, in KV blocks of BLOCK_SIZE tokens: one call, or on a
# CPU (a profile with ``attention_calls``) as many as ``padding_groups`` cuts them into.


def shared_attention_ms(latency: LatencyProfile, entries: list[tuple[int, int]]) -> float:
    """Attention of the padded calls over ``entries`` = (context tokens, new tokens) per sequence,
    beyond what the verify table's context-0 row holds: per call, the context axis (measured with
    one new token per sequence, so that key slots = context tokens) read at the *padded* key slots,
    times the measured factor for several new tokens per sequence; a call beyond the first also
    costs its own ``fixed_keys`` key slots."""
    if not entries:
        return 0.0
    keys = np.array([-(-(c + n) // BLOCK_SIZE) * BLOCK_SIZE for c, n in entries], np.int64)
    queries = np.array([n for _, n in entries], np.int64)
    calls = [np.arange(len(entries))]
    if latency.attention_calls is not None and len(entries) > 1:
        calls = padding_groups(keys, queries, *latency.attention_calls)
    base = float(latency.verify_ms(1, 0.0))
    ms = 0.0
    for call in calls:
        slots = len(call) * int(keys[call].max())
        ms += max(float(latency.verify_ms(1, slots)) - base, 0.0) * latency.query_factor(int(queries[call].max()))
    if len(calls) > 1:
        ms += (len(calls) - 1) * max(float(latency.verify_ms(1, latency.attention_calls[0])) - base, 0.0)
    return ms


def engine_step_ms(latency: LatencyProfile, chunks: list[tuple[int, int]],
                   trees: list[tuple[int, int]]) -> float:
    """One target step of our engine: prompt ``chunks`` = (tokens, already prefilled) and decoding
    ``trees`` = (context tokens, verified tree tokens, root included) per request.

    Every new token goes through the linear layers: the verify table at context 0 for all of them,
    which also charges one logits row per token. Each chunk then adds its difference from as many
    verified tokens, from the prefill table at its prefilled length: attention over the prompt so
    far (it grows with it) minus the logits rows a chunk does not compute (it computes one). The
    step costs at least any of its parts alone (the trees' tokens, each chunk): a bound that keeps
    two tables measured at different moments of a shared machine's load from pricing a step below
    its own parts. Trees, decodes and chunks of fewer than ``SOLO_QUERY_THRESHOLD`` tokens share one
    padded attention call (``shared_attention_ms``). A step small enough to run compiled layers
    (the profile's ``compiled_steps``) is priced by ``compiled_step_ms`` instead."""
    tree_tokens = sum(n for _, n in trees)
    if latency.compiled_keys is not None and 0 < sum(c for c, _ in chunks) + tree_tokens <= latency.compiled_tokens:
        return compiled_step_ms(latency, chunks, trees)
    if latency.graphed:
        parts = graph_parts(chunks, trees, latency.measured_with.get("graph_parts") or MAX_GRAPH_PARTS,
                            graph_rows(latency.limits.max_batch_tokens), latency.limits.max_batch_requests)
        if parts is not None:
            return split_step_ms(latency, *parts)
    ms = float(latency.verify_ms(sum(c for c, _ in chunks) + tree_tokens, 0.0))
    parts = [float(latency.verify_ms(tree_tokens, 0.0))] if trees else []
    shared = list(trees)
    for c, p in chunks:
        alone = float(latency.prefill_ms(c, p))
        ms += alone - float(latency.verify_ms(c, 0.0))
        parts.append(alone)
        if c < SOLO_QUERY_THRESHOLD:
            shared.append((p, c))
    return max([ms, *parts]) + shared_attention_ms(latency, shared)


def graph_parts(chunks: list[tuple[int, int]], trees: list[tuple[int, int]], max_parts: int = MAX_GRAPH_PARTS,
                max_rows: int = MAX_GRAPH_TOKENS, max_requests: int = 64
                ) -> tuple[list[tuple[int, int]], list[tuple[list, list]]] | None:
    """How the engine with CUDA graphs runs this step as several graphed forwards (engine/cuda_graphs.py),
    or None when it runs it as one (graphed or eager): (the chunks of ``SOLO_QUERY_THRESHOLD`` tokens
    or more, one forward each; the shared call's packs as (short chunks, trees) each), 2 to
    ``max_parts`` forwards in all (the profile's ``measured_with.graph_parts``). The shared call (trees
    and shorter chunks) is one forward when it fits a graph of ``max_rows`` padded rows, else cut
    into packs by ``graph_packs``, as the engine's graph runner cuts it."""
    solo = [c for c in chunks if c[0] >= SOLO_QUERY_THRESHOLD]
    short = [c for c in chunks if c[0] < SOLO_QUERY_THRESHOLD]
    if any(query_rows(c) > max_rows for c, _ in solo):
        return None
    packs = []
    if trees or short:
        sizes = [n for _, n in trees] + [c for c, _ in short]
        cut = graph_packs(sizes, max_rows, max_requests)
        if cut is None:
            return None
        entries = list(trees) + short
        packs = [([entries[i] for i in p if i >= len(trees)], [entries[i] for i in p if i < len(trees)])
                 for p in cut]
    if not 1 < len(solo) + len(packs) <= max_parts:
        return None
    return solo, packs


def split_step_ms(latency: LatencyProfile, solo: list[tuple[int, int]], packs: list[tuple[list, list]]) -> float:
    """A step run as one forward per attention call (``graph_parts``): each long chunk from the
    prefill table at its prefilled length, each pack of the shared call (short chunks, trees) as a
    step of its own, each forward reading the weights again."""
    ms = sum(float(latency.prefill_ms(c, p)) for c, p in solo)
    for short, trees in packs:
        ms += engine_step_ms(latency, short, trees)  # one call: priced as a step of its own
    return ms


def compiled_step_ms(latency: LatencyProfile, chunks: list[tuple[int, int]],
                     trees: list[tuple[int, int]]) -> float:
    """A step of our engine's compiled CPU layers (``engine/cpu_decode.py``): no attention call,
    each row reads the keys its mask shows, weights are read once for all rows. The verify table
    at context 0 for all new tokens (measured compiled at these sizes, its chains' keys included),
    plus per row the ``compiled_keys`` table at the committed keys before it: a chunk's rows at
    its prompt's prefilled tokens, a tree's at its request's context."""
    table = latency.compiled_keys
    rows = [(p, c) for c, p in chunks] + list(trees)  # (committed keys, rows)
    tokens = sum(n for _, n in rows)
    return float(latency.verify_ms(tokens, 0.0)) + sum(n * float(table(k)) for k, n in rows)


def table_step_ms(latency: LatencyProfile, chunk_tokens: int, prefilled: int,
                  tree_tokens: int | None, context: int) -> float:
    """One target step as one table lookup (``step_model: "table"``): the verify table for all new
    tokens at the batch's total KV context (``prefilled`` + the decoding requests' ``context``);
    a step without decoding requests (``tree_tokens`` None) the prefill table."""
    if tree_tokens is None:
        return float(latency.prefill_ms(chunk_tokens, prefilled))
    return float(latency.verify_ms(chunk_tokens + tree_tokens, prefilled + context))


class SimExecutor:
    def __init__(self, latency: LatencyProfile, acceptance, seed: int = 0,
                 kv_capacity_tokens: int | None = None, draft_prefill: bool = False):
        """``draft_prefill``: the system runs a draft model, which must also prefill every prompt
        chunk (one draft forward over the chunk tokens after the target's step); not with a profile
        measured with the n-gram drafter, which has no KV to fill (its drafting is priced per
        iteration by the profile's ``host["draft"]`` table when it has one)."""
        self.latency = latency
        self.ngram = latency.ngram_drafter  # drafting priced per iteration
        self.draft_prefill = draft_prefill and not self.ngram
        self.acceptance = acceptance
        self.rng = np.random.default_rng(seed)
        self.kv_capacity_tokens = kv_capacity_tokens or latency.limits.kv_capacity_tokens
        self.clock = 0.0
        self.engine_model = latency.step_model == "engine"
        self._speculated = False  # this iteration drafted trees (host work of the speculative kind)

    def now(self) -> float:
        return self.clock

    def wait_until(self, t_ms: float) -> None:
        self.clock = max(self.clock, t_ms)

    def speculate(self, requests: list[Request], shape: SpecShape) -> CandidateForest:
        forest = self.acceptance.draft(requests, shape, self.rng)
        per_iteration = self.latency.draft_iteration_ms(len(requests)) if self.ngram else None
        if per_iteration is not None:
            self.clock += per_iteration
        else:
            steps = shape.draft_tokens_per_step(len(requests))
            ctx = sum(r.context_len for r in requests)
            self.clock += float(np.sum(self.latency.draft_ms(np.asarray(steps, np.float64), ctx)))
        self._speculated = True
        return forest

    def execute(self, prefill: list[tuple[Request, int]], decode: list[Request],
                forest: CandidateForest, selected: np.ndarray, max_commit: np.ndarray) -> StepOutput:
        prefill_tokens = sum(c for _, c in prefill)
        self.clock += self._step_ms(prefill, decode, forest, selected)
        ends = None
        if decode:
            if forest.n_nodes > forest.n_requests:
                accepted, ends = accepted_ends(forest, selected)
                committed = accepted + 1
            else:
                committed = np.ones(len(decode), np.int64)
            committed = np.minimum(committed, max_commit)
        else:
            committed = np.zeros(0, np.int64)
        if self.draft_prefill and prefill_tokens:
            self.clock += float(self.latency.draft_ms(prefill_tokens,
                                                      sum(r.prefilled for r, _ in prefill)))
        completes = sum(1 for r, c in prefill if r.prefilled + c >= r.input_len)
        return StepOutput(committed, np.zeros(len(decode), bool), [False] * completes, accepted_nodes=ends)

    def _step_ms(self, prefill: list[tuple[Request, int]], decode: list[Request],
                 forest: CandidateForest, selected: np.ndarray) -> float:
        """The target step's time by the profile's ``step_model``; "engine" adds the iteration's
        host work."""
        if not self.engine_model:  # the paper-scale path: sums only
            return table_step_ms(self.latency, sum(c for _, c in prefill), sum(r.prefilled for r, _ in prefill),
                                 int(selected.sum()) if decode else None, sum(r.context_len for r in decode))
        chunks = [(c, r.prefilled) for r, c in prefill]
        trees = []
        if decode:
            sizes = np.add.reduceat(np.asarray(selected, np.int64), forest.offsets[:-1])
            trees = [(r.context_len, max(int(n), 1)) for r, n in zip(decode, sizes.tolist())]
        drafted = bool(decode) and forest.verifies_drafted(selected)
        ms = engine_step_ms(self.latency, chunks, trees) + self.latency.host_ms(len(decode), self._speculated, drafted)
        self._speculated = False
        return ms

    def release(self, request: Request) -> None:
        release = getattr(self.acceptance, "release", None)  # a model that keeps per-request state
        if release is not None:
            release(request)
