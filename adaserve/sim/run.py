"""``adaserve simulate``: replay a trace through a policy on the simulated executor."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from adaserve.core.metrics import summarize
from adaserve.core.progress import progress as progress_bar
from adaserve.core.profile import LatencyProfile
from adaserve.core.request import Request
from adaserve.core.results import RecordSpool, write_results
from adaserve.core.tally import Tally
from adaserve.core.trace import (CompactRecords, TraceError, TraceRecord, prepare_record, scan_trace, stream_trace,
                                 to_request)
from adaserve.iteration import ServingLoop
from adaserve.sim import SIM_MODEL
from adaserve.scheduling.policies import make_policy
from adaserve.sim.acceptance import acceptance_for
from adaserve.sim.executor import SimExecutor
from adaserve.sim.ngram_replay import NgramReplay, recorded_acceptance
from adaserve.sim.profiles import split_calls_missing, system_profile
from adaserve.workload.tokens import InputLengthCheck


@dataclass
class SimResult:
    summary: dict
    requests: list[Request] | None  # by rid, when kept (``simulate_records``)
    wall_s: float
    iterations: int
    registered: int = 0
    spool: RecordSpool | None = None  # the request records, when spooled (``simulate_file``)


def simulate_records(records: Sequence[TraceRecord], system: str, profile_name: str, *, seed: int = 0,
                     baseline_ms: float | None = None, scale_slos: bool = False,
                     acceptance=None, progress: bool = False,
                     policy_options: dict | None = None, pricing: str = "per-engine") -> SimResult:
    """Simulate ``records``; the profile's ``family`` picks the speculation constants and, unless
    ``acceptance`` is given, the calibrated acceptance model. ``system`` is priced on the engine
    the paper ran it on (``system_profile``; ``pricing="shared"``: all on the named profile).
    The finished requests are kept (``SimResult.requests``)."""
    profile = system_profile(profile_name, system, pricing)
    return _simulate(CompactRecords(records), system, profile, seed, acceptance, progress, policy_options,
                     baseline_ms=baseline_ms, scale_slos=scale_slos, keep=True)


def _arrivals(records: CompactRecords | StreamedRecords, baseline_ms: float, scale_slos: bool) -> Iterator[Request]:
    """The records' requests (rid = index) in arrival order, each made when the loop reads it."""
    for i, rec in records.in_arrival_order():
        yield to_request(i, prepare_record(rec, baseline_ms=baseline_ms, scale_slos=scale_slos), baseline_ms)


class StreamedRecords:
    """A checked trace file's records, decoded again from the file as the loop reaches their
    arrival (``stream_trace``): a simulation holds none of them beforehand. ``fixes``: record
    index -> the input length that replaces the recorded one (``--fix-input-length``)."""

    def __init__(self, path: str | Path, n: int, fixes: dict[int, int]):
        self.path, self.n, self.fixes = Path(path), n, fixes

    def __len__(self) -> int:
        return self.n

    def in_arrival_order(self) -> Iterator[tuple[int, TraceRecord]]:
        i = -1
        for i, rec in enumerate(stream_trace(self.path)):
            fixed = self.fixes.get(i)
            yield i, rec if fixed is None else replace(rec, input_length=fixed)
        if i + 1 != self.n:
            raise TraceError(self.path, [f"holds {i + 1} records, not the {self.n} it held when it was checked"])


def _simulate(records: CompactRecords | StreamedRecords, system: str, profile: LatencyProfile, seed: int, acceptance,
              progress: bool, policy_options: dict | None, *, baseline_ms: float | None, scale_slos: bool,
              keep: bool = False, spool: bool = False) -> SimResult:
    """The simulation loop. Each request is made when it arrives and tallied when it leaves
    (``core/tally.py``); with ``keep`` the requests are also kept, with ``spool`` their records
    written to a ``RecordSpool`` (in rid order, as they leave). Without ``keep``, nothing is kept per
    request: a file's records are read again as they arrive (``StreamedRecords``), records given in
    memory are held as ``CompactRecords`` (~40 bytes each)."""
    policy = make_policy(system, profile.family, **(policy_options or {}))
    executor = SimExecutor(profile, acceptance or acceptance_for(profile.family), seed,
                           draft_prefill=policy.drafts)
    n = len(records)
    bar = progress_bar(n, f"{system} on {profile.name}", "req", enabled=progress, leave=False)
    tally, kept = Tally(), []
    records_out = RecordSpool(n) if spool else None

    def finished(r: Request) -> None:
        tally.add(r)
        if records_out is not None:
            records_out.add(r)
        if keep:
            kept.append(r)
        bar.update()

    baseline = baseline_ms or profile.decode_baseline_ms
    loop = ServingLoop(policy, executor, on_finish=finished, arrivals=_arrivals(records, baseline, scale_slos))
    start = time.perf_counter()
    loop.run()
    wall = time.perf_counter() - start
    bar.close()
    summary = summarize(tally, committed_tokens=loop.stats.committed_tokens,
                        request_steps=loop.stats.request_steps, overhead_ms=loop.stats.overhead_ms,
                        registered=n)
    requests = sorted(kept, key=lambda r: r.rid) if keep else None
    return SimResult(summary, requests, wall, loop.stats.iterations, n, records_out)


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
    records = load_sim_records(trace, fix_input_lengths, warn)
    stale = split_calls_missing(profile)
    if stale:
        warn(stale)
    model = recorded_acceptance(acceptance, records.in_arrival_order()) if acceptance else None
    result = _simulate(records, system, profile, seed, model, progress, policy_options, baseline_ms=baseline_ms,
                       scale_slos=scale_slos, spool=out is not None)
    if out is not None:
        meta = {"backend": "sim", "sim_model": SIM_MODEL, "system": system, "trace": str(trace), "profile": profile.name,
                "profile_source": profile.source, "hardware": profile.hardware, "seed": seed,
                "baseline_ms": baseline_ms or profile.decode_baseline_ms,
                "hardware_scaled_slos": scale_slos, "iterations": result.iterations,
                "policy_options": policy_options or {},
                "fixed_input_lengths": fix_input_lengths, "pricing": pricing,
                "acceptance": str(acceptance) if acceptance else "synthetic (calibrated)",
                "acceptance_replay": (None if model is None else "ngram drafter" if isinstance(model, NgramReplay)
                                      else "records"),
                "simulation_wall_s": round(result.wall_s, 3),
                "note": "simulated: latency from the profile, acceptance from the acceptance model; "
                        "scheduling overhead is measured CPU time of the selection code, other "
                        "overhead that of the serving loop's own bookkeeping"}
        write_results(out, result.summary, result.spool, meta)
        result.spool.close()
    return result


def load_sim_records(trace: str | Path, fix_input_lengths: bool = False,
                     warn: Callable[[str], None] = lambda message: None) -> StreamedRecords:
    """The trace's records as the simulator reads them: lengths and times, no prompts. The file is
    checked first, record by record (each prompt against its ``input_length``, then dropped), and
    read again as the loop reaches each record: memory does not grow with the trace."""
    check = InputLengthCheck(fix=fix_input_lengths)
    scan_trace(trace, check)
    warning = check.warning(str(trace))
    if warning:
        warn(warning)
    fixes = {i: est for i, (_, est) in check.bad.items()} if fix_input_lengths else {}
    return StreamedRecords(trace, check.seen, fixes)


def _stderr_warning(message: str) -> None:
    print(f"adaserve: warning: {message}", file=sys.stderr)
