"""``adaserve exp FIG [MODEL]``: one figure's sweep, configured by the seed README's environment
variables (the ``exps/`` scripts call this); ``adaserve reproduce``: every figure, both models,
every system, in simulation, then the plots and the headline table."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import time

from adaserve.harness.sweep import FIGURES, MAIN_SYSTEMS, MODELS, SWITCHES, settings_from_env

ENV_HELP = """environment variables (as in the artifact's README):
  ADASERVE, VLLM, VLLM_SPEC (k=4,6,8), VLLM_SARATHI, SPECINFER, PRIORITY, ABLATIONS  ON/OFF (default OFF)
  RPS_MIN RPS_MAX RPS_STEP (fig8,9) | PROP_MIN PROP_MAX PROP_STEP (fig10)
  SLO_SCALE_MIN SLO_SCALE_MAX SLO_SCALE_STEP (fig11) | OUTPUT_LENGTH
  LLAMA_OVERHEAD, QWEN_OVERHEAD (fig15)   BACKEND=sim|engine|http   TRACE_DIR   RESULTS_DIR   JOBS   SEED
  engine: MODEL, DRAFT or DRAFTER=ngram, PROFILE   http: ENDPOINT, BASELINE_MS, MODEL
  EXTRA_ARGS  appended to the engine's `adaserve run` / the client's `adaserve bench` command"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("exp", help="run one figure's sweep (configured by environment variables)",
                       description=__doc__, epilog=ENV_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("figure", help=f"one of: {', '.join(FIGURES)}")
    p.add_argument("model", nargs="?", help=f"one of: {', '.join(MODELS)} (fig15 reads "
                   "LLAMA_OVERHEAD/QWEN_OVERHEAD instead)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_exp)

    r = sub.add_parser("reproduce", help="every figure, both models, every system (simulated), "
                       "then plots and the headline table")
    r.add_argument("--results", default="results")
    r.add_argument("--plots", default="plots")
    r.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    r.add_argument("--figures", default=",".join(f for f in FIGURES),
                   help="comma-separated subset, e.g. fig8,9,fig15")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=run_reproduce)


def run_exp(args: argparse.Namespace) -> int:
    from adaserve.harness.runner import run_sweep

    settings = settings_from_env(args.figure, args.model, os.environ)
    report = run_sweep(settings, progress=not args.no_progress)
    print(report.summary())
    return 1 if report.failed else 0


def reproduce_env(figure: str, model: str, args: argparse.Namespace) -> dict[str, str]:
    env = {var: "ON" for var, systems in SWITCHES.items() if set(systems) <= set(MAIN_SYSTEMS)}
    env.update(RESULTS_DIR=args.results, JOBS=str(args.jobs), BACKEND="sim")
    if figure == "fig15":
        env[f"{model.upper()}_OVERHEAD"] = "ON"
    return env


def run_reproduce(args: argparse.Namespace) -> int:
    from adaserve.harness.runner import run_sweep

    figures = _split_figures(args.figures)
    unknown = [f for f in figures if f not in FIGURES]
    if unknown:
        raise ValueError(f"unknown figure(s) {unknown}; figures: {', '.join(FIGURES)}")
    start, failed = time.perf_counter(), 0
    for figure in figures:
        for model in MODELS:
            s = settings_from_env(figure, model, reproduce_env(figure, model, args))
            report = run_sweep(s, progress=not args.no_progress, desc=f"{figure} {model}")
            print(f"{figure} {model}: {report.summary()}", flush=True)
            failed += len(report.failed)
    print(f"sweeps finished in {time.perf_counter() - start:.0f} s", flush=True)
    from adaserve.cli.plot_cmd import draw_and_report

    draw_and_report(args.results, args.plots, quiet=True,
                    json_path=str(Path(args.results) / "headline.json"))
    return 1 if failed else 0


def _split_figures(text: str) -> list[str]:
    """``fig8,9,fig10`` → [fig8,9, fig10] (the figure name itself contains a comma)."""
    out: list[str] = []
    for part in text.split(","):
        if part.isdigit() and out:
            out[-1] += "," + part
        elif part:
            out.append(part)
    return out


