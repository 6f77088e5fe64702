"""Running a sweep: make the traces that are missing, skip finished points, run the rest (in
parallel worker processes for the simulator), report failures without stopping the sweep."""

from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from adaserve.core.results import result_complete, write_results
from adaserve.core.trace import load_trace, save_trace
from adaserve.harness.sweep import FIGURES, MODELS, Point, Settings, SettingsError, points, result_prefix


@dataclass
class SweepReport:
    done: list[Point] = field(default_factory=list)
    skipped: list[Point] = field(default_factory=list)
    failed: list[tuple[Point, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{len(self.done)} point(s) run, {len(self.skipped)} skipped (already complete), "
                 f"{len(self.failed)} failed"]
        lines += [f"  FAILED {p.figure}/{p.model}/{p.system}/{p.name}: {why}" for p, why in self.failed]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ traces

def generate_point_trace(p: Point, seed: int) -> None:
    """Write the trace of a point with ``adaserve trace generate``'s code (deterministic)."""
    from adaserve.workload.generate import generate_trace

    kind = FIGURES[p.figure].kind
    kwargs: dict = {"seed": seed, "output_len": p.output_len}
    if kind == "rps":
        kwargs["rps"] = p.x
    elif kind == "prop":
        kwargs["prop"] = p.x
    elif kind == "slo":
        kwargs["slo_scale"] = p.x
    save_trace(p.trace, generate_trace(kind, **kwargs))


def ensure_traces(s: Settings, todo: list[Point], progress: bool) -> None:
    missing = sorted({p.trace: p for p in todo if not p.trace.is_file()}.items())
    if s.trace_dir is not None and missing:
        names = ", ".join(str(t) for t, _ in missing[:3])
        raise SettingsError(f"TRACE_DIR={s.trace_dir}: no trace for {len(missing)} point(s), "
                            f"e.g. {names}")
    for trace, p in tqdm(missing, desc="generating traces", unit="trace",
                         disable=not progress or not missing):
        generate_point_trace(p, s.seed)


# ------------------------------------------------------------------------------------ points

def _meta(s: Settings, p: Point) -> dict:
    return {"backend": s.backend, "system": p.system, "trace": str(p.trace),
            "sweep": {"figure": p.figure, "model": p.model, "system": p.system,
                      "x_name": p.x_name, "x": p.x, "point": p.name}}


def run_sim_point(s: Settings, p: Point) -> None:
    from adaserve.sim.run import simulate_records

    profile = MODELS[p.model]
    res = simulate_records(load_trace(p.trace), p.system, profile, seed=s.seed)
    meta = {**_meta(s, p), "profile": profile, "seed": s.seed, "iterations": res.iterations,
            "simulation_wall_s": round(res.wall_s, 3),
            "note": "simulated: latency from the profile, acceptance from the calibrated model; "
                    "scheduling overhead is measured CPU time of the selection code"}
    write_results(result_prefix(s, p), res.summary, res.requests, meta)


def external_command(s: Settings, p: Point) -> list[str]:
    """The ``adaserve run`` / ``adaserve bench`` command of an engine or http point."""
    a, out = s.backend_args, str(result_prefix(s, p))
    exe = [sys.executable, "-m", "adaserve"]
    if s.backend == "engine":
        cmd = exe + ["run", "--trace", str(p.trace), "--system", p.system, "--model", a["model"],
                     "--out", out]
        if a.get("draft"):
            cmd += ["--draft", a["draft"]]
        if a.get("drafter"):
            cmd += ["--drafter", a["drafter"]]
        if a.get("profile"):
            cmd += ["--profile", a["profile"]]
        return cmd + ["--no-progress"] + a["extra"]
    cmd = exe + ["bench", "--endpoint", a["endpoint"], "--trace", str(p.trace),
                 "--baseline-ms", str(a["baseline_ms"]), "--out", out, "--no-progress"]
    return cmd + (["--model", a["model"]] if a.get("model") else []) + a["extra"]


def run_point(s: Settings, p: Point) -> None:
    if s.backend == "sim":
        run_sim_point(s, p)
        return
    proc = subprocess.run(external_command(s, p), capture_output=True, text=True)
    if proc.returncode != 0 or not result_complete(result_prefix(s, p)):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"exit {proc.returncode}: " + " | ".join(tail))


def _worker(args: tuple[Settings, Point]) -> tuple[Point, str | None]:
    s, p = args
    try:
        run_point(s, p)
        return p, None
    except Exception as e:  # a failing point is reported; the sweep goes on
        detail = traceback.format_exc(limit=-2).strip().splitlines()
        return p, f"{type(e).__name__}: {e} [{detail[-3].strip() if len(detail) >= 3 else ''}]"


def run_sweep(s: Settings, progress: bool = True, desc: str | None = None) -> SweepReport:
    report = SweepReport()
    todo = []
    for p in points(s):
        (report.skipped if result_complete(result_prefix(s, p)) else todo).append(p)
    ensure_traces(s, todo, progress)
    # the engine and http backends own the machine / the server: one point at a time
    jobs = min(s.jobs, len(todo)) if s.backend == "sim" else 1
    bar = tqdm(total=len(todo), desc=desc or f"{s.figure} {'+'.join(s.models)}", unit="point",
               disable=not progress or not todo)
    work = [(s, p) for p in todo]
    if jobs > 1:
        with mp.get_context("spawn").Pool(jobs) as pool:
            results = pool.imap_unordered(_worker, work)
            _collect(results, report, bar)
    else:
        _collect(map(_worker, work), report, bar)
    bar.close()
    return report


def _collect(results, report: SweepReport, bar) -> None:
    for p, err in results:
        if err is None:
            report.done.append(p)
        else:
            report.failed.append((p, err))
            bar.write(f"FAILED {p.figure}/{p.model}/{p.system}/{p.name}: {err}")
        bar.update()
