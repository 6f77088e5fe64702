"""``adaserve exp EXPERIMENT [MODEL]``: one experiment's sweep, configured by the artifact README's
environment variables (the ``exps/`` scripts call this); ``adaserve reproduce``: every experiment,
both models, every system, in simulation, then the plots and the headline table."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from adaserve.harness.figures import EXPERIMENTS, FIGURE_IDS, experiments_for
from adaserve.harness.sweep import MAIN_SYSTEMS, MODELS, OVERHEAD_SWITCHES, SWITCHES, settings_from_env


def _env_help() -> str:
    switches = "\n".join(f"    {var:<14}{', '.join(systems)}" for var, systems in SWITCHES.items())
    sweeps = "\n".join(f"    {' '.join(e.env)} ({e.folder})" for e in EXPERIMENTS.values() if e.env)
    return f"""environment variables (as in the artifact's README):
  systems, ON/OFF (default OFF):
{switches}
  sweeps:
{sweeps}
  OUTPUT_LENGTH   {', '.join(OVERHEAD_SWITCHES)} (fig15)
  BACKEND=sim|engine|http   TRACE_DIR   RESULTS_DIR   JOBS   SEED
  PRICING=per-engine|shared  sim: each system on its paper engine's profile, or all on FlexFlow's
  engine: MODEL, DRAFT or DRAFTER=ngram, PROFILE   http: ENDPOINT, BASELINE_MS, MODEL
  EXTRA_ARGS  appended to the engine's `adaserve run` / the client's `adaserve bench` command

A finished point is skipped only when its result records the same configuration (backend, model,
drafter, seed, output length, profile, trace sha256, extra arguments); otherwise it is run again.
Variables that look like these but are not read (e.g. RPS_MAXX) are reported as warnings."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("exp", help="run one experiment's sweep (configured by environment variables)",
                       description=__doc__, epilog=_env_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", metavar="EXPERIMENT",
                   help=f"one of: {', '.join(EXPERIMENTS)} (or a figure it draws, e.g. 12)")
    p.add_argument("model", nargs="?", help=f"one of: {', '.join(MODELS)} (fig15 reads "
                   "LLAMA_OVERHEAD/QWEN_OVERHEAD instead)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_exp)

    r = sub.add_parser("reproduce", help="every figure, both models, every system (simulated), "
                       "then plots and the headline table")
    r.add_argument("--results", default="results")
    r.add_argument("--plots", default="plots")
    r.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    r.add_argument("--figures", default="all",
                   help=f"comma-separated figures among {','.join(FIGURE_IDS)} (default: all); "
                   "runs the experiments that draw them, e.g. 15 or fig8,9,fig15")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=run_reproduce)


def run_exp(args: argparse.Namespace) -> int:
    from adaserve.harness.runner import run_sweep

    settings = settings_from_env(args.experiment, args.model, os.environ)
    for warning in settings.warnings:
        print(f"adaserve exp: warning: {warning}", file=sys.stderr)
    report = run_sweep(settings, progress=not args.no_progress)
    print(report.summary())
    return 1 if report.failed else 0


def reproduce_env(experiment: str, model: str, args: argparse.Namespace) -> dict[str, str]:
    env = {var: "ON" for var, systems in SWITCHES.items() if set(systems) <= set(MAIN_SYSTEMS)}
    env.update(RESULTS_DIR=args.results, JOBS=str(args.jobs), BACKEND="sim")
    if EXPERIMENTS[experiment].kind == "overhead":
        env[f"{model.upper()}_OVERHEAD"] = "ON"
    return env


def run_reproduce(args: argparse.Namespace) -> int:
    from adaserve.harness.report import draw_and_report
    from adaserve.harness.runner import run_sweep

    experiments = experiments_for(args.figures)
    start, failed = time.perf_counter(), 0
    for e in experiments:
        for model in MODELS:
            s = settings_from_env(e.folder, model, reproduce_env(e.folder, model, args))
            report = run_sweep(s, progress=not args.no_progress, desc=f"{e.folder} {model}")
            print(f"{e.folder} {model}: {report.summary()}", flush=True)
            failed += len(report.failed)
    print(f"sweeps finished in {time.perf_counter() - start:.0f} s", flush=True)
    draw_and_report(args.results, args.plots, quiet=True,
                    json_path=str(Path(args.results) / "headline.json"))
    return 1 if failed else 0
