"""Deterministic workload traces for the paper's experiments (docs/workloads.md).

``generate_trace(kind, ...)`` returns the records of one trace; the same arguments and seed give
the same records (and ``save_trace`` the same bytes). Kinds:

=========  ======================================================================================
rps        Figures 8, 9, 12: bursty arrivals rescaled onto 360 s, ``request_count(rps, 360)``
           requests (rounded to the nearest 100 as the artifact did), 60/20/20 coding / chat /
           summarization, 256 output tokens.
prop       Figure 10: RPS 4.0; coding (the urgent category) has share ``prop``, chat and
           summarization split the rest evenly.
slo        Figure 11: RPS 4.0, 60/20/20; the coding SLO ratio is ``slo_scale`` itself, as in the
           artifact's files (the records keep ``category: "coding"``).
fluc       Figure 14: a 6-minute trace; chat, coding and summarization each follow a bell-shaped
           rate (Gaussian, sd = 2·duration/15) peaking at ``rps`` (default 4 req/s) at 1/4, 1/2 and
           3/4 of the trace (1.5, 3 and 4.5 minutes). Times are from the start of the window.
overhead   Figure 15: RPS 3.6, 60/20/20, 128 output tokens.
=========  ======================================================================================

Random streams are separate for arrivals, categories and prompts, and each is drawn one request
after another, so (as in the artifact) the ``rps`` traces of one seed are time-rescaled prefixes of
one request sequence, and ``prop``/``slo`` traces of one seed share their arrival times.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from adaserve.core import slo
from adaserve.core.errors import UserError
from adaserve.core.trace import TraceRecord
from adaserve.workload import arrivals
from adaserve.workload.prompts import PromptPool, load_pool

KINDS = ("rps", "prop", "slo", "fluc", "overhead")
ARRIVALS = ("bursty", "poisson", "gamma")
DEFAULT_DURATION_S = 360.0
DEFAULT_GAMMA_CV = 1.2
MAX_REQUESTS = 1_000_000
CATEGORY_ORDER = tuple(c.name for c in slo.CATEGORIES)  # coding, chat, summarization
BASE_SLO_RATIO = {c.name: c.slo_ratio for c in slo.CATEGORIES}
ARTIFACT_MIX = {"coding": 0.6, "chat": 0.2, "summarization": 0.2}
DEFAULT_RPS = {"rps": None, "prop": 4.0, "slo": 4.0, "fluc": 4.0, "overhead": 3.6}
DEFAULT_OUTPUT_LEN = {"rps": 256, "prop": 256, "slo": 256, "fluc": 256, "overhead": 128}
# Figure 13: where each category's bump peaks, as a fraction of the trace, and its width.
FLUC_PEAK_AT = {"chat": 0.25, "coding": 0.5, "summarization": 0.75}
# sd 48 s of 360: the artifact's emission_fluc_6m_peak4.0.json has bumps of about 0.8 min sd and
# 1,445 requests (docs/workloads.md); three 4 req/s bumps of 48 s sd give ≈ 1,415
FLUC_WIDTH_FRACTION = 2.0 / 15.0


@dataclass(frozen=True)
class TraceSpec:
    """Everything that determines a trace (with the prompt pool). ``None`` means the kind's
    default; ``resolved()`` fills the defaults in and validates."""

    kind: str
    rps: float | None = None
    prop: float | None = None
    slo_scale: float | None = None
    output_len: int | None = None
    duration_s: float = DEFAULT_DURATION_S
    seed: int = 0
    arrival: str | None = None
    gamma_cv: float | None = None
    artifact_rounding: bool = True

    def resolved(self) -> TraceSpec:
        check_spec(self)
        spec = replace(self,
                       rps=self.rps if self.rps is not None else DEFAULT_RPS[self.kind],
                       output_len=self.output_len or DEFAULT_OUTPUT_LEN[self.kind],
                       arrival=None if self.kind == "fluc" else (self.arrival or "bursty"),
                       gamma_cv=self.gamma_cv or (DEFAULT_GAMMA_CV
                                                  if self.arrival == "gamma" else None))
        if spec.kind != "fluc":
            spec.request_total()  # fail on a trace with no request before any work
        return spec

    def request_total(self) -> int:
        """Requests of a fixed-count kind (``rps`` must be resolved); ``UserError`` saying what
        to change when the rounding leaves none or there are too many."""
        rps, duration = float(self.rps), self.duration_s
        if not rps * duration <= MAX_REQUESTS:  # also an infinite product of two large values
            raise UserError(f"--rps {rps:g} over --duration-s {duration:g} gives "
                            f"{rps * duration:g} requests (more than {MAX_REQUESTS}); lower "
                            "--rps or --duration-s")
        try:
            n = arrivals.request_count(rps, duration, artifact_rounding=self.artifact_rounding)
        except ValueError:
            if self.artifact_rounding:
                hint = (" at the nearest 100 (as the artifact's traces); pass --exact-count to "
                        "round to the nearest request, or raise --rps or --duration-s so that "
                        "rps x duration is at least 50")
            else:
                hint = "; raise --rps or --duration-s so that rps x duration is at least 0.5"
            raise UserError(f"--rps {rps:g} over --duration-s {duration:g} gives no request: "
                            f"{rps * duration:g} expected requests round to 0{hint}") from None
        return n

    def mix(self) -> dict[str, float]:
        """Category shares for the fixed-count kinds."""
        if self.kind == "prop":
            rest = (1.0 - float(self.prop)) / 2.0
            return {"coding": float(self.prop), "chat": rest, "summarization": rest}
        return dict(ARTIFACT_MIX)

    def slo_ratio(self, category: str) -> float:
        ratio = BASE_SLO_RATIO[category]
        if self.kind == "slo" and category == "coding":
            ratio = round(float(self.slo_scale), 9)  # the artifact's files: slo_ratio = the scale
        return ratio


# ----------------------------------------------------------------------------------- validation

def _finite_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _only_for(spec: TraceSpec, value: object, flag: str, kind: str) -> None:
    if value is not None and spec.kind != kind:
        raise UserError(f"{flag} applies only to --kind {kind} (got --kind {spec.kind})")


def check_spec(spec: TraceSpec) -> None:
    """Raise ``UserError`` naming the offending flag and value."""
    if spec.kind not in KINDS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)}, got {spec.kind!r}")
    _only_for(spec, spec.prop, "--prop", "prop")
    _only_for(spec, spec.slo_scale, "--slo-scale", "slo")
    if spec.kind == "rps" and spec.rps is None:
        raise UserError("--kind rps needs --rps (average requests per second, e.g. 4.8)")
    if spec.rps is not None and not (_finite_number(spec.rps) and spec.rps > 0):
        raise UserError(f"--rps must be a positive number, got {spec.rps!r}")
    if spec.kind == "prop" and spec.prop is None:
        raise UserError("--kind prop needs --prop (the urgent coding share, e.g. 0.5)")
    if spec.prop is not None and not (_finite_number(spec.prop) and 0 < spec.prop < 1):
        raise UserError(f"--prop must be strictly between 0 and 1 (the urgent coding share), "
                        f"got {spec.prop!r}")
    if spec.kind == "slo" and spec.slo_scale is None:
        raise UserError("--kind slo needs --slo-scale (the coding SLO multiplier, e.g. 0.8)")
    if spec.slo_scale is not None and not (_finite_number(spec.slo_scale) and spec.slo_scale > 0):
        raise UserError(f"--slo-scale must be a positive number, got {spec.slo_scale!r}")
    _check_common(spec)


def _check_common(spec: TraceSpec) -> None:
    out = spec.output_len
    if out is not None and not (isinstance(out, int) and not isinstance(out, bool) and out >= 1):
        raise UserError(f"--output-len must be a positive integer, got {out!r}")
    if not (_finite_number(spec.duration_s) and spec.duration_s > 0):
        raise UserError(f"--duration-s must be a positive number, got {spec.duration_s!r}")
    if not (isinstance(spec.seed, int) and not isinstance(spec.seed, bool) and spec.seed >= 0):
        raise UserError(f"--seed must be a non-negative integer, got {spec.seed!r}")
    if spec.arrival is not None and spec.kind == "fluc":
        raise UserError("--arrival does not apply to --kind fluc (its arrivals follow the "
                        "bell-shaped rates)")
    if spec.arrival is not None and spec.arrival not in ARRIVALS:
        raise UserError(f"--arrival must be one of {', '.join(ARRIVALS)}, got {spec.arrival!r}")
    if spec.gamma_cv is not None and spec.arrival != "gamma":
        raise UserError("--cv applies only to --arrival gamma")
    if spec.gamma_cv is not None and not (_finite_number(spec.gamma_cv) and spec.gamma_cv > 0):
        raise UserError(f"--cv must be a positive number, got {spec.gamma_cv!r}")


# ------------------------------------------------------------------------------------ arrivals

def fixed_count_arrivals(spec: TraceSpec, rng: np.random.Generator) -> np.ndarray:
    """Arrival times (ms) of the fixed-count kinds, rescaled onto the trace's duration."""
    n = spec.request_total()
    if spec.arrival == "poisson":
        return arrivals.poisson_arrivals(n, spec.duration_s, rng)
    if spec.arrival == "gamma":
        return arrivals.gamma_arrivals(n, spec.duration_s, float(spec.gamma_cv), rng)
    return arrivals.bursty_arrivals(n, spec.duration_s, rng)


def draw_categories(n: int, mix: dict[str, float], rng: np.random.Generator) -> list[str]:
    """I.i.d. categories by share, one uniform draw per request (so prefixes agree)."""
    names = list(mix)
    edges = np.cumsum([mix[k] for k in names])
    idx = np.searchsorted(edges / edges[-1], rng.random(n), side="right")
    return [names[min(i, len(names) - 1)] for i in idx]


def fluc_rates(spec: TraceSpec) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Each category's bell-shaped rate (req/s) for the ``fluc`` kind."""
    width = spec.duration_s * FLUC_WIDTH_FRACTION
    return {name: arrivals.bell_rate(float(spec.rps), spec.duration_s * at, width)
            for name, at in FLUC_PEAK_AT.items()}


def fluc_arrivals(spec: TraceSpec, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Merged arrivals of the per-category inhomogeneous Poisson processes (thinning)."""
    streams = rng.spawn(len(FLUC_PEAK_AT))
    times: list[np.ndarray] = []
    labels: list[str] = []
    for (name, rate), stream in zip(fluc_rates(spec).items(), streams):
        t = arrivals.fluctuating_arrivals(rate, spec.duration_s, stream)
        times.append(t)
        labels += [name] * len(t)
    all_t = np.concatenate(times)
    order = np.argsort(all_t, kind="stable")
    if order.size == 0:
        raise UserError(f"--kind fluc with --rps {spec.rps:g} and --duration-s "
                        f"{spec.duration_s:g} produced no request; raise --rps (the peak rate) "
                        "or --duration-s")
    return all_t[order], [labels[i] for i in order]


# ------------------------------------------------------------------------------------- records

def generate_trace(kind: str, *, rps: float | None = None, prop: float | None = None,
                   slo_scale: float | None = None, output_len: int | None = None,
                   duration_s: float = DEFAULT_DURATION_S, seed: int = 0,
                   pool: PromptPool | str = "offline", arrival: str | None = None,
                   gamma_cv: float | None = None,
                   artifact_rounding: bool = True) -> list[TraceRecord]:
    """The records of one trace (see the module doc for the kinds)."""
    spec = TraceSpec(kind, rps, prop, slo_scale, output_len, duration_s, seed, arrival, gamma_cv,
                     artifact_rounding)
    return generate_from_spec(spec, pool)


def generate_from_spec(spec: TraceSpec, pool: PromptPool | str = "offline") -> list[TraceRecord]:
    spec = spec.resolved()
    prompts = load_pool(pool) if isinstance(pool, str) else pool
    for name in CATEGORY_ORDER:
        prompts.get(name)  # fail before any work if a category has no prompts
    arrival_ss, category_ss, prompt_ss = np.random.SeedSequence(spec.seed).spawn(3)
    if spec.kind == "fluc":
        times, cats = fluc_arrivals(spec, np.random.default_rng(arrival_ss))
    else:
        times = fixed_count_arrivals(spec, np.random.default_rng(arrival_ss))
        cats = draw_categories(len(times), spec.mix(), np.random.default_rng(category_ss))
    picks = np.random.default_rng(prompt_ss).random(len(times))
    return [_record(spec, float(t), c, float(u), prompts) for t, c, u in zip(times, cats, picks)]


def _record(spec: TraceSpec, t_ms: float, category: str, u: float,
            pool: PromptPool) -> TraceRecord:
    """One request: the prompt at position ``u`` (uniform in [0, 1)) of its category's list."""
    choices = pool.get(category)
    prompt = choices[min(int(u * len(choices)), len(choices) - 1)]
    return TraceRecord(emission_time_ms=round(t_ms, 3), input_length=prompt.input_length,
                       output_length=int(spec.output_len), prompt=prompt.text,
                       slo_ratio=spec.slo_ratio(category), category=category)

