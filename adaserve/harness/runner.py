"""Running a sweep: make the traces that are missing, skip the points already done with the same
configuration (``harness.record``), run the rest (in parallel worker processes for the
simulator), report failures without stopping the sweep."""

from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys
import traceback
from dataclasses import dataclass, field

from adaserve.core.progress import progress as progress_bar
from adaserve.core.results import result_complete, write_results
from adaserve.core.trace import load_trace, save_trace
from adaserve.harness.figures import EXPERIMENTS
from adaserve.harness.record import file_sha256, stale_reason, stamp_config
from adaserve.harness.sweep import MODELS, Point, Settings, SettingsError, point_config, points, result_prefix


@dataclass
class SweepReport:
    done: list[Point] = field(default_factory=list)
    skipped: list[Point] = field(default_factory=list)
    failed: list[tuple[Point, str]] = field(default_factory=list)
    replaced: list[tuple[Point, str]] = field(default_factory=list)  # stale results run again

    def summary(self) -> str:
        lines = [f"{len(self.done)} point(s) run, {len(self.skipped)} skipped (already complete), "
                 f"{len(self.failed)} failed"]
        lines += [f"  re-ran {p.label}: {why}" for p, why in self.replaced]
        lines += [f"  FAILED {p.label}: {why}" for p, why in self.failed]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ traces

def generate_point_trace(p: Point, seed: int) -> None:
    """Write the trace of a point with ``adaserve trace generate``'s code (deterministic)."""
    from adaserve.workload.generate import generate_trace

    kind = EXPERIMENTS[p.experiment].kind
    kwargs: dict = {"seed": seed, "output_len": p.output_len}
    if kind == "rps":
        kwargs["rps"] = p.x
    elif kind == "prop":
        kwargs["prop"] = p.x
    elif kind == "slo":
        kwargs["slo_scale"] = p.x
    save_trace(p.trace, generate_trace(kind, **kwargs))


def ensure_traces(s: Settings, pts: list[Point], progress: bool) -> None:
    missing = sorted({p.trace: p for p in pts if not p.trace.is_file()}.items())
    if s.trace_dir is not None and missing:
        names = ", ".join(str(t) for t, _ in missing[:3])
        raise SettingsError(f"TRACE_DIR={s.trace_dir}: no trace for {len(missing)} point(s), "
                            f"e.g. {names}")
    if not missing:
        return
    with progress_bar(len(missing), "generating traces", "trace", enabled=progress) as bar:
        for _, p in missing:
            generate_point_trace(p, s.seed)
            bar.update()


# ------------------------------------------------------------------------------------ points

def _meta(s: Settings, p: Point, config: dict) -> dict:
    return {"backend": s.backend, "system": p.system, "trace": str(p.trace),
            "sweep": {"figure": p.experiment, "model": p.model, "system": p.system,
                      "x_name": p.x_name, "x": p.x, "point": p.name},
            "point_config": config}


def run_sim_point(s: Settings, p: Point, config: dict) -> None:
    from adaserve.sim.run import simulate_records

    profile = MODELS[p.model]
    pricing = s.backend_args.get("pricing", "per-engine")
    res = simulate_records(load_trace(p.trace, keep_prompts=False), p.system, profile, seed=s.seed,
                           pricing=pricing)
    meta = {**_meta(s, p, config), "profile": profile, "seed": s.seed, "pricing": pricing,
            "iterations": res.iterations, "simulation_wall_s": round(res.wall_s, 3),
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


def run_point(s: Settings, p: Point, config: dict) -> None:
    if s.backend == "sim":
        run_sim_point(s, p, config)
        return
    prefix = result_prefix(s, p)
    # a stale result must not pass for this run's when the command fails before writing its own
    for suffix in (".txt", ".json"):
        prefix.with_name(prefix.name + suffix).unlink(missing_ok=True)
    proc = subprocess.run(external_command(s, p), capture_output=True, text=True)
    if proc.returncode != 0 or not result_complete(prefix):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"exit {proc.returncode}: " + " | ".join(tail))
    stamp_config(prefix, config)


def _worker(args: tuple[Settings, Point, dict]) -> tuple[Point, str | None]:
    s, p, config = args
    try:
        run_point(s, p, config)
        return p, None
    except Exception as e:  # a failing point is reported; the sweep goes on
        detail = traceback.format_exc(limit=-2).strip().splitlines()
        return p, f"{type(e).__name__}: {e} [{detail[-3].strip() if len(detail) >= 3 else ''}]"


def plan_sweep(s: Settings, progress: bool = False) -> tuple[list[tuple[Point, dict]], SweepReport]:
    """The points to run (with the configuration each must record) and the report so far: the
    points skipped because their result matches, the stale ones that will be replaced."""
    report = SweepReport()
    pts = points(s)
    ensure_traces(s, pts, progress)
    todo = []
    for p in pts:
        config = point_config(s, p, file_sha256(p.trace))
        why = stale_reason(result_prefix(s, p), config)
        if why is None:
            report.skipped.append(p)
            continue
        if why != "no complete result":
            report.replaced.append((p, why))
        todo.append((p, config))
    return todo, report


def run_sweep(s: Settings, progress: bool = True, desc: str | None = None) -> SweepReport:
    todo, report = plan_sweep(s, progress)
    # the engine and http backends own the machine / the server: one point at a time
    jobs = min(s.jobs, len(todo)) if s.backend == "sim" else 1
    work = [(s, p, config) for p, config in todo]
    with progress_bar(len(todo), desc or f"{s.experiment} {'+'.join(s.models)}", "point",
                      enabled=progress and bool(todo)) as bar:
        if jobs > 1:
            with mp.get_context("spawn").Pool(jobs) as pool:
                _collect(pool.imap_unordered(_worker, work), report, bar)
                pool.close()  # let the workers exit on their own: terminating them (the with
                pool.join()   # block's exit) leaks their semaphores, which Python reports at exit
        else:
            _collect(map(_worker, work), report, bar)
    return report


def _collect(results, report: SweepReport, bar) -> None:
    for p, err in results:
        if err is None:
            report.done.append(p)
        else:
            report.failed.append((p, err))
            bar.write(f"FAILED {p.label}: {err}")
        bar.update()
