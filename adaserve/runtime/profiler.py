"""Measure a ``LatencyProfile`` (core/profile.py format) for a model on this hardware.

Every point is the median of ``repeat`` timed target forwards after one warm-up. The batch is
built before the clock starts: building it is host work, measured with the rest of an iteration's
host work in the ``host`` table (so that the simulator counts it once; the engine's step log,
``scripts/engine_steps.py``, times the same forward). KV context is allocated without being
computed (its values do not change the time), so long contexts cost nothing to set up.

* ``verify``: one target step with ``tokens`` new tokens spread over ``clip(tokens // 4, 1,
  max_batch_requests)`` sequences (chains; a tree costs the same), no context: f(tokens). The
  context axis is additive: ``ms(tokens, C) = f(tokens) + g(C) - g(0)`` where g(C) is a step
  decoding one token for each of ``CONTEXT_SEQS`` sequences holding C context tokens in all, each
  point timed right after a context-0 step it is compared with (``context_points``).
* ``draft``: one draft-model step of ``tokens`` tree tokens over ``min(tokens, max_batch_requests)``
  sequences of ``DRAFT_CONTEXT`` tokens each (model drafter), or one n-gram expansion of ``tokens``
  frontier nodes (n-gram drafter: CPU time of the lookups).
* ``prefill``: one prompt chunk of ``tokens`` tokens of a single sequence, up to the maximum
  sequence length (whole prompts, as the vLLM-style policies prefill them: attention grows with the
  square of the prompt, so a table stopping at the chunk size and extrapolated linearly is too
  cheap). Context axis = tokens of the prompt already prefilled: a ``prefill_chunk``-token chunk
  is timed after ``p`` prefilled tokens (``PREFILL_CONTEXTS``), and its extra time over ``p = 0``
  is charged per chunk token (each new token attends to ``p`` more keys).
* ``compiled_steps`` (a CPU model whose steps of up to ``cpu_decode_limit`` tokens run compiled
  layers, ``engine/cpu_decode.py``): the extra time of a one-token step of one sequence holding
  C context tokens over the same step at context 0 (``compiled_key_points``, paired like the
  context axis), C over ``CONTEXT_POINTS`` up to the maximum sequence length. Such a step makes
  no attention call, so the context axis above (eight sequences, the operator path) does not
  price it: each row reads its own keys.
* ``attention_queries``: extra time of a step of ``CONTEXT_SEQS`` sequences holding
  ``QUERY_CONTEXT`` context tokens in all over the same step at context 0, with ``q`` new tokens
  per sequence (``QUERY_POINTS``): how the attention cost of trees grows with their size.
* ``host``: host work per iteration (everything but the target forward and the drafting: plan,
  selection, batch building, verification walk, commit, loop bookkeeping) of ``n`` requests
  (``HOST_REQUESTS``) decoding through the real ``ServingLoop`` and ``TorchExecutor``, with the
  adaserve policy and this profile's drafter (``speculative``) and with the vllm policy
  (``incremental``): median over ``HOST_STEPS`` iterations of the iteration's time (the profile's clock) minus the
  forward and drafting inside it; and (``draft``) the drafting itself per iteration, under the
  adaserve policy. For the n-gram drafter the simulator charges that per iteration instead of the
  per-level ``draft`` table: its cost is mostly per call (index update, beam bookkeeping), which a
  one-level expansion does not see.
  The speculative rows count the iterations that verified drafted nodes only (``host_step_ms``).
* ``host_systems`` (``adaserve profile`` only, not the quick profile): the same host work per
  iteration verifying drafted nodes under each policy of ``HOST_SYSTEMS``, planned with this
  profile's own tables (after the passes above; median over as many passes). The simulator and the
  engine charge a system its own row for its iterations that verify drafted nodes
  (``LatencyProfile.for_system``).
* ``baseline_ms``: one sequence decoding one token over ``BASELINE_CONTEXT`` tokens, plus the host
  work of an iteration of one request (``host``'s ``incremental`` point at 1) where that was measured:
  the decode iteration one request meets in this engine (docs/definitions.md §1). On a CPU the host
  part is ~1% of it; on a GPU, where a graphed 1B-shaped step takes ~2.4 ms, it was ~0.6 ms (H100),
  and a forward-only baseline put every coding SLO (1.2 × baseline) below what one request's decode
  iteration costs. ``measured_with["baseline"]`` says which.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from adaserve.core.errors import UserError
from adaserve.core.profile import LatencyProfile, Limits, Table
from adaserve.scheduling.admission import graph_rows
from adaserve.scheduling.attention_calls import cpu_call_costs
from adaserve.scheduling.plan import SpecShape

from adaserve.core.progress import progress as progress_bar
from adaserve.engine.batch import BatchBuilder
from adaserve.engine.cuda_graphs import cache_with_scratch_block, graph_parts_setting, make_graph_runner
from adaserve.drafting.ngram import NgramDrafter
from adaserve.engine.kv_cache import BLOCK_SIZE
from adaserve.engine.model import Transformer, cpu_decode_limit, linear_kernel
from adaserve.engine.paged_attention import paged_attention_enabled
from adaserve.engine.sequence import SeqState

TOKEN_POINTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
# Context tokens over CONTEXT_SEQS sequences; the points below 1,024 resolve small contexts, where
# a decode step of a few short requests sits (docs/fidelity.md, "Small contexts").
CONTEXT_POINTS = (0, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
PREFILL_POINTS = (16, 32, 64, 128, 256, 512, 1024, 2048)
PREFILL_CONTEXTS = (0, 256, 512, 1024, 1536, 3072, 6144)
QUERY_POINTS = (1, 4, 16)
QUERY_CONTEXT = 8192
HOST_REQUESTS = (1, 2, 4, 8, 16, 32, 64)
HOST_STEPS = 5
TREE_SEARCH = 8  # iterations run per speculative host row point: up to this many times HOST_STEPS
HOST_PROMPT = 64  # tokens: a 16-token pattern repeated, so the n-gram drafter finds continuations
# speculative policies whose host work differs from adaserve's: each gets its own host row in a full
# profile (``host_systems``); vLLM-Spec(6/8) take vLLM-Spec(4)'s, the AdaServe ablations adaserve's
HOST_SYSTEMS = ("adaserve_plus", "specinfer", "vllm_spec_4")
CONTEXT_SEQS = 8
BASELINE_CONTEXT = 128
DRAFT_CONTEXT = 64  # per sequence, for draft-model steps


@dataclass
class Grid:
    tokens: list[int]
    contexts: list[int]
    prefill: list[int]
    draft: list[int]
    repeat: int = 5
    prefill_contexts: list[int] = field(default_factory=list)  # prefilled tokens before a chunk
    queries: list[int] = field(default_factory=list)  # new tokens per sequence (attention_queries)
    host: list[int] = field(default_factory=list)  # decoding requests (host work)
    chunk: int = 256  # the chunk timed at each prefill context
    compiled_keys: list[int] = field(default_factory=list)  # contexts of compiled one-token steps

    @classmethod
    def for_limits(cls, limits: Limits, repeat: int = 5, quick: bool = False) -> "Grid":
        top = limits.max_batch_tokens
        tokens = _upto(TOKEN_POINTS, top)
        contexts = _upto(CONTEXT_POINTS, min(CONTEXT_SEQS, limits.max_batch_requests) * limits.max_seq_len)
        prefill = _upto(PREFILL_POINTS, max(limits.prefill_chunk, top, limits.max_seq_len))
        chunk = min(limits.prefill_chunk, top)
        prefill_ctx = [p for p in PREFILL_CONTEXTS if p + chunk <= limits.max_seq_len]
        queries = [q for q in QUERY_POINTS if q * CONTEXT_SEQS <= top]
        host = _upto(HOST_REQUESTS, limits.max_batch_requests)
        keys = _upto(CONTEXT_POINTS, limits.max_seq_len)
        if quick:
            tokens, contexts, prefill = tokens[::2] + tokens[-1:], contexts[::2] + contexts[-1:], prefill[::2] + prefill[-1:]
            prefill_ctx, host, keys = prefill_ctx[::2], host[::2] + host[-1:], keys[::2] + keys[-1:]
        return cls(sorted(set(tokens)), sorted(set(contexts)), sorted(set(prefill)), _upto(TOKEN_POINTS, 256), repeat,
                   prefill_ctx, queries, sorted(set(host)), chunk, sorted(set(keys)))

    def for_model(self, model: Transformer, graph_rows: int | None = None) -> "Grid":
        """This grid for ``model``: without compiled-step keys unless its CPU steps of a few tokens
        run compiled layers, and then with verify points on both sides of that limit. A step of
        one token more runs the operator path, at a cost well above the compiled one (SmolLM2: 4
        tokens 45.9 ms, 6 tokens 71.0 ms), so a table interpolating across the limit priced the
        5-token steps of vLLM-Spec(4) ~20% low. With CUDA graphs of up to ``graph_rows`` rows,
        verify and prefill points on both sides of that size: one token more runs eagerly,
        several times slower on a launch-bound GPU."""
        grid = self
        if graph_rows:
            graph_edge = (graph_rows, graph_rows + 1)
            grid = replace(grid, tokens=sorted(set(grid.tokens) | {t for t in graph_edge if t <= max(grid.tokens)}),
                           prefill=sorted(set(grid.prefill) | {t for t in graph_edge if t <= max(grid.prefill)}))
        limit = cpu_decode_limit(model.lm_head.weight)
        if not limit:
            return replace(grid, compiled_keys=[])
        edge = {t for t in (limit, limit + 1) if t <= max(grid.tokens)}
        return replace(grid, tokens=sorted(set(grid.tokens) | edge))

    @property
    def size(self) -> int:
        """Measured points (``measure`` yields one label per point)."""
        return (1 + len(self.tokens) + len(self.contexts) + len(self.prefill) + len(self.draft)
                + len(self.prefill_contexts) + len(self.queries) + 3 * len(self.host) + len(self.compiled_keys))


def _upto(points, top: int) -> list[int]:
    out = [p for p in points if p <= top]
    return out + ([top] if top not in out else [])


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def clock_name() -> str:
    """``ADASERVE_PROFILE_CLOCK``: ``wall`` (default) or ``cpu``, the calling thread's CPU time. On a
    CPU shared with other jobs, wall time counts the time spent waiting for a core; with one torch
    thread the work runs on the calling thread, so its CPU time leaves that wait out
    (docs/fidelity.md; ``scripts/engine_steps.py --cpu-clock`` runs the engine on the same clock)."""
    name = os.environ.get("ADASERVE_PROFILE_CLOCK", "wall")
    if name not in CLOCKS:
        raise UserError(f"ADASERVE_PROFILE_CLOCK={name!r}: use one of {', '.join(CLOCKS)}")
    return name


def clock() -> float:
    return CLOCKS[clock_name()]()


def median_ms(fn: Callable[..., None], repeat: int, setup: Callable[[], object] | None = None,
              teardown: Callable[[], None] | None = None) -> float:
    """Median ms of ``fn`` over ``repeat`` calls after one warm-up call. With ``setup``, each call
    is ``fn(setup())`` and only ``fn`` is timed; ``teardown`` runs untimed after each call."""
    times = []
    for i in range(repeat + 1):
        args = (setup(),) if setup is not None else ()
        t0 = clock()
        fn(*args)
        elapsed = clock() - t0
        if teardown is not None:
            teardown()
        if i:
            times.append(elapsed)
    return 1e3 * statistics.median(times)


def sync(device: torch.device | str) -> None:
    """Wait for queued kernels (CUDA launches are asynchronous: time only after this)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _sync(model: Transformer) -> None:
    sync(model.lm_head.weight.device)


class StepBench:
    """Timed forwards of synthetic batches on a scratch KV cache.

    Each sequence claims its context and its new tokens in one pop (``BlockAllocator.claim``), as
    the engine claims a request's reservation: its blocks are consecutive, its chain's after its
    context's, as in a server's pool. On a CPU that layout matters: a 1-token SmolLM2 step over
    1,000 keys cost ~10% more with every block elsewhere in the pool (docs/engine.md, "KV blocks
    claimed ahead"), and profiles timed over such scattered blocks priced the long-context steps of
    real runs 6-13% high (docs/fidelity.md).

    ``graphs``: the steps run as the engine runs them with CUDA graphs on (engine/cuda_graphs.py),
    with buckets sized by these limits: a step replays the graph of its bucket (decode tokens,
    trees and prefill chunks of up to 1,024 tokens), captured during the point's warm-up call; longer
    chunks stay eager. On a GPU a
    graphed step costs a fraction of an eager one (issue 12: a 1B-shaped decode step 2.3 ms against
    8.2 ms on an H200), so a profile of an engine with graphs on must time graphs too."""

    def __init__(self, model: Transformer, max_tokens: int, seed: int = 0, graphs: Limits | None = None,
                 spare_blocks: int = 256):
        self.model = model
        blocks = max_tokens // BLOCK_SIZE + spare_blocks
        self.runner = None
        if graphs is None:
            self.cache = model.make_cache(blocks, BLOCK_SIZE)
        else:
            self.cache, scratch = cache_with_scratch_block(model, blocks, BLOCK_SIZE)
            self.runner = make_graph_runner(model, self.cache, scratch, graphs.max_batch_requests,
                                            graphs.max_seq_len, graphs.max_batch_tokens)
        self.device = model.lm_head.weight.device
        self.rng = np.random.default_rng(seed)
        self.vocab = model.config.vocab_size

    def _ids(self, n: int) -> list[int]:
        return self.rng.integers(3, self.vocab, n).tolist()

    def _built(self, builder: BatchBuilder):
        """The batch on the device, its copies finished before the clock starts."""
        batch = builder.build(self.device)
        _sync(self.model)
        return batch

    def forward(self, batch) -> None:
        """The timed part of a step: the target forward over a built batch."""
        if self.runner is not None:
            self.runner(batch)
        else:
            self.model(batch, self.cache)
        _sync(self.model)

    def step_ms(self, n_seqs: int, tokens: int, context: int, repeat: int) -> float:
        """``tokens`` new tokens as chains over ``n_seqs`` sequences holding ``context`` KV tokens in all."""
        news = [tokens // n_seqs + (i < tokens % n_seqs) for i in range(n_seqs)]
        ctxs = [context // n_seqs + (i < context % n_seqs) for i in range(n_seqs)]
        return self.chains_ms(ctxs, news, repeat)

    def chains_ms(self, ctxs: list[int], news: list[int], repeat: int) -> float:
        """Sequence ``s`` holding ``ctxs[s]`` KV tokens with a chain of ``news[s]`` new tokens."""
        n_seqs = len(ctxs)
        for s, (c, n) in enumerate(zip(ctxs, news)):
            self.cache.add(s)
            self.cache.alloc.claim(s, c + n)
            self.cache.alloc.append(s, c)
        chains = [(self._ids(n), list(range(-1, n - 1))) for n in news]

        def build():
            b = BatchBuilder(self.cache)
            for s, (ids, parents) in enumerate(chains):
                if ids:
                    b.add_tree(s, ids, parents)
            return self._built(b)

        def reset():
            for s, c in enumerate(ctxs):
                self.cache.truncate(s, c)
        try:
            return median_ms(self.forward, repeat, build, reset)
        finally:
            for s in range(n_seqs):
                self.cache.free(s)

    def _prefill(self, ids: list[int]):
        """A batch of one prefill chunk (sequence "p"; free it after the step)."""
        b = BatchBuilder(self.cache)
        b.add_prefill("p", ids)
        return self._built(b)

    def prefill_once_ms(self, tokens: int) -> float:
        """ms of one prefill step with no warm-up call: on a GPU, what a length the process has not
        run before costs (per-shape kernel plans included)."""
        batch = self._prefill(self._ids(tokens))
        try:
            t0 = clock()
            self.forward(batch)
            return 1e3 * (clock() - t0)
        finally:
            self.cache.free("p")

    def prefill_ms(self, tokens: int, repeat: int) -> float:
        ids = self._ids(tokens)
        return median_ms(self.forward, repeat, lambda: self._prefill(ids), lambda: self.cache.free("p"))


def ngram_draft_ms(nodes: int, repeat: int, seed: int = 0) -> float:
    """One n-gram expansion of ``nodes`` roots (requests with 512-token histories)."""
    rng = np.random.default_rng(seed)
    seqs = [SeqState(i, rng.integers(3, 200, 512).tolist(), 512) for i in range(nodes)]
    drafter = NgramDrafter()
    shape = SpecShape(depth=1, width=3)
    return median_ms(lambda: drafter.draft(seqs, shape), repeat)


def verify_seqs(tokens: int, limits: Limits) -> int:
    return int(np.clip(tokens // 4, 1, limits.max_batch_requests))


def measure(model: Transformer, limits: Limits, grid: Grid, draft: Transformer | None = None,
            cuda_graphs: bool = False) -> Iterator[tuple[str, float]]:
    """Yields ``(label, ms)`` per measured point (for a progress bar); see ``measure_profile``.
    ``cuda_graphs``: the target's steps as an engine with CUDA graphs runs them (``StepBench``)."""
    bench = StepBench(model, max(grid.contexts) + max(grid.tokens) + max(grid.prefill) + QUERY_CONTEXT,
                      graphs=limits if cuda_graphs else None)
    yield "baseline", bench.step_ms(1, 1, BASELINE_CONTEXT, grid.repeat)
    for t in grid.tokens:
        yield f"verify:{t}", bench.step_ms(verify_seqs(t, limits), t, 0, grid.repeat)
    yield from context_points(bench, min(CONTEXT_SEQS, limits.max_batch_requests), grid.contexts, grid.repeat)
    if cpu_decode_limit(model.lm_head.weight):
        yield from compiled_key_points(bench, grid.compiled_keys, grid.repeat)
    for t in grid.prefill:
        yield f"prefill:{t}", bench.prefill_ms(t, max(2, grid.repeat // 2))
    for p in grid.prefill_contexts:  # a chain of `chunk` tokens gets its own attention call, as a chunk
        yield f"prefillctx:{p}", bench.step_ms(1, grid.chunk, p, grid.repeat)
    for q in grid.queries:
        yield f"queries:{q}", (bench.step_ms(CONTEXT_SEQS, CONTEXT_SEQS * q, QUERY_CONTEXT, grid.repeat)
                               - bench.step_ms(CONTEXT_SEQS, CONTEXT_SEQS * q, 0, grid.repeat))
    n_max = limits.max_batch_requests
    dbench = StepBench(draft, DRAFT_CONTEXT * n_max + max(grid.draft)) if draft is not None else None
    for t in grid.draft:
        n = min(t, n_max)
        ms = dbench.step_ms(n, t, DRAFT_CONTEXT * n, grid.repeat) if dbench else ngram_draft_ms(t, grid.repeat)
        yield f"draft:{t}", ms
    if grid.host:
        yield from measure_host(model, limits, grid, draft)


def context_points(bench: StepBench, seqs: int, contexts: list[int], repeat: int
                   ) -> Iterator[tuple[str, float]]:
    """``context:C``: g(C) of the context axis, each point paired with a context-0 step timed right
    before it, g(C) = g(0) + (step at C - step at 0 just before). The simulator reads only the
    differences g(C) - g(0); pairing keeps a load that changes between one point and the next out
    of them (unpaired, a profile at load 5-7 once showed 12.6 ms for 128 context tokens, where a
    quieter measurement shows none: docs/fidelity.md, "Small contexts")."""
    g0 = None
    for c in contexts:
        zero = bench.step_ms(seqs, seqs, 0, repeat)
        g0 = zero if g0 is None else g0
        yield f"context:{c}", g0 + (bench.step_ms(seqs, seqs, c, repeat) - zero if c else 0.0)


def compiled_key_points(bench: StepBench, contexts: list[int], repeat: int) -> Iterator[tuple[str, float]]:
    """``ckeys:C``: a compiled one-token step of one sequence at context C minus the same step at
    context 0 timed right before it (paired as in ``context_points``)."""
    for c in contexts:
        zero = bench.step_ms(1, 1, 0, repeat)
        yield f"ckeys:{c}", bench.step_ms(1, 1, c, repeat) - zero if c else 0.0


def measure_host(model: Transformer, limits: Limits, grid: Grid, draft: Transformer | None
                 ) -> Iterator[tuple[str, float]]:
    """``hostspec:n`` / ``hostincr:n``: host ms per iteration of ``n`` decoding requests (module
    docstring). The policies see a flat profile, so the adaserve policy's budget covers its trees."""
    flat = Table(np.array([1.0, float(limits.max_batch_tokens)]), np.ones(2))
    profile = LatencyProfile("host", verify=flat, draft=flat, prefill=flat, baseline_ms=1.0, limits=limits)
    for n in grid.host:
        host, drafting = host_step_ms(model, profile, draft, n, "adaserve", trees_only=True)
        yield f"hostspec:{n}", host
        yield f"hostdraft:{n}", drafting
        yield f"hostincr:{n}", host_step_ms(model, profile, draft, n, "vllm")[0]


def measure_host_systems(model: Transformer, profile: LatencyProfile, draft: Transformer | None,
                         systems: tuple[str, ...], sizes: list[int]) -> Iterator[tuple[str, float]]:
    """``hostsys:SYSTEM:n``: the host ms per decode iteration of ``n`` requests under each of
    ``systems``' policies, planned with ``profile``'s own tables (the profile ``host_systems``
    rows; ``LatencyProfile.for_system``)."""
    for system in systems:
        for n in sizes:
            yield f"hostsys:{system}:{n}", host_step_ms(model, profile, draft, n, system, trees_only=True)[0]


def host_step_ms(model: Transformer, profile: LatencyProfile, draft: Transformer | None, n: int,
                 system: str, steps: int = HOST_STEPS, trees_only: bool = False) -> tuple[float, float]:
    """Median host ms of ``steps`` decode iterations of ``n`` requests under ``system``'s policy
    (forward and drafting excluded), and the median ms of the drafting (``speculate``) itself.

    ``trees_only`` (the speculative rows): only iterations that verified drafted nodes count; up to
    ``TREE_SEARCH`` x ``steps`` iterations are run to find them, and where none did, those that
    drafted (else every one) count. Why: host work differs most with a tree to choose from. With
    one request ``adaserve_plus`` drafted nothing, or nothing that its selection kept, in most of
    the first iterations (its drafting switch; the n-gram drafter's misses), which cost it 0.6-0.8
    ms against 1.1-1.35 ms for iterations with a tree (SmolLM2, this VM): a median over all of
    them priced its tree iterations as empty ones."""
    from adaserve.core.request import Request
    from adaserve.engine.drafters import ModelDrafter
    from adaserve.engine.executor import TorchExecutor
    from adaserve.iteration import ServingLoop
    from adaserve.scheduling.policies import make_policy

    iterations = steps * TREE_SEARCH if trees_only else steps
    new = (iterations + 3) * 16
    per_seq = -(-(HOST_PROMPT + new + 128) // BLOCK_SIZE) + 2
    blocks = n * per_seq + profile.limits.max_batch_requests
    drafter = ModelDrafter(draft, blocks, BLOCK_SIZE) if draft is not None else NgramDrafter()
    ex = TorchExecutor(model, profile, drafter, num_blocks=blocks, ignore_eos=True)
    rng = np.random.default_rng(n)
    pattern = rng.integers(3, model.config.vocab_size, (n, 16))
    ex.set_prompts({i: np.tile(pattern[i], HOST_PROMPT // 16).tolist() for i in range(n)})
    requests = [Request(rid=i, arrival_ms=0.0, input_len=HOST_PROMPT, max_new_tokens=new, slo_ratio=1.5,
                        slo_ms=1.5 * profile.decode_baseline_ms, category="coding") for i in range(n)]
    loop = ServingLoop(make_policy(system, model.config.family), ex, requests)
    forward_s: list[float] = []
    draft_s: list[float] = []
    verified: list[bool] = []  # this iteration's step verified drafted nodes
    ex.model = _Timed(ex.model, forward_s)
    ex.speculate = _Timed(ex.speculate, draft_s)
    execute = ex.execute

    def noting_trees(prefill, decode, forest, selected, max_commit):
        verified.append(bool(decode) and forest.verifies_drafted(selected))
        return execute(prefill, decode, forest, selected, max_commit)
    ex.execute = noting_trees
    every, drafted, trees = [], [], []  # (host, drafting) seconds per iteration
    with torch.inference_mode():
        while loop.waiting or loop.pending:  # prefill, then one warm-up decode step
            loop.run_once()
        loop.step()
        for _ in range(iterations):
            if len(loop.running) < n:
                break
            forward_s.clear()
            draft_s.clear()
            verified.clear()
            t0 = clock()
            loop.step()
            every.append((clock() - t0 - sum(forward_s) - sum(draft_s), sum(draft_s)))
            if draft_s:
                drafted.append(every[-1])
            if any(verified):
                trees.append(every[-1])
            if len(trees if trees_only else every) >= steps:
                break
    timed = (trees or drafted or every) if trees_only else every
    if not timed:
        raise RuntimeError(f"host work of {n} requests: no decode iteration was timed")
    return 1e3 * statistics.median(t[0] for t in timed), 1e3 * statistics.median(t[1] for t in timed)


class _Timed:
    """A callable (the target model, the drafting) whose calls' wall seconds are appended to a list;
    other attributes are the wrapped object's."""

    def __init__(self, fn, out: list[float]):
        self.fn, self.out = fn, out

    def __getattr__(self, name):
        return getattr(self.fn, name)

    def __call__(self, *args):
        sync_device = getattr(self.fn, "lm_head", None)
        if sync_device is not None:
            _sync(self.fn)
        t0 = clock()
        out = self.fn(*args)
        if sync_device is not None:
            _sync(self.fn)
        self.out.append(clock() - t0)
        return out


def hardware_string(model: Transformer) -> str:
    w = model.lm_head.weight
    dtype = str(w.dtype).replace("torch.", "")
    tp = getattr(model, "world_size", 1)
    ranks = f", tensor parallel {tp} ranks" if tp > 1 else ""
    if w.is_cuda:
        return f"{torch.cuda.get_device_name(w.device)}, {dtype}, torch {torch.__version__}{ranks}"
    return f"{cpu_name()}, {torch.get_num_threads()} threads, {dtype}, torch {torch.__version__}{ranks}"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measured_with(model: Transformer, cuda_graphs: bool = False) -> dict:
    """What a measured profile depends on besides the model: checked when a profile is reused.
    ``cuda_graphs`` is recorded on CUDA only (on the CPU the engine never captures graphs), and
    with graphs the most graphed forwards a step may run as (``ADASERVE_GRAPH_PARTS``), which the
    simulator prices steps by; on CUDA whether decode and tree attention ran the paged kernel
    (``ADASERVE_PAGED_ATTENTION``). ``kv_blocks``: how the timed steps' KV blocks lay in the pool
    (``StepBench``: each sequence's claimed in one pop, as the engine claims them; "scattered" for
    a few hours of 2026-11-28, and profiles without the field timed consecutive blocks without
    claims: their cache entries are not reused)."""
    w = model.lm_head.weight
    return {"device": w.device.type, "dtype": str(w.dtype).replace("torch.", ""),
            "threads": torch.get_num_threads() if w.device.type == "cpu" else None,
            "torch": torch.__version__, "linear": linear_kernel(w),
            "tensor_parallel": getattr(model, "world_size", 1),
            "cuda_graphs": bool(cuda_graphs) if w.device.type == "cuda" else None,
            "graph_parts": graph_parts_setting() if cuda_graphs and w.device.type == "cuda" else None,
            "paged_attention": paged_attention_enabled(w.device) if w.device.type == "cuda" else None,
            "kv_blocks": "claimed"}


def assemble(name: str, points: dict[str, float], grid: Grid, limits: Limits, model: Transformer,
             drafter: str | None = None, cuda_graphs: bool = False) -> LatencyProfile:
    """The profile from measured points (keys as yielded by ``measure``); ``drafter`` ("ngram" or
    "model") is recorded in ``measured_with``: the simulator charges no draft prefill for n-grams."""
    f = np.array([points[f"verify:{t}"] for t in grid.tokens])
    # more context never costs less: a later context point below an earlier one is noise (running max)
    g = np.maximum.accumulate(np.array([points[f"context:{c}"] for c in grid.contexts]))
    by_ctx = f[None, :] + (g - g[0])[:, None]
    verify = Table(np.array(grid.tokens, float), f, np.array(grid.contexts, float), by_ctx) \
        if len(grid.contexts) >= 2 else Table(np.array(grid.tokens, float), f)
    draft = Table(np.array(grid.draft, float), np.array([points[f"draft:{t}"] for t in grid.draft]))
    queries = _table(points, "queries", grid.queries)
    host = {mode: t for mode, label in (("speculative", "hostspec"), ("incremental", "hostincr"),
                                        ("draft", "hostdraft"))
            if (t := _table(points, label, grid.host)) is not None}
    # the baseline is what one request's decode iteration costs in this engine: its forward plus the
    # host work of an iteration of one request (docs/definitions.md §1), when that was measured
    compiled = compiled_keys_table(points, grid, model)
    host_one = points.get("hostincr:1")
    baseline = points["baseline"] + (host_one or 0.0)
    return LatencyProfile(name=name, verify=verify, draft=draft, prefill=prefill_table(points, grid),
                          baseline_ms=round(baseline, 3), source="measured",
                          hardware=hardware_string(model), limits=limits,
                          measured_with={**measured_with(model, cuda_graphs),
                                         "baseline": "forward + host" if host_one is not None else "forward",
                                         **({"drafter": drafter} if drafter else {}),
                                         **({"clock": "cpu"} if clock_name() == "cpu" else {})},
                          family=model.config.family, step_model="engine", attention_queries=queries, host=host,
                          attention_calls=attention_calls(model),
                          compiled_tokens=cpu_decode_limit(model.lm_head.weight) if compiled else 0,
                          compiled_keys=compiled)


def compiled_keys_table(points: dict[str, float], grid: Grid, model: Transformer) -> Table | None:
    """The ``compiled_steps`` keys table (ms vs context keys of one row, starting at 0 and never
    decreasing: a later point below an earlier one is noise), if ``model`` runs compiled steps and
    at least two points were measured."""
    keys = grid.compiled_keys
    if not cpu_decode_limit(model.lm_head.weight) or len(keys) < 2 or any(f"ckeys:{c}" not in points for c in keys):
        return None
    ms = np.maximum.accumulate(np.maximum([points[f"ckeys:{c}"] for c in keys], 0.0))
    return Table(np.array(keys, float), ms - ms[0])


def attention_calls(model: Transformer) -> tuple[float, float] | None:
    """How the engine splits its shared attention call on this model's device (``BatchBuilder``:
    on a CPU only), for the simulator to price the same calls."""
    if model.lm_head.weight.device.type != "cpu":
        return None
    return cpu_call_costs(model.config.num_heads, model.config.num_kv_heads)


def _table(points: dict[str, float], label: str, sizes: list[int]) -> Table | None:
    """An optional table from its measured points; None unless at least two were measured."""
    if len(sizes) < 2 or any(f"{label}:{s}" not in points for s in sizes):
        return None
    return Table(np.array(sizes, float), np.array([max(points[f"{label}:{s}"], 0.0) for s in sizes]))


def prefill_table(points: dict[str, float], grid: Grid) -> Table:
    """Whole chunks at ``p = 0`` as measured; at ``p`` prefilled tokens, plus the measured extra of a
    ``grid.chunk``-token chunk at ``p`` per chunk token (module docstring)."""
    base = np.array([points[f"prefill:{t}"] for t in grid.prefill])
    tokens = np.array(grid.prefill, float)
    if len(grid.prefill_contexts) < 2 or any(f"prefillctx:{p}" not in points for p in grid.prefill_contexts):
        return Table(tokens, base)
    at = np.maximum.accumulate(np.array([points[f"prefillctx:{p}"] for p in grid.prefill_contexts]))
    extra = (at - at[0]) / grid.chunk  # ms per chunk token
    return Table(tokens, base, np.array(grid.prefill_contexts, float), base[None, :] + extra[:, None] * tokens[None, :])


def measure_profile(name: str, model: Transformer, limits: Limits, grid: Grid,
                    draft: Transformer | None = None, progress: bool = False,
                    cuda_graphs: bool = False, passes: int = 1) -> LatencyProfile:
    """The full profile: every point of ``grid`` (each the median of ``grid.repeat`` timed calls
    after a warm-up call), measured ``passes`` times over the whole grid, keeping per point the
    median over the passes.

    Why passes: on a quiet 2-core VM a point moved by up to 15% between two passes a minute apart
    (docs/fidelity.md, "Quiet-machine run"), more than the timed calls within one pass differ; the
    grid's passes interleave, so a slow minute spoils one sample of each point, not a point. The
    median, not ``quick_profile``'s minimum: the simulator prices the steps a run will pay, and a run
    pays the typical cost, not the luckiest."""
    if clock_name() == "cpu" and model.lm_head.weight.device.type != "cpu":
        raise UserError("ADASERVE_PROFILE_CLOCK=cpu measures CPU time: it cannot time a GPU")
    if passes < 1:
        raise UserError(f"--passes must be >= 1, got {passes}")
    samples: dict[str, list[float]] = {}
    grid = grid.for_model(model, graph_rows(limits.max_batch_tokens) if cuda_graphs else None)
    systems = HOST_SYSTEMS if grid.host else ()
    with progress_bar(passes * (grid.size + len(systems) * len(grid.host)), f"profiling {name}", "pt",
                      enabled=progress) as bar:
        def sampled(points: Iterator[tuple[str, float]]) -> None:
            for label, ms in points:
                samples.setdefault(label, []).append(ms)
                bar.set_postfix_str(f"{label} {ms:.1f} ms")
                bar.update()
        for _ in range(passes):
            sampled(measure(model, limits, grid, draft, cuda_graphs))
        profile = assemble(name, {label: statistics.median(v) for label, v in samples.items()}, grid, limits,
                           model, "model" if draft is not None else "ngram", cuda_graphs)
        for _ in range(passes):
            sampled(measure_host_systems(model, profile, draft, systems, grid.host))
    profile.host_systems = {system: Table(np.array(grid.host, float), np.array(
        [max(statistics.median(samples[f"hostsys:{system}:{n}"]), 0.0) for n in grid.host])) for system in systems}
    return profile


# ---- the quick profile of `adaserve run` / `adaserve serve` without --profile ----------------------

QUICK_PASSES = 3


def quick_profile(name: str, model: Transformer, limits: Limits, draft: Transformer | None = None,
                  passes: int = QUICK_PASSES, progress: bool = False, cuda_graphs: bool = False) -> LatencyProfile:
    """The start-up profile: the quick grid (``Grid.for_limits(quick=True)``) measured ``passes``
    times over, each point timed once per pass after a warm-up call, keeping per point the
    **minimum** over the passes, then every table made non-decreasing by ``monotone_points``.

    Why: on a shared machine other processes only ever add time, so the least-disturbed run is the
    best estimate of a step's cost, and spreading a point's runs over passes (rather than timing
    them back to back) keeps one burst of load from spoiling all of them. A median of 3 consecutive
    runs once gave 383 ms at 1 token and 344 ms at 8 tokens on a loaded 2-core VM; the cumulative
    max guarantees that the scheduler never sees more tokens as cheaper."""
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    grid = Grid.for_limits(limits, repeat=1, quick=True).for_model(model, graph_rows(limits.max_batch_tokens) if cuda_graphs else None)
    total = passes * grid.size
    best: dict[str, float] = {}
    with progress_bar(total, f"profiling {name} (quick)", "pt", enabled=progress) as bar:
        for _ in range(passes):
            for label, ms in measure(model, limits, grid, draft, cuda_graphs):
                best[label] = min(ms, best.get(label, float("inf")))
                bar.set_postfix_str(f"{label} {ms:.1f} ms")
                bar.update()
    return assemble(name, monotone_points(best), grid, limits, model, "model" if draft is not None else "ngram",
                    cuda_graphs)


def monotone_points(points: dict[str, float]) -> dict[str, float]:
    """Measured points (``measure``'s labels) with each table's values replaced by their running
    maximum in increasing size: verify and prefill in tokens, context in context tokens, draft in
    tokens (``baseline`` unchanged). A point that measured cheaper than a smaller one is raised to it."""
    out = dict(points)
    tables: dict[str, list[tuple[int, str]]] = {}
    for label in points:
        kind, sep, size = label.partition(":")
        if sep:
            tables.setdefault(kind, []).append((int(size), label))
    for entries in tables.values():
        running = float("-inf")
        for _, label in sorted(entries):
            running = max(running, points[label])
            out[label] = running
    return out
