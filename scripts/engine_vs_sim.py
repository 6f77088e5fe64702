"""Our engine against the simulator that models it (issue 14, item 6; docs/fidelity.md).

    python scripts/engine_vs_sim.py run --trace T --out DIR [--systems adaserve,vllm,...]
        [--scales 4,1] [--requests 16] [--output-len 48] [--repeat 1] [--model smollm2-135m]
    python scripts/engine_vs_sim.py table DIR [--profile P]
    python scripts/engine_vs_sim.py steps PROFILE STEPS.jsonl [--system S]
    python scripts/engine_vs_sim.py retime PROFILE STEPS.jsonl [--sample 16] [--kind decode|prefill]

``run``, per repeat ``k``: measures a profile (``adaserve profile``, DIR/profile-k.json) right
before that repeat's engine runs, then for every time scale and system runs ``adaserve run``
(through scripts/engine_steps.py, which also logs every iteration) with the recorded acceptance,
writing DIR/x<scale>/<system>-k.{json,txt,acc.jsonl,steps.jsonl}. The load average before and
after each measurement goes to DIR/load.jsonl: on a shared machine the load moves step times by
more than the systems differ, so profile and runs must be taken under the same load.

``run --bracket``: the repeat's profile is measured again after its runs (DIR/profile-k-after.json),
and ``table`` prices those runs with the per-point mean of the two (DIR/profile-k-bracket.json;
``--before-only``: the first alone). Why: the VM's speed drifts by several percent within the
minutes a repeat takes (docs/fidelity.md), so a profile measured only before the runs prices the
later ones with the speed of the past.

``run --cpu-clock``: the profile and the engine runs on the CPU-time clock (scripts/engine_steps.py):
on a shared machine, the time spent waiting for a core is left out of both.

``run --reference``: right after each profile and right before and after each run, a fresh process
times two reference steps (``reference``: a one-token decode step over 128 context tokens, which
reads every weight once, and a 256-token prefill chunk, bound by arithmetic) into
DIR/reference.jsonl. ``table --drift`` then prices each run with its repeat's profile scaled by how
much slower or faster the machine ran the references around that run than around the profile: the
decode tables (``verify``, the compiled steps, attention queries, the baseline) by the decode
reference's ratio, the prefill table by the prefill reference's; host work and drafting as
measured. Why: a profile is measured minutes before or after a run, and this VM's speed moves by
several percent within minutes. On the 2-core VM the references turned out about as noisy as the
drift they measure (docs/fidelity.md, "Claimed KV blocks"): ``--drift`` is a second reading, not
the verdict, and reference.jsonl shows when a run met a slow machine.

``table``: simulates every engine run (``adaserve.sim.compare.engine_vs_sim``: same requests, SLOs,
baseline, the repeat's profile unless ``--profile``, the run's recorded acceptance) and prints, per
time scale and system, the medians over repeats of attainment, goodput, tokens per step, mean
TPOT, mean TTFT and iterations, engine against simulator, with the simulator's error (attainment:
in points; the others: relative) and the mean per-request TPOT error.

``table --old-model`` prices the same runs as the simulator did before (one verify-table lookup
per step at the total context, no host work, drafting from the per-level table). ``table --replay
records`` replays the per-position acceptance records even where a recording holds the run's token
ids (by default the simulator then runs the n-gram drafter over them: ``adaserve.sim.ngram_replay``).

``steps``: prices each logged iteration with the profile's step model and prints, per kind of step
(prefill only, decode only, mixed), the measured forward / drafting / host time against the price
(the host at the system's own row where the profile has one: ``LatencyProfile.for_system``).

``reference``: times the two reference steps once and prints them as one JSON line.

``retime``: a sample of the logged decode-only steps timed again in isolation (``StepBench``: a
fresh KV cache, each sequence's blocks claimed as the engine claims them, the same contexts and
tree sizes, each tree as a chain; median of 5 after a warm-up, on the profile's clock), beside the forward the engine logged in its run and the profile's price: which
part of an error is the profile's pricing of a step (re-timed vs priced) and which the step costing
more inside the run than alone (logged vs re-timed). ``--kind prefill``: the steps of one prompt's
first chunk alone instead, re-timed as the profile times its prefill table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adaserve.core.profile import LatencyProfile  # noqa: E402
from adaserve.sim.acceptance import AcceptanceRecordError, load_records  # noqa: E402
from adaserve.sim.compare import engine_vs_sim, tpot_error  # noqa: E402
from adaserve.sim.executor import engine_step_ms, table_step_ms  # noqa: E402

SYSTEMS = "adaserve,adaserve_plus,vllm,sarathi,vllm_spec_4,specinfer"
METRICS = (("attainment", 100, "%"), ("goodput", 1, ""), ("tokens_per_step", 1, ""),
           ("tpot_mean", 1, "ms"), ("ttft_mean", 1, "ms"), ("iterations", 1, ""))


def load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def _log_load(out: Path, what: str, phase: str) -> None:
    with open(out / "load.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"what": what, "phase": phase, "time": time.strftime("%H:%M:%S"),
                            "loadavg": load_average()}) + "\n")


def _adaserve(args: list[str], steps: Path | None = None, cpu_clock: bool = False) -> None:
    """One ``adaserve`` command; with ``steps``, through engine_steps.py (its log, optionally the
    CPU clock); ``cpu_clock`` also puts ``adaserve profile`` on the CPU clock."""
    if steps:
        cmd = [sys.executable, str(ROOT / "scripts" / "engine_steps.py"), str(steps),
               *(["--cpu-clock"] if cpu_clock else []), "--"]
    else:
        cmd = [str(Path(sys.executable).parent / "adaserve")]
    subprocess.run(cmd + args, check=True, cwd=ROOT, env=_clock_env(cpu_clock))


def _clock_env(cpu_clock: bool) -> dict[str, str]:
    """This process's environment with the profiler's clock set (``ADASERVE_PROFILE_CLOCK``)."""
    return {**os.environ, "ADASERVE_PROFILE_CLOCK": "cpu" if cpu_clock else "wall"}


def _model(name: str):
    """The target model alone, as ``adaserve run --threads 1`` loads it."""
    from adaserve.config import EngineConfig
    from adaserve.runtime.build import load_models

    return load_models(EngineConfig(model=name, drafter="ngram", threads=1), say=lambda _: None)[0]


def run(a: argparse.Namespace) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--model", a.model, "--drafter", "ngram", "--threads", "1"]
    def measure(profile: Path) -> None:
        _log_load(out, profile.name, "before")
        _adaserve(["profile", *common, "--out", str(profile), "--no-progress", "--passes", str(a.profile_passes)],
                  cpu_clock=a.cpu_clock)
        _log_load(out, profile.name, "after")
        if a.reference:
            _reference(out, profile.name, "after", a)

    for k in range(a.first, a.first + a.repeat):
        profile = out / f"profile-{k}.json"
        measure(profile)
        for scale in a.scales.split(","):
            d = out / f"x{scale}"
            d.mkdir(exist_ok=True)
            for system in a.systems.split(","):
                prefix = d / f"{system}-{k}"
                _log_load(out, str(prefix), "before")
                if a.reference:
                    _reference(out, f"{d.name}/{prefix.name}", "before", a)
                _adaserve(["run", "--trace", a.trace, "--system", system, *common, "--profile", str(profile),
                           "--max-requests", str(a.requests), "--output-len-cap", str(a.output_len),
                           "--time-scale", scale, "--scale-slos", "--ignore-eos", "--no-progress",
                           "--record-acceptance", f"{prefix}.acc.jsonl", "--out", str(prefix)],
                          steps=Path(f"{prefix}.steps.jsonl"), cpu_clock=a.cpu_clock)
                _log_load(out, str(prefix), "after")
                if a.reference:
                    _reference(out, f"{d.name}/{prefix.name}", "after", a)
        if a.bracket:  # the same profile again, after the runs: ``table`` prices them with the mean of the two
            measure(out / f"profile-{k}-after.json")


AXES = ("tokens", "context_tokens")  # a profile table's grid: equal in profiles that are averaged
REFERENCE_DECODE = (1, 1, 128)  # sequences, new tokens, context tokens: reads every weight once
REFERENCE_PREFILL = 256  # tokens of one prefill chunk: bound by arithmetic
# the profile's timings each reference scales (``table --drift``): field paths, lists or numbers
DECODE_FIELDS = ("baseline_ms", "verify/ms", "verify/ms_by_context", "attention_queries/ms", "compiled_steps/keys/ms")
PREFILL_FIELDS = ("prefill/ms", "prefill/ms_by_context")


def reference(a: argparse.Namespace) -> None:
    import torch

    from adaserve.runtime.profiler import StepBench

    model = _model(a.model)
    with torch.inference_mode():
        bench = StepBench(model, 2 * REFERENCE_PREFILL)
        decode = bench.step_ms(*REFERENCE_DECODE, repeat=15)
        prefill = bench.prefill_ms(REFERENCE_PREFILL, repeat=5)
    print(json.dumps({"decode_ms": round(decode, 4), "prefill_ms": round(prefill, 4)}))


def _reference(out: Path, what: str, phase: str, a: argparse.Namespace) -> None:
    """The reference steps timed in a fresh process (on the profile's clock), appended to
    DIR/reference.jsonl for ``what`` (a profile's file name or a run's ``x<scale>/<system>-<k>``)."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "reference", "--model", a.model],
                          check=True, cwd=ROOT, env=_clock_env(a.cpu_clock), capture_output=True, text=True)
    line = {"what": what, "phase": phase, "time": time.strftime("%H:%M:%S"),
            **json.loads(done.stdout.strip().splitlines()[-1])}
    with open(out / "reference.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def reference_ms(out: Path, what: list[str]) -> tuple[float, float]:
    """Mean decode and prefill reference ms over every line of DIR/reference.jsonl for ``what``."""
    path = out / "reference.jsonl"
    if not path.exists():
        raise SystemExit(f"{path}: missing; --drift needs runs made with run --reference")
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    mine = [x for x in lines if x["what"] in what]
    missing = set(what) - {x["what"] for x in mine}
    if missing:
        raise SystemExit(f"{path}: no reference for {', '.join(sorted(missing))}")
    return (statistics.fmean(x["decode_ms"] for x in mine), statistics.fmean(x["prefill_ms"] for x in mine))


def scaled_profile(doc: dict, decode: float, prefill: float) -> dict:
    """A copy of the profile JSON ``doc`` with its decode timings times ``decode`` and its prefill
    timings times ``prefill`` (``DECODE_FIELDS``, ``PREFILL_FIELDS``; fields it lacks are skipped)."""
    doc = json.loads(json.dumps(doc))

    def scale(x, f):
        return [scale(v, f) for v in x] if isinstance(x, list) else x * f

    for fields, f in ((DECODE_FIELDS, decode), (PREFILL_FIELDS, prefill)):
        for path in fields:
            *parents, leaf = path.split("/")
            node = doc
            for key in parents:
                node = node.get(key) if isinstance(node, dict) else None
            if isinstance(node, dict) and leaf in node:
                node[leaf] = scale(node[leaf], f)
    return doc


def drift_profile(out: Path, k: str, run: str, profile: Path, a: argparse.Namespace) -> Path:
    """``profile`` (repeat ``k``'s, as ``repeat_profile`` chose it) scaled by the reference steps
    around ``run`` (``x<scale>/<system>-<k>``) over those right after the profile(s) it averages."""
    if a.profile:
        raise SystemExit("--drift scales each repeat's own profile: it cannot be used with --profile")
    bracketed = profile.name.endswith("-bracket.json")
    names = [f"profile-{k}.json"] + ([f"profile-{k}-after.json"] if bracketed else [])
    at_profile, at_run = reference_ms(out, names), reference_ms(out, [run])
    decode, prefill = at_run[0] / at_profile[0], at_run[1] / at_profile[1]
    scaled = out / "drift" / f"{run.replace('/', '-')}.json"
    scaled.parent.mkdir(exist_ok=True)
    doc = scaled_profile(json.loads(profile.read_text(encoding="utf-8")), decode, prefill)
    scaled.write_text(json.dumps(doc), encoding="utf-8")
    return scaled


def mean_profile(docs: list[dict], where: str = "profile") -> dict:
    """The per-point mean of profiles measured on the same grid (their JSON): every timing (a float,
    or a list of them that is not an axis) averaged; axes, limits and labels must agree, else
    ``ValueError`` names the field."""
    first = docs[0]
    if isinstance(first, dict):
        if any(not isinstance(d, dict) or d.keys() != first.keys() for d in docs):
            raise ValueError(f"{where}: the profiles have different fields")
        return {k: mean_profile([d[k] for d in docs], f"{where}/{k}") for k in first}
    if isinstance(first, list):
        if any(not isinstance(d, list) or len(d) != len(first) for d in docs):
            raise ValueError(f"{where}: the profiles' grids differ")
        if where.rsplit("/", 1)[-1] in AXES:
            if any(d != first for d in docs):
                raise ValueError(f"{where}: the profiles' grids differ")
            return first
        return [mean_profile(list(col), f"{where}[{i}]") for i, col in enumerate(zip(*docs))]
    if isinstance(first, float):
        return sum(docs) / len(docs)
    if any(d != first for d in docs):
        raise ValueError(f"{where}: the profiles differ ({first!r} against {next(d for d in docs if d != first)!r})")
    return first


def repeat_profile(out: Path, k: str, a: argparse.Namespace) -> Path:
    """The profile that prices repeat ``k``: ``--profile``, else the mean of the profiles measured
    before and after its runs where ``run --bracket`` measured both (written beside them), else the
    one before."""
    if a.profile:
        return Path(a.profile)
    before, after = out / f"profile-{k}.json", out / f"profile-{k}-after.json"
    if not after.exists() or a.before_only:
        return before
    both = out / f"profile-{k}-bracket.json"
    docs = [json.loads(p.read_text(encoding="utf-8")) for p in (before, after)]
    both.write_text(json.dumps(mean_profile(docs)), encoding="utf-8")
    return both


def _median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def old_model(profile: Path) -> Path:
    """A copy of ``profile`` that the simulator prices as it did before issue 14's item 6: one
    table lookup per step, no host work, drafting from the per-level table, draft prefill charged."""
    d = json.loads(profile.read_text(encoding="utf-8"))
    d["step_model"] = "table"
    d.pop("host", None)
    d.pop("host_systems", None)
    d.get("measured_with", {}).pop("drafter", None)
    path = profile.with_suffix(".old-model.json")
    path.write_text(json.dumps(d), encoding="utf-8")
    return path


def table(a: argparse.Namespace) -> None:
    out = Path(a.dir)
    print("| load | system | runs | " + " | ".join(f"{m} engine / sim (err)" for m, _, _ in METRICS)
          + " | per-request TPOT err |")
    print("|---|---|---|" + "---|" * (len(METRICS) + 1))
    profiles: dict[str, Path] = {}  # per repeat, made once (a bracketing mean is written to a file)
    for d in sorted(out.glob("x*"), key=lambda p: -float(p.name[1:])):
        systems: dict[str, list[Path]] = {}
        for js in sorted(d.glob("*.json")):
            systems.setdefault(js.stem.rsplit("-", 1)[0], []).append(js)
        for system, runs in systems.items():
            pairs, errs = [], []
            for js in runs:
                k = js.stem.rsplit("-", 1)[1]
                if k not in profiles:
                    profile = repeat_profile(out, k, a)
                    profiles[k] = old_model(profile) if a.old_model else profile
                profile = profiles[k]
                if a.drift:
                    profile = drift_profile(out, k, f"{d.name}/{js.stem}", profile, a)
                acc = js.with_suffix(".acc.jsonl")  # token lines only for systems that do not speculate
                acc = acc if acc.exists() and acc.stat().st_size else None
                if acc is not None and a.replay == "records" and not load_records_or_none(acc):
                    acc = None  # token lines only: a run that never drafted
                eng, sim = engine_vs_sim(js, profile, acc, replay=a.replay)
                pairs.append((eng, sim))
                errs.append(tpot_error(eng, sim))
            cells = []
            for m, scale, unit in METRICS:
                e, s = _median([p[0][m] for p in pairs]), _median([p[1][m] for p in pairs])
                cells.append(_cell(m, scale, unit, e, s))
            tp = _median(errs)
            print(f"| {d.name} | {system} | {len(pairs)} | " + " | ".join(cells)
                  + (f" | {100 * tp:.0f}% |" if tp is not None else " | - |"))


def load_records_or_none(path: Path) -> dict | None:
    """The recording's per-position records, None where it holds none (token lines only)."""
    try:
        return load_records(path)
    except AcceptanceRecordError:
        return None


def _cell(metric: str, scale: float, unit: str, e: float | None, s: float | None) -> str:
    """``engine / sim (error)``: attainment's error in points (the goal is within 5), the others'
    relative to the engine."""
    if e is None or s is None:
        return "-"
    if metric == "attainment":
        err = f"{scale * (s - e):+.1f} pt"
    else:
        err = f"{100 * (s / e - 1):+.0f}%" if e else "-"
    return f"{scale * e:.1f} / {scale * s:.1f}{unit} ({err})"


def _decode_kind(trees: list[tuple]) -> str:
    """Decode steps by the padded key slots of their attention call (requests x longest keys)."""
    slots = len(trees) * max(c + n for c, n in trees)
    return "decode, padded slots " + ("< 1k" if slots < 1000 else "1k-4k" if slots < 4000 else ">= 4k")


def steps(a: argparse.Namespace) -> None:
    system = a.system or Path(a.steps).name.split(".", 1)[0].rsplit("-", 1)[0]  # x4/adaserve_plus-2.steps.jsonl
    prof = LatencyProfile.load(a.profile).for_system(system)
    cpu = prof.measured_with.get("clock") == "cpu"  # compare like with like: the step log has both
    print(f"clock: {'thread CPU time' if cpu else 'wall'} (the profile's)")
    kinds: dict[str, dict[str, float]] = {}
    for line in open(a.steps, encoding="utf-8"):
        r = json.loads(line)
        if "prefill" not in r and "decode" not in r:  # the serving warm-up (logs before 2026-11-28)
            continue
        if cpu:
            r = {k[:-7] + "_ms" if k.endswith("_cpu_ms") else k: v for k, v in r.items() if not k.endswith("_ms")
                 or k.endswith("_cpu_ms")}
        chunks = [tuple(x) for x in r.get("prefill", [])]
        trees = [tuple(x) for x in r.get("decode", [])]
        kind = "mixed" if chunks and trees else "prefill" if chunks else _decode_kind(trees)
        k = kinds.setdefault(kind, dict.fromkeys(("n", "forward", "price", "draft", "host", "host_price"), 0.0))
        k["n"] += 1
        k["forward"] += r.get("forward_ms", 0.0)
        k["price"] += (table_step_ms(prof, sum(c for c, _ in chunks), sum(p for _, p in chunks),
                                     sum(n for _, n in trees) if trees else None, sum(c for c, _ in trees))
                       if a.old_model else engine_step_ms(prof, chunks, trees))
        k["draft"] += r.get("speculate_ms", 0.0)
        k["host"] += r["iteration_ms"] - r.get("forward_ms", 0.0) - r.get("speculate_ms", 0.0)
        # as the simulator: every iteration, prefill-only ones too (host_ms at one request)
        k["host_price"] += 0.0 if a.old_model else prof.host_ms(len(trees), "speculate_ms" in r,
                                                                 tree=any(n > 1 for _, n in trees))
    print(f"{'step kind':30} {'steps':>5} {'forward ms':>11} {'priced':>8} {'err':>6} {'draft ms':>9} "
          f"{'host ms':>8} {'host priced':>12}  (means per step)")
    for kind, k in sorted(kinds.items()):
        n = k["n"]
        print(f"{kind:30} {n:5.0f} {k['forward'] / n:11.1f} {k['price'] / n:8.1f} "
              f"{100 * (k['price'] / k['forward'] - 1):+5.0f}% {k['draft'] / n:9.2f} {k['host'] / n:8.2f} "
              f"{k['host_price'] / n:12.2f}")


def retime(a: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from adaserve.engine.kv_cache import BLOCK_SIZE
    from adaserve.runtime.profiler import StepBench

    prof = LatencyProfile.load(a.profile)
    if prof.measured_with.get("clock") == "cpu":
        os.environ["ADASERVE_PROFILE_CLOCK"] = "cpu"
    key = "forward_cpu_ms" if prof.measured_with.get("clock") == "cpu" else "forward_ms"
    records = list(map(json.loads, open(a.steps, encoding="utf-8")))
    if a.kind == "decode":
        logged = [r for r in records if r.get("decode") and not r.get("prefill")]
    else:  # a prompt's first chunk alone: the profile's prefill table times that shape
        logged = [r for r in records if not r.get("decode") and len(r.get("prefill") or []) == 1
                  and r["prefill"][0][1] == 0]
    if not logged:
        raise SystemExit(f"{a.steps}: no {'decode-only' if a.kind == 'decode' else 'first-chunk prefill'} step")
    pick = np.random.default_rng(a.seed).choice(len(logged), min(a.sample, len(logged)), replace=False)
    model = _model(a.model)
    rows = []
    print(f"{'requests':>8} {'tokens':>6} {'context':>7} {'logged ms':>10} {'re-timed':>9} {'priced':>7}")
    with torch.inference_mode():
        for i in sorted(pick.tolist()):
            if a.kind == "prefill":
                (chunk, _), = logged[i]["prefill"]
                alone = StepBench(model, chunk + BLOCK_SIZE).prefill_ms(chunk, 5)
                rows.append((1, chunk, 0, logged[i][key], alone, engine_step_ms(prof, [(chunk, 0)], [])))
            else:
                trees = [tuple(t) for t in logged[i]["decode"]]
                bench = StepBench(model, sum(c + n + BLOCK_SIZE for c, n in trees))
                alone = bench.chains_ms([c for c, _ in trees], [n for _, n in trees], 5)
                rows.append((len(trees), sum(n for _, n in trees), sum(c for c, _ in trees), logged[i][key], alone,
                             engine_step_ms(prof, [], trees)))
            print("{:8d} {:6d} {:7d} {:10.1f} {:9.1f} {:7.1f}".format(*rows[-1]), flush=True)
    m = np.array(rows, float)[:, 3:].mean(0)
    print(f"means: logged {m[0]:.1f}, re-timed {m[1]:.1f} ({100 * (m[1] / m[0] - 1):+.0f}%), "
          f"priced {m[2]:.1f} ({100 * (m[2] / m[1] - 1):+.0f}% of re-timed)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--trace", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--systems", default=SYSTEMS)
    r.add_argument("--scales", default="4,1")
    r.add_argument("--requests", type=int, default=16)
    r.add_argument("--output-len", type=int, default=48)
    r.add_argument("--repeat", type=int, default=1)
    r.add_argument("--first", type=int, default=0, help="index of the first repeat (to add repeats)")
    r.add_argument("--model", default="smollm2-135m")
    r.add_argument("--profile-passes", type=int, default=1, help="adaserve profile --passes (median per point)")
    r.add_argument("--bracket", action="store_true",
                   help="measure the profile again after each repeat's runs (profile-K-after.json); "
                        "table prices the runs with the mean of the two")
    r.add_argument("--cpu-clock", action="store_true",
                   help="profile and engine on this thread's CPU time (waits for a core left out)")
    r.add_argument("--reference", action="store_true",
                   help="time two reference steps after each profile and around each run (reference.jsonl)")
    t = sub.add_parser("table")
    t.add_argument("dir")
    t.add_argument("--profile", help="simulate every run with this profile instead of its repeat's")
    t.add_argument("--old-model", action="store_true",
                   help="price steps as before issue 14's item 6 (one table lookup, no host work)")
    t.add_argument("--drift", action="store_true",
                   help="scale each run's profile by the reference steps around the run over those "
                        "around the profile (runs made with run --reference)")
    t.add_argument("--before-only", action="store_true",
                   help="price each repeat with the profile measured before its runs even where "
                        "run --bracket measured one after them too")
    t.add_argument("--replay", choices=("auto", "records"), default="auto",
                   help="auto: run the n-gram drafter over each run's recorded token ids where the "
                        "recording has them; records: replay the per-position records (as before 2026-11-28)")
    s = sub.add_parser("steps")
    s.add_argument("profile")
    s.add_argument("steps")
    s.add_argument("--old-model", action="store_true", help="price as before item 6 (one table lookup)")
    s.add_argument("--system", help="whose host row prices the host work (default: from the file name, "
                                    "SYSTEM-K.steps.jsonl as run writes it)")
    ref = sub.add_parser("reference")
    ref.add_argument("--model", default="smollm2-135m")
    rt = sub.add_parser("retime")
    rt.add_argument("profile")
    rt.add_argument("steps")
    rt.add_argument("--sample", type=int, default=16, help="steps drawn from the log")
    rt.add_argument("--kind", choices=("decode", "prefill"), default="decode",
                    help="decode-only steps, or steps of one prompt's first chunk alone")
    rt.add_argument("--seed", type=int, default=0)
    rt.add_argument("--model", default="smollm2-135m")
    a = ap.parse_args(argv)
    {"run": run, "table": table, "steps": steps, "retime": retime, "reference": reference}[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
