"""Systems across loads on a measured engine profile with recorded (or synthetic) acceptance
(issue 15: "never below vLLM at any load"; docs/adaserve_plus.md).

    python scripts/replay_acceptance.py --profile DIR/profile-0.json --trace rps24.json \\
        --acceptance ngram=DIR/x1/adaserve-0.acc.jsonl --acceptance synthetic \\
        [--requests 16,64] [--scales 0.5,1,2,4,8,16] [--output-cap 48]
        [--systems vllm,sarathi,adaserve,adaserve_plus] [--json OUT.json]

The profile and the recordings come from ``scripts/engine_vs_sim.py run`` (``adaserve profile``
and ``adaserve run --record-acceptance``). Each row simulates the trace's first N requests with
arrival times multiplied by the scale (0.5: twice the rate), outputs capped as in the engine runs,
hardware-scaled SLOs (``scale_slos``), and prints attainment / joint attainment / tokens per
request-step for every system. ``--acceptance synthetic`` is the calibrated synthetic model of
Llama. Everything printed is simulated."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adaserve.core.trace import load_trace  # noqa: E402
from adaserve.sim.acceptance import RecordedAcceptance, acceptance_for  # noqa: E402
from adaserve.sim.run import simulate_records  # noqa: E402


def acceptance(spec: str):
    """``synthetic`` or ``NAME=FILE`` -> (name, model)."""
    if spec == "synthetic":
        return spec, acceptance_for("llama")
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise SystemExit(f"--acceptance {spec!r}: expected NAME=FILE or synthetic")
    return name, RecordedAcceptance.load(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", required=True)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--acceptance", action="append", required=True, help="NAME=FILE (recorded) or synthetic")
    ap.add_argument("--requests", default="16,64")
    ap.add_argument("--scales", default="0.5,1,2,4,8,16")
    ap.add_argument("--output-cap", type=int, default=48)
    ap.add_argument("--systems", default="vllm,sarathi,adaserve,adaserve_plus")
    ap.add_argument("--json", help="also write every row to this JSON file")
    a = ap.parse_args(argv)
    systems = a.systems.split(",")
    models = [acceptance(s) for s in a.acceptance]
    base = load_trace(a.trace, keep_prompts=False)
    rows = []
    print("| requests | acceptance | time scale | " + " | ".join(systems) + " |")
    print("|---|---|---|" + "---|" * len(systems))
    for n in (int(x) for x in a.requests.split(",")):
        for scale in (float(x) for x in a.scales.split(",")):
            records = [replace(r, emission_time_ms=r.emission_time_ms * scale,
                               output_length=min(r.output_length, a.output_cap)) for r in base[:n]]
            for name, model in models:
                cells = []
                for system in systems:
                    s = simulate_records(records, system, a.profile, scale_slos=True, acceptance=model).summary
                    rows.append({"requests": n, "scale": scale, "acceptance": name, "system": system,
                                 "attainment": s["slo_attainment"], "joint": s["joint_attainment"],
                                 "tokens_per_step": s["mean_generated_tokens_per_step"]})
                    cells.append(f"{100 * s['slo_attainment']:.1f} / {100 * s['joint_attainment']:.1f} / "
                                 f"{s['mean_generated_tokens_per_step']:.2f}")
                print(f"| {n} | {name} | {scale:g} | " + " | ".join(cells) + " |", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
