"""The artifact's experiment sweeps (Figures 8-15): which points an experiment has, where each
point's trace and result live, and what configuration each point must have been run with.

The ``exps/`` shell scripts only hand their environment to ``adaserve exp``; every variable of the
artifact's README is read and validated here (``settings_from_env``), before any work starts, and
variables that look like ours but are not read are reported (``Settings.warnings``).

Result paths follow the artifact: ``results/<experiment>/<model>/<system>/<point>.txt`` (+
``.json``, docs/definitions.md). A point counts as done only when its result is complete and was
run with the configuration asked for now (``point_config``; checked by ``harness.record``).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from adaserve.core.environment import VARIABLES as ENVIRONMENT_VARIABLES
from adaserve.core.errors import UserError
from adaserve.harness.figures import EXPERIMENTS, Experiment, experiment_of
from adaserve.harness.record import file_sha256
from adaserve.scheduling.policies import SYSTEM_REGISTRY

MODELS = {"llama": "llama-3.1-70b", "qwen": "qwen2.5-32b"}
BACKENDS = ("sim", "engine", "http")
#: switch variable -> the systems it turns on, in registry order
SWITCHES: dict[str, tuple[str, ...]] = {}
for _s in SYSTEM_REGISTRY:
    SWITCHES[_s.switch] = SWITCHES.get(_s.switch, ()) + (_s.name,)
#: what ``adaserve reproduce`` runs: the paper's systems (no ablations, no extensions)
MAIN_SYSTEMS = tuple(s.name for s in SYSTEM_REGISTRY if s.role in ("adaserve", "baseline"))
OVERHEAD_SWITCHES = {f"{m.upper()}_OVERHEAD": m for m in MODELS}
#: variables every experiment reads (besides the system switches and its own sweep variables)
COMMON_VARIABLES = ("OUTPUT_LENGTH", "BACKEND", "TRACE_DIR", "RESULTS_DIR", "JOBS", "SEED",
                    "MODEL", "DRAFT", "DRAFTER", "PROFILE", "ENDPOINT", "BASELINE_MS", "EXTRA_ARGS",
                    "PRICING")
#: ADASERVE_* variables read elsewhere (the engine, the scripts, caches, the test suite)
OTHER_ADASERVE_VARIABLES = tuple(ENVIRONMENT_VARIABLES)


@dataclass(frozen=True)
class Point:
    experiment: str           # its folder, e.g. "fig8,9"
    model: str
    system: str
    x: float | None
    name: str
    trace: Path
    output_len: int

    @property
    def x_name(self) -> str | None:
        return EXPERIMENTS[self.experiment].x_name

    @property
    def label(self) -> str:
        return f"{self.experiment}/{self.model}/{self.system}/{self.name}"


@dataclass
class Settings:
    experiment: str
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
    warnings: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- env validation

class SettingsError(UserError):
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


def _sweep_values(spec: Experiment, env: Mapping[str, str], model: str) -> list[float | None]:
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


def settings_from_env(experiment: str, model: str | None, env: Mapping[str, str]) -> Settings:
    """Validate every variable a script can set; raise ``SettingsError`` naming the first bad one.
    ``experiment``: its folder (``fig8,9``) or a figure it draws (``8``)."""
    spec = experiment_of(experiment)
    if spec.kind == "overhead":
        models = [m for var, m in OVERHEAD_SWITCHES.items() if _switch(env, var)]
        if not models:
            raise SettingsError("no model selected: set LLAMA_OVERHEAD=ON and/or QWEN_OVERHEAD=ON")
        systems = ["adaserve"]
    else:
        if model not in MODELS:
            raise SettingsError(f"unknown model {model!r}; models: {', '.join(MODELS)}")
        models, systems = [model], _systems(env)
    out_len = _number(env, "OUTPUT_LENGTH", spec.output_len)
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
    if seed < 0 or seed != int(seed):
        raise SettingsError(f"SEED={seed:g}: must be a non-negative integer")
    return Settings(spec.folder, models, systems, {m: _sweep_values(spec, env, m) for m in models},
                    int(out_len), backend, Path(env.get("RESULTS_DIR", "results") or "results"),
                    Path(trace_dir) if trace_dir else None, int(seed), int(jobs),
                    _backend_args(backend, env), unknown_variable_warnings(spec, env))


def _backend_args(backend: str, env: Mapping[str, str]) -> dict:
    """What the engine and http backends need (checked here, before any work). ``EXTRA_ARGS`` is
    appended to their ``adaserve run`` / ``adaserve bench`` command (e.g. ``--threads 1
    --output-len-cap 48 --time-scale 4 --scale-slos`` for a CPU run)."""
    if backend != "sim":
        if env.get("PRICING", "").strip():
            raise SettingsError("PRICING applies to BACKEND=sim only")
        try:
            extra = shlex.split(env.get("EXTRA_ARGS", ""))
        except ValueError as e:
            raise SettingsError(f"EXTRA_ARGS: {e}") from None
        return {**_backend_args_of(backend, env), "extra": extra}
    if env.get("EXTRA_ARGS", "").strip():
        raise SettingsError("EXTRA_ARGS applies to BACKEND=engine or http only")
    return {"pricing": _pricing(env)}


def _pricing(env: Mapping[str, str]) -> str:
    """``PRICING`` (sim only): ``per-engine`` (default) or ``shared`` (``sim.profiles.PRICINGS``)."""
    from adaserve.sim.profiles import PRICINGS

    pricing = env.get("PRICING", "").strip() or PRICINGS[0]
    if pricing not in PRICINGS:
        raise SettingsError(f"PRICING={pricing!r}: expected one of {', '.join(PRICINGS)}")
    return pricing


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


# ------------------------------------------------------------------------ misspelled variables

def _sweep_variables() -> dict[str, str]:
    """Every sweep variable -> the experiment that reads it."""
    return {v: e.folder for e in EXPERIMENTS.values() if e.env for v in e.env}


def _system_spellings() -> dict[str, str]:
    """Upper-case system names (``SARATHI``, ``VLLM_SPEC_4``, ``GREEDY``) -> their switch."""
    out = {}
    for s in SYSTEM_REGISTRY:
        out[s.name.upper()] = s.switch
        out[re.sub(r"\W+", "_", s.label.upper()).strip("_")] = s.switch
    return out


def unknown_variable_warnings(spec: Experiment, env: Mapping[str, str]) -> list[str]:
    """Warnings for variables that look like this harness's but are not read by ``spec``: a
    misspelling (``RPS_MAXX``, ``ADASERV``), any unknown ``ADASERVE*``, ``*_MIN``/``*_MAX``/
    ``*_STEP``, a system's name instead of its switch, or another experiment's variable."""
    sweep_vars = _sweep_variables()
    overhead = set(OVERHEAD_SWITCHES) if spec.kind == "overhead" else set()
    switches = set() if spec.kind == "overhead" else set(SWITCHES)
    own = set(COMMON_VARIABLES) | set(spec.env or ()) | overhead | switches
    known = own | set(sweep_vars) | set(OVERHEAD_SWITCHES) | set(SWITCHES)
    systems = _system_spellings()
    warnings = []
    for name in sorted(env):
        if name in own or name in OTHER_ADASERVE_VARIABLES:
            continue
        if name in known:
            where = sweep_vars.get(name) or ("fig15" if name in OVERHEAD_SWITCHES else
                                             "the other experiments")
            warnings.append(f"{name} is ignored by {spec.folder} (it is read by {where})")
            continue
        hint = systems.get(name) or next(iter(difflib.get_close_matches(
            name, sorted(known | set(OTHER_ADASERVE_VARIABLES)), n=1, cutoff=0.9)), None)
        looks_ours = (name.startswith("ADASERVE") or re.search(r"_(MIN|MAX|STEP)$", name)
                      or hint is not None)
        if looks_ours:
            warnings.append(f"{name} is not a variable of this script"
                            + (f"; did you mean {hint}?" if hint else "")
                            + " (`adaserve exp --help` lists them)")
    return warnings


# ----------------------------------------------------------------------------------- the points

def points(s: Settings) -> list[Point]:
    spec = EXPERIMENTS[s.experiment]
    out = []
    for model in s.models:
        for x in s.xs[model]:
            name = spec.point_name(x, s.output_len)
            trace = trace_path(s, name, spec.artifact_trace_names(x, s.output_len))
            for system in s.systems:
                out.append(Point(s.experiment, model, system, x, name, trace, s.output_len))
    return out


def trace_path(s: Settings, point_name: str, artifact_names: tuple[str, ...] = ()) -> Path:
    """An artifact trace under TRACE_DIR (any of ``artifact_names``, default
    ``emission_<point>.json``, directly or in ``<experiment>/``), else the generated one under
    ``results/traces/<experiment>/`` (shared by both models). A generated trace's file name carries
    every setting it is generated from that the point name does not: ``_ol<N>`` for a non-default
    OUTPUT_LENGTH the name lacks (fig10, fig14), ``_seed<N>`` for SEED other than 0."""
    if s.trace_dir is not None:
        names = artifact_names or (f"emission_{point_name}.json",)
        for file in names:
            for cand in (s.trace_dir / file, s.trace_dir / s.experiment / file):
                if cand.is_file():
                    return cand
        return s.trace_dir / s.experiment / names[0]
    spec = EXPERIMENTS[s.experiment]
    suffix = ""
    if f"ol{s.output_len}" not in point_name.split("_") and s.output_len != spec.output_len:
        suffix += f"_ol{s.output_len}"
    if s.seed:
        suffix += f"_seed{s.seed}"
    return s.results / "traces" / s.experiment / f"emission_{point_name}{suffix}.json"


def result_prefix(s: Settings, p: Point) -> Path:
    return s.results / p.experiment / p.model / p.system / p.name


def point_config(s: Settings, p: Point, trace_sha256: str) -> dict:
    """Everything that decides a point's numbers: the point itself, the trace's content, the
    backend and its options. A result counts as this point's only when its recorded
    ``meta.point_config`` equals this (``harness.record``)."""
    config = {"experiment": p.experiment, "model": p.model, "system": p.system, "point": p.name,
              "x": p.x, "output_len": p.output_len, "seed": s.seed,
              "trace_sha256": trace_sha256, "backend": s.backend}
    a = s.backend_args
    if s.backend == "sim":
        from adaserve.sim import SIM_MODEL

        config.update(profile=MODELS[p.model], sim_model=SIM_MODEL)
        if a.get("pricing", "per-engine") != "per-engine":  # default results keep their config
            config["pricing"] = a["pricing"]
    elif s.backend == "engine":
        config.update(engine_model=a["model"], draft=a["draft"], drafter=a["drafter"],
                      profile=a["profile"],
                      profile_sha256=(file_sha256(a["profile"]) if a["profile"]
                                      and Path(a["profile"]).is_file() else None),  # else a name
                      extra_args=list(a["extra"]))
    else:
        config.update(endpoint=a["endpoint"], baseline_ms=a["baseline_ms"],
                      served_model=a["model"], extra_args=list(a["extra"]))
    return config
