"""``ValueCounts`` (core/tally.py): the inter-token latencies of a run kept as distinct values
and counts give numpy's statistics of the whole list."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaserve.core.tally import ValueCounts

QS = (0, 1, 25, 50, 90, 99, 99.9, 100)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0.5, 1.25, 3.0, 7.75, 12.5]) | st.floats(0.01, 1e4), max_size=40),
                min_size=1, max_size=30).filter(lambda chunks: any(chunks)),
       st.integers(1, 64))
def test_value_counts_give_numpy_s_statistics(chunks, merge_at):
    vc = ValueCounts()
    vc.MERGE_AT = merge_at  # merge often: the merged and the buffered values both count
    for chunk in chunks:
        vc.add(np.array(chunk, dtype=float))
    every = np.concatenate([np.array(c, dtype=float) for c in chunks])
    assert vc.count == every.size
    for q in QS:
        assert vc.percentile(q) == np.percentile(every, q), q
    assert vc.median() == np.median(every)
    assert vc.mean() == pytest.approx(every.mean(), rel=1e-12)
    assert vc.std() == pytest.approx(every.std(), rel=1e-9, abs=1e-9)
    values, counts = vc.distinct()
    assert values.tolist() == np.unique(every).tolist() and counts.sum() == every.size


def test_memory_follows_the_distinct_values():
    vc = ValueCounts()
    vc.MERGE_AT = 1000
    gaps = np.arange(50, dtype=float)  # 50 distinct gaps, met 100,000 times
    for _ in range(2000):
        vc.add(gaps)
    values, counts = vc.distinct()
    assert len(values) == 50 and counts.tolist() == [2000] * 50
    assert len(vc._buffer) == 0


# ------------------------------------------------------------- past the limits: binned values

from adaserve.core import tally as tally_module  # noqa: E402
from adaserve.core.tally import REL_ERROR, Sample, binned  # noqa: E402

POSITIVE = st.floats(1e-6, 1e9, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(POSITIVE | st.floats(-1e9, -1e-6), min_size=1, max_size=50))
def test_binned_values_are_within_the_relative_error_keep_their_order_and_bin_again_to_themselves(xs):
    x = np.sort(np.array(xs))
    b = binned(x)
    assert np.all(np.abs(b - x) <= REL_ERROR * np.abs(x))
    assert np.all(np.diff(b) >= 0)  # monotone: the k-th binned value bins the k-th value
    assert np.array_equal(binned(b), b)


def test_zero_and_non_finite_values_are_not_binned():
    special = np.array([0.0, -0.0, np.inf, -np.inf])
    assert np.array_equal(binned(special), special)
    assert np.isnan(binned(np.array([np.nan]))[0])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(POSITIVE, max_size=30), min_size=1, max_size=20).filter(lambda c: any(c)),
       st.integers(0, 40))
def test_value_counts_past_their_limit_give_numpy_s_statistics_within_the_relative_error(chunks, limit):
    vc = ValueCounts(limit=limit)
    vc.MERGE_AT = 7
    for chunk in chunks:
        vc.add(np.array(chunk, dtype=float))
    every = np.concatenate([np.array(c, dtype=float) for c in chunks])
    assert vc.count == every.size
    assert vc.exact == (np.unique(every).size <= limit)
    tol = 0.0 if vc.exact else REL_ERROR
    for q in QS:
        assert vc.percentile(q) == pytest.approx(np.percentile(every, q), rel=tol + 1e-12), q
    assert vc.median() == pytest.approx(np.median(every), rel=tol + 1e-12)
    assert vc.mean() == pytest.approx(every.mean(), rel=tol + 1e-12)


def test_binned_value_counts_stay_bounded_by_the_values_spread():
    vc = ValueCounts(limit=1000)
    rng = np.random.default_rng(0)
    for _ in range(40):
        vc.add(rng.uniform(10.0, 80.0, 25_000))  # a million distinct gaps over three octaves
    values, counts = vc.distinct()
    assert not vc.exact and counts.sum() == 1_000_000
    assert len(values) <= 3 * 5_000 + 1


def test_a_sample_is_numpy_s_in_rid_order_then_binned_past_its_limit():
    rng = np.random.default_rng(1)
    rids = rng.permutation(300)
    values = rng.uniform(1.0, 500.0, 300)
    exact, small = Sample(), Sample(limit=50)
    for rid, v in zip(rids, values):
        exact.add(int(rid), float(v))
        small.add(int(rid), float(v))
    in_rid_order = values[np.argsort(rids)]
    s = exact.stats()
    assert s.exact and s.mean() == in_rid_order.mean() and s.percentile(90) == np.percentile(in_rid_order, 90)
    b = small.stats()
    assert not b.exact and b.count == 300
    assert b.percentile(90) == pytest.approx(np.percentile(values, 90), rel=REL_ERROR)
    assert b.std() == pytest.approx(values.std(), rel=10 * REL_ERROR)
    both = Sample.union([exact, small]).stats()  # a binned part bins the union
    assert not both.exact and both.count == 600
    assert Sample.union([exact, exact]).stats().exact


def test_a_long_run_s_summary_is_binned_and_says_so(monkeypatch):
    """Past the limits the tally keeps bounded state, and the summary's latency statistics are
    within REL_ERROR of the exact ones (and flagged so); counts and attainment stay exact."""
    from adaserve.core.metrics import summarize
    from adaserve.core.request import Phase, Request
    from adaserve.core.tally import Tally

    def finished(rid: int) -> Request:
        r = Request(rid=rid, arrival_ms=10.0 * rid, input_len=20, max_new_tokens=5, slo_ratio=1.2,
                    slo_ms=40.0, category=("coding", "chat")[rid % 2])
        r.admitted_ms, r.first_token_ms, r.first_decode_ms = 10.0 * rid + 1, 10.0 * rid + 3 + rid % 7, 10.0 * rid + 3
        r.token_times_ms = [r.first_token_ms + 31.0 * k + (rid % 11) * 0.37 for k in range(5)]
        r.finish_ms, r.generated, r.steps, r.phase = r.token_times_ms[-1], 5, 5, Phase.FINISHED
        return r

    requests = [finished(rid) for rid in range(400)]
    kw = dict(committed_tokens=2000, request_steps=2000)
    exact = summarize(requests, **kw)
    monkeypatch.setattr(tally_module, "EXACT_LIMIT", 30)
    monkeypatch.setattr(tally_module, "DISTINCT_LIMIT", 5)
    tally = Tally.of(requests)
    assert all(len(s._value) <= 30 for g in tally.groups.values() for s in (g.ttft, g.tpot, g.decode))
    approx = summarize(tally, **kw)
    assert exact["exact_latency_stats"] and not approx["exact_latency_stats"]
    from adaserve.core.results import format_text
    assert "latency statistics binned" in format_text(approx, {}) and "binned" not in format_text(exact, {})
    for key in ("completed", "attained", "slo_attainment", "goodput", "total_tokens"):
        assert approx[key] == exact[key]
    for key in ("ttft_ms", "tpot_ms", "decode_latency_ms"):
        for stat in ("mean", "p50", "p90", "p99"):
            assert approx[key][stat] == pytest.approx(exact[key][stat], rel=REL_ERROR), (key, stat)
    for key in ("median_itl_ms", "p99_itl_ms", "mean_tpot_ms", "p99_ttft_ms"):
        assert approx["vllm"][key] == pytest.approx(exact["vllm"][key], rel=REL_ERROR), key
