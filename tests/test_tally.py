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
