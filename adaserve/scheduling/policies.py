"""Every serving policy of docs/definitions.md §5 behind the one ``Policy`` interface of plan.py.

A policy never touches torch or the clock: it reads an ``IterationView`` and returns a ``Plan``
(prefill chunks, decoding requests, speculation shape), then, once the executor has drafted
candidate trees, a ``Selection`` of the nodes to verify.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from adaserve.core.errors import UserError
from adaserve.core.request import Request
from adaserve.scheduling.admission import chunked_prefill, whole_prefill
from adaserve.scheduling.plan import IterationView, Plan, Selection, SpecShape
from adaserve.scheduling.selection import (SortedCandidates, choose_budget, select, select_equal,
                                           slo_wants)
from adaserve.scheduling.speculation import SpecParams, spec_params_for
from adaserve.scheduling.trees import CandidateForest

SPECINFER_WIDTHS = (1, 1, 3, 1, 1, 1, 1, 1)
SARATHI_TOKEN_BUDGET = 2048
PREFILL_MODES = ("eager", "buffer", "slack")  # AdaServe's prefill mixing (docs/scheduler.md)


@dataclass
class PolicyConfig:
    spec: SpecParams
    min_prefill_chunk: int = 128       # prefill tokens an iteration always grants when requests wait
    sarathi_token_budget: int = SARATHI_TOKEN_BUDGET
    urgent_factor: float = 1.25        # priority: urgent iff slo_ms <= urgent_factor * tightest SLO
    prefill_mode: str = "eager"        # AdaServe: "eager" (a full prefill chunk every iteration),
                                       # "buffer" (at most prefill_buffer tokens while requests
                                       # decode) or "slack" (fit the tightest request's slack);
                                       # docs/scheduler.md
    prefill_buffer: int = 128          # the artifact's --chunked-prefill-buffer-size (our reading)


def context_tokens(requests: list[Request]) -> int:
    """Σ ``context_len``: for decoding requests (all generated >= 1, the usual case) from the
    summed fields, without a property call per request (this runs every iteration)."""
    generated = list(map(_GENERATED, requests))
    if min(generated, default=1) < 1:
        return sum(r.context_len for r in requests)
    return sum(map(_PREFILLED, requests)) + sum(generated) - len(generated)


_GENERATED, _PREFILLED = operator.attrgetter("generated"), operator.attrgetter("prefilled")


def step_ms(view: IterationView, shape: SpecShape, n: int, tokens, ctx: int):
    """Predicted iteration time: the draft steps of ``shape`` plus one target forward of ``tokens``."""
    return draft_phase_ms(view, shape, n, ctx) + view.latency.verify_ms(tokens, ctx)


def draft_phase_ms(view: IterationView, shape: SpecShape, n: int, ctx: int | None = None) -> float:
    """The draft steps of ``shape`` for ``n`` requests whose KV context totals ``ctx`` tokens."""
    steps = shape.draft_tokens_per_step(n)
    if not steps:
        return 0.0
    return float(np.sum(view.latency.draft_ms(np.asarray(steps, np.float64), ctx)))


def needed_tokens(requests: list[Request], now_ms: float, t_iter_ms: float) -> np.ndarray:
    """A(r) for every request, vectorized (best-effort requests get <= 0)."""
    return need_function(requests, now_ms)(t_iter_ms)


def need_function(requests: list[Request], now_ms: float) -> Callable[[float], np.ndarray]:
    """A(r) for every request as a function of the predicted iteration time (the requests' state
    is read once, however many budgets are tried)."""
    return need_from_terms(need_terms(requests, now_ms))


def need_from_terms(terms: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Callable[[float], np.ndarray]:
    """A(r) as a function of the iteration time, from ``need_terms``."""
    elapsed, slo, done = terms
    return lambda t_iter_ms: (elapsed + t_iter_ms) / slo - done


def need_terms(requests: list[Request], now_ms: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What A(r) is made of, per request: (elapsed since t0, SLO ms per token, tokens done);
    A(r) = (elapsed + t_iter) / slo - done."""
    t0 = np.fromiter((r.first_decode_ms for r in requests), np.float64, len(requests))
    slo = np.fromiter((r.slo_ms for r in requests), np.float64, len(requests))
    done = np.fromiter((r.generated for r in requests), np.float64, len(requests))
    return now_ms - t0, slo, done


def select_all(forest: CandidateForest, predicted_ms: float) -> Selection:
    return Selection(np.ones(forest.n_nodes, bool), forest.n_nodes, predicted_ms)


class _Base:
    name = "base"
    drafts = False  # runs a draft model (which then also prefills every prompt)

    def __init__(self, config: PolicyConfig):
        self.config = config

    def select(self, plan: Plan, forest: CandidateForest, view: IterationView) -> Selection:
        ctx = context_tokens(plan.decode)
        tokens = forest.n_nodes + sum(c for _, c in plan.prefill)
        return select_all(forest, float(step_ms(view, plan.shape, len(plan.decode), tokens, ctx)))


class AdaServe(_Base):
    """SLO-customized speculative decoding (docs/definitions.md §4). ``mode``: "adaserve", or the ablations
    "greedy" (throughput selection only) and "equal" (equal per-request budget)."""

    drafts = True

    def __init__(self, config: PolicyConfig, mode: str = "adaserve"):
        super().__init__(config)
        if mode not in ("adaserve", "greedy", "equal"):
            raise ValueError(f"unknown AdaServe mode {mode!r}")
        if config.prefill_mode not in PREFILL_MODES:
            raise UserError(f"unknown prefill mode {config.prefill_mode!r}; valid: "
                            f"{', '.join(PREFILL_MODES)}")
        self.mode = mode
        self.name = mode

    def plan(self, view: IterationView) -> Plan:
        decode = list(view.running)
        shape = self.config.spec.shape(len(decode)) if decode else SpecShape()
        room = self.prefill_room(view, decode, shape)
        return Plan(chunked_prefill(view, room, len(decode)), decode, shape)

    def prefill_room(self, view: IterationView, decode: list[Request], shape: SpecShape) -> int:
        """Prefill tokens for this iteration: as many as fit without pushing the tightest decoding
        request behind its SLO schedule (its slack), never fewer than ``min_prefill_chunk``."""
        lim = view.limits
        if not view.waiting:
            return 0
        if not decode:
            return lim.max_batch_tokens
        if self.config.prefill_mode == "eager":
            return lim.prefill_chunk
        if self.config.prefill_mode == "buffer":
            return min(self.config.prefill_buffer, lim.prefill_chunk)
        floor = self.config.min_prefill_chunk
        base = min(len(decode) * (shape.depth + 1), lim.max_batch_tokens - floor)
        slack = min((r.slo_ms * r.generated - (view.now_ms - r.first_decode_ms) for r in decode),
                    default=np.inf)
        top = lim.max_batch_tokens - base
        if top <= floor:
            return floor
        chunks = np.arange(floor, top + 1, 32)
        ctx = context_tokens(decode)
        extra = view.latency.verify_ms(base + chunks, ctx) - view.latency.verify_ms(base, ctx)
        fits = chunks[extra <= max(slack, 0.0)]
        return int(fits[-1]) if len(fits) else floor

    def select(self, plan: Plan, forest: CandidateForest, view: IterationView) -> Selection:
        decode, shape = plan.decode, plan.shape
        n = len(decode)
        prefill_tokens = sum(c for _, c in plan.prefill)
        ctx = context_tokens(decode)
        draft = draft_phase_ms(view, shape, n, ctx)

        def predict(b):
            return draft + view.latency.verify_ms(np.asarray(b) + prefill_tokens, ctx)

        max_budget = max(n, view.limits.max_batch_tokens - prefill_tokens)
        sc = SortedCandidates.build(forest)
        budget = choose_budget(sc, n, max_budget, predict)
        if self.mode == "equal":
            return Selection(select_equal(forest, sc, budget), budget, float(predict(budget)))
        cap = np.full(n, shape.depth + 1, np.float64)
        need_at = need_function(decode, view.now_ms)
        need = need_at(float(predict(budget)))
        n_max = self.config.spec.n_max(budget, n)
        want = None
        if self.mode == "adaserve":
            want = slo_wants(sc, need, cap, n_max)
            wanted = n + int(want.sum())
            if wanted > budget:  # spend more this iteration so every request stays on track
                budget = min(wanted, max_budget)
                need = need_at(float(predict(budget)))
                n_max = self.config.spec.n_max(budget, n)
                want = None
        mask = select(forest, sc, budget, need, cap, n_max, slo_phase=self.mode == "adaserve",
                      want=want)
        return Selection(mask, budget, float(predict(budget)))


class SpecInfer(AdaServe):
    """A static token tree for every request, verified whole, with AdaServe's prefill mixing."""

    name = "specinfer"

    def __init__(self, config: PolicyConfig, widths: tuple[int, ...] = SPECINFER_WIDTHS):
        super().__init__(config)
        self.name = "specinfer"
        self.shape = SpecShape.static(widths)

    def plan(self, view: IterationView) -> Plan:
        decode = list(view.running)
        shape = self.shape if decode else SpecShape()
        room = self.prefill_room(view, decode, shape)
        return Plan(chunked_prefill(view, room, len(decode)), decode, shape)

    select = _Base.select


class PrefillFirst(_Base):
    """vLLM without chunked prefill: an iteration either prefills whole prompts or decodes all
    running requests; ``k > 0`` decodes with chain speculation of k draft tokens (vLLM-Spec)."""

    def __init__(self, config: PolicyConfig, k: int = 0):
        super().__init__(config)
        self.shape = SpecShape.chain(k) if k else SpecShape()
        self.name = f"vllm_spec_{k}" if k else "vllm"
        self.drafts = k > 0

    def plan(self, view: IterationView) -> Plan:
        prefill = whole_prefill(view, len(view.running)) if view.waiting else []
        if prefill or not view.running:
            return Plan(prefill, [], SpecShape())
        return Plan([], list(view.running), self.shape)


class Sarathi(_Base):
    """Continuous batching with chunked prefill: decode tokens first, prefill chunks fill the rest
    of a per-iteration token budget."""

    name = "sarathi"

    def plan(self, view: IterationView) -> Plan:
        decode = list(view.running)
        room = self.config.sarathi_token_budget - len(decode)
        return Plan(chunked_prefill(view, room, len(decode)), decode, SpecShape())


class Priority(_Base):
    """Incremental decoding, urgent requests first; while urgent requests decode, the batch is cut
    so that one step fits the tightest urgent SLO (other requests wait a step). Urgent = an SLO
    within ``urgent_factor`` of the tightest SLO running (best-effort requests never are)."""

    name = "priority"

    def plan(self, view: IterationView) -> Plan:
        running = sorted(view.running, key=lambda r: (r.slo_ms, r.arrival_ms))
        tightest = running[0].slo_ms if running else np.inf
        urgent = [r for r in running if r.slo_ms <= self.config.urgent_factor * tightest
                  and np.isfinite(r.slo_ms)]
        if not urgent:
            room = self.config.sarathi_token_budget - len(running)
            return Plan(chunked_prefill(view, room, len(running)), running, SpecShape())
        limit = min(r.slo_ms for r in urgent)
        ctx = context_tokens(running)
        sizes = np.arange(1, len(running) + 1)
        fits = sizes[view.latency.verify_ms(sizes, ctx) <= limit]
        if float(view.latency.verify_ms(len(urgent), ctx)) > limit:
            fits = sizes  # the urgent SLO cannot be met even alone: cutting the batch only starves
        batch = running[: max(len(urgent), int(fits[-1]) if len(fits) else 0)]
        room = self.config.min_prefill_chunk
        spare = view.latency.verify_ms(len(batch) + np.arange(32, view.limits.prefill_chunk + 1, 32), ctx)
        room = max(room, 32 * int(np.sum(spare <= limit)))
        return Plan(chunked_prefill(view, room, len(running)), batch, SpecShape())


@dataclass(frozen=True)
class SystemInfo:
    """One serving system. ``role``: "adaserve", "baseline" (compared in the headline table),
    "ablation" or "extension" (beyond the paper: run only when its switch is ON); ``switch``: the artifact scripts' ON/OFF variable that selects it."""
    name: str
    label: str
    role: str
    switch: str


#: The one ordered list of systems: names, figure labels, roles and script switches are derived
#: from it (CLI choices, harness switches, plot order, headline baselines). A new policy is one
#: entry here plus its case in ``make_policy``.
SYSTEM_REGISTRY: tuple[SystemInfo, ...] = (
    SystemInfo("adaserve", "AdaServe", "adaserve", "ADASERVE"),
    SystemInfo("vllm", "vLLM", "baseline", "VLLM"),
    SystemInfo("sarathi", "Sarathi-Serve", "baseline", "VLLM_SARATHI"),
    SystemInfo("vllm_spec_4", "vLLM-Spec (4)", "baseline", "VLLM_SPEC"),
    SystemInfo("vllm_spec_6", "vLLM-Spec (6)", "baseline", "VLLM_SPEC"),
    SystemInfo("vllm_spec_8", "vLLM-Spec (8)", "baseline", "VLLM_SPEC"),
    SystemInfo("specinfer", "SpecInfer", "baseline", "SPECINFER"),
    SystemInfo("priority", "Priority", "baseline", "PRIORITY"),
    SystemInfo("greedy", "AdaServe (greedy sel.)", "ablation", "ABLATIONS"),
    SystemInfo("equal", "AdaServe (equal sel.)", "ablation", "ABLATIONS"),
    SystemInfo("adaserve_plus", "AdaServe+", "extension", "ADASERVE_PLUS"),  # issue 15, beyond the paper
)
SYSTEMS = tuple(s.name for s in SYSTEM_REGISTRY)
BASELINES = tuple(s.name for s in SYSTEM_REGISTRY if s.role == "baseline")


#: policies defined in their own module (which imports this one) register their constructor here;
#: the package's ``__init__`` imports those modules, so they are registered before any use
POLICY_FACTORIES: dict[str, Callable[[PolicyConfig, str | None], object]] = {}


def register_policy(system: str, factory: Callable[[PolicyConfig, str | None], object]) -> None:
    """Make ``make_policy(system, family)`` return ``factory(config, family)``."""
    POLICY_FACTORIES[system] = factory


def make_policy(system: str, family: str | None, spec: SpecParams | None = None, **overrides):
    """The policy for a system name of docs/definitions.md §5; ``family``: the target's
    model_type, which picks the artifact's speculation constants (``spec_params_for``)."""
    config = PolicyConfig(spec=spec or spec_params_for(family), **overrides)
    if system in POLICY_FACTORIES:
        return POLICY_FACTORIES[system](config, family)
    if system in ("adaserve", "greedy", "equal"):
        return AdaServe(config, mode=system)
    if system == "vllm":
        return PrefillFirst(config)
    if system.startswith("vllm_spec_") and system[len("vllm_spec_"):].isdigit():
        return PrefillFirst(config, k=int(system[len("vllm_spec_"):]))
    if system == "sarathi":
        return Sarathi(config)
    if system == "specinfer":
        return SpecInfer(config)
    if system == "priority":
        return Priority(config)
    raise UserError(f"unknown system {system!r}; valid systems: {', '.join(SYSTEMS)}")
