"""The exps/ scripts on tiny sweeps: result files, skipping, failures, and bad variables."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from adaserve.core.results import read_stats_block, result_complete
from adaserve.core.trace import load_trace, save_trace
from adaserve.harness.sweep import SettingsError, grid, settings_from_env

ROOT = Path(__file__).resolve().parents[1]
FIG89_48: list[Path] = []  # the fig8,9 RPS 4.8 trace of the ``artifact_traces`` fixture


@pytest.fixture(autouse=True)
def _fig89_48(artifact_traces):
    FIG89_48[:] = [artifact_traces.file("fig8,9/emission_rps4.8_ol256.json")]


def small_trace_dir(tmp_path, names, n=40):
    records = load_trace(FIG89_48[0])[:n]
    d = tmp_path / "traces"
    for name in names:
        save_trace(d / f"emission_{name}.json", records)
    return d


def run_script(script, tmp_path, **env):
    full = {**os.environ, "RESULTS_DIR": str(tmp_path / "results"), "JOBS": "1", **env}
    return subprocess.run([str(ROOT / "exps" / script)], capture_output=True, text=True, env=full,
                          timeout=300, cwd=tmp_path)


def test_fig89_llama_writes_eight_points_and_skips_on_rerun(tmp_path):
    traces = small_trace_dir(tmp_path, ["rps4.6_ol256", "rps4.8_ol256"])
    env = dict(ADASERVE="ON", VLLM_SPEC="ON", RPS_MIN="4.6", RPS_MAX="4.8", TRACE_DIR=str(traces))
    p = run_script("fig8,9/run_llama_rps.sh", tmp_path, **env)
    assert p.returncode == 0, p.stderr
    assert "8 point(s) run, 0 skipped" in p.stdout
    res = tmp_path / "results" / "fig8,9" / "llama"
    for system in ("adaserve", "vllm_spec_4", "vllm_spec_6", "vllm_spec_8"):
        for point in ("rps4.6_ol256", "rps4.8_ol256"):
            assert result_complete(res / system / point)
    doc = json.loads((res / "adaserve" / "rps4.8_ol256.json").read_text())
    assert doc["meta"]["sweep"] == {"figure": "fig8,9", "model": "llama", "system": "adaserve",
                                    "x_name": "rps", "x": 4.8, "point": "rps4.8_ol256"}
    assert read_stats_block(res / "adaserve" / "rps4.8_ol256.txt")["total_requests"] == "40/40"
    again = run_script("fig8,9/run_llama_rps.sh", tmp_path, **env)
    assert again.returncode == 0 and "0 point(s) run, 8 skipped" in again.stdout


def test_parallel_sweep_ends_cleanly(tmp_path):
    """JOBS=2 runs points in a pool of processes; its workers must exit on their own (a pool
    terminated at the end leaked their semaphores, and Python printed warnings after the run)."""
    traces = small_trace_dir(tmp_path, ["rps4.6_ol256", "rps4.8_ol256"], n=10)
    p = run_script("fig8,9/run_llama_rps.sh", tmp_path, ADASERVE="ON", VLLM="ON", RPS_MIN="4.6",
                   RPS_MAX="4.8", TRACE_DIR=str(traces), JOBS="2")
    assert p.returncode == 0, p.stderr
    assert "4 point(s) run" in p.stdout
    assert "leaked" not in p.stderr and "resource_tracker" not in p.stderr, p.stderr


def test_failing_point_is_reported_and_the_sweep_goes_on(tmp_path):
    traces = small_trace_dir(tmp_path, ["rps4.6_ol256", "rps4.8_ol256"])
    (traces / "emission_rps4.6_ol256.json").write_text('[{"emission_time_ms": "soon"}]')
    p = run_script("fig8,9/run_qwen_rps.sh", tmp_path, ADASERVE="ON", RPS_MIN="4.6", RPS_MAX="4.8",
                   TRACE_DIR=str(traces))
    assert p.returncode == 1
    assert "1 point(s) run" in p.stdout and "1 failed" in p.stdout
    assert "FAILED fig8,9/qwen/adaserve/rps4.6_ol256" in p.stdout and "record 0" in p.stdout
    res = tmp_path / "results" / "fig8,9" / "qwen" / "adaserve"
    assert result_complete(res / "rps4.8_ol256") and not (res / "rps4.6_ol256.txt").exists()


def test_fig15_and_fig14_scripts(tmp_path):
    traces = small_trace_dir(tmp_path, ["rps3.6_ol128", "fluc"])
    p = run_script("fig15/run_overhead_breakdown.sh", tmp_path, QWEN_OVERHEAD="ON", TRACE_DIR=str(traces))
    assert p.returncode == 0, p.stderr
    txt = tmp_path / "results" / "fig15" / "qwen" / "adaserve" / "rps3.6_ol128.txt"
    assert "eval_overhead_breakdown" in read_stats_block(txt)
    p = run_script("fig14/run_llama_fluc.sh", tmp_path, VLLM="ON", SPECINFER="ON", TRACE_DIR=str(traces))
    assert p.returncode == 0, p.stderr
    for system in ("vllm", "specinfer"):
        assert result_complete(tmp_path / "results" / "fig14" / "llama" / system / "fluc")


@pytest.mark.parametrize("script,env,message", [
    ("fig8,9/run_llama_rps.sh", {"ADASERVE": "ON", "RPS_MIN": "abc"}, "RPS_MIN='abc': expected a number"),
    ("fig10/run_qwen_prop.sh", {"ADASERVE": "ON", "PROP_MAX": "2"}, "PROP_MAX=2: must be in (0, 1)"),
    ("fig11/run_llama_slo.sh", {"ADASERVE": "ON", "SLO_SCALE_STEP": "0"}, "SLO_SCALE_STEP=0: must be > 0"),
    ("fig11/run_qwen_slo.sh", {"ADASERVE": "ON", "OUTPUT_LENGTH": "-3"}, "OUTPUT_LENGTH=-3"),
    ("fig8,9/run_qwen_rps.sh", {"ADASERVE": "ON", "RPS_MIN": "4", "RPS_MAX": "3"}, "is above RPS_MAX"),
    ("fig8,9/run_qwen_rps.sh", {"ADASERVE": "maybe"}, "ADASERVE='maybe': expected ON or OFF"),
    ("fig14/run_qwen_fluc.sh", {}, "no system selected"),
    ("fig15/run_overhead_breakdown.sh", {}, "LLAMA_OVERHEAD=ON"),
    ("fig10/run_llama_prop.sh", {"ADASERVE": "ON", "BACKEND": "gpu"}, "BACKEND='gpu'"),
    ("fig10/run_llama_prop.sh", {"ADASERVE": "ON", "BACKEND": "http"}, "needs ENDPOINT"),
    ("fig10/run_llama_prop.sh", {"ADASERVE": "ON", "TRACE_DIR": "/nonexistent"}, "TRACE_DIR"),
    ("fig10/run_llama_prop.sh", {"ADASERVE": "ON", "EXTRA_ARGS": "--threads 1"}, "EXTRA_ARGS applies"),
    ("fig10/run_llama_prop.sh", {"ADASERVE": "ON", "BACKEND": "engine"}, "needs MODEL"),
])
def test_bad_variables_stop_before_any_work(tmp_path, script, env, message):
    p = run_script(script, tmp_path, **env)
    assert p.returncode == 2
    assert message in p.stderr
    assert not (tmp_path / "results").exists()


def test_missing_trace_in_trace_dir_is_an_error(tmp_path):
    traces = small_trace_dir(tmp_path, ["rps4.8_ol256"])
    p = run_script("fig8,9/run_llama_rps.sh", tmp_path, ADASERVE="ON", RPS_MIN="4.6", RPS_MAX="4.8",
                   TRACE_DIR=str(traces))
    assert p.returncode == 2 and "no trace for 1 point(s)" in p.stderr


def test_grid_and_defaults():
    assert grid(2.6, 4.8, 0.2)[-1] == 4.8 and len(grid(2.6, 4.8, 0.2)) == 12
    assert grid(0.1, 0.9, 0.1) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    s = settings_from_env("fig8,9", "qwen", {"ADASERVE": "on", "VLLM_SPEC": "ON"})
    assert s.xs["qwen"][0] == 2.4 and s.xs["qwen"][-1] == 4.2
    assert s.systems == ["adaserve", "vllm_spec_4", "vllm_spec_6", "vllm_spec_8"]
    with pytest.raises(SettingsError, match="unknown model"):
        settings_from_env("fig10", "gpt", {"ADASERVE": "ON"})


def test_reproduce_runs_sweeps_plots_and_headline(tmp_path):
    """`adaserve reproduce` on one figure: generated traces, both models, plots, headline table."""
    import sys
    results, plots = tmp_path / "results", tmp_path / "plots"
    cmd = [sys.executable, "-m", "adaserve", "reproduce", "--figures", "fig15", "--results", str(results),
           "--plots", str(plots), "--no-progress", "--jobs", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    for model in ("llama", "qwen"):
        assert result_complete(results / "fig15" / model / "adaserve" / "rps3.6_ol128")
    assert (results / "traces" / "fig15" / "emission_rps3.6_ol128.json").is_file()
    assert (plots / "fig15.png").is_file() and (plots / "fig15.pdf").is_file()
    assert "figure 15  llama  speculation" in p.stdout
    assert json.loads((results / "headline.json").read_text())
    bad = subprocess.run(cmd[:5] + ["fig13"] + cmd[6:], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and "unknown figure" in bad.stderr


@pytest.mark.parametrize("script,env,points", [
    ("fig10/run_llama_prop.sh", {"PROP_MIN": "0.3", "PROP_MAX": "0.4"}, ["prop0.3_rps4.0", "prop0.4_rps4.0"]),
    ("fig11/run_qwen_slo.sh", {"SLO_SCALE_MIN": "0.8", "SLO_SCALE_MAX": "1.0", "OUTPUT_LENGTH": "128"},
     ["slo0.8_ol128", "slo1.0_ol128"]),
])
def test_fig10_fig11_tiny_sweeps(tmp_path, script, env, points):
    traces = small_trace_dir(tmp_path, points, n=30)
    p = run_script(script, tmp_path, ADASERVE="ON", VLLM_SARATHI="ON", TRACE_DIR=str(traces), **env)
    assert p.returncode == 0, p.stderr
    fig, model = script.split("/")[0], "llama" if "llama" in script else "qwen"
    for system in ("adaserve", "sarathi"):
        for point in points:
            assert result_complete(tmp_path / "results" / fig / model / system / point)
    again = run_script(script, tmp_path, ADASERVE="ON", VLLM_SARATHI="ON", TRACE_DIR=str(traces), **env)
    assert "0 point(s) run, 4 skipped" in again.stdout


def test_generated_traces_are_written_once_and_reused(tmp_path):
    """Without TRACE_DIR the sweep generates its traces (deterministically) under results/traces."""
    env = dict(ADASERVE="ON", RPS_MIN="0.2", RPS_MAX="0.2", OUTPUT_LENGTH="16")
    p = run_script("fig8,9/run_qwen_rps.sh", tmp_path, **env)
    assert p.returncode == 0, p.stderr
    trace = tmp_path / "results" / "traces" / "fig8,9" / "emission_rps0.2_ol16.json"
    first = trace.read_bytes()
    assert len(load_trace(trace)) == 100   # 0.2 req/s x 360 s, rounded to 100 as the artifact did
    trace.unlink()
    (tmp_path / "results" / "fig8,9" / "qwen" / "adaserve" / "rps0.2_ol16.txt").unlink()
    assert run_script("fig8,9/run_qwen_rps.sh", tmp_path, **env).returncode == 0
    assert trace.read_bytes() == first


TINY_PROFILE = {"name": "tiny", "baseline_ms": 2.0, "source": "test",
                "limits": {"max_batch_requests": 8, "max_batch_tokens": 256, "prefill_chunk": 64,
                           "max_seq_len": 256},
                "verify": {"tokens": [1, 8, 256], "ms": [1.0, 1.2, 8.0]},
                "draft": {"tokens": [1, 128], "ms": [0.2, 1.0]}}


def tiny_trace_dir(tmp_path, name):
    from adaserve.core.trace import TraceRecord
    d = tmp_path / "traces"
    records = [TraceRecord(40.0 * i, 8, 6, f"def f{i}(x): return x + {i}", ratio)
               for i, ratio in enumerate((1.2, -50.0, -150.0, 1.2))]
    save_trace(d / f"emission_{name}.json", records)
    profile = tmp_path / "tiny.json"
    profile.write_text(json.dumps(TINY_PROFILE))
    return d, profile


def test_engine_backend_runs_the_real_engine(tmp_path):
    traces, profile = tiny_trace_dir(tmp_path, "rps4.8_ol256")
    p = run_script("fig8,9/run_llama_rps.sh", tmp_path, ADASERVE="ON", VLLM="ON", RPS_MIN="4.8",
                   RPS_MAX="4.8", TRACE_DIR=str(traces), BACKEND="engine", MODEL="tiny-llama",
                   DRAFTER="ngram", PROFILE=str(profile), EXTRA_ARGS="--threads 1")
    assert p.returncode == 0, p.stdout + p.stderr
    for system in ("adaserve", "vllm"):
        prefix = tmp_path / "results" / "fig8,9" / "llama" / system / "rps4.8_ol256"
        assert result_complete(prefix)
        assert read_stats_block(prefix.with_name("rps4.8_ol256.txt"))["total_requests"] == "4/4"


def test_http_backend_drives_a_server(tmp_path):
    import socket
    import sys
    import time
    import urllib.request
    traces, profile = tiny_trace_dir(tmp_path, "fluc")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "adaserve", "serve", "--model", "tiny-llama",
                               "--drafter", "ngram", "--profile", str(profile), "--port", str(port),
                               "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        p = run_script("fig14/run_qwen_fluc.sh", tmp_path, ADASERVE="ON", TRACE_DIR=str(traces),
                       BACKEND="http", ENDPOINT=f"http://127.0.0.1:{port}", BASELINE_MS="2")
        assert p.returncode == 0, p.stdout + p.stderr
        prefix = tmp_path / "results" / "fig14" / "qwen" / "adaserve" / "fluc"
        assert result_complete(prefix)
        assert read_stats_block(prefix.with_name("fluc.txt"))["total_requests"] == "4/4"
    finally:
        server.terminate()
        server.wait(timeout=30)
