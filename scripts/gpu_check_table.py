"""The table at the end of scripts/gpu-check.sh: one Markdown table from the JSON results in a work
folder (``bench-<shape>-graphs-<on|off>.json`` from ``adaserve bench engine --json``,
``run-<system>.json`` from ``adaserve run``, ``run-<system>-x<time scale>.json`` for arrivals at
another time scale, ``run-<system>-cycles[-x<scale>].json`` on the cycling checkpoint (a column of
its own), ``run-adaserve[-cycles]-parts1[-x<scale>].json`` without split steps (SPLIT_AB),
``run-adaserve[-cycles]-densemask[-x<scale>].json`` with dense host-built masks (MASK_AB),
``run-adaserve[-cycles]-paged[-x<scale>].json`` and ``floor-paged.json`` with the paged attention kernel
(PAGED_AB), each with its iteration log ``.steps.jsonl`` from scripts/engine_steps.py). Missing files (a failed step) leave their cells
empty. Where the work folder also holds the profile the runs used (``profile-<shape>.json``) and
their recorded acceptance (``run-<system>.acc.jsonl``), each run is simulated with them
(``adaserve.sim.compare.engine_vs_sim``, issue 14) and the simulator's numbers stand beside the
engine's with its relative error. Usage: ``python scripts/gpu_check_table.py WORK``."""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BENCH = re.compile(r"bench-(?P<shape>.+)-graphs-(?P<graphs>on|off)\.json")
RUN = re.compile(r"run-(?P<system>[a-z0-9_]+)(?:-cycles)?(?:-parts1|-densemask|-paged)?(?:-x(?P<scale>[0-9.]+))?\.json")


def _load(path: Path) -> dict | list | None:
    """The JSON in ``path``; None (with a note on stderr) for an empty or cut-off file, e.g. a step
    killed by its caller's time limit before the script could remove its partial output."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"gpu_check_table: skipping {path.name}: {e}", file=sys.stderr)
        return None


def _num(x, digits=2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def bench_rows(files: list[Path]) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Columns (one per shape and graphs setting) and rows (measure -> column -> cell)."""
    cols, rows = [], {}

    def put(measure: str, col: str, value: str) -> None:
        rows.setdefault(measure, {})[col] = value

    for f in files:
        m = BENCH.fullmatch(f.name)
        doc = _load(f)
        if doc is None:
            continue
        col = f"{m['shape']} graphs {m['graphs']}"
        cols.append(col)
        put("1-token decode step, batch 1 (quick profile) ms", col, _num(doc.get("baseline_ms")))
        for r in doc.get("overhead", []):
            what = f"{r['mode']} step, {r['requests']} req ({r['tokens_per_step']:.0f} tok)"
            put(f"{what}: forward ms", col, _num(r["forward_ms"]))
            put(f"{what}: engine / forward", col, _num(r["ratio"], 3))
        for r in doc.get("host", []):
            put(f"host work per iteration, {r['requests']} req ms", col, _num(r["host_ms"], 3))
            if r.get("host_replayed_ms") is not None:
                put(f"host work per iteration, {r['requests']} req, forward replayed ms", col,
                    _num(r["host_replayed_ms"], 3))
        for r in doc.get("generation", []):
            extra = f" ({r['same_as_hf']}/{r['batch']} same as generate)" if r.get("same_as_hf") is not None else ""
            put(f"generate tok/s, {r['system']}, batch {r['batch']}", col, _num(r["tokens_per_s"], 1) + extra)
    return cols, rows


def run_cells(files: list[Path]) -> list[tuple[str, str, str]]:
    """(measure, column, cell) of every ``adaserve run`` result; the column is its shape and
    graphs setting, like the benchmark's."""
    out = []
    for f in files:
        doc = _load(f)
        if doc is None:
            continue
        s, meta = doc["summary"], doc["meta"]
        iters = meta.get("iterations") or 0
        graphs = meta.get("cuda_graphs")
        shape = Path(meta["model"]).name.removeprefix("ckpt-")
        col = f"{shape} graphs {'on' if graphs else 'off'}"
        what = f"adaserve run {meta['system']}, {s.get('registered')} requests"
        if graphs and meta.get("graph_parts") == 1:  # SPLIT_AB's run: no step split into graphed parts
            what += ", graph parts 1"
        if meta.get("mask_windows") is False and meta.get("device", "").startswith("cuda"):  # MASK_AB's run
            what += ", dense masks"
        if meta.get("paged_attention"):  # PAGED_AB's run
            what += ", paged attention"
        if meta.get("time_scale", 1) != 1:
            what += f", time scale {meta['time_scale']:g}"
        out.append((f"{what}: SLO attainment %", col, _num(s.get("slo_attainment_pct"), 1)))
        out.append((f"{what}: wall ms per iteration", col, _num(1e3 * meta["wall_s"] / iters if iters else None, 1)
                    + f" ({iters} iterations)"))
        out.append((f"{what}: tokens per request-step", col, _num(s.get("mean_generated_tokens_per_step"))))
        out.extend((f"{what}: {m}", col, cell) for m, cell in iteration_cells(f.with_suffix(".steps.jsonl")))
        if graphs:
            split = f", {graphs['split_steps']} as one graph per attention call" if "split_steps" in graphs else ""
            if graphs.get("packed_steps"):
                split += f" ({graphs['packed_steps']} with the shared call in packs)"
            out.append((f"{what}: steps replayed as graphs", col,
                        f"{graphs['graph_steps']}/{graphs['graph_steps'] + graphs['eager_steps']}{split}"))
        warm = meta.get("warmup")
        if warm:
            out.append((f"{what}: warm-up s (graphs captured ahead)", col,
                        f"{warm['serving_s'] + warm['graphs_s']:.1f} ({warm['graphs']})"))
        # the profile the run was given (a cycling checkpoint shares its shape's), else its shape's
        given = f.parent / Path(meta.get("profile") or "").name
        profile = given if given.is_file() else f.parent / f"profile-{shape}.json"
        out.extend((f"{what}: {m}", col, cell) for m, cell in simulated_cells(f, profile))
    return out


def iteration_cells(steps: Path) -> list[tuple[str, str]]:
    """(measure, cell) of the run's logged iterations (scripts/engine_steps.py): the median wall
    time of an iteration with decode work and no prefill chunk (AdaServe's iteration against vLLM's,
    issue 12), of one holding a prefill chunk (on an H200 these cost 60-180 ms: docs/engine.md,
    "GPU results"), and of all iterations; nothing when the log is missing."""
    if not steps.is_file():
        return []
    recs = [json.loads(line) for line in steps.read_text().splitlines() if line.strip()]
    decode = [r["iteration_ms"] for r in recs if r.get("decode") and not r.get("prefill")]
    prefill = [r["iteration_ms"] for r in recs if r.get("prefill")]
    every = [r["iteration_ms"] for r in recs if "iteration_ms" in r]
    med = lambda xs: _num(statistics.median(xs), 2) + f" ({len(xs)})" if xs else ""  # noqa: E731
    cells = [("median ms per decode-only iteration (count)", med(decode)),
             ("median ms per iteration with a prefill chunk (count)", med(prefill)),
             ("median ms per iteration (count)", med(every))]
    # CUDA: the forward's host time (its launches) against its span on the GPU (scripts/engine_steps.py)
    for label, keep in (("decode-only", lambda r: r.get("decode") and not r.get("prefill")),
                        ("with a prefill chunk", lambda r: r.get("prefill"))):
        both = [(r["forward_ms"], r["forward_device_ms"]) for r in recs if keep(r) and "forward_device_ms" in r]
        if both:
            cells.append((f"median forward ms, host / GPU span, iterations {label}",
                          f"{statistics.median(h for h, _ in both):.2f} / {statistics.median(d for _, d in both):.2f}"))
    return cells


SIM_MEASURES = (("attainment", "SLO attainment % (engine / simulated)", 100, 1),
                ("tpot_mean", "mean TPOT ms (engine / simulated)", 1, 1),
                ("tokens_per_step", "tokens per step (engine / simulated)", 1, 2))


def simulated_cells(run: Path, profile: Path) -> list[tuple[str, str]]:
    """(measure, cell) of the run against its simulation from ``profile`` and the run's recorded
    acceptance; nothing when the profile is missing, a note when the simulation fails."""
    if not profile.is_file():
        return []
    acc = run.with_suffix(".acc.jsonl")
    try:
        from adaserve.sim.compare import engine_vs_sim
        eng, sim = engine_vs_sim(run, profile, acc if acc.is_file() and acc.stat().st_size else None)
    except Exception as e:  # one failed comparison must not lose the rest of the table
        return [("simulated", f"failed: {type(e).__name__}: {e}")]
    cells = []
    for key, label, scale, digits in SIM_MEASURES:
        e, s = eng.get(key), sim.get(key)
        err = f" ({100 * (s / e - 1):+.0f}%)" if e and s is not None else ""
        cells.append((label, f"{_num(None if e is None else scale * e, digits)} / "
                             f"{_num(None if s is None else scale * s, digits)}{err}"))
    return cells


def paged_comparison(floor: list[dict], paged: list[dict]) -> str:
    """The graphed steps of the weight-floor table with gather + SDPA and with the paged attention
    kernel side by side, and the verdict that decides the kernel's default: on only if it is
    faster in every step (prefill chunks do not use it, so they are left out)."""
    lines = ["| shape | step | gather + SDPA ms | paged ms | paged / gather |", "|---|---|---|---|---|"]
    ratios = []
    for base in floor:
        other = next((r for r in paged if r["shape"] == base["shape"]), None)
        steps = base["steps"].get("graphs on", {})
        theirs = (other or {}).get("steps", {}).get("graphs on", {})
        for label, ms in steps.items():
            if label in theirs:
                ratios.append(theirs[label] / ms)
                lines.append(f"| {base['shape']} | {label} | {ms:.3f} | {theirs[label]:.3f} | {ratios[-1]:.2f} |")
    if not ratios:
        return "(paged attention: no graphed step measured both ways)"
    faster = sum(r < 1 for r in ratios)
    verdict = ("on by default" if faster == len(ratios) else "stays off by default")
    lines += ["", f"Paged attention is faster in {faster} of {len(ratios)} graphed steps (median paged / gather "
                  f"{statistics.median(ratios):.2f}): {verdict} (ADASERVE_PAGED_ATTENTION)."]
    return "\n".join(lines)


def table(work: Path) -> str:
    bench = sorted(p for p in work.iterdir() if BENCH.fullmatch(p.name))
    runs = sorted(p for p in work.iterdir() if RUN.fullmatch(p.name))
    floor = _load(work / "floor.json") if (work / "floor.json").is_file() else None
    if not bench and not runs and not floor:
        return "(no results: every measuring step failed)"
    from adaserve.runtime.weight_floor import table as floor_table

    head = floor_table(floor) + "\n\n" if floor else ""
    paged = _load(work / "floor-paged.json") if (work / "floor-paged.json").is_file() else None
    if paged:  # PAGED_AB: the same steps with the paged attention kernel
        head += "With ADASERVE_PAGED_ATTENTION=1:\n\n" + floor_table(paged) + "\n\n"
        if floor:
            head += paged_comparison(floor, paged) + "\n\n"
    masks = work / "mask-build.md"  # scripts/bench_mask_build.py's own table
    tail = "\n\n" + masks.read_text().strip() if masks.is_file() and masks.stat().st_size else ""
    if not bench and not runs:
        return (head + tail.lstrip()).rstrip()
    cols, rows = bench_rows(bench)
    for measure, col, cell in run_cells(runs):
        if col not in cols:
            cols.append(col)
        rows.setdefault(measure, {})[col] = cell
    lines = ["| measure | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for measure, cells in rows.items():
        lines.append(f"| {measure} | " + " | ".join(cells.get(c, "") for c in cols) + " |")
    return head + "\n".join(lines) + tail


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python scripts/gpu_check_table.py WORK_FOLDER")
    print(table(Path(sys.argv[1])))
