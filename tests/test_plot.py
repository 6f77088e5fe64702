"""`adaserve plot` and the headline table on small hand-made result trees (plus one tiny
simulator-made tree, so the real summary shape is covered too)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from adaserve.cli import main
from adaserve.core.results import write_results
from adaserve.harness import headline as hl
from adaserve.harness import plot


# ------------------------------------------------------------------------------------ helpers

def summary(att: float | None, goodput: float | None, *, tps: float | None = 4.0,
            completed: int = 1000, overhead_us: dict | None = None) -> dict:
    """A minimal summary of the shape ``metrics.summarize`` returns (what the writers need)."""
    attained = None if att is None else round(att * completed)
    oh = None
    if overhead_us is not None:
        total = sum(overhead_us.values())
        oh = {"total_us": total, "us": dict(overhead_us),
              "share": {k: v / total for k, v in overhead_us.items()}}
    cat = {"registered": completed, "completed": completed, "slo_attainment": att,
           "goodput": goodput, "tpot_ms": {"mean": 30.0}}
    return {"total_time_ms": 1000.0, "registered": completed, "completed": completed,
            "attained": attained, "slo_attainment": att, "total_tokens": 1000,
            "throughput_tokens_per_sec": goodput, "goodput": goodput,
            "mean_generated_tokens_per_step": tps, "per_category": {"coding": cat},
            "overhead": oh, "rejected": 0}


def put(root: Path, fig: str, model: str, system: str, point: str, s: dict,
        sweep: dict | None = None) -> None:
    meta = {"backend": "test", "system": system}
    if sweep is not None:
        meta["sweep"] = sweep
    write_results(root / fig / model / system / point, s, [], meta)


FIG89 = {  # system -> {rps: (attainment, goodput, tokens/step)}; vllm lacks rps 3.0
    "adaserve": {2.6: (1.0, 600, 6.2), 3.0: (0.95, 700, 5.5), 3.4: (0.9, 800, 4.8)},
    "vllm": {2.6: (0.5, 300, 1.0), 3.4: (0.3, 200, 1.0)},
    "vllm_spec_4": {2.6: (0.8, 400, 3.4), 3.0: (0.75, 420, 3.4), 3.4: (0.7, 400, 3.4)},
    "sarathi": {2.6: (0.6, 350, 1.0), 3.0: (0.55, 340, 1.0), 3.4: (0.6, 500, 1.0)},
}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    for system, pts in FIG89.items():
        for rps, (a, g, t) in pts.items():
            put(root, "fig8,9", "llama", system, f"rps{rps:.1f}_ol256", summary(a, g, tps=t))
    put(root, "fig8,9", "qwen", "adaserve", "rps2.4_ol256", summary(0.99, 500, tps=3.9))
    put(root, "fig8,9", "qwen", "vllm", "rps2.4_ol256", summary(0.5, 250))
    # an unfinished point (JSON without its text file) must be ignored
    (root / "fig8,9/llama/vllm").mkdir(parents=True, exist_ok=True)
    (root / "fig8,9/llama/vllm/rps3.0_ol256.json").write_text('{"complete": false}')
    for prop, (a, b) in {0.2: (0.9, 0.6), 0.6: (0.8, 0.4), 0.9: (0.85, 0.7)}.items():
        put(root, "fig10", "llama", "adaserve", f"prop{prop:.1f}_rps4.0", summary(a, 900 * a))
        put(root, "fig10", "llama", "vllm_spec_6", f"prop{prop:.1f}_rps4.0", summary(b, 600 * b))
    for scale, (a, b) in {0.6: (0.8, 0.2), 1.0: (0.9, 0.6), 1.6: (1.0, 0.95)}.items():
        sweep = {"figure": "fig11", "model": "qwen", "system": "adaserve",
                 "x_name": "slo_scale", "x": scale}
        put(root, "fig11", "qwen", "adaserve", f"slo{scale:.1f}_ol256", summary(a, 800 * a),
            sweep=sweep)
        put(root, "fig11", "qwen", "priority", f"slo{scale:.1f}_ol256", summary(b, 700 * b))
    put(root, "fig14", "llama", "adaserve", "fluc", summary(0.836, 700))
    put(root, "fig14", "llama", "sarathi", "fluc", summary(0.125, 100))
    put(root, "fig14", "qwen", "adaserve", "fluc", summary(0.83, 650))
    us = {"speculation": 500.0, "verification": 400.0, "scheduling": 100.0, "prefill": 1000.0,
          "other": 0.0}
    put(root, "fig15", "llama", "adaserve", "rps3.6_ol128", summary(1.0, 400, overhead_us=us))
    return root


# -------------------------------------------------------------------------------------- plots

def test_every_figure_written_as_png_and_pdf(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "plots"
    lines: list[str] = []
    drawn = plot.plot_all(tree, out, None, echo=lines.append)
    assert set(drawn) == set(plot.FIGURES)
    for fig_id in plot.FIGURES:
        png, pdf = out / f"fig{fig_id}.png", out / f"fig{fig_id}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", fig_id
        assert pdf.read_bytes()[:5] == b"%PDF-", fig_id
        assert drawn[fig_id].paths == [png, pdf]
    assert any("incomplete point" in line for line in lines)


def test_missing_point_stays_missing(tree: Path) -> None:
    drawn = plot.draw_figure("8", tree)
    series = plot.figure_series(drawn.figure)
    llama = series["Llama-3.1-70B-Instruct | SLO Attainment (%)"]
    xs, ys = llama["vLLM"]
    assert xs == [2.6, 3.0, 3.4]
    assert ys[0] == pytest.approx(50.0) and math.isnan(ys[1]) and ys[2] == pytest.approx(30.0)
    assert llama["AdaServe"][1] == pytest.approx([100.0, 95.0, 90.0])
    # qwen has one point and two systems; no systems or points are invented
    qwen = series["Qwen2.5-32B-Instruct | SLO Attainment (%)"]
    assert set(qwen) == {"AdaServe", "vLLM"} and qwen["AdaServe"] == ([2.4], [99.0])
    # goodput (fig 9) and tokens per step (fig 12: AdaServe and vLLM-Spec only)
    g = plot.figure_series(plot.draw_figure("9", tree).figure)
    assert math.isnan(g["Llama-3.1-70B-Instruct | Goodput (tokens/s)"]["vLLM"][1][1])
    t = plot.figure_series(plot.draw_figure("12", tree).figure)
    assert set(t["Llama-3.1-70B-Instruct | Mean tokens per step"]) == {"AdaServe",
                                                                       "vLLM-Spec (4)"}


def test_fig11_x_axis_reversed_and_fig10_in_percent(tree: Path) -> None:
    f11 = plot.draw_figure("11", tree).figure
    assert f11.axes and all(ax.xaxis_inverted() for ax in f11.axes)
    s11 = plot.figure_series(f11)
    xs, ys = s11["Qwen2.5-32B-Instruct | SLO Attainment (%)"]["AdaServe"]
    assert xs == [0.6, 1.0, 1.6] and ys == pytest.approx([80.0, 90.0, 100.0])
    f8 = plot.draw_figure("8", tree).figure
    assert not any(ax.xaxis_inverted() for ax in f8.axes)
    s10 = plot.figure_series(plot.draw_figure("10", tree).figure)
    assert s10["Llama-3.1-70B-Instruct | SLO Attainment (%)"]["vLLM-Spec (6)"][0] == \
        pytest.approx([20.0, 60.0, 90.0])


def test_bars_and_overhead_shares(tree: Path) -> None:
    d14 = plot.draw_figure("14", tree)
    assert d14.data["llama"]["adaserve"]["slo_attainment"] == pytest.approx(83.6)
    assert "sarathi" not in d14.data["qwen"]  # missing bar: not invented
    d15 = plot.draw_figure("15", tree)
    assert list(d15.data) == ["llama"]  # qwen has no fig15 result
    assert d15.data["llama"] == pytest.approx({"speculation": 0.5, "verification": 0.4,
                                               "scheduling": 0.1})  # prefill left out


def test_name_parsing_and_variants(tmp_path: Path) -> None:
    assert plot.parse_point_name("rps4.8_ol256", "rps") == (4.8, "ol256")
    assert plot.parse_point_name("prop0.6_rps4.0", "prop") == (0.6, "rps4.0")
    assert plot.parse_point_name("slo1.2_ol128", "slo") == (1.2, "ol128")
    assert plot.parse_point_name("fluc", None) == (None, "fluc")
    assert plot.parse_point_name("weird", "rps")[0] is None
    root = tmp_path / "results"
    for rps in (2.6, 3.0):
        put(root, "fig8,9", "llama", "adaserve", f"rps{rps:.1f}_ol256", summary(0.9, 100))
    put(root, "fig8,9", "llama", "adaserve", "rps4.0_ol128", summary(0.1, 10))
    # meta.sweep.x wins over the name
    put(root, "fig8,9", "llama", "vllm", "rps2.6_ol256", summary(0.5, 50),
        sweep={"figure": "fig8,9", "x_name": "rps", "x": 3.0})
    drawn = plot.draw_figure("8", root)
    s = plot.figure_series(drawn.figure)["Llama-3.1-70B-Instruct | SLO Attainment (%)"]
    assert s["AdaServe"][0] == [2.6, 3.0]  # the ol256 variant (more points), not ol128
    assert s["vLLM"][1][0] != s["vLLM"][1][0] and s["vLLM"][1][1] == pytest.approx(50.0)
    assert any("several point variants" in n for n in drawn.notes)


def test_no_data_prints_a_note(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "results"
    empty.mkdir()
    lines: list[str] = []
    drawn = plot.plot_all(empty, tmp_path / "plots", None, echo=lines.append)
    assert all(d.empty for d in drawn.values())
    assert len([x for x in lines if "not drawn" in x]) == len(plot.FIGURES)
    assert not (tmp_path / "plots").exists() or not any((tmp_path / "plots").iterdir())
    assert main(["plot", "--results", str(empty), "--out", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "no figure drawn" in out and "headline table: no figure" in out


def test_cli_errors(tmp_path: Path, capsys) -> None:
    assert main(["plot", "--results", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "r").mkdir()
    assert main(["plot", "--results", str(tmp_path / "r"), "--figures", "8,13"]) == 2
    assert "unknown figure '13'" in capsys.readouterr().err
    with pytest.raises(ValueError):
        plot.parse_figures("abc")
    assert plot.parse_figures("fig15, 8,9,8") == ["8", "9", "15"]


# ----------------------------------------------------------------------------------- headline

def test_headline_numbers(tree: Path) -> None:
    h = hl.headline(tree)
    rows = {(r.figure, r.model): r for r in h.rows}
    # figure 8/9, llama: hardest = rps 3.4; best baseline there = vllm_spec_4 (0.7 > 0.6 > 0.3)
    r = rows[("8,9", "llama")]
    assert r.points == 3 and r.hardest.x == pytest.approx(3.4)
    assert r.hardest.baseline == "vllm_spec_4"
    assert r.hardest.violation_ratio == pytest.approx(0.3 / 0.1)
    assert r.hardest.goodput_ratio == pytest.approx(800 / 400)
    assert math.isinf(r.max_violation_ratio) and r.max_violation_ratio_x == pytest.approx(2.6)
    # goodput ratios: 600/400, 700/420 (best by attainment at 3.0 is vllm_spec_4), 800/400
    assert r.max_goodput_ratio == pytest.approx(2.0) and r.max_goodput_ratio_x == pytest.approx(3.4)
    # figure 10: hardest = highest urgent share (0.9): violations 0.3 (baseline) vs 0.15
    r = rows[("10", "llama")]
    assert r.hardest.x == pytest.approx(0.9) and r.hardest.baseline == "vllm_spec_6"
    assert r.hardest.violation_ratio == pytest.approx(0.3 / 0.15)
    assert r.hardest.goodput_ratio == pytest.approx(0.85 * 900 / (0.7 * 600))
    assert r.max_violation_ratio == pytest.approx(0.4 / 0.1)
    assert r.max_violation_ratio_x == pytest.approx(0.2)
    assert r.max_goodput_ratio == pytest.approx(0.8 * 900 / (0.4 * 600))
    # figure 11: hardest = lowest SLO scale; at 1.6 AdaServe has no violations -> inf
    r = rows[("11", "qwen")]
    assert r.hardest.x == pytest.approx(0.6) and r.hardest.baseline == "priority"
    assert r.hardest.violation_ratio == pytest.approx(0.8 / 0.2)
    assert r.hardest.goodput_ratio == pytest.approx(640 / 140)
    assert math.isinf(r.max_violation_ratio) and r.max_violation_ratio_x == pytest.approx(1.6)
    # figure 14: a single point; qwen has no baseline -> no row, a note
    r = rows[("14", "llama")]
    assert r.hardest.x is None and r.hardest.baseline == "sarathi"
    assert r.hardest.violation_ratio == pytest.approx(0.875 / 0.164)
    assert ("14", "qwen") not in rows
    assert any("14" in n and "qwen" in n for n in h.notes)
    text = hl.format_headline(h)
    assert "vLLM-Spec (4)" in text and "inf" in text and "3.00x" in text
    assert any(e.startswith("figure 15  llama") and "scheduling 10.00%" in e for e in h.extras)
    assert any(e.startswith("figure 12  llama") for e in h.extras)


def test_headline_shows_ttft_beside_attainment(tmp_path: Path) -> None:
    root = tmp_path / "results"
    for system, att, p50, p90 in (("adaserve", 0.9, 300.0, 1200.0), ("vllm", 0.5, 4000.0, 9000.0)):
        s = summary(att, 500)
        s["ttft_ms"] = {"count": 1000, "mean": p50, "p50": p50, "p90": p90, "p99": p90}
        put(root, "fig8,9", "llama", system, "rps4.8_ol256", s)
    put(root, "fig8,9", "qwen", "adaserve", "rps4.8_ol256", summary(0.9, 500))
    put(root, "fig8,9", "qwen", "vllm", "rps4.8_ol256", summary(0.5, 500))
    h = hl.headline(root, "8")
    rows = {r.model: r for r in h.rows}
    assert rows["llama"].hardest.adaserve_ttft_s == pytest.approx((0.3, 1.2))
    assert rows["llama"].hardest.baseline_ttft_s == pytest.approx((4.0, 9.0))
    text = hl.format_headline(h)
    assert "TTFT p50/p90" in text and "0.3/1.2s" in text and "4.0/9.0s" in text
    qwen = [line for line in text.splitlines() if line.startswith("8,9") and "qwen" in line][0]
    assert " - " in qwen  # no TTFT recorded: shown as absent, not as 0


def test_violation_ratio_rules() -> None:
    assert hl.violation_ratio(0.2, 0.0) == math.inf
    assert hl.violation_ratio(0.0, 0.0) == 1.0
    assert hl.violation_ratio(0.4, 0.1) == pytest.approx(4.0)
    assert hl.goodput_ratio(100.0, 0.0) == math.inf
    assert hl.fmt_ratio(math.inf) == "inf" and hl.fmt_ratio(None) == "-"
    assert hl.violations({"completed": 3, "attained": 3, "slo_attainment": 1.0}) == 0.0


def test_headline_cli_table_only_and_json(tree: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "plots"
    js = tmp_path / "h.json"
    assert main(["plot", "--results", str(tree), "--out", str(out), "--table-only",
                 "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert "Headline" in text and not out.exists()
    assert any(line.startswith("8,9") and "llama" in line for line in text.splitlines())
    doc = json.loads(js.read_text())
    assert {r["figure"] for r in doc["rows"]} == {"8,9", "10", "11", "14"}
    assert main(["plot", "--results", str(tree), "--out", str(out), "--figures", "15"]) == 0
    text = capsys.readouterr().out
    assert (out / "fig15.png").is_file() and "figure 15  llama" in text
    assert not any(line.startswith("8,9") for line in text.splitlines())  # only figure 15


# --------------------------------------------------------------------------- real (simulated)

def test_simulated_results_plot(tmp_path: Path, artifact_traces) -> None:
    from adaserve.sim.run import simulate_file

    root = tmp_path / "results"
    for fig, name in (("fig8,9", "rps4.8_ol256"), ("fig8,9", "rps2.6_ol256"),
                      ("fig15", "rps3.6_ol128")):
        records = json.loads(artifact_traces.file(f"{fig}/emission_{name}.json").read_text())[:60]
        trace = tmp_path / f"{fig}_{name}.json"
        trace.write_text(json.dumps(records))
        systems = ("adaserve",) if fig == "fig15" else ("adaserve", "vllm_spec_4")
        for system in systems:
            simulate_file(trace, system, "llama-3.1-70b", root / fig / "llama" / system / name)
    drawn = plot.plot_all(root, tmp_path / "plots", "8,9,12,15", echo=lambda s: None)
    assert all(not d.empty for d in drawn.values())
    s = plot.figure_series(drawn["12"].figure)["Llama-3.1-70B-Instruct | Mean tokens per step"]
    assert s["AdaServe"][0] == [2.6, 4.8] and all(y > 1 for y in s["AdaServe"][1])
    shares = drawn["15"].data["llama"]
    assert sum(shares.values()) == pytest.approx(1.0) and shares["scheduling"] < 0.5
    h = hl.headline(root)
    assert [(r.figure, r.model, r.hardest.x) for r in h.rows] == [("8,9", "llama", 4.8)]
