"""The harness as a user meets it: a finished point is skipped only when it was run with the same
configuration, misspelled variables are reported, the scripts explain a missing set-up, progress
bars stay out of logs, and one registry each for systems and figures."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from adaserve.core.results import load_result, write_results
from adaserve.core.trace import TraceRecord, load_trace, save_trace
from adaserve.harness import figures, headline, plot, record, runner, sweep
from adaserve.harness.sweep import SettingsError, settings_from_env
from adaserve.scheduling import policies

ROOT = Path(__file__).resolve().parents[1]


def tiny_traces(tmp_path: Path, *names: str, n: int = 12) -> Path:
    """A TRACE_DIR with one small trace per point name (a few ms to simulate)."""
    d = tmp_path / "traces"
    records = [TraceRecord(50.0 * i, 16 + i, 8, f"def f{i}(x): return x * {i}", ratio)
               for i, ratio in zip(range(n), [1.2, -50.0, 1.6, -150.0] * n)]
    for name in names:
        save_trace(d / f"emission_{name}.json", records)
    return d


def env_for(tmp_path: Path, traces: Path | None, **extra: str) -> dict[str, str]:
    env = {"ADASERVE": "ON", "RESULTS_DIR": str(tmp_path / "results"), "JOBS": "1", **extra}
    if traces is not None:
        env["TRACE_DIR"] = str(traces)
    return env


def sweep_once(experiment: str, model: str | None, env: dict[str, str]) -> runner.SweepReport:
    return runner.run_sweep(settings_from_env(experiment, model, env), progress=False)


def plan(experiment: str, model: str | None, env: dict[str, str]):
    todo, report = runner.plan_sweep(settings_from_env(experiment, model, env))
    return [p.name for p, _ in todo], dict((p.name, why) for p, why in report.replaced), report


# ------------------------------------------------------------------ a changed setting re-runs

RPS48 = "rps4.8_ol256"


@pytest.mark.parametrize("change,why", [
    ({"BACKEND": "engine", "MODEL": "smollm2-135m", "DRAFTER": "ngram"}, "backend 'sim' -> 'engine'"),
    ({"BACKEND": "http", "ENDPOINT": "http://127.0.0.1:9", "BASELINE_MS": "30"},
     "backend 'sim' -> 'http'"),
    ({"SEED": "1"}, "seed 0 -> 1"),
    ({"PRICING": "shared"}, "pricing None -> 'shared'"),
])
def test_a_finished_point_is_rerun_when_the_setting_changed(tmp_path, change, why):
    """The issue's case: after a simulated run, the same point on another backend or seed used to
    print "0 point(s) run, 1 skipped" and keep the simulated result."""
    env = env_for(tmp_path, tiny_traces(tmp_path, RPS48), RPS_MIN="4.8", RPS_MAX="4.8")
    assert len(sweep_once("fig8,9", "llama", env).done) == 1
    assert plan("fig8,9", "llama", env)[0] == []           # same setting: skipped
    todo, replaced, report = plan("fig8,9", "llama", {**env, **change})
    assert todo == [RPS48] and not report.skipped
    assert why in replaced[RPS48]


def test_pricing_reaches_the_simulator_and_is_checked(tmp_path):
    """PRICING=shared prices a vLLM baseline on the named (FlexFlow) profile, as ``simulate
    --pricing shared`` does, and says so in the result; a bad value or another backend is refused."""
    traces = tiny_traces(tmp_path, RPS48)
    env = {**env_for(tmp_path, traces, RPS_MIN="4.8", RPS_MAX="4.8"), "ADASERVE": "OFF", "VLLM": "ON"}
    shared = {**env, "RESULTS_DIR": str(tmp_path / "shared"), "PRICING": "shared"}
    assert len(sweep_once("fig8,9", "llama", env).done) == len(sweep_once("fig8,9", "llama", shared).done) == 1
    per_engine = load_result(tmp_path / "results" / "fig8,9" / "llama" / "vllm" / RPS48)
    on_table = load_result(tmp_path / "shared" / "fig8,9" / "llama" / "vllm" / RPS48)
    assert on_table["meta"]["pricing"] == "shared" and per_engine["meta"]["pricing"] == "per-engine"
    assert on_table["summary"]["total_time_ms"] != per_engine["summary"]["total_time_ms"]
    with pytest.raises(SettingsError, match="PRICING='flat'"):
        settings_from_env("fig8,9", "llama", {**env, "PRICING": "flat"})
    with pytest.raises(SettingsError, match="PRICING applies to BACKEND=sim"):
        settings_from_env("fig8,9", "llama", {**shared, "BACKEND": "engine", "MODEL": "m",
                                              "DRAFTER": "ngram"})


@pytest.mark.parametrize("experiment,point,extra", [
    ("fig10", "prop0.2_rps4.0", {"PROP_MIN": "0.2", "PROP_MAX": "0.2"}),
    ("fig14", "fluc", {}),
])
def test_output_length_missing_from_the_point_name_still_counts(tmp_path, experiment, point, extra):
    env = env_for(tmp_path, tiny_traces(tmp_path, point), **extra)
    sweep_once(experiment, "qwen", env)
    todo, replaced, _ = plan(experiment, "qwen", {**env, "OUTPUT_LENGTH": "128"})
    assert todo == [point] and "output_len 256 -> 128" in replaced[point]
    report = sweep_once(experiment, "qwen", {**env, "OUTPUT_LENGTH": "128"})
    assert len(report.done) == 1 and "re-ran" in report.summary()
    doc = json.loads((tmp_path / "results" / experiment / "qwen" / "adaserve" / f"{point}.json")
                     .read_text())
    assert doc["meta"]["point_config"]["output_len"] == 128
    assert plan(experiment, "qwen", {**env, "OUTPUT_LENGTH": "128"})[0] == []


def test_generated_traces_are_named_by_every_setting_they_come_from(tmp_path):
    def trace_of(experiment, model, **env):
        s = settings_from_env(experiment, model, env_for(tmp_path, None, **env))
        return sweep.points(s)[0].trace.name

    assert trace_of("fig10", "llama", PROP_MIN="0.2", PROP_MAX="0.2") == "emission_prop0.2_rps4.0.json"
    assert (trace_of("fig10", "llama", PROP_MIN="0.2", PROP_MAX="0.2", OUTPUT_LENGTH="128")
            == "emission_prop0.2_rps4.0_ol128.json")
    assert trace_of("fig14", "qwen", OUTPUT_LENGTH="64", SEED="2") == "emission_fluc_ol64_seed2.json"
    assert (trace_of("fig8,9", "qwen", RPS_MIN="3", RPS_MAX="3", OUTPUT_LENGTH="64")
            == "emission_rps3.0_ol64.json")  # the name already says the output length


def test_seed_gets_its_own_generated_trace(tmp_path):
    env = env_for(tmp_path, None, RPS_MIN="0.2", RPS_MAX="0.2", OUTPUT_LENGTH="4")
    runner.plan_sweep(settings_from_env("fig8,9", "qwen", env))
    runner.plan_sweep(settings_from_env("fig8,9", "qwen", {**env, "SEED": "1"}))
    folder = tmp_path / "results" / "traces" / "fig8,9"
    zero, one = (load_trace(folder / f"emission_rps0.2_ol4{s}.json") for s in ("", "_seed1"))
    assert len(zero) == len(one) and zero != one


def test_a_result_copied_from_another_point_is_not_complete(tmp_path):
    env = env_for(tmp_path, tiny_traces(tmp_path, "rps4.6_ol256", RPS48), RPS_MIN="4.6",
                  RPS_MAX="4.8")
    sweep_once("fig8,9", "llama", env)
    folder = tmp_path / "results" / "fig8,9" / "llama" / "adaserve"
    for suffix in (".json", ".txt"):
        shutil.copy(folder / f"rps4.6_ol256{suffix}", folder / f"{RPS48}{suffix}")
    todo, replaced, _ = plan("fig8,9", "llama", env)
    assert todo == [RPS48] and "point 'rps4.6_ol256' -> 'rps4.8_ol256'" in replaced[RPS48]
    data = plot.load_dataset(tmp_path / "results", "fig8,9")
    assert [p.name for p in data.points] == ["rps4.6_ol256"]
    assert any("meta.sweep.point is 'rps4.6_ol256'" in n for n in data.notes)


def test_text_and_json_must_agree(tmp_path):
    env = env_for(tmp_path, tiny_traces(tmp_path, RPS48), RPS_MIN="4.8", RPS_MAX="4.8")
    sweep_once("fig8,9", "llama", env)
    txt = tmp_path / "results" / "fig8,9" / "llama" / "adaserve" / f"{RPS48}.txt"
    lines = txt.read_text().splitlines()
    lines = [" slo_attainment( 0.1234)" if ln.startswith(" slo_attainment(") else ln for ln in lines]
    txt.write_text("\n".join(lines) + "\n")
    todo, replaced, _ = plan("fig8,9", "llama", env)
    assert todo == [RPS48] and "slo_attainment: text says '0.1234'" in replaced[RPS48]
    assert any("text says" in n for n in plot.load_dataset(tmp_path / "results", "fig8,9").notes)


def test_a_result_without_a_recorded_configuration_is_rerun(tmp_path):
    env = env_for(tmp_path, tiny_traces(tmp_path, RPS48), RPS_MIN="4.8", RPS_MAX="4.8")
    sweep_once("fig8,9", "llama", env)
    js = tmp_path / "results" / "fig8,9" / "llama" / "adaserve" / f"{RPS48}.json"
    doc = json.loads(js.read_text())
    del doc["meta"]["point_config"]
    js.write_text(json.dumps(doc))
    assert plan("fig8,9", "llama", env)[1] == {RPS48: "no recorded configuration"}


def test_a_simulated_result_of_an_older_cost_model_is_rerun(tmp_path, monkeypatch):
    env = env_for(tmp_path, tiny_traces(tmp_path, RPS48), RPS_MIN="4.8", RPS_MAX="4.8")
    sweep_once("fig8,9", "llama", env)
    assert plan("fig8,9", "llama", env)[0] == []
    import adaserve.sim
    monkeypatch.setattr(adaserve.sim, "SIM_MODEL", "a newer cost model")
    todo, replaced, _ = plan("fig8,9", "llama", env)
    assert todo == [RPS48] and "sim_model" in replaced[RPS48]


def test_engine_and_http_results_get_the_configuration_recorded(tmp_path, monkeypatch):
    """``adaserve run`` / ``bench`` do not know the sweep: the harness stamps their JSON, and a
    changed engine option (here the drafter, then the model) re-runs the point."""
    calls = []

    def fake_run(cmd, **kwargs):  # what `adaserve run` leaves behind, without the engine
        from adaserve.sim.run import simulate_records
        calls.append(cmd)
        res = simulate_records(load_trace(cmd[cmd.index("--trace") + 1]), "adaserve",
                               "llama-3.1-70b")
        write_results(cmd[cmd.index("--out") + 1], res.summary, res.requests, {"backend": "engine"})
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(runner.subprocess, "run", fake_run)
    engine = {"BACKEND": "engine", "MODEL": "tiny-llama", "DRAFTER": "ngram"}
    env = env_for(tmp_path, tiny_traces(tmp_path, "fluc"), **engine)
    assert len(sweep_once("fig14", "llama", env).done) == 1 and len(calls) == 1
    doc = json.loads((tmp_path / "results/fig14/llama/adaserve/fluc.json").read_text())
    assert doc["meta"]["point_config"]["engine_model"] == "tiny-llama"
    assert doc["meta"]["point_config"]["drafter"] == "ngram"
    assert doc["meta"]["point_config"]["trace_sha256"] == record.file_sha256(tmp_path / "traces/emission_fluc.json")
    assert sweep_once("fig14", "llama", env).skipped and len(calls) == 1
    todo, replaced, _ = plan("fig14", "llama", {**env, "MODEL": "smollm2-135m"})
    assert "engine_model 'tiny-llama' -> 'smollm2-135m'" in replaced["fluc"]
    todo, replaced, _ = plan("fig14", "llama", {**env, "EXTRA_ARGS": "--threads 1"})
    assert "extra_args [] -> ['--threads', '1']" in replaced["fluc"]


def test_a_failed_external_run_does_not_leave_the_old_result_standing(tmp_path, monkeypatch):
    env = env_for(tmp_path, tiny_traces(tmp_path, "fluc"))
    sweep_once("fig14", "llama", env)   # a simulated result
    monkeypatch.setattr(runner.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, "", ""))
    engine = {**env, "BACKEND": "engine", "MODEL": "tiny-llama", "DRAFTER": "ngram"}
    report = sweep_once("fig14", "llama", engine)
    assert len(report.failed) == 1
    assert not (tmp_path / "results/fig14/llama/adaserve/fluc.txt").exists()


# ------------------------------------------------------------------------ misspelled variables

@pytest.mark.parametrize("name,experiment,expected", [
    ("RPS_MAXX", "fig8,9", "RPS_MAXX is not a variable of this script; did you mean RPS_MAX?"),
    ("ADASERV", "fig10", "did you mean ADASERVE?"),
    ("ADASERVE_RESULTS", "fig10", "ADASERVE_RESULTS is not a variable of this script"),
    ("OUTPUT_LEN_MAX", "fig11", "OUTPUT_LEN_MAX is not a variable"),
    ("SARATHI", "fig14", "did you mean VLLM_SARATHI?"),
    ("VLLM_SPEC_4", "fig14", "did you mean VLLM_SPEC?"),
    ("PROP_MIN", "fig8,9", "PROP_MIN is ignored by fig8,9 (it is read by fig10)"),
    ("LLAMA_OVERHEAD", "fig11", "LLAMA_OVERHEAD is ignored by fig11 (it is read by fig15)"),
])
def test_variables_that_look_like_ours_get_a_warning(tmp_path, name, experiment, expected):
    s = settings_from_env(experiment, "llama", {**env_for(tmp_path, None), name: "1"})
    assert any(expected in w for w in s.warnings), s.warnings


def test_ordinary_environment_gives_no_warning(tmp_path):
    ordinary = {k: "x" for k in ("PATH", "HOME", "USER", "SHELL", "TERM", "LANG", "PWD", "TMPDIR",
                                 "CUDA_VISIBLE_DEVICES", "HF_HOME", "OMP_NUM_THREADS", "CI",
                                 "PYTHONPATH", "VIRTUAL_ENV", "MAKEFLAGS", "ADASERVE_BIN",
                                 "ADASERVE_PROGRESS", "ADASERVE_TRACES", "JOB", "MODE")}
    for e in figures.EXPERIMENTS:
        own = {"LLAMA_OVERHEAD": "ON"} if e == "fig15" else {"ADASERVE": "ON"}
        env = {"RESULTS_DIR": str(tmp_path), "JOBS": "1", **ordinary, **own,
               "OUTPUT_LENGTH": "128", "BACKEND": "sim", "SEED": "0"}
        assert settings_from_env(e, "llama", env).warnings == []


def test_every_adaserve_variable_the_source_reads_is_listed_and_never_warned_about(tmp_path):
    """``core/environment.py`` lists every ADASERVE_* name the code, scripts and tests mention
    (besides the exps/ system switches); the harness takes none of them for a misspelling, and the
    README's table documents each."""
    import re

    from adaserve.core.environment import VARIABLES
    from adaserve.harness.sweep import SWITCHES

    named: set[str] = set()
    for folder in ("adaserve", "scripts", "exps", "docker", "tests", ".ci"):
        for f in (ROOT / folder).rglob("*"):
            if f.is_file() and f.suffix in (".py", ".sh", "") and "__pycache__" not in f.parts:
                named |= set(re.findall(r"\bADASERVE_[A-Z][A-Z_]*\b", f.read_text(errors="replace")))
    named -= {"ADASERVE_RESULTS"}  # the misspelling the test above plants
    assert named - set(SWITCHES) == set(VARIABLES)
    env = {"RESULTS_DIR": str(tmp_path), "JOBS": "1", "ADASERVE": "ON", **dict.fromkeys(VARIABLES, "1")}
    assert settings_from_env("fig10", "llama", env).warnings == []
    readme = (ROOT / "README.md").read_text()
    assert [v for v in VARIABLES if f"| `{v}` |" not in readme] == []


def test_the_warning_reaches_the_user(tmp_path):
    env = {**os.environ, **env_for(tmp_path, tiny_traces(tmp_path, "fluc")), "RPS_MAXX": "3"}
    p = subprocess.run([str(ROOT / "exps/fig14/run_llama_fluc.sh")], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "warning: RPS_MAXX is not a variable of this script; did you mean RPS_MAX?" in p.stderr


# ----------------------------------------------------------------------------- the scripts

def test_scripts_before_setup_say_make_venv(tmp_path):
    """A clone without .venv: exit 127 with the fix in the message (bash said only "No such
    file or directory")."""
    shutil.copytree(ROOT / "exps", tmp_path / "exps")
    env = {k: v for k, v in os.environ.items() if k != "ADASERVE_BIN"}
    for script in sorted((tmp_path / "exps").glob("*/*.sh")):
        p = subprocess.run([str(script)], capture_output=True, text=True, env=env, timeout=30)
        assert p.returncode == 127, script
        assert "run `make venv` first" in p.stderr, script


def test_each_script_maps_to_one_registered_experiment():
    for script in sorted((ROOT / "exps").glob("*/*.sh")):
        folder = script.parent.name
        assert folder in figures.EXPERIMENTS, script
        execs = [ln for ln in script.read_text().splitlines() if ln.startswith("exec ")]
        assert len(execs) == 1 and f" exp {folder} " in execs[0], script
    assert {p.name for p in (ROOT / "exps").iterdir()} == set(figures.EXPERIMENTS)


def test_progress_bars_stay_out_of_redirected_output(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ADASERVE_PROGRESS", raising=False)
    env = env_for(tmp_path, tiny_traces(tmp_path, RPS48), RPS_MIN="4.8", RPS_MAX="4.8")
    runner.run_sweep(settings_from_env("fig8,9", "llama", env), progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and "point/s" not in err and "s/point" not in err


# ------------------------------------------------------------------------------- registries

def test_one_system_registry():
    reg = policies.SYSTEM_REGISTRY
    assert policies.SYSTEMS == tuple(s.name for s in reg)
    assert len(set(policies.SYSTEMS)) == len(reg)
    assert {s.role for s in reg} == {"adaserve", "baseline", "ablation", "extension"}
    # the harness, the plots and the headline table all derive from it
    assert sorted(n for names in sweep.SWITCHES.values() for n in names) == sorted(policies.SYSTEMS)
    assert set(sweep.MAIN_SYSTEMS) == {s.name for s in reg if s.role in ("adaserve", "baseline")}
    assert headline.BASELINES == policies.BASELINES == tuple(s.name for s in reg
                                                             if s.role == "baseline")
    assert plot.SYSTEM_ORDER == policies.SYSTEMS
    for s in reg:
        assert plot.label_of(s.name) == s.label
        policies.make_policy(s.name, "llama")


def test_every_registered_baseline_is_compared_in_the_headline_table(tmp_path):
    """A baseline only in the registry (not in a hand-kept list) must still be compared."""
    from test_plot import put, summary
    root = tmp_path / "results"
    put(root, "fig14", "llama", "adaserve", "fluc", summary(0.9, 700))
    for b in policies.BASELINES:
        put(root, "fig14", "llama", b, "fluc", summary(0.5, 300))
    best = policies.BASELINES[-1]
    put(root, "fig14", "llama", best, "fluc", summary(0.8, 600))
    rows = headline.headline(root, "14").rows
    assert [r.hardest.baseline for r in rows] == [best]


def test_one_figure_registry_and_spelling():
    assert figures.FIGURE_IDS == ("8", "9", "10", "11", "12", "14", "15")
    assert plot.FIGURES == figures.FIGURE_IDS
    assert plot.FIG_DIRS == {"8": "fig8,9", "9": "fig8,9", "12": "fig8,9", "10": "fig10",
                             "11": "fig11", "14": "fig14", "15": "fig15"}
    assert list(headline.COMPARED) == ["8,9", "10", "11", "14"]
    for spelling in ("8,9", "fig8,9", "fig8, fig9", "figure 8", "8", "12"):
        assert figures.experiment_of(spelling).folder == "fig8,9"
    assert figures.parse_figures("fig8,9,fig15") == ["8", "9", "15"]
    assert [e.folder for e in figures.experiments_for("15,fig8")] == ["fig8,9", "fig15"]
    with pytest.raises(ValueError, match="names 2 experiments"):
        figures.experiment_of("10,11")
    with pytest.raises(ValueError, match="unknown figure 'fig13'"):
        figures.parse_figures("fig13")
    s = settings_from_env("8", "llama", {"ADASERVE": "ON"})
    assert s.experiment == "fig8,9" and s.xs["llama"][0] == 2.6


def test_exp_command_does_not_import_the_plot_command():
    tree = ast.parse((ROOT / "adaserve/cli/exp_cmd.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m and m.startswith("adaserve.cli") for m in imported), imported


def test_reproduce_figures_use_the_registry(tmp_path):
    from adaserve.cli import main
    assert main(["reproduce", "--figures", "fig13", "--results", str(tmp_path / "r"),
                 "--no-progress"]) == 2


def test_trace_dir_finds_the_artifacts_own_fig10_and_fig14_names(tmp_path):
    """The artifact names fig10/fig14 traces unlike their results (``emission_rps4.0_prop0.2.json``,
    ``emission_fluc_6m_peak4.0.json``): TRACE_DIR finds those too, as ``adaserve traces fetch``
    installs them."""
    from adaserve.harness.sweep import points, settings_from_env

    for folder, name, env in (("fig10", "emission_rps4.0_prop0.2.json", {"PROP_MIN": "0.2", "PROP_MAX": "0.2"}),
                              ("fig14", "emission_fluc_6m_peak4.0.json", {})):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_text("[]")
        s = settings_from_env(folder, "llama", {"ADASERVE": "ON", "TRACE_DIR": str(tmp_path), **env})
        assert [p.trace for p in points(s)] == [tmp_path / folder / name]
