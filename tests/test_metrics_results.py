"""Metrics (docs/definitions.md §3) on hand-made requests (numbers worked out by hand in the comments) and the
result files of docs/definitions.md §7 (text block + JSON)."""

from __future__ import annotations

import json
import math

import pytest

from adaserve.core import metrics, results, slo
from adaserve.core.metrics import overhead_breakdown, serving_time_ms, summarize, tpot_ms, ttft_ms
from adaserve.core.request import Phase, Request
from adaserve.core.tally import Tally
from adaserve.core.results import (load_result, read_stats_block, result_complete, stats_block,
                                   write_results)

BASELINE_MS = 30.0


def make(rid, category, ratio, *, arrival, admitted=None, first_token=None, first_decode=None,
         finish=None, generated=0, input_len=10, phase=Phase.FINISHED, steps=0, token_times=(),
         reason=None) -> Request:
    return Request(rid=rid, arrival_ms=arrival, input_len=input_len, max_new_tokens=256,
                   slo_ratio=ratio, slo_ms=slo.slo_ms(ratio, BASELINE_MS), category=category,
                   phase=phase, generated=generated, steps=steps, admitted_ms=admitted,
                   first_token_ms=first_token, first_decode_ms=first_decode, finish_ms=finish,
                   finish_reason=reason, token_times_ms=list(token_times))


def workload() -> list[Request]:
    """Four finished requests and one rejected one (times in ms, baseline latency 30 ms).

    rid cat            SLO        arrival admit 1st tok finish gen  decode lat  bound      attained
    0   coding         1.2×30=36    0       0     50     320   10   270         36·10=360  yes
    1   chat           50 (abs)   100     120    200     500    5   300         50·5=250   no
    2   summarization  150 (abs)  200     250    400    1100    8   700         150·8=1200 yes
    3   best_effort    none       250     400    500    2000    4   1500        inf        yes
    4   chat (rejected)            50       -      -       -    0   -           -          (excluded)
    """
    return [
        make(0, "coding", 1.2, arrival=0, admitted=0, first_token=50, first_decode=50, finish=320,
             generated=10, input_len=100, steps=4),
        make(1, "chat", -50, arrival=100, admitted=120, first_token=200, first_decode=200,
             finish=500, generated=5, input_len=20, steps=2,
             token_times=[200, 300, 300, 400, 500]),
        make(2, "summarization", -150, arrival=200, admitted=250, first_token=400,
             first_decode=400, finish=1100, generated=8, input_len=500, steps=3),
        make(3, "best_effort", 1000, arrival=250, admitted=400, first_token=500, first_decode=500,
             finish=2000, generated=4, input_len=30, steps=1),
        make(4, "chat", -50, arrival=50, input_len=5000, phase=Phase.REJECTED,
             reason="prompt_too_long"),
    ]


# committed tokens per verification step = generated − 1 (the prefill token is not a step):
# 9 + 4 + 7 + 3 = 23 over 4 + 2 + 3 + 1 = 10 request-steps -> 2.3 tokens per step
COMMITTED, STEPS = 23, 10
OVERHEAD_MS = {"speculation": 600.0, "verification": 1000.0, "scheduling": 100.0,
               "prefill": 200.0, "other": 100.0}  # 2000 ms in all


@pytest.fixture()
def summary():
    return summarize(workload(), committed_tokens=COMMITTED, request_steps=STEPS,
                     overhead_ms=OVERHEAD_MS)


# ---------------------------------------------------------------------------- SLOs and requests

def test_slo_encoding():
    assert slo.slo_ms(1.2, 30.0) == pytest.approx(36.0)   # relative: × baseline
    assert slo.slo_ms(2.0, 28.0) == 56.0
    assert slo.slo_ms(-50, 30.0) == 50.0                  # absolute ms
    assert slo.slo_ms(-150, 28.0) == 150.0
    assert slo.slo_ms(999, 30.0) == 999 * 30.0            # the boundary is still a ratio
    assert math.isinf(slo.slo_ms(999.5, 30.0))            # > 999: no SLO
    for bad in (0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            slo.slo_ms(bad, 30.0)


@pytest.mark.parametrize("ratio, generated, latency, attained", [
    (1.2, 10, 360.0, True),     # exactly 36 ms × 10 tokens: <= holds
    (1.2, 10, 360.5, False),
    (-50, 4, 200.0, True),      # 50 ms × 4
    (-50, 4, 200.1, False),
    (1000, 3, 1e9, True),       # best effort is always attained
])
def test_attained_boundary(ratio, generated, latency, attained):
    r = make(0, "x", ratio, arrival=0, admitted=0, first_token=10, first_decode=10,
             finish=10 + latency, generated=generated)
    assert r.decode_latency_ms == pytest.approx(latency)
    assert r.attained is attained


def test_unfinished_request_is_not_attained():
    r = make(0, "x", 1000, arrival=0, admitted=0, first_token=5, first_decode=5, generated=3,
             phase=Phase.DECODING)
    assert r.decode_latency_ms is None and r.attained is False


def test_per_request_latencies():
    r0, r1, r2, r3, r4 = workload()
    assert [ttft_ms(r) for r in (r0, r1, r2, r3)] == [50, 100, 200, 250]  # first token − arrival
    # TPOT = (finish − first token) / (generated − 1): 270/9, 300/4, 700/7, 1500/3
    assert [tpot_ms(r) for r in (r0, r1, r2, r3)] == [30, 75, 100, 500]
    assert ttft_ms(r4) is None and tpot_ms(r4) is None
    one = make(9, "x", 1.2, arrival=0, first_token=5, first_decode=5, finish=5, generated=1)
    assert tpot_ms(one) is None  # a single token has no per-output-token time
    assert metrics.itls_ms(r1) == [100, 100, 100]  # same-step commits arrive as one chunk


# ------------------------------------------------------------------------------ the summary

def test_the_tally_keeps_every_finished_request_s_itls():
    reqs = [make(0, "chat", 1.2, arrival=0, token_times=[1.0, 3.0, 3.0, 7.5]),
            make(1, "chat", 1.2, arrival=0, token_times=[]), make(2, "chat", 1.2, arrival=0, token_times=[4.0]),
            make(3, "chat", 1.2, arrival=0, token_times=[2.0, 2.5, 9.0]),
            make(4, "chat", 1.2, arrival=0, token_times=[1.0, 8.0], phase=Phase.DECODING)]  # unfinished: left out
    values, counts = Tally.of(reqs).itls.distinct()
    assert values.tolist() == [0.5, 2.0, 4.5, 6.5] and counts.tolist() == [1, 1, 1, 1]
    assert Tally.of([]).itls.count == 0


def test_a_tally_filled_as_requests_finish_gives_the_same_summary():
    """The simulator adds requests in the order they finish; the summary is the list's."""
    reqs = workload()
    tally = Tally()
    for r in (reqs[3], reqs[1], reqs[4], reqs[0], reqs[2]):
        tally.add(r)
    kw = dict(committed_tokens=COMMITTED, request_steps=STEPS, overhead_ms=OVERHEAD_MS)
    assert summarize(tally, **kw) == summarize(reqs, **kw)


def test_serving_time_is_last_finish_minus_first_admission():
    assert serving_time_ms(workload()) == 2000.0  # finish 2000 (rid 3) − admission 0 (rid 0)
    assert serving_time_ms(workload()[1:3]) == 1100.0 - 120.0
    assert serving_time_ms([]) == 0.0


def test_overall_numbers(summary):
    s = summary
    assert s["total_time_ms"] == 2000.0
    assert (s["registered"], s["completed"], s["rejected"], s["unfinished"]) == (5, 4, 1, 0)
    assert s["attained"] == 3                          # rids 0, 2, 3
    assert s["slo_attainment"] == pytest.approx(0.75)  # 3 / 4: the rejected one is not counted
    assert s["slo_attainment_pct"] == pytest.approx(75.0)
    assert s["total_tokens"] == 27                     # 10 + 5 + 8 + 4
    assert s["attained_tokens"] == 22                  # 10 + 8 + 4
    assert s["throughput_tokens_per_sec"] == pytest.approx(13.5)  # 27 tokens / 2 s
    assert s["goodput"] == pytest.approx(11.0)                    # 22 tokens / 2 s
    assert s["mean_generated_tokens_per_step"] == pytest.approx(2.3)  # 23 / 10
    assert s["rejected_reasons"] == {"prompt_too_long": 1}
    assert s["rejected_requests"] == [{"rid": 4, "category": "chat", "reason": "prompt_too_long"}]


def test_latency_distributions(summary):
    ttft = summary["ttft_ms"]  # 50, 100, 200, 250
    assert ttft["count"] == 4
    assert ttft["mean"] == pytest.approx(150.0)
    assert ttft["p50"] == pytest.approx(150.0)
    assert ttft["p90"] == pytest.approx(235.0)    # rank 0.9·3 = 2.7: 200 + 0.7·50
    assert ttft["p99"] == pytest.approx(248.5)    # rank 2.97: 200 + 0.97·50
    tpot = summary["tpot_ms"]  # 30, 75, 100, 500
    assert tpot["mean"] == pytest.approx(176.25)
    assert tpot["p50"] == pytest.approx(87.5)
    assert tpot["p99"] == pytest.approx(488.0)    # 100 + 0.97·400
    dl = summary["decode_latency_ms"]  # 270, 300, 700, 1500
    assert dl["mean"] == pytest.approx(692.5)
    assert dl["p50"] == pytest.approx(500.0)


def test_per_category(summary):
    pc = summary["per_category"]
    assert list(pc) == ["coding", "chat", "summarization", "best_effort"]
    # (registered, completed, rejected, attained)
    assert [(m["registered"], m["completed"], m["rejected"], m["attained"]) for m in pc.values()] \
        == [(1, 1, 0, 1), (2, 1, 1, 0), (1, 1, 0, 1), (1, 1, 0, 1)]
    assert pc["chat"]["slo_attainment"] == 0.0   # 0 / 1: the rejected chat request is excluded
    assert pc["coding"]["slo_attainment"] == 1.0
    # goodput per category over the same 2 s: 10/2, 0, 8/2, 4/2 — summing to the overall 11
    goodputs = {c: m["goodput"] for c, m in pc.items()}
    assert goodputs == pytest.approx({"coding": 5.0, "chat": 0.0, "summarization": 4.0,
                                      "best_effort": 2.0})
    assert sum(goodputs.values()) == pytest.approx(summary["goodput"])
    assert pc["chat"]["throughput_tokens_per_sec"] == pytest.approx(2.5)  # 5 / 2
    assert pc["summarization"]["ttft_ms"]["mean"] == 200.0
    assert pc["chat"]["tpot_ms"]["mean"] == 75.0


def test_no_slo_request_counts_as_attained_only_when_finished():
    reqs = [make(0, "best_effort", 1000, arrival=0, admitted=0, first_token=10, first_decode=10,
                 finish=1010, generated=2),
            make(1, "best_effort", 1000, arrival=0, admitted=0, first_token=10, first_decode=10,
                 generated=1, phase=Phase.DECODING)]
    s = summarize(reqs, committed_tokens=1, request_steps=1)
    # one completed, attained; the unfinished one is in neither count
    assert (s["completed"], s["attained"], s["unfinished"]) == (1, 1, 1)
    assert s["slo_attainment"] == 1.0
    assert s["goodput"] == pytest.approx(2.0 / 1.01)  # 2 tokens over 0 .. 1010 ms


def test_vllm_fields(summary):
    v = summary["vllm"]
    assert v["duration"] == pytest.approx(2.0)
    assert v["completed"] == 4
    assert v["total_input_tokens"] == 650               # 100 + 20 + 500 + 30 (rejected excluded)
    assert v["total_output_tokens"] == 27
    assert v["request_throughput"] == pytest.approx(2.0)      # 4 / 2 s
    assert v["output_throughput"] == pytest.approx(13.5)      # 27 / 2 s
    assert v["total_token_throughput"] == pytest.approx(338.5)  # 677 / 2 s
    assert v["mean_ttft_ms"] == pytest.approx(150.0)
    assert v["median_ttft_ms"] == pytest.approx(150.0)
    assert v["p99_ttft_ms"] == pytest.approx(248.5)
    # population std of 50, 100, 200, 250: sqrt((100² + 50² + 50² + 100²) / 4) = sqrt(6250)
    assert v["std_ttft_ms"] == pytest.approx(math.sqrt(6250))
    assert v["mean_tpot_ms"] == pytest.approx(176.25)
    assert v["median_tpot_ms"] == pytest.approx(87.5)
    assert v["p99_tpot_ms"] == pytest.approx(488.0)
    assert v["mean_itl_ms"] == pytest.approx(100.0)  # only rid 1 has token times: gaps 100 ×3


def test_empty_run_has_undefined_values():
    s = summarize([], committed_tokens=0, request_steps=0)
    assert s["completed"] == 0 and s["total_time_ms"] == 0.0
    assert s["slo_attainment"] is None and s["goodput"] is None
    assert s["mean_generated_tokens_per_step"] is None
    assert s["vllm"]["completed"] == 0 and s["vllm"]["request_throughput"] == 0.0


def test_registered_can_be_given():
    s = summarize(workload(), committed_tokens=COMMITTED, request_steps=STEPS, registered=7)
    assert s["registered"] == 7 and s["completed"] == 4


def test_overhead_breakdown_shares():
    ob = overhead_breakdown(OVERHEAD_MS)
    assert ob["total_us"] == pytest.approx(2_000_000.0)
    assert list(ob["us"]) == list(metrics.OVERHEAD_COMPONENTS)
    assert ob["us"]["speculation"] == pytest.approx(600_000.0)
    assert ob["share"] == pytest.approx({"speculation": 0.3, "verification": 0.5,
                                         "scheduling": 0.05, "prefill": 0.1, "other": 0.05})
    partial = overhead_breakdown({"verification": 3.0, "sampling": 1.0})
    assert list(partial["us"]) == [*metrics.OVERHEAD_COMPONENTS, "sampling"]
    assert partial["us"]["speculation"] == 0.0
    assert partial["share"]["verification"] == pytest.approx(0.75)
    assert overhead_breakdown({})["share"]["other"] is None  # nothing measured
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            overhead_breakdown({"other": bad})


# --------------------------------------------------------------------------------- result files

META = {"system": "adaserve", "model": "llama", "trace": "emission_rps4.8_ol256.json"}
BLOCK_ORDER = ["total_time_ms", "total_requests", "total_tokens", "throughput_tokens_per_sec",
               "mean_generated_tokens_per_step", "slo_attainment", "goodput"]


def strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"non-standard JSON literal {name}")
    return json.loads(text, parse_constant=refuse)


def test_stats_block_lines(summary):
    assert stats_block(summary) == [
        " total_time_ms( 2000.000)",
        " total_requests( 4/5)",
        " total_tokens( 27)",
        " throughput_tokens_per_sec( 13.5000)",
        " mean_generated_tokens_per_step( 2.3000)",
        " slo_attainment( 0.7500)",
        " goodput( 11.0000)",
        " eval_overhead_breakdown( speculation: 600000.0 us, verification: 1000000.0 us, "
        "scheduling: 100000.0 us, prefill: 200000.0 us, other: 100000.0 us)",
    ]
    no_overhead = summarize(workload(), committed_tokens=COMMITTED, request_steps=STEPS)
    assert not any("eval_overhead_breakdown" in l for l in stats_block(no_overhead))


def test_write_results_files(tmp_path, summary):
    prefix = tmp_path / "fig8,9" / "llama" / "adaserve" / "rps4.8_ol256"
    txt, js = write_results(prefix, summary, workload(), META)
    assert txt == prefix.with_name("rps4.8_ol256.txt") and js == prefix.with_name("rps4.8_ol256.json")
    assert sorted(p.name for p in txt.parent.iterdir()) == ["rps4.8_ol256.json", "rps4.8_ol256.txt"]

    text = txt.read_text(encoding="utf-8")
    assert text.endswith("\n".join(stats_block(summary)) + "\n")
    assert text.startswith("system: adaserve\n")
    tail = text.splitlines()[-8:]
    assert [l.split("(")[0].strip() for l in tail] == BLOCK_ORDER + ["eval_overhead_breakdown"]

    stats = read_stats_block(txt)
    assert list(stats) == BLOCK_ORDER + ["eval_overhead_breakdown"]
    assert float(stats["total_time_ms"]) == 2000.0
    assert stats["total_requests"] == "4/5"
    assert int(stats["total_tokens"]) == 27
    assert float(stats["throughput_tokens_per_sec"]) == pytest.approx(13.5)
    assert float(stats["mean_generated_tokens_per_step"]) == pytest.approx(2.3)
    assert float(stats["slo_attainment"]) == pytest.approx(0.75)
    assert float(stats["goodput"]) == pytest.approx(11.0)
    assert "scheduling: 100000.0 us" in stats["eval_overhead_breakdown"]

    doc = strict_json(js.read_text(encoding="utf-8"))
    assert doc["complete"] is True and doc["meta"] == META
    s = doc["summary"]
    assert s["total_time_ms"] == 2000.0 and s["completed"] == 4 and s["registered"] == 5
    assert s["total_tokens"] == 27
    assert s["throughput_tokens_per_sec"] == pytest.approx(float(stats["throughput_tokens_per_sec"]))
    assert s["goodput"] == pytest.approx(float(stats["goodput"]))
    assert s["slo_attainment"] == pytest.approx(float(stats["slo_attainment"]))
    assert s["mean_generated_tokens_per_step"] == pytest.approx(2.3)
    assert s["per_category"]["summarization"]["goodput"] == pytest.approx(4.0)
    assert s["overhead"]["share"]["verification"] == pytest.approx(0.5)
    for key in ("completed", "request_throughput", "output_throughput", "mean_ttft_ms",
                "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms"):
        assert key in s["vllm"], key
    assert s["vllm"]["output_throughput"] == pytest.approx(13.5)

    recs = doc["requests"]
    assert [r["rid"] for r in recs] == [0, 1, 2, 3, 4]
    assert [r["attained"] for r in recs] == [True, False, True, True, False]
    assert recs[0]["slo_ms"] == pytest.approx(36.0)
    assert recs[3]["slo_ms"] is None            # best effort: inf is written as null
    assert recs[4]["phase"] == "rejected" and recs[4]["finish_reason"] == "prompt_too_long"
    assert recs[1]["ttft_ms"] == 100 and recs[1]["tpot_ms"] == 75
    assert load_result(prefix) == doc
    assert result_complete(prefix)
    # written one request record at a time, the text is json.dumps of the whole document
    whole = {"complete": True, "meta": META, "summary": summary,
             "requests": [metrics.request_record(r) for r in workload()]}
    assert js.read_text(encoding="utf-8") == json.dumps(results._clean(whole), allow_nan=False) + "\n"
    _, js = write_results(tmp_path / "none", summary, [], META)  # no requests: an empty list
    assert js.read_text(encoding="utf-8") == json.dumps(results._clean({**whole, "requests": []})) + "\n"


def test_non_finite_numbers_become_null(tmp_path):
    s = summarize([], committed_tokens=0, request_steps=0)  # undefined metrics are None
    _, js = write_results(tmp_path / "empty", s, [], {"scale": float("inf"), "x": float("nan")})
    text = js.read_text(encoding="utf-8")
    doc = strict_json(text)
    assert doc["meta"] == {"scale": None, "x": None}
    assert doc["summary"]["goodput"] is None
    assert read_stats_block(tmp_path / "empty.txt")["goodput"] == "nan"


def test_prefix_with_suffix_names_the_same_pair(tmp_path, summary):
    txt, js = write_results(tmp_path / "point.txt", summary, workload(), META)
    assert (txt.name, js.name) == ("point.txt", "point.json")
    assert result_complete(tmp_path / "point")
    assert result_complete(tmp_path / "point.txt")
    assert load_result(tmp_path / "point.json")["complete"] is True


def test_result_complete_false_for_missing_partial_or_truncated(tmp_path, summary):
    prefix = tmp_path / "p"
    assert not result_complete(prefix)                         # nothing there
    txt, js = write_results(prefix, summary, workload(), META)
    assert result_complete(prefix)
    full_txt, full_js = txt.read_text(), js.read_text()

    txt.unlink()
    assert not result_complete(prefix)                         # JSON only
    txt.write_text(full_txt)
    js.unlink()
    assert not result_complete(prefix)                         # text only
    js.write_text(full_js[: len(full_js) // 2])
    assert not result_complete(prefix)                         # truncated JSON
    js.write_text(json.dumps({**json.loads(full_js), "complete": False}))
    assert not result_complete(prefix)                         # marked incomplete
    js.write_text("[1, 2]")
    assert not result_complete(prefix)                         # JSON, but not our document
    js.write_text(full_js)
    assert result_complete(prefix)

    lines = full_txt.splitlines(keepends=True)
    txt.write_text("".join(lines[:-1]))
    assert not result_complete(prefix)                         # overhead line cut off
    txt.write_text("".join(lines[:-2]))
    assert not result_complete(prefix)                         # goodput line cut off
    txt.write_text("".join(lines[:-1]) + lines[-1][:20])
    assert not result_complete(prefix)                         # cut mid-line
    txt.write_text("".join(line for line in lines if "total_tokens(" not in line))
    assert not result_complete(prefix)                         # a block line missing
    txt.write_text("")
    assert not result_complete(prefix)


def test_without_overhead_the_block_is_complete_without_that_line(tmp_path):
    s = summarize(workload(), committed_tokens=COMMITTED, request_steps=STEPS)
    txt, _ = write_results(tmp_path / "p", s, workload(), META)
    assert "eval_overhead_breakdown" not in txt.read_text()
    assert result_complete(tmp_path / "p")


def test_failed_json_write_leaves_no_text_file(tmp_path, summary):
    # text is the "done" marker: if the JSON cannot be written, neither file may appear
    with pytest.raises(TypeError):
        write_results(tmp_path / "p", summary, workload(), {"bad": object()})
    assert list(tmp_path.iterdir()) == []
    assert not result_complete(tmp_path / "p")


def test_rewrite_leaves_no_temp_files(tmp_path, summary):
    write_results(tmp_path / "p", summary, workload(), META)
    write_results(tmp_path / "p", summary, workload()[:2], META)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json", "p.txt"]
    assert len(load_result(tmp_path / "p")["requests"]) == 2


def test_read_stats_block_of_an_artifact_style_file(tmp_path):
    path = tmp_path / "artifact.txt"
    path.write_text("some log line\n  indented( 3)\n total_time_ms( 360000.5)\n"
                    " total_requests( 1690/1700)\n goodput( 812.25)\nnot a stat( 1)\n")
    assert read_stats_block(path) == {"total_time_ms": "360000.5",
                                      "total_requests": "1690/1700", "goodput": "812.25"}
    assert results.STATS_LINE.match(" slo_attainment( 0.9)")


# ------------------------------------------------------------------------- the record spool

def test_the_spool_writes_records_in_rid_order_holding_only_those_behind_a_missing_rid():
    reqs = [make(rid, "chat", 1.2, arrival=0, token_times=[1.0, 2.0]) for rid in range(6)]
    spool = results.RecordSpool(7)  # rid 6 never leaves: left out
    for rid, waiting in ((2, 1), (0, 1), (1, 0), (5, 1), (3, 1), (4, 0)):
        spool.add(reqs[rid])
        assert len(spool._waiting) == waiting, rid  # written once every lower rid is
    with pytest.raises(ValueError, match="request 3: rids must be 0 .. 6, each spooled once"):
        spool.add(reqs[3])
    assert [json.loads(t)["rid"] for t in spool.texts()] == [0, 1, 2, 3, 4, 5]
    assert [json.loads(t) for t in spool.texts()] == [json.loads(json.dumps(metrics.request_record(r))) for r in reqs]
    spool.close()


def test_records_left_behind_a_rid_that_never_leaves_are_written_at_the_end():
    reqs = [make(rid, "chat", 1.2, arrival=0, token_times=[1.0]) for rid in range(4)]
    spool = results.RecordSpool(4)
    for rid in (3, 1, 2):  # rid 0 is cut short
        spool.add(reqs[rid])
    assert [json.loads(t)["rid"] for t in spool.texts()] == [1, 2, 3]
    spool.close()
