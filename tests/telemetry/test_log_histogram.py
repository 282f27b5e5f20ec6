"""LogHistogram: quantiles within half a bucket of the exact sample quantile."""

from __future__ import annotations

import random

import numpy as np
import pytest

from telemetry.log_histogram import LogHistogram


def test_quantiles_are_within_half_a_bucket_of_the_exact_ones():
    rng = random.Random(7)
    xs = [rng.lognormvariate(-3.0, 0.8) for _ in range(20_000)]  # TBT-like: tens of ms, a long tail
    h = LogHistogram().add_all(xs)
    assert h.count == len(xs)
    for q in (0.01, 0.5, 0.9, 0.99, 0.999):
        exact = float(np.quantile(xs, q, method="inverted_cdf"))  # the ceil(q * n)-th smallest
        assert h.quantile(q) == pytest.approx(exact, rel=0.0051)


def test_tells_a_54_ms_tail_from_a_57_ms_one():
    a = LogHistogram().add_all([0.030] * 990 + [0.054] * 10)
    b = LogHistogram().add_all([0.030] * 990 + [0.057] * 10)
    assert a.quantile(0.995) == pytest.approx(0.054, rel=0.005)
    assert b.quantile(0.995) == pytest.approx(0.057, rel=0.005)
    assert a.quantile(0.99) == pytest.approx(0.030, rel=0.005)  # rank 990 is still the body


def test_edges_and_bad_arguments():
    h = LogHistogram(lo=1e-3, hi=1.0)
    assert h.quantile(0.5) is None
    h.add(0.0)  # at or below lo: the first bucket
    h.add(5.0)  # at or above hi: the last bucket
    assert h.quantile(0.0) == pytest.approx(1e-3, rel=0.01)
    assert h.quantile(1.0) == pytest.approx(1.0, rel=0.02)
    with pytest.raises(ValueError, match="q must be in"):
        h.quantile(1.5)
    with pytest.raises(ValueError, match="rel_width"):
        LogHistogram(rel_width=0)
