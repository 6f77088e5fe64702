"""Measure a ``LatencyProfile`` (core/profile.py format) for a model on this hardware.

Every point is the median of ``repeat`` timed engine steps (batch building included) after one
warm-up. KV context is allocated without being computed (its values do not change the time), so
long contexts cost nothing to set up.

* ``verify``: one target step with ``tokens`` new tokens spread over ``clip(tokens // 4, 1,
  max_batch_requests)`` sequences (chains; a tree costs the same), no context: f(tokens). The
  context axis is additive: ``ms(tokens, C) = f(tokens) + g(C) - g(0)`` where g(C) is a step
  decoding one token for each of ``CONTEXT_SEQS`` sequences holding C context tokens in all.
* ``draft``: one draft-model step of ``tokens`` tree tokens over ``min(tokens, max_batch_requests)``
  sequences of ``DRAFT_CONTEXT`` tokens each (model drafter), or one n-gram expansion of ``tokens``
  frontier nodes (n-gram drafter: CPU time of the lookups).
* ``prefill``: one prompt chunk of ``tokens`` tokens of a single sequence.
* ``baseline_ms``: one sequence decoding one token over ``BASELINE_CONTEXT`` tokens
  (docs/definitions.md §1).
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from adaserve.core.profile import LatencyProfile, Limits, Table
from adaserve.scheduling.plan import SpecShape

from adaserve.core.progress import progress as progress_bar
from adaserve.engine.batch import BatchBuilder
from adaserve.engine.drafters import NgramDrafter
from adaserve.engine.kv_cache import BLOCK_SIZE
from adaserve.engine.model import Transformer, linear_kernel
from adaserve.engine.sequence import SeqState

TOKEN_POINTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
CONTEXT_POINTS = (0, 1024, 4096, 8192, 16384, 32768)
PREFILL_POINTS = (16, 32, 64, 128, 256, 512, 1024, 2048)
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

    @classmethod
    def for_limits(cls, limits: Limits, repeat: int = 5, quick: bool = False) -> "Grid":
        top = limits.max_batch_tokens
        tokens = _upto(TOKEN_POINTS, top)
        contexts = _upto(CONTEXT_POINTS, min(CONTEXT_SEQS, limits.max_batch_requests) * limits.max_seq_len)
        prefill = _upto(PREFILL_POINTS, max(limits.prefill_chunk, top))
        if quick:
            tokens, contexts, prefill = tokens[::2] + tokens[-1:], contexts[::2] + contexts[-1:], prefill[::2]
        return cls(sorted(set(tokens)), sorted(set(contexts)), sorted(set(prefill)), _upto(TOKEN_POINTS, 256), repeat)


def _upto(points, top: int) -> list[int]:
    out = [p for p in points if p <= top]
    return out + ([top] if top not in out else [])


def median_ms(fn: Callable[[], None], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _sync(model: Transformer) -> None:
    if model.lm_head.weight.is_cuda:
        torch.cuda.synchronize()


class StepBench:
    """Timed forwards of synthetic batches on a scratch KV cache."""

    def __init__(self, model: Transformer, max_tokens: int, seed: int = 0):
        self.model = model
        self.cache = model.make_cache(max_tokens // BLOCK_SIZE + 256, BLOCK_SIZE)
        self.device = model.lm_head.weight.device
        self.rng = np.random.default_rng(seed)
        self.vocab = model.config.vocab_size

    def _ids(self, n: int) -> list[int]:
        return self.rng.integers(3, self.vocab, n).tolist()

    def step_ms(self, n_seqs: int, tokens: int, context: int, repeat: int) -> float:
        """``tokens`` new tokens as chains over ``n_seqs`` sequences holding ``context`` KV tokens in all."""
        news = [tokens // n_seqs + (i < tokens % n_seqs) for i in range(n_seqs)]
        ctxs = [context // n_seqs + (i < context % n_seqs) for i in range(n_seqs)]
        for s, c in enumerate(ctxs):
            self.cache.add(s)
            self.cache.alloc.append(s, c)
        chains = [(self._ids(n), list(range(-1, n - 1))) for n in news]

        def step():
            b = BatchBuilder(self.cache)
            for s, (ids, parents) in enumerate(chains):
                if ids:
                    b.add_tree(s, ids, parents)
            self.model(b.build(self.device), self.cache)
            _sync(self.model)
            for s, c in enumerate(ctxs):
                self.cache.truncate(s, c)
        try:
            return median_ms(step, repeat)
        finally:
            for s in range(n_seqs):
                self.cache.free(s)

    def prefill_ms(self, tokens: int, repeat: int) -> float:
        ids = self._ids(tokens)

        def step():
            b = BatchBuilder(self.cache)
            b.add_prefill("p", ids)
            self.model(b.build(self.device), self.cache)
            _sync(self.model)
            self.cache.free("p")
        return median_ms(step, repeat)


def ngram_draft_ms(nodes: int, repeat: int, seed: int = 0) -> float:
    """One n-gram expansion of ``nodes`` roots (requests with 512-token histories)."""
    rng = np.random.default_rng(seed)
    seqs = [SeqState(i, rng.integers(3, 200, 512).tolist(), 512) for i in range(nodes)]
    drafter = NgramDrafter()
    shape = SpecShape(depth=1, width=3)
    return median_ms(lambda: drafter.draft(seqs, shape), repeat)


def verify_seqs(tokens: int, limits: Limits) -> int:
    return int(np.clip(tokens // 4, 1, limits.max_batch_requests))


def measure(model: Transformer, limits: Limits, grid: Grid, draft: Transformer | None = None
            ) -> Iterator[tuple[str, float]]:
    """Yields ``(label, ms)`` per measured point (for a progress bar); see ``measure_profile``."""
    bench = StepBench(model, max(grid.contexts) + max(grid.tokens) + max(grid.prefill))
    yield "baseline", bench.step_ms(1, 1, BASELINE_CONTEXT, grid.repeat)
    for t in grid.tokens:
        yield f"verify:{t}", bench.step_ms(verify_seqs(t, limits), t, 0, grid.repeat)
    ctx_seqs = min(CONTEXT_SEQS, limits.max_batch_requests)
    for c in grid.contexts:
        yield f"context:{c}", bench.step_ms(ctx_seqs, ctx_seqs, c, grid.repeat)
    for t in grid.prefill:
        yield f"prefill:{t}", bench.prefill_ms(t, max(2, grid.repeat // 2))
    n_max = limits.max_batch_requests
    dbench = StepBench(draft, DRAFT_CONTEXT * n_max + max(grid.draft)) if draft is not None else None
    for t in grid.draft:
        n = min(t, n_max)
        ms = dbench.step_ms(n, t, DRAFT_CONTEXT * n, grid.repeat) if dbench else ngram_draft_ms(t, grid.repeat)
        yield f"draft:{t}", ms


def hardware_string(model: Transformer) -> str:
    w = model.lm_head.weight
    dtype = str(w.dtype).replace("torch.", "")
    if w.is_cuda:
        return f"{torch.cuda.get_device_name(w.device)}, {dtype}, torch {torch.__version__}"
    return f"{cpu_name()}, {torch.get_num_threads()} threads, {dtype}, torch {torch.__version__}"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measured_with(model: Transformer) -> dict:
    """What a measured profile depends on besides the model: checked when a profile is reused."""
    w = model.lm_head.weight
    return {"device": w.device.type, "dtype": str(w.dtype).replace("torch.", ""),
            "threads": torch.get_num_threads() if w.device.type == "cpu" else None,
            "torch": torch.__version__, "linear": linear_kernel(w)}


def assemble(name: str, points: dict[str, float], grid: Grid, limits: Limits, model: Transformer) -> LatencyProfile:
    """The profile from measured points (keys as yielded by ``measure``)."""
    f = np.array([points[f"verify:{t}"] for t in grid.tokens])
    g = np.array([points[f"context:{c}"] for c in grid.contexts])
    by_ctx = f[None, :] + np.maximum(g - g[0], 0.0)[:, None]
    verify = Table(np.array(grid.tokens, float), f, np.array(grid.contexts, float), by_ctx) \
        if len(grid.contexts) >= 2 else Table(np.array(grid.tokens, float), f)
    draft = Table(np.array(grid.draft, float), np.array([points[f"draft:{t}"] for t in grid.draft]))
    prefill = Table(np.array(grid.prefill, float), np.array([points[f"prefill:{t}"] for t in grid.prefill]))
    return LatencyProfile(name=name, verify=verify, draft=draft, prefill=prefill,
                          baseline_ms=round(points["baseline"], 3), source="measured",
                          hardware=hardware_string(model), limits=limits, measured_with=measured_with(model),
                          family=model.config.family)


def measure_profile(name: str, model: Transformer, limits: Limits, grid: Grid,
                    draft: Transformer | None = None, progress: bool = False) -> LatencyProfile:
    total = 1 + len(grid.tokens) + len(grid.contexts) + len(grid.prefill) + len(grid.draft)
    points = {}
    with progress_bar(total, f"profiling {name}", "pt", enabled=progress) as bar:
        for label, ms in measure(model, limits, grid, draft):
            points[label] = ms
            bar.set_postfix_str(f"{label} {ms:.1f} ms")
            bar.update()
    return assemble(name, points, grid, limits, model)


# ---- the quick profile of `adaserve run` / `adaserve serve` without --profile ----------------------

QUICK_PASSES = 3


def quick_profile(name: str, model: Transformer, limits: Limits, draft: Transformer | None = None,
                  passes: int = QUICK_PASSES, progress: bool = False) -> LatencyProfile:
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
    grid = Grid.for_limits(limits, repeat=1, quick=True)
    total = passes * (1 + len(grid.tokens) + len(grid.contexts) + len(grid.prefill) + len(grid.draft))
    best: dict[str, float] = {}
    with progress_bar(total, f"profiling {name} (quick)", "pt", enabled=progress) as bar:
        for _ in range(passes):
            for label, ms in measure(model, limits, grid, draft):
                best[label] = min(ms, best.get(label, float("inf")))
                bar.set_postfix_str(f"{label} {ms:.1f} ms")
                bar.update()
    return assemble(name, monotone_points(best), grid, limits, model)


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
