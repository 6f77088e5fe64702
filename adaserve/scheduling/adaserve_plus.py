"""``adaserve_plus`` (issue 15): AdaServe with calibrated acceptance, cost-aware speculation and
TTFT deadlines. The faithful ``adaserve`` (policies.AdaServe) is unchanged; docs/adaserve_plus.md
describes the method and its measurements.

Three changes to AdaServe's iteration:

1. **Calibration** (``calibration.py``): selection ranks candidates by the *calibrated* path
   probability, learned online from every verification (``observe``, called by the serving loop
   after each step).
2. **Cost-aware speculation.** Every decision compares options by one score: the SLO *deficit*
   the iteration leaves — Σ over salvageable requests of the tokens each is behind its SLO schedule
   after the iteration, given its expected committed tokens and the predicted iteration time — and,
   among options within a tolerance of the smallest deficit, the expected tokens per ms. The plan
   scores every tree depth (and no speculation at all: the draft phase must pay for itself), the
   selection scores a grid of verification budgets. A request whose SLO, with a margin, is out of
   reach at the best rate the system has now (*hopeless*) stops steering the choice. A drafter
   whose cost does not depend on the depth (n-gram) drafts its deepest tree while drafting pays
   (``DraftSwitch``) and leaves to the selection what to verify.
3. **TTFT deadlines**: waiting prompts are prefilled earliest-deadline-first (deadlines still
   ahead first), and each iteration's prefill room is the larger of what the decode slack
   allows and the least room that meets the most waiting prompts' TTFT deadlines; none when even
   the least room would sink a salvageable request and no prompt loses its deadline by waiting an
   iteration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adaserve.core.request import Phase, Request
from adaserve.scheduling.admission import chunked_prefill
from adaserve.scheduling.calibration import (MAX_DEPTH, PAPER_CHAIN_ACCEPTANCE, Calibrator,
                                             DepthAcceptance, conditional_confidence, end_weights,
                                             exact_end_weights, node_outcomes)
from adaserve.scheduling.plan import IterationView, Plan, Selection, SpecShape
from adaserve.scheduling.policies import (AdaServe, PolicyConfig, context_tokens, draft_phase_ms,
                                          need_from_terms, need_terms, register_policy, select_all)
from adaserve.scheduling.selection import (SortedCandidates, choose_budget, compiled_kernels, select_budgets,
                                          slo_wants)
from adaserve.scheduling.trees import CandidateForest

DEFICIT_TOLERANCE = 0.25   # tokens: options this close to the smallest deficit count as equal
BUDGET_GRID = 8            # verification budgets the selection scores between its extremes
# "hopeless" iff the SLO time left < margin × tokens left × the best predicted ms per token; 2.5
# was the best of 0.7-1000 at Llama RPS 4.8 (docs/adaserve_plus.md, "What did not work")
HOPELESS_MARGIN = 2.5
# the same test for the selection's SLO phase (which nodes a request behind schedule gets): tuned
# over 1.0-2.5 on ten sweep points (docs/adaserve_plus.md, "The selection's margin"); at 2.5 a
# request 22 tokens from its end with 766 ms left (Llama RPS 3.6) got no SLO-phase nodes and
# missed its 36 ms SLO by 3%
SELECT_MARGIN = 2.0


@dataclass
class SloState:
    """The decoding requests' SLO position, read once per decision (arrays over requests)."""

    slo: np.ndarray        # ms per token (inf: best effort)
    slack: np.ndarray      # ms ahead of the SLO schedule: slo·o − (now − t0)
    budget: np.ndarray     # ms the SLO allows for the rest at the maximum length: slo·max − elapsed
    left: np.ndarray       # tokens left to the maximum length
    terms: tuple[np.ndarray, np.ndarray, np.ndarray]  # ``need_terms``: (now − t0, slo, o)

    @classmethod
    def of(cls, decode: list[Request], now_ms: float) -> "SloState":
        terms = need_terms(decode, now_ms)
        elapsed, slo, done = terms
        most = np.fromiter((r.max_new_tokens for r in decode), np.float64, len(decode))
        with np.errstate(invalid="ignore"):
            return cls(slo, slo * done - elapsed, slo * most - elapsed, np.maximum(most - done, 0), terms)

    def weights(self, best_ms_per_token: np.ndarray, margin: float = HOPELESS_MARGIN) -> np.ndarray:
        """1 for requests whose SLO is within reach (the time left is at least ``margin`` times
        what the rest takes at ``best_ms_per_token``), 0 for best effort and hopeless ones."""
        finite = np.isfinite(self.slo)
        ok = self.budget >= margin * self.left * best_ms_per_token
        return (finite & ok).astype(np.float64)

    def spare(self, ms_per_token: np.ndarray) -> np.ndarray:
        """ms each request can lose now and still finish within its SLO if it decodes the rest
        at ``ms_per_token``: its time left at the maximum length minus what the rest takes."""
        return self.budget - self.left * ms_per_token

    def deficit(self, expected: np.ndarray, t_ms: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """Σ weight · tokens behind schedule after an iteration of ``t_ms`` committing
        ``expected``; vectorized over options: ``expected`` (options, n), ``t_ms`` (options,)."""
        kernels = compiled_kernels()
        if kernels is not None:
            return kernels.deficit_terms(np.asarray(expected, np.float64), np.asarray(t_ms, np.float64),
                                         self.slo, self.slack, np.asarray(weight, np.float64)).sum(axis=1)
        finite = np.isfinite(self.slo)
        slo = np.where(finite, self.slo, 1.0)
        slack = np.where(finite, self.slack, 0.0)
        behind = np.maximum(np.asarray(t_ms)[:, None] - slack - slo * expected, 0.0) / slo
        return (behind * np.where(finite, weight, 0.0)).sum(axis=1)


def pick(deficits: np.ndarray, rates: np.ndarray) -> int:
    """Index of the option with the best rate among those within tolerance of the least deficit."""
    ok = deficits <= deficits.min() + DEFICIT_TOLERANCE
    return int(np.flatnonzero(ok)[np.argmax(rates[ok])])


@dataclass
class DraftSwitch:
    """Whether drafting pays, for a drafter the plan always runs at its deepest (the n-gram table):
    tokens per predicted ms of the iterations that drafted against the same iterations predicted
    without drafting (one token per request, no draft call, incremental host work), as decayed
    sums. Drafting starts on, goes off while it does not pay, and is tried again every
    ``probe_every`` iterations so that the sums follow the traffic."""

    decay: float = 0.98        # per drafting iteration (~50 iterations of memory)
    min_seen: int = 8          # drafting iterations before the sums decide
    probe_every: int = 16
    spec_tokens: float = 0.0
    spec_ms: float = 0.0
    plain_tokens: float = 0.0
    plain_ms: float = 0.0
    seen: int = 0
    since_draft: int = 0       # iterations since the last one that drafted

    def record(self, drafted: bool, committed: float, n: int, spec_ms: float, plain_ms: float) -> None:
        if not drafted:
            self.since_draft += 1
            return
        d = self.decay
        self.spec_tokens, self.spec_ms = d * self.spec_tokens + committed, d * self.spec_ms + spec_ms
        self.plain_tokens, self.plain_ms = d * self.plain_tokens + n, d * self.plain_ms + plain_ms
        self.seen += 1
        self.since_draft = 0

    def pays(self) -> bool:
        return self.seen < self.min_seen or self.spec_tokens * self.plain_ms >= self.plain_tokens * self.spec_ms

    def draft(self) -> bool:
        return self.pays() or self.since_draft + 1 >= self.probe_every


class AdaServePlus(AdaServe):
    """AdaServe with calibrated, cost-aware speculation and TTFT-deadline prefill (module doc)."""

    def __init__(self, config: PolicyConfig, family: str | None = None):
        super().__init__(config)
        self.name = "adaserve_plus"
        self.calibrator = Calibrator()
        self.depths = DepthAcceptance(alpha=PAPER_CHAIN_ACCEPTANCE.get(family or "llama", 0.79))
        self._calibrated: tuple[int, np.ndarray, np.ndarray] | None = None  # (id(forest), p̂, F̂)
        self.outcomes = {"exact": 0, "posterior": 0}  # steps learned from exact ends / posteriors
        self.switch = DraftSwitch()
        self._plain_ms: float | None = None  # the planned iteration's predicted time without drafting
        self._state: tuple[list[Request], float, SloState] | None = None  # this iteration's, once read
        self._shapes: dict[int, list[SpecShape]] = {}  # shape_options by request count

    # -- plan ---------------------------------------------------------------------------------
    def plan(self, view: IterationView) -> Plan:
        decode = list(view.running)
        ordered = _deadline_view(view)
        if not decode:
            return Plan(chunked_prefill(ordered, self.prefill_room(ordered, [], SpecShape()), 0),
                        [], SpecShape())
        shape = self.choose_shape(view, decode, 0)
        room = self.ttft_room(ordered, decode, shape)
        prefill = chunked_prefill(ordered, room, len(decode))
        prefill_tokens = sum(c for _, c in prefill)
        if prefill_tokens:  # else the shape just chosen, for the same iteration, stands
            shape = self.choose_shape(view, decode, prefill_tokens)
        return Plan(prefill, decode, shape)

    def shape_options(self, n: int) -> list[SpecShape]:
        """No speculation, then beams of every depth up to Eq. 8's, at Eq. 9's width."""
        shapes = self._shapes.get(n)
        if shapes is None:
            spec = self.config.spec
            shapes = self._shapes[n] = [SpecShape()] + [SpecShape(d, spec.width(n))
                                                        for d in range(1, spec.depth(n) + 1)]
        return shapes

    def slo_state(self, decode: list[Request], now_ms: float) -> SloState:
        """``SloState.of(decode, now_ms)``, read once per iteration: its plan and selection ask for
        it with the same list of requests at the same time, and the requests change only when the
        iteration commits."""
        cached = self._state
        if cached is not None and cached[0] is decode and cached[1] == now_ms:
            return cached[2]
        state = SloState.of(decode, now_ms)
        self._state = (decode, now_ms, state)
        return state

    def choose_shape(self, view: IterationView, decode: list[Request], prefill_tokens: int) -> SpecShape:
        """The shape with the smallest expected SLO deficit, then the most tokens per ms. A depth
        is scored with the selection's freedom: any number of requests may have their trees
        verified (``_verified_options``), since the selection verifies a tree only where it pays.

        A drafter whose cost does not depend on the depth (the n-gram table, one call per
        iteration) drafts its deepest tree whenever drafting pays (``DraftSwitch``), and the
        selection, which sees each node's calibrated confidence, decides what to verify: the
        per-category estimate here cannot tell a coding request that repeats itself from one
        that does not, and on the CPU engine's profile it drafted nothing in half the
        iterations and lost the predictable requests AdaServe's SLO phase saves
        (docs/adaserve_plus.md)."""
        n, ctx = len(decode), context_tokens(decode)
        shapes = self.shape_options(n)
        if view.latency.ngram_drafter:
            self._plain_ms = float(overhead_one_ms(view, n, shapes[0], ctx)
                                   + view.latency.verify_ms(n + prefill_tokens, ctx))
            return shapes[-1] if self.switch.draft() else shapes[0]
        self._plain_ms = None
        state = self.slo_state(decode, view.now_ms)
        depth = np.array([min(s.depth, MAX_DEPTH) for s in shapes])
        w = self.config.spec.width(n)
        nodes = np.concatenate(([0.0], np.cumsum(np.minimum(self.depths.mean_width(), w))))
        e, tokens = _verified_options(self.expected_tokens(decode, depth), nodes[depth], state.slack)
        tokens = np.minimum(tokens, max(view.limits.max_batch_tokens - prefill_tokens, n))
        lat = view.latency
        first, wide = lat.draft_ms(np.array([n, n * w], np.float64), ctx)
        draft = np.where(depth > 0, first + np.maximum(depth - 1, 0) * wide, 0.0)
        over = np.repeat(overhead_ms(view, n, depth, draft), n + 1)
        t = over + np.asarray(lat.verify_ms(tokens.ravel() + prefill_tokens, ctx), np.float64)
        e = e.reshape(-1, n)
        weight = state.weights(np.min(t[:, None] / e, axis=0))
        return shapes[pick(state.deficit(e, t, weight), e.sum(axis=1) / t) // (n + 1)]

    def expected_tokens(self, decode: list[Request], depth: np.ndarray) -> np.ndarray:
        """E_r = 1 + Σ_{k≤d} ρ_k(r's category): tokens each request is expected to commit in an
        iteration of tree depth d, for every d of ``depth``: (len(depth), n)."""
        cumulative = self.depths.cumulative
        cum = np.array([cumulative(r.category) for r in decode])  # (n, MAX_DEPTH + 1)
        return 1.0 + cum[:, np.minimum(depth, MAX_DEPTH)].T

    def ttft_room(self, view: IterationView, decode: list[Request], shape: SpecShape) -> int:
        """Prefill tokens this iteration: what the tightest salvageable request's slack allows
        (``slack`` mode) or, if more, the least room that meets the most waiting prompts' TTFT
        deadlines (``_deadline_room``) among the rooms every salvageable decoding request can
        absorb (``SloState.spare``): a TPOT miss loses the request on both metrics, a TTFT miss
        on the joint one only, so TTFT deadlines take what the decode SLOs leave. When even the
        least room would push a salvageable request past its SLO, the prefill waits an iteration
        if no waiting prompt loses its TTFT deadline by the wait (``_can_wait``): a floor of
        ``min_prefill_chunk`` tokens cost a coding request with 3 tokens and 350 ms left a 465 ms
        step on the CPU engine's profile."""
        lim = view.limits
        if not view.waiting:
            return 0
        n, ctx = len(decode), context_tokens(decode)
        base = min(n * (shape.depth + 1), lim.max_batch_tokens - self.config.min_prefill_chunk)
        draft = overhead_one_ms(view, n, shape, ctx)
        rooms = _room_options(view, self.config.min_prefill_chunk, lim.max_batch_tokens - base)
        if len(rooms) == 0:
            return self.config.min_prefill_chunk
        extra = (view.latency.verify_ms(base + rooms, ctx) - view.latency.verify_ms(base, ctx)
                 + draft_prefill_ms(view, rooms))
        state = self.slo_state(decode, view.now_ms)
        step = draft + float(view.latency.verify_ms(base, ctx))
        weight = state.weights(np.full(n, step / max(shape.depth + 1, 1)))
        slack = np.min(np.where(weight > 0, state.slack, np.inf), initial=np.inf)
        fits = rooms[extra <= max(slack, 0.0)]
        by_slack = int(fits[-1]) if len(fits) else int(rooms[0])
        spare = state.spare(step / self.expected_tokens(decode, np.array([shape.depth]))[0])
        ok = extra <= np.min(np.where(weight > 0, spare, np.inf), initial=np.inf)
        by_deadline = _deadline_room(view, rooms[ok], (step + extra)[ok]) if ok.any() else 0
        room = max(by_slack, by_deadline)
        if not ok[0] and _can_wait(view, room, step, float(extra[rooms == room][0])):
            return 0  # even the least chunk would sink a salvageable request: prefill next time
        return room

    # -- select -------------------------------------------------------------------------------
    def select(self, plan: Plan, forest: CandidateForest, view: IterationView) -> Selection:
        decode, shape, n = plan.decode, plan.shape, len(plan.decode)
        prefill_tokens = sum(c for _, c in plan.prefill)
        predict = _step_predictor(plan, view, prefill_tokens)
        if forest.n_nodes == n:
            return select_all(forest, float(predict(n)))
        cond, path = self.calibrator.calibrate(forest)
        self._calibrated = (id(forest), cond, path)
        cal = CandidateForest(forest.offsets, forest.parent, forest.token, path, forest.depth)
        sc = SortedCandidates.build(cal)
        max_budget = max(n, view.limits.max_batch_tokens - prefill_tokens)
        b_rate = choose_budget(sc, n, max_budget, predict)
        state = self.slo_state(decode, view.now_ms)
        terms = state.terms
        need_at = need_from_terms(terms)
        cap = np.full(n, shape.depth + 1, np.float64)
        best = sc.expected_tokens(len(sc.order))[-1] / n + 1.0
        weight = state.weights(np.full(n, float(predict(b_rate)) / best), SELECT_MARGIN)
        need = np.where(weight > 0, need_at(float(predict(b_rate))), -np.inf)
        wanted = n + int(slo_wants(sc, need, cap, self.config.spec.n_max(b_rate, n)).sum())
        top = min(max(wanted, b_rate), max_budget)
        grid = np.linspace(n, top, BUDGET_GRID + 1).round().astype(np.int64).tolist()
        budgets = np.array(sorted({*grid, b_rate}), np.int64)
        times = np.asarray(predict(budgets), np.float64)
        n_max = np.array([self.config.spec.n_max(int(b), n) for b in budgets], np.int64)
        masks, expected = select_budgets(cal, sc, budgets, times, terms, weight, cap, n_max)
        i = pick(state.deficit(expected, times, weight), expected.sum(axis=1) / times)
        return Selection(masks[i], int(budgets[i]), float(times[i]))

    # -- feedback -----------------------------------------------------------------------------
    def observe(self, plan: Plan, forest: CandidateForest, selection: Selection, out) -> None:
        """Learn from one step's outcome: which selected nodes the target accepted."""
        decode = plan.decode
        if decode and self._plain_ms is not None:
            self.switch.record(plan.shape.speculative, float(np.sum(out.committed)), len(decode),
                               selection.predicted_ms, self._plain_ms)
        if not decode or forest.n_nodes == len(decode):
            return
        committed = np.asarray(out.committed, np.int64)
        live = np.array([r.phase == Phase.DECODING and r.rid not in out.failed for r in decode])
        accepted_depth = np.where(live, committed - 1, -1)  # a capped commit ends its request
        if self._calibrated is not None and self._calibrated[0] == id(forest):
            cond, path = self._calibrated[1], self._calibrated[2]
        else:
            cond, path = self.calibrator.calibrate(forest)
        sel = np.asarray(selection.selected, bool)
        end = None
        if out.tokens is not None:
            end = exact_end_weights(forest, sel, out.tokens, accepted_depth)
        elif out.accepted_nodes is not None:  # the simulator reports the node its ids would name
            end = np.zeros(forest.n_nodes)
            end[np.asarray(out.accepted_nodes)[live]] = 1.0
        self.outcomes["exact" if end is not None else "posterior"] += 1
        if end is None:
            end = end_weights(forest, sel, accepted_depth, cond, path)
        tried, accepted = node_outcomes(forest, end)
        use = sel & (forest.parent >= 0) & live[forest.owner]
        q = conditional_confidence(forest)
        self.calibrator.update(forest.depth[use], q[use], tried[use], accepted[use])
        verified = np.zeros((len(decode), MAX_DEPTH))
        deep = use & (forest.depth <= MAX_DEPTH)
        np.add.at(verified, (forest.owner[deep], forest.depth[deep] - 1), 1.0)
        self.depths.update_many([r.category for r in decode], plan.shape.depth, accepted_depth,
                                verified)


def _verified_options(expected: np.ndarray, nodes: np.ndarray, slack: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Per depth (rows of ``expected``: (depths, n) tokens each request commits with its whole
    tree verified; ``nodes``: a tree's non-root nodes per depth), the options "the first k
    requests' trees verified, the others' roots only", k = 0..n, requests ranked by expected
    gain (then the least slack first). Returns the options' expected tokens (depths, n + 1, n)
    and verified tokens (depths, n + 1)."""
    kernels = compiled_kernels()
    if kernels is not None:
        return kernels.verified_options(np.asarray(expected, np.float64), np.asarray(nodes, np.float64),
                                        np.asarray(slack, np.float64))
    depths, n = expected.shape
    gain = expected - 1.0
    rank = np.empty((depths, n), np.int64)
    for d in range(depths):
        rank[d, np.lexsort((slack, -gain[d]))] = np.arange(n)
    k = np.arange(n + 1)
    chosen = rank[:, None, :] < k[None, :, None]                       # (depths, n + 1, n)
    return 1.0 + gain[:, None, :] * chosen, n + k[None, :] * nodes[:, None]


def _step_predictor(plan: Plan, view: IterationView, prefill_tokens: int):
    """Predicted iteration time as a function of the verification budget (vectorized)."""
    ctx, n = context_tokens(plan.decode), len(plan.decode)
    draft = overhead_one_ms(view, n, plan.shape, ctx)
    if prefill_tokens:
        prefilled = sum(r.prefilled for r, _ in plan.prefill)
        draft += float(draft_prefill_ms(view, prefill_tokens, prefilled))
    return lambda b: draft + view.latency.verify_ms(np.asarray(b) + prefill_tokens, ctx)


def overhead_ms(view: IterationView, n: int, depth: np.ndarray, level_draft) -> np.ndarray:
    """What an iteration of ``n`` decoding requests costs besides the target step, per tree depth of
    ``depth``, as the engine pays it: the drafting (``level_draft``, the draft table's steps; a
    profile measured with the n-gram drafter has its measured per-iteration call instead) and the
    host work of its kind (speculative with a tree to verify, or incremental) where the simulator
    charges it too: profiles of the engine step model (measured by ``adaserve profile``; the
    paper's tables have none). On a GPU, where a step of 1 or 64 tokens costs about the same, the
    host work of a speculative iteration (drafting, selection, tree batch, verification walk) is
    most of what speculating costs: without it the policy saw speculation as nearly free."""
    lat = view.latency
    speculative = np.asarray(depth) > 0
    per_iteration = lat.draft_iteration_ms(n) if lat.ngram_drafter else None
    draft = np.where(speculative, np.asarray(level_draft, np.float64) if per_iteration is None else per_iteration, 0.0)
    if lat.step_model != "engine":
        return draft
    return draft + np.where(speculative, lat.host_ms(n, True, tree=True), lat.host_ms(n, False))


def overhead_one_ms(view: IterationView, n: int, shape: SpecShape, ctx: int) -> float:
    """``overhead_ms`` of one shape, whose drafting is ``draft_phase_ms`` (not looked up when the
    profile's n-gram row replaces it): the same sums, without the arrays (this runs a few times
    an iteration)."""
    lat = view.latency
    if shape.depth > 0:
        draft = lat.draft_iteration_ms(n) if lat.ngram_drafter else None
        draft = draft_phase_ms(view, shape, n, ctx) if draft is None else draft
    else:
        draft = 0.0
    if lat.step_model != "engine":
        return float(draft)
    return float(draft + lat.host_ms(n, shape.depth > 0, tree=True))


def draft_prefill_ms(view: IterationView, tokens, prefilled: int = 0):
    """The draft model's forward over ``tokens`` prefill-chunk tokens (vectorized) after
    ``prefilled`` prompt tokens: a draft model needs every prompt's KV too, so each chunk costs a
    draft forward after the target's step. A profile measured with the n-gram drafter has no draft
    model to fill (0)."""
    tokens = np.asarray(tokens, np.float64)
    if view.latency.ngram_drafter:
        return np.zeros_like(tokens)
    return np.asarray(view.latency.draft_ms(tokens, prefilled), np.float64)


def _deadline_view(view: IterationView) -> IterationView:
    """The view with waiting prompts in prefill order: TTFT deadlines still ahead earliest first
    (earliest-deadline-first; a started prompt keeps its place by its deadline, so a long prompt
    due in seconds does not hold back short ones due sooner), then missed ones earliest first
    (FIFO among equals)."""
    now = view.now_ms

    def key(r: Request) -> tuple:
        deadline = r.ttft_deadline_ms
        return (deadline < now, deadline, r.arrival_ms, r.rid)

    waiting = sorted(view.waiting, key=key)
    return IterationView(view.now_ms, waiting, view.running, view.latency, view.kv_free_tokens)


def _room_options(view: IterationView, least: int, most: int) -> np.ndarray:
    """Prefill rooms to score, ascending: every 32 tokens from ``least`` to ``most``, plus the
    rooms that complete a waiting prompt exactly (in the view's order), since a prompt's TTFT
    ends with its last chunk: a room 8 tokens short of one costs it a whole extra iteration."""
    ends = np.cumsum([r.remaining_prefill for r in view.waiting], dtype=np.int64)
    ends = ends[(ends >= least) & (ends <= most)]
    return np.unique(np.concatenate((np.arange(least, most + 1, 32, dtype=np.int64), ends)))


def _queue(view: IterationView) -> tuple[np.ndarray, np.ndarray]:
    """The waiting prompts in the view's order: prompt tokens left up to and including each
    (cumulative, since each waits for those before it) and each one's TTFT deadline."""
    remaining = np.cumsum([r.remaining_prefill for r in view.waiting], dtype=np.float64)
    deadline = np.array([r.ttft_deadline_ms for r in view.waiting], np.float64)
    return remaining, deadline


def _can_wait(view: IterationView, room: int, decode_ms: float, extra_ms: float) -> bool:
    """Whether prefilling ``room`` tokens per iteration from the next iteration on (after one of
    ``decode_ms`` without prefill; each later one ``extra_ms`` longer) meets every TTFT deadline
    (of the waiting prompts, in the view's order) that prefilling from this iteration on meets. A
    prompt already past its deadline has lost it either way, and its TPOT clock starts only with
    its first token: it does not forbid the wait. In an overload (the CPU engine at the trace's
    rate) every queued prompt is late, and prefilling them anyway sank the decoding requests that
    could still attain."""
    remaining, deadline = _queue(view)
    prefill_now = view.now_ms + np.ceil(remaining / max(room, 1)) * (decode_ms + extra_ms)
    return bool(np.all((prefill_now + decode_ms <= deadline) | (prefill_now > deadline)))


def _deadline_room(view: IterationView, rooms: np.ndarray, step_ms: np.ndarray) -> int:
    """The least prefill room per iteration among those whose steps finish the most waiting
    prompts (in the view's order) by their TTFT deadlines; 0 when no room meets any. A prompt may
    be met only by a small room (short steps) or only by a large one (few steps), so every room is
    scored, not only the largest."""
    remaining, deadline = _queue(view)
    finish = view.now_ms + np.ceil(remaining[None, :] / rooms[:, None]) * step_ms[:, None]
    met = (finish <= deadline).sum(axis=1)
    return int(rooms[np.argmax(met)]) if met.max() > 0 else 0


register_policy("adaserve_plus", AdaServePlus)
