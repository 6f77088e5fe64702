"""``adaserve simulate``: replay a trace through a policy on the simulated executor."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adaserve.core.metrics import summarize
from adaserve.core.progress import progress as progress_bar
from adaserve.core.profile import LatencyProfile
from adaserve.core.request import Request
from adaserve.core.results import write_results
from adaserve.core.trace import TraceRecord, load_trace, prepare_records, to_requests
from adaserve.iteration import ServingLoop
from adaserve.sim import SIM_MODEL
from adaserve.scheduling.policies import make_policy
from adaserve.sim.acceptance import RecordedAcceptance, acceptance_for
from adaserve.sim.executor import SimExecutor
from adaserve.sim.profiles import split_calls_missing, system_profile
from adaserve.workload.tokens import InputLengthCheck


@dataclass
class SimResult:
    summary: dict
    requests: list[Request]
    wall_s: float
    iterations: int


def simulate_records(records: list[TraceRecord], system: str, profile_name: str, *, seed: int = 0,
                     baseline_ms: float | None = None, scale_slos: bool = False,
                     acceptance=None, progress: bool = False,
                     policy_options: dict | None = None, pricing: str = "per-engine") -> SimResult:
    """Simulate ``records``; the profile's ``family`` picks the speculation constants and, unless
    ``acceptance`` is given, the calibrated acceptance model. ``system`` is priced on the engine
    the paper ran it on (``system_profile``; ``pricing="shared"``: all on the named profile)."""
    profile = system_profile(profile_name, system, pricing)
    requests = _prepared_requests(records, profile, baseline_ms, scale_slos)
    return _simulate(requests, system, profile, seed, acceptance, progress, policy_options)


def _prepared_requests(records: list[TraceRecord], profile: LatencyProfile, baseline_ms: float | None,
                       scale_slos: bool) -> list[Request]:
    baseline = baseline_ms or profile.decode_baseline_ms
    return to_requests(prepare_records(records, baseline_ms=baseline, scale_slos=scale_slos), baseline)


def _simulate(requests: list[Request], system: str, profile: LatencyProfile, seed: int, acceptance,
              progress: bool, policy_options: dict | None) -> SimResult:
    policy = make_policy(system, profile.family, **(policy_options or {}))
    executor = SimExecutor(profile, acceptance or acceptance_for(profile.family), seed,
                           draft_prefill=policy.drafts)
    bar = progress_bar(len(requests), f"{system} on {profile.name}", "req", enabled=progress,
                       leave=False)
    loop = ServingLoop(policy, executor, requests, on_finish=lambda r: bar.update())
    start = time.perf_counter()
    loop.run()
    wall = time.perf_counter() - start
    bar.close()
    summary = summarize(requests, committed_tokens=loop.stats.committed_tokens,
                        request_steps=loop.stats.request_steps, overhead_ms=loop.stats.overhead_ms,
                        registered=len(requests))
    return SimResult(summary, requests, wall, loop.stats.iterations)


def simulate_file(trace: str | Path, system: str, profile_name: str, out: str | Path | None, *,
                  seed: int = 0, baseline_ms: float | None = None, scale_slos: bool = False,
                  progress: bool = False, policy_options: dict | None = None,
                  acceptance: str | Path | None = None, fix_input_lengths: bool = False,
                  pricing: str = "per-engine",
                  warn: Callable[[str], None] | None = None) -> SimResult:
    """Simulate a trace file; ``acceptance``: a recorded-acceptance JSONL to replay. Records whose
    ``input_length`` disagrees with their prompt's token count by more than 2x are reported through
    ``warn`` (default: stderr) and, with ``fix_input_lengths``, given the prompt's token count."""
    warn = warn or _stderr_warning
    profile = system_profile(profile_name, system, pricing)
    # the records become requests in one call, so that nothing holds them during the run
    requests = _prepared_requests(load_sim_records(trace, fix_input_lengths, warn), profile, baseline_ms,
                                  scale_slos)
    stale = split_calls_missing(profile)
    if stale:
        warn(stale)
    model = RecordedAcceptance.load(acceptance) if acceptance else None
    result = _simulate(requests, system, profile, seed, model, progress, policy_options)
    if out is not None:
        meta = {"backend": "sim", "sim_model": SIM_MODEL, "system": system, "trace": str(trace), "profile": profile.name,
                "profile_source": profile.source, "hardware": profile.hardware, "seed": seed,
                "baseline_ms": baseline_ms or profile.decode_baseline_ms,
                "hardware_scaled_slos": scale_slos, "iterations": result.iterations,
                "policy_options": policy_options or {},
                "fixed_input_lengths": fix_input_lengths, "pricing": pricing,
                "acceptance": str(acceptance) if acceptance else "synthetic (calibrated)",
                "simulation_wall_s": round(result.wall_s, 3),
                "note": "simulated: latency from the profile, acceptance from the acceptance model; "
                        "scheduling overhead is measured CPU time of the selection code, other "
                        "overhead that of the serving loop's own bookkeeping"}
        write_results(out, result.summary, result.requests, meta)
    return result


def load_sim_records(trace: str | Path, fix_input_lengths: bool = False,
                     warn: Callable[[str], None] = lambda message: None) -> list[TraceRecord]:
    """The trace's records without their prompts (the simulator needs lengths and times only):
    each prompt is checked against its record's ``input_length`` as it is read, then dropped,
    so memory grows by a few hundred bytes per record, not by the file's size."""
    check = InputLengthCheck(fix=fix_input_lengths)
    records = load_trace(trace, keep_prompts=False, each=check)
    warning = check.warning(str(trace))
    if warning:
        warn(warning)
    return records


def _stderr_warning(message: str) -> None:
    print(f"adaserve: warning: {message}", file=sys.stderr)
