"""The artifact's experiment sweeps (Figures 8-15): which points a figure has, where each point's
trace and result live, and running the points that are not done yet.

The ``exps/`` shell scripts only hand their environment to ``adaserve exp``; every variable of the
seed README is read and validated here (``settings_from_env``), before any work starts.

Result paths follow SPEC §7: ``results/<fig>/<model>/<system>/<point>.txt`` (+ ``.json``). A point
whose complete result exists is skipped; results are written atomically (``core.results``), so an
interrupted run never leaves a file a rerun would take for a finished point.
"""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

MODELS = {"llama": "llama-3.1-70b", "qwen": "qwen2.5-32b"}
BACKENDS = ("sim", "engine", "http")
# switch variable -> systems it turns on (seed README names; PRIORITY and ablations are ours)
SWITCHES = {"ADASERVE": ("adaserve",), "VLLM": ("vllm",), "VLLM_SARATHI": ("sarathi",),
            "VLLM_SPEC": ("vllm_spec_4", "vllm_spec_6", "vllm_spec_8"), "SPECINFER": ("specinfer",),
            "PRIORITY": ("priority",), "ABLATIONS": ("greedy", "equal")}
MAIN_SYSTEMS = ("adaserve", "vllm", "sarathi", "vllm_spec_4", "vllm_spec_6", "vllm_spec_8",
                "specinfer", "priority")


@dataclass(frozen=True)
class FigureSpec:
    name: str                 # results folder name
    kind: str                 # trace kind for workload.generate
    x_name: str | None        # the swept variable, None for single-point figures
    env: tuple[str, str, str] | None  # MIN, MAX, STEP variable names
    defaults: Mapping[str, tuple[float, float, float]] = field(default_factory=dict)  # per model
    bounds: tuple[float, float] = (0.0, math.inf)  # open interval of valid x values

    def point_name(self, x: float | None, output_len: int) -> str:
        if self.kind == "rps":
            return f"rps{x:.1f}_ol{output_len}"
        if self.kind == "prop":
            return f"prop{x:.1f}_rps4.0"
        if self.kind == "slo":
            return f"slo{x:.1f}_ol{output_len}"
        if self.kind == "fluc":
            return "fluc"
        return f"rps3.6_ol{output_len}"


FIGURES = {
    "fig8,9": FigureSpec("fig8,9", "rps", "rps", ("RPS_MIN", "RPS_MAX", "RPS_STEP"),
                         {"llama": (2.6, 4.8, 0.2), "qwen": (2.4, 4.2, 0.2)}),
    "fig10": FigureSpec("fig10", "prop", "prop", ("PROP_MIN", "PROP_MAX", "PROP_STEP"),
                        {"llama": (0.1, 0.9, 0.1), "qwen": (0.1, 0.9, 0.1)}, bounds=(0.0, 1.0)),
    "fig11": FigureSpec("fig11", "slo", "slo_scale", ("SLO_SCALE_MIN", "SLO_SCALE_MAX", "SLO_SCALE_STEP"),
                        {"llama": (0.6, 1.6, 0.2), "qwen": (0.6, 1.6, 0.2)}),
    "fig14": FigureSpec("fig14", "fluc", None, None),
    "fig15": FigureSpec("fig15", "overhead", None, None),
}
DEFAULT_OUTPUT_LEN = {"fig8,9": 256, "fig10": 256, "fig11": 256, "fig14": 256, "fig15": 128}


@dataclass(frozen=True)
class Point:
    figure: str
    model: str
    system: str
    x: float | None
    name: str
    trace: Path
    output_len: int

    @property
    def x_name(self) -> str | None:
        return FIGURES[self.figure].x_name


@dataclass
class Settings:
    figure: str
    models: list[str]
    systems: list[str]
    xs: dict[str, list[float | None]]     # per model
    output_len: int
    backend: str = "sim"
    results: Path = Path("results")
    trace_dir: Path | None = None
    seed: int = 0
    jobs: int = 1
    backend_args: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- env validation

class SettingsError(ValueError):
    pass


def _switch(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if raw.upper() in ("ON", "1", "TRUE", "YES"):
        return True
    if raw.upper() in ("OFF", "0", "FALSE", "NO"):
        return False
    raise SettingsError(f"{name}={raw!r}: expected ON or OFF")


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected a number") from None
    if not math.isfinite(value):
        raise SettingsError(f"{name}={raw!r}: expected a finite number")
    return value


def grid(lo: float, hi: float, step: float) -> list[float]:
    """``lo, lo+step, ..., <= hi`` rounded to 6 decimals (so 0.1 steps do not drift)."""
    n = int(math.floor((hi - lo) / step + 1e-9))
    return [round(lo + i * step, 6) for i in range(n + 1)]


def _sweep_values(spec: FigureSpec, env: Mapping[str, str], model: str) -> list[float | None]:
    if spec.env is None:
        return [None]
    lo_name, hi_name, step_name = spec.env
    d_lo, d_hi, d_step = spec.defaults[model]
    lo, hi, step = (_number(env, lo_name, d_lo), _number(env, hi_name, d_hi),
                    _number(env, step_name, d_step))
    if step <= 0:
        raise SettingsError(f"{step_name}={step:g}: must be > 0")
    low, high = spec.bounds
    for name, v in ((lo_name, lo), (hi_name, hi)):
        if not low < v < high:
            raise SettingsError(f"{name}={v:g}: must be in ({low:g}, {high:g})" if math.isfinite(high)
                                else f"{name}={v:g}: must be > {low:g}")
    if lo > hi:
        raise SettingsError(f"{lo_name}={lo:g} is above {hi_name}={hi:g}")
    return grid(lo, hi, step)


def _systems(env: Mapping[str, str]) -> list[str]:
    systems = [s for var, names in SWITCHES.items() if _switch(env, var) for s in names]
    if not systems:
        raise SettingsError("no system selected: set one or more of " +
                            ", ".join(f"{v}=ON" for v in SWITCHES))
    return systems


def settings_from_env(figure: str, model: str | None, env: Mapping[str, str]) -> Settings:
    """Validate every variable a script can set; raise ``SettingsError`` naming the first bad one."""
    if figure not in FIGURES:
        raise SettingsError(f"unknown figure {figure!r}; figures: {', '.join(FIGURES)}")
    spec = FIGURES[figure]
    if figure == "fig15":
        models = [m for m in MODELS if _switch(env, f"{m.upper()}_OVERHEAD")]
        if not models:
            raise SettingsError("no model selected: set LLAMA_OVERHEAD=ON and/or QWEN_OVERHEAD=ON")
        systems = ["adaserve"]
    else:
        if model not in MODELS:
            raise SettingsError(f"unknown model {model!r}; models: {', '.join(MODELS)}")
        models, systems = [model], _systems(env)
    out_len = _number(env, "OUTPUT_LENGTH", DEFAULT_OUTPUT_LEN[figure])
    if out_len < 1 or out_len != int(out_len):
        raise SettingsError(f"OUTPUT_LENGTH={out_len:g}: must be a positive integer")
    backend = env.get("BACKEND", "sim").strip() or "sim"
    if backend not in BACKENDS:
        raise SettingsError(f"BACKEND={backend!r}: expected one of {', '.join(BACKENDS)}")
    trace_dir = env.get("TRACE_DIR", "").strip()
    if trace_dir and not Path(trace_dir).is_dir():
        raise SettingsError(f"TRACE_DIR={trace_dir!r}: no such directory")
    jobs = _number(env, "JOBS", float(os.cpu_count() or 1))
    if jobs < 1 or jobs != int(jobs):
        raise SettingsError(f"JOBS={jobs:g}: must be a positive integer")
    seed = _number(env, "SEED", 0)
    return Settings(figure, models, systems, {m: _sweep_values(spec, env, m) for m in models},
                    int(out_len), backend, Path(env.get("RESULTS_DIR", "results") or "results"),
                    Path(trace_dir) if trace_dir else None, int(seed), int(jobs),
                    _backend_args(backend, env))


def _backend_args(backend: str, env: Mapping[str, str]) -> dict:
    """What the engine and http backends need (checked here, before any work). ``EXTRA_ARGS`` is
    appended to their ``adaserve run`` / ``adaserve bench`` command (e.g. ``--threads 1
    --output-len-cap 48 --time-scale 4 --scale-slos`` for a CPU run)."""
    if backend != "sim":
        try:
            extra = shlex.split(env.get("EXTRA_ARGS", ""))
        except ValueError as e:
            raise SettingsError(f"EXTRA_ARGS: {e}") from None
        return {**_backend_args_of(backend, env), "extra": extra}
    if env.get("EXTRA_ARGS", "").strip():
        raise SettingsError("EXTRA_ARGS applies to BACKEND=engine or http only")
    return {}


def _backend_args_of(backend: str, env: Mapping[str, str]) -> dict:
    if backend == "engine":
        model = env.get("MODEL", "").strip()
        if not model:
            raise SettingsError("BACKEND=engine needs MODEL (e.g. MODEL=smollm2-135m) and "
                                "DRAFT=<model> or DRAFTER=ngram")
        return {"model": model, "draft": env.get("DRAFT", "").strip() or None,
                "drafter": env.get("DRAFTER", "").strip() or None,
                "profile": env.get("PROFILE", "").strip() or None}
    if backend == "http":
        endpoint = env.get("ENDPOINT", "").strip()
        if not endpoint:
            raise SettingsError("BACKEND=http needs ENDPOINT (e.g. ENDPOINT=http://127.0.0.1:8000)")
        baseline = _number(env, "BASELINE_MS", math.nan)
        if not baseline > 0:
            raise SettingsError("BACKEND=http needs BASELINE_MS, the server's measured baseline "
                                "per-token latency in ms (> 0)")
        return {"endpoint": endpoint, "baseline_ms": baseline,
                "model": env.get("MODEL", "").strip() or None}
    raise AssertionError(backend)


# ----------------------------------------------------------------------------------- the points

def points(s: Settings) -> list[Point]:
    spec = FIGURES[s.figure]
    out = []
    for model in s.models:
        for x in s.xs[model]:
            name = spec.point_name(x, s.output_len)
            trace = trace_path(s, model, name)
            for system in s.systems:
                out.append(Point(s.figure, model, system, x, name, trace, s.output_len))
    return out


def trace_path(s: Settings, model: str, point_name: str) -> Path:
    """An artifact trace under TRACE_DIR (``emission_<point>.json``, directly or in ``<fig>/``), else
    the generated one under ``results/traces/<fig>/`` (shared by both models)."""
    file = f"emission_{point_name}.json"
    if s.trace_dir is not None:
        for cand in (s.trace_dir / file, s.trace_dir / s.figure / file):
            if cand.is_file():
                return cand
    return s.results / "traces" / s.figure / file


def result_prefix(s: Settings, p: Point) -> Path:
    return s.results / p.figure / p.model / p.system / p.name
