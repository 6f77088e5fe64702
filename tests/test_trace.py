"""Trace files (docs/definitions.md §6, issue 2 item 3): validation errors name the file, the record
index and the field; save/load round trip; atomic save; the artifact's traces (the
``artifact_traces`` fixture: the real files when found, else generated ones of the same shape);
trace_stats on a hand-made trace; ``adaserve trace inspect``."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from adaserve.core import trace as trace_mod
from adaserve.core.trace import (MAX_PROBLEMS, TraceError, TraceRecord, load_trace, parse_records,
                                 save_trace, to_requests, trace_stats)
from adaserve.workload.artifact_traces import KNOWN_SHA256

REPO = Path(__file__).resolve().parents[1]


def good(**overrides):
    """One valid record as decoded JSON, with fields replaced (or removed when set to ...)."""
    rec = {"emission_time_ms": 0.0, "input_length": 12, "output_length": 256,
           "prompt": "def add(a, b):", "slo_ratio": 1.2}
    rec.update(overrides)
    return {k: v for k, v in rec.items() if v is not ...}


def write(tmp_path: Path, data, name: str = "trace.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def load_error(path: Path) -> TraceError:
    with pytest.raises(TraceError) as info:
        load_trace(path)
    err = info.value
    assert isinstance(err, ValueError)  # the CLI turns ValueErrors into exit code 2
    assert err.path == str(path)
    return err


def assert_names(err: TraceError, path: Path, index: int, field: str) -> str:
    """One line of the message names the file, ``record <index>`` and the field; return it."""
    for line in str(err).splitlines():
        if str(path) in line and re.search(rf"\brecord {index}\b", line) and f"'{field}'" in line:
            return line
    raise AssertionError(f"no line names {path}, record {index} and '{field}':\n{err}")


# ------------------------------------------------------------------------- whole-file problems

def test_not_json_names_the_file(tmp_path):
    path = write(tmp_path, '[{"emission_time_ms": 0,')
    err = load_error(path)
    assert str(path) in str(err) and "not valid JSON" in str(err)


def test_integer_beyond_pythons_digit_limit_is_a_trace_error(tmp_path):
    path = write(tmp_path, '[{"emission_time_ms": 1' + "0" * 5000 + "}]")
    err = load_error(path)
    assert str(path) in str(err) and "not valid JSON" in str(err)


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "nope.json"
    err = load_error(path)
    assert str(path) in str(err) and "not found" in str(err)


@pytest.mark.parametrize("data, word", [({"records": []}, "dict"), ("a string", "str"),
                                        (3, "int"), (None, "null")])
def test_top_level_must_be_a_list(tmp_path, data, word):
    path = write(tmp_path, json.dumps(data))
    err = load_error(path)
    assert str(path) in str(err) and "array" in str(err) and word in str(err)


def test_empty_list_is_an_error(tmp_path):
    err = load_error(write(tmp_path, []))
    assert "no records" in str(err)


# ---------------------------------------------------------------------- per-record problems

@pytest.mark.parametrize("bad", [[1, 2], "text", 7, None, True])
def test_record_must_be_an_object(tmp_path, bad):
    path = write(tmp_path, [good(), bad])
    err = load_error(path)
    line = next(l for l in str(err).splitlines() if "record 1" in l)
    assert str(path) in line and "JSON object" in line
    assert len(err.problems) == 1


@pytest.mark.parametrize("field", trace_mod.REQUIRED_FIELDS)
def test_missing_field(tmp_path, field):
    path = write(tmp_path, [good(), good(**{"emission_time_ms": 5.0, field: ...})])
    err = load_error(path)
    assert "missing" in assert_names(err, path, 1, field)
    assert len(err.problems) == 1


WRONG_TYPES = [
    ("emission_time_ms", "0"), ("emission_time_ms", True), ("emission_time_ms", None),
    ("emission_time_ms", [0]),
    ("input_length", "12"), ("input_length", True), ("input_length", 12.0), ("input_length", None),
    ("output_length", "256"), ("output_length", False), ("output_length", 256.5),
    ("output_length", {"n": 1}),
    ("prompt", 5), ("prompt", None), ("prompt", ["a"]), ("prompt", True),
    ("slo_ratio", "1.2"), ("slo_ratio", True), ("slo_ratio", None), ("slo_ratio", "-50"),
]


@pytest.mark.parametrize("field, value", WRONG_TYPES)
def test_wrong_type(tmp_path, field, value):
    path = write(tmp_path, [good(), good(**{field: value})])
    err = load_error(path)
    line = assert_names(err, path, 1, field)
    assert "must be" in line
    assert len(err.problems) == 1


def test_negative_time(tmp_path):
    path = write(tmp_path, [good(emission_time_ms=-1.5)])
    assert ">= 0" in assert_names(load_error(path), path, 0, "emission_time_ms")


def test_decreasing_time_names_the_later_record(tmp_path):
    path = write(tmp_path, [good(emission_time_ms=0), good(emission_time_ms=500),
                            good(emission_time_ms=500), good(emission_time_ms=400)])
    err = load_error(path)
    line = assert_names(err, path, 3, "emission_time_ms")
    assert "decreases" in line and "record 2" in line  # points at the record it goes back from
    assert len(err.problems) == 1  # equal times (records 1, 2) are fine


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t "])
def test_empty_or_whitespace_prompt(tmp_path, prompt):
    path = write(tmp_path, [good(prompt=prompt)])
    assert "empty" in assert_names(load_error(path), path, 0, "prompt")


@pytest.mark.parametrize("n", [0, -3])
def test_non_positive_output_length(tmp_path, n):
    path = write(tmp_path, [good(output_length=n)])
    assert ">= 1" in assert_names(load_error(path), path, 0, "output_length")


def test_negative_input_length(tmp_path):
    path = write(tmp_path, [good(input_length=-1)])
    assert_names(load_error(path), path, 0, "input_length")


@pytest.mark.parametrize("field", ["emission_time_ms", "slo_ratio", "input_length",
                                   "output_length"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_literals_are_rejected(tmp_path, field, literal):
    # Python's json module accepts these non-standard literals; the loader must not.
    rec = good()
    rec[field] = "@@"
    text = json.dumps([rec]).replace('"@@"', literal)
    assert math.isnan(json.loads(text)[0][field]) or math.isinf(json.loads(text)[0][field])
    path = write(tmp_path, text)
    err = load_error(path)
    line = assert_names(err, path, 0, field)
    assert ("finite" in line) or ("integer" in line)
    assert len(err.problems) == 1


def test_huge_integer_time_is_reported_not_crashed(tmp_path):
    path = write(tmp_path, '[{"emission_time_ms": 1' + "0" * 400 + ', "input_length": 1, '
                           '"output_length": 1, "prompt": "x", "slo_ratio": 1.2}]')
    assert "too large" in assert_names(load_error(path), path, 0, "emission_time_ms")


def test_slo_ratio_zero(tmp_path):
    path = write(tmp_path, [good(slo_ratio=0)])
    assert "0" in assert_names(load_error(path), path, 0, "slo_ratio")


@pytest.mark.parametrize("category", ["", "   ", 3, ["chat"], True])
def test_bad_category(tmp_path, category):
    path = write(tmp_path, [good(category=category)])
    assert_names(load_error(path), path, 0, "category")


def test_null_category_is_allowed(tmp_path):
    [rec] = load_trace(write(tmp_path, [good(category=None)]))
    assert rec.category is None


def test_several_problems_are_reported_at_once(tmp_path):
    path = write(tmp_path, [
        good(),
        good(emission_time_ms=10, prompt=""),                      # record 1: prompt
        good(emission_time_ms=20, output_length=0, slo_ratio="x"),  # record 2: two fields
        "oops",                                                    # record 3: not an object
        good(emission_time_ms=5),                                  # record 4: goes back in time
        good(emission_time_ms=30, input_length=...),               # record 5: missing field
    ])
    err = load_error(path)
    assert len(err.problems) == 6
    assert_names(err, path, 1, "prompt")
    assert_names(err, path, 2, "output_length")
    assert_names(err, path, 2, "slo_ratio")
    assert "record 3" in str(err)
    assert_names(err, path, 4, "emission_time_ms")
    assert_names(err, path, 5, "input_length")
    assert "record 0" not in str(err)


def test_problem_list_is_capped_and_counts_the_rest(tmp_path):
    n = MAX_PROBLEMS + 5
    path = write(tmp_path, [good(emission_time_ms=i, output_length=0) for i in range(n)])
    err = load_error(path)
    assert len(err.problems) == MAX_PROBLEMS
    assert "and 5 more" in str(err).splitlines()[-1]


def test_parse_records_in_memory_uses_a_placeholder_name():
    with pytest.raises(TraceError, match=r"<memory>.*record 0: field 'prompt'"):
        parse_records([good(prompt=" ")])


def test_extra_fields_are_ignored_and_valid_records_load(tmp_path):
    recs = load_trace(write(tmp_path, [good(extra=1), good(emission_time_ms=3, slo_ratio=-50)]))
    assert [r.emission_time_ms for r in recs] == [0.0, 3.0]
    assert recs[1].slo_ratio == -50.0 and isinstance(recs[1].slo_ratio, float)


# ------------------------------------------------------------------------------ save and load

RECORDS = [
    TraceRecord(0.0, 120, 256, "def fib(n):\n", 1.2),
    TraceRecord(12.5, 15, 128, "Give three tips for staying healthy. ✓", -50.0, "chat"),
    TraceRecord(12.5, 800, 64, "Please generate a summarization…", -150.0, "summarization"),
    TraceRecord(3000.0, 7, 1, "anything", 1000.0, "batch jobs"),
]


def test_save_load_round_trip(tmp_path):
    path = tmp_path / "sub" / "dir" / "t.json"
    save_trace(path, RECORDS)
    assert load_trace(path) == RECORDS
    data = json.loads(path.read_text(encoding="utf-8"))
    assert "category" not in data[0]  # absent category is not written as null
    assert data[1]["category"] == "chat"
    assert sorted(data[0]) == sorted(trace_mod.REQUIRED_FIELDS)


def test_saved_file_is_strict_json_one_record_per_line(tmp_path):
    path = tmp_path / "t.json"
    save_trace(path, RECORDS)
    text = path.read_text(encoding="utf-8")
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard literal {c}"))
    assert len(text.strip().splitlines()) == len(RECORDS) + 2


def _temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]


def test_save_leaves_no_temp_file(tmp_path):
    save_trace(tmp_path / "t.json", RECORDS)
    save_trace(tmp_path / "t.json", RECORDS[:2])  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]
    assert len(load_trace(tmp_path / "t.json")) == 2


@pytest.mark.parametrize("bad", [
    TraceRecord(0.0, 1, 0, "x", 1.2),
    TraceRecord(float("nan"), 1, 1, "x", 1.2),
    TraceRecord(0.0, 1, 1, "", 1.2),
    TraceRecord(0.0, 1, 1, "x", 0.0),
    TraceRecord(0.0, 1, 1, "x", float("inf")),
    TraceRecord(0.0, 1, 1, "x", 1.2, ""),
])
def test_invalid_records_are_refused_before_writing(tmp_path, bad):
    path = tmp_path / "t.json"
    with pytest.raises(TraceError):
        save_trace(path, [bad])
    assert list(tmp_path.iterdir()) == []
    save_trace(path, RECORDS)
    before = path.read_bytes()
    with pytest.raises(TraceError, match=re.escape(str(path))):
        save_trace(path, [*RECORDS, bad])
    assert path.read_bytes() == before
    assert _temp_files(tmp_path) == []


def test_decreasing_times_and_empty_list_are_refused(tmp_path):
    with pytest.raises(TraceError, match="record 1: field 'emission_time_ms'"):
        save_trace(tmp_path / "t.json", [RECORDS[1], RECORDS[0]])
    with pytest.raises(TraceError, match="no records"):
        save_trace(tmp_path / "t.json", [])
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    save_trace(path, RECORDS)
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(trace_mod.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_trace(path, RECORDS[:1])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]


# ---------------------------------------------------------------------------------- conversion

def test_to_requests():
    reqs = to_requests(RECORDS, baseline_ms=30.0)
    assert [r.rid for r in reqs] == [0, 1, 2, 3]
    assert [r.arrival_ms for r in reqs] == [0.0, 12.5, 12.5, 3000.0]
    assert [r.input_len for r in reqs] == [120, 15, 800, 7]
    assert [r.max_new_tokens for r in reqs] == [256, 128, 64, 1]
    assert reqs[0].slo_ms == pytest.approx(36.0)  # 1.2 × 30 ms baseline
    assert reqs[1].slo_ms == 50.0 and reqs[2].slo_ms == 150.0
    assert math.isinf(reqs[3].slo_ms)
    assert [r.category for r in reqs] == ["coding", "chat", "summarization", "batch jobs"]
    assert reqs[1].prompt == RECORDS[1].prompt
    assert [r.input_len for r in to_requests(RECORDS, 30.0, input_lengths=[1, 2, 3, 4])] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="input_lengths"):
        to_requests(RECORDS, 30.0, input_lengths=[1, 2])


# ---------------------------------------------------------------------------- trace statistics

def test_trace_stats_by_hand():
    recs = [
        TraceRecord(0.0, 10, 100, "a", 1.2),       # coding
        TraceRecord(1000.0, 20, 200, "b", -50.0),  # chat
        TraceRecord(3000.0, 30, 100, "c", 1.2),    # coding
        TraceRecord(6000.0, 40, 50, "d", 1000.0),  # no SLO -> "best_effort"
    ]
    s = trace_stats(recs)
    assert s["requests"] == 4
    assert s["duration_s"] == pytest.approx(6.0)          # last − first arrival
    assert s["rps"] == pytest.approx(4 / 6)               # requests / duration
    # gaps 1000, 2000, 3000 ms: mean 2000, population std sqrt((1e6 + 0 + 1e6)/3) = 816.4966
    assert s["interarrival_cv"] == pytest.approx(math.sqrt(2e6 / 3) / 2000)  # 0.408248
    # input lengths 10, 20, 30, 40: mean 25, p50 25, p90 at rank 2.7 -> 30 + 0.7·10 = 37
    assert s["input_length"] == pytest.approx({"mean": 25.0, "p50": 25.0, "p90": 37.0, "max": 40.0})
    # output lengths sorted 50, 100, 100, 200: mean 112.5, p50 100, p90 100 + 0.7·100 = 170
    assert s["output_length"] == pytest.approx({"mean": 112.5, "p50": 100.0, "p90": 170.0,
                                               "max": 200.0})
    cats = s["categories"]
    assert list(cats) == ["coding", "chat", "best_effort"]  # paper order first, then the rest
    assert {k: v["count"] for k, v in cats.items()} == {"coding": 2, "chat": 1, "best_effort": 1}
    assert cats["coding"]["share"] == pytest.approx(0.5)
    assert cats["chat"]["share"] == pytest.approx(0.25)
    assert cats["coding"]["rps"] == pytest.approx(2 / 6)
    assert cats["coding"]["slo_ratios"] == [1.2]
    assert cats["coding"]["input_length"]["mean"] == pytest.approx(20.0)  # (10 + 30) / 2
    assert cats["best_effort"]["output_length"]["max"] == 50.0


def test_trace_stats_single_record_has_no_rate_or_cv():
    s = trace_stats([TraceRecord(5.0, 1, 1, "x", -50.0)])
    assert s["duration_s"] == 0.0 and s["rps"] is None and s["interarrival_cv"] is None
    assert s["categories"]["chat"]["count"] == 1


def test_explicit_category_wins_over_the_ratio():
    s = trace_stats([TraceRecord(0.0, 1, 1, "x", 1.2, "urgent"), TraceRecord(1.0, 1, 1, "y", 1.2)])
    assert list(s["categories"]) == ["coding", "urgent"]


# --------------------------------------------------------------------- the artifact's traces

NAME = re.compile(r"emission_rps(?P<rps>[\d.]+)_ol(?P<ol>\d+)\.json")


@pytest.mark.parametrize("name", sorted(KNOWN_SHA256))
def test_artifact_trace_loads_with_expected_shape(name, artifact_traces):
    path = artifact_traces.file(name)
    m = NAME.fullmatch(path.name)
    assert m, path.name
    rps, ol = float(m["rps"]), int(m["ol"])
    recs = load_trace(path)
    # RPS·360 rounded to the nearest 100 requests (e.g. 4.8 -> 1728 -> 1700)
    assert len(recs) == round(rps * 360 / 100) * 100
    assert all(r.output_length == ol for r in recs)
    s = trace_stats(recs)
    assert s["duration_s"] == pytest.approx(360.0, abs=1.0)
    assert 1.0 < s["interarrival_cv"] < 1.5  # burstier than Poisson
    shares = {k: v["share"] for k, v in s["categories"].items()}
    assert set(shares) == {"coding", "chat", "summarization"}
    assert shares["coding"] == pytest.approx(0.6, abs=0.03)
    assert shares["chat"] == pytest.approx(0.2, abs=0.03)
    assert shares["summarization"] == pytest.approx(0.2, abs=0.03)


def test_rps48_trace_by_name(artifact_traces):
    path = artifact_traces.file("fig8,9/emission_rps4.8_ol256.json")
    s = trace_stats(load_trace(path))
    assert s["requests"] == 1700
    counts = {k: v["count"] for k, v in s["categories"].items()}
    assert sum(counts.values()) == 1700
    assert counts["coding"] / 1700 == pytest.approx(0.60, abs=0.02)
    assert counts["chat"] / 1700 == pytest.approx(0.20, abs=0.02)
    assert counts["summarization"] / 1700 == pytest.approx(0.20, abs=0.02)
    assert s["categories"]["coding"]["slo_ratios"] == [1.2]
    assert s["categories"]["chat"]["slo_ratios"] == [-50.0]
    assert s["categories"]["summarization"]["slo_ratios"] == [-150.0]


def test_fig89_traces_are_prefixes_of_one_sequence(artifact_traces):
    files = [artifact_traces.file(n) for n in sorted(KNOWN_SHA256) if n.startswith("fig8,9/")]
    assert len(files) == 13
    loaded = [load_trace(f) for f in files]
    longest = max(loaded, key=len)
    for recs in loaded:
        assert [(r.prompt, r.slo_ratio) for r in recs] == \
            [(r.prompt, r.slo_ratio) for r in longest[:len(recs)]]


# ------------------------------------------------------------------------------ the command

def _adaserve(*args: str) -> subprocess.CompletedProcess:
    exe = REPO / ".venv" / "bin" / "adaserve"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "adaserve"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_cli_inspect_good_file(tmp_path):
    path = tmp_path / "good.json"
    save_trace(path, RECORDS)
    res = _adaserve("trace", "inspect", str(path))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert str(path) in out
    for cat in ("coding", "chat", "summarization", "batch jobs"):
        assert re.search(rf"^{cat}\s+1\s+25\.0%", out, re.M), (cat, out)
    assert re.search(r"^all\s+4\s+100\.0%", out, re.M)
    assert "req/s" in out and "CV" in out

    res = _adaserve("trace", "inspect", str(path), "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["requests"] == 4 and doc["duration_s"] == pytest.approx(3.0)
    assert doc["categories"]["chat"]["count"] == 1


def test_cli_inspect_artifact_trace(artifact_traces):
    path = artifact_traces.file("fig8,9/emission_rps4.8_ol256.json")
    res = _adaserve("trace", "inspect", str(path))
    assert res.returncode == 0, res.stderr
    assert re.search(r"^requests\s+1700 over 360\.0 s", res.stdout, re.M)
    for cat in ("coding", "chat", "summarization"):
        assert re.search(rf"^{cat}\s+\d+", res.stdout, re.M)


def test_cli_inspect_bad_file(tmp_path):
    path = write(tmp_path, [good(), good(emission_time_ms=1, output_length=0)], "bad.json")
    res = _adaserve("trace", "inspect", str(path))
    assert res.returncode == 2
    assert res.stdout == ""
    assert str(path) in res.stderr
    assert "record 1" in res.stderr and "'output_length'" in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_inspect_not_json(tmp_path):
    path = write(tmp_path, "not json at all", "broken.json")
    res = _adaserve("trace", "inspect", str(path))
    assert res.returncode == 2
    assert str(path) in res.stderr and "Traceback" not in res.stderr


# ------------------------------------------------------------- streaming load (issue 12, item 5)

def _whole_file_records(path):
    """What the whole-file path (read_json + parse_records) gives: records or the TraceError text."""
    from adaserve.core.files import JsonFileError, read_json
    try:
        return parse_records(read_json(path), path)
    except JsonFileError as e:
        return str(TraceError(path, [e.reason]))
    except TraceError as e:
        return str(e)


def _streamed(path, chunk, monkeypatch, **kwargs):
    """load_trace with reads of ``chunk`` bytes; the records or the TraceError text."""
    monkeypatch.setattr(trace_mod._JsonArrayReader, "CHUNK", chunk)
    try:
        return load_trace(path, **kwargs)
    except TraceError as e:
        return str(e)


STREAM_CASES = {
    "valid, multi-byte text": "\ufeff [\n" + ",\n".join(json.dumps(good(
        emission_time_ms=i * 10.5, prompt=f"héllo wörld {i} 🙂 " * (i + 1), input_length=123456789,
        category=None if i % 2 else "chat")) for i in range(9)) + "\n]\n",
    "truncated": '[{"emission_time_ms": 0, "prompt": "abc',
    "trailing comma": "[" + json.dumps(good()) + ",]",
    "extra data": "[" + json.dumps(good()) + "] []",
    "missing comma": "[" + json.dumps(good()) + json.dumps(good()) + "]",
    "top-level object": json.dumps({"records": [good()]}),
    "number list": "[12345678, 2]",
    "empty array": " [ ] ",
    "empty file": "",
    "bad record": json.dumps([good(), good(emission_time_ms=-1), good(output_length=0)]),
}


@pytest.mark.parametrize("chunk", [1, 3, 64, 1 << 20])
@pytest.mark.parametrize("case", list(STREAM_CASES))
def test_streamed_load_equals_the_whole_file_path(tmp_path, monkeypatch, case, chunk):
    """Records and error messages do not depend on how the file is read, wherever the reads
    split it (inside a multi-byte character, a number, a string)."""
    path = write(tmp_path, STREAM_CASES[case])
    assert _streamed(path, chunk, monkeypatch) == _whole_file_records(path)


@pytest.mark.parametrize("raw", [b"\xff\xfe[\x00]\x00", b'[{"prompt": "\xff"}]'])
def test_streamed_load_reports_encoding_problems_as_before(tmp_path, monkeypatch, raw):
    path = tmp_path / "t.json"
    path.write_bytes(raw)
    expected = _whole_file_records(path)
    assert "UTF" in expected
    assert _streamed(path, 2, monkeypatch) == expected


def test_valid_file_is_streamed_without_reading_it_whole(tmp_path, monkeypatch):
    path = write(tmp_path, [good(emission_time_ms=i, prompt=f"p{i}") for i in range(5)])
    monkeypatch.setattr(trace_mod, "read_json", lambda p: pytest.fail("read whole"))
    assert [r.prompt for r in _streamed(path, 16, monkeypatch)] == [f"p{i}" for i in range(5)]


def test_load_without_prompts_sees_them_through_each(tmp_path):
    records = [TraceRecord(float(i), 10 + i, 5, f"prompt {i}", 1.2, "chat") for i in range(4)]
    save_trace(tmp_path / "t.json", records)
    seen = []

    def each(i, rec):
        seen.append((i, rec.prompt))
        return rec if i != 2 else TraceRecord(rec.emission_time_ms, 99, rec.output_length,
                                               rec.prompt, rec.slo_ratio, rec.category)

    got = load_trace(tmp_path / "t.json", keep_prompts=False, each=each)
    assert seen == [(i, f"prompt {i}") for i in range(4)]
    assert [r.prompt for r in got] == [""] * 4
    assert [r.input_length for r in got] == [10, 11, 99, 13]
    assert [(r.emission_time_ms, r.slo_ratio) for r in got] == [(r.emission_time_ms, r.slo_ratio)
                                                                for r in records]


def test_loading_without_prompts_does_not_hold_the_file(tmp_path, monkeypatch):
    """Peak memory of a load without prompts stays far below the file's size: prompts are
    dropped as they are read, and the file is never decoded whole (a 20 MB trace here, read
    256 KiB at a time: a few reads' worth of memory)."""
    import tracemalloc
    chunk = 1 << 18
    monkeypatch.setattr(trace_mod._JsonArrayReader, "CHUNK", chunk)
    prompt = "word " * 4000  # 20 KB
    path = tmp_path / "big.json"
    path.write_text("[\n" + ",\n".join(json.dumps(good(emission_time_ms=i, prompt=prompt + str(i)))
                                       for i in range(1000)) + "\n]\n")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        records = load_trace(path, keep_prompts=False)
        peak_without = tracemalloc.get_traced_memory()[1]
        del records
        tracemalloc.reset_peak()
        records = load_trace(path)
        peak_with = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak_with > size  # the prompts themselves
    assert peak_without < 8 * chunk < size / 8, (peak_without, size)
