import math

import numpy as np
import pytest

from simulator.workloads import (
    KNOT_D,
    KNOT_P,
    KNOT_Q,
    clip_lengths,
    clip_workload,
    clipped_rate_factor,
    effective_qps,
    length_pairs,
    load_trace,
    make_workload,
    mean_lengths,
    synthetic_lengths,
    workload_stats,
)


def test_synthetic_quantiles_match_the_knots():
    pairs = synthetic_lengths(40_000, np.random.default_rng(0), max_total=None)
    p = np.array([a for a, _ in pairs])
    d = np.array([b for _, b in pairs])
    for q, kp, kd in zip(KNOT_Q, KNOT_P, KNOT_D):
        if 5 <= q <= 95:
            assert np.percentile(p, q) == pytest.approx(kp, rel=0.06, abs=8), q
            assert np.percentile(d, q) == pytest.approx(kd, rel=0.06, abs=8), q
    assert p.mean() == pytest.approx(2356, rel=0.03)  # the knots' mean (the trace's own is 2340)
    assert d.mean() == pytest.approx(439.5, rel=0.03)
    assert abs(np.corrcoef(p, d)[0, 1]) < 0.03  # drawn independently


def test_max_total_is_respected():
    pairs = synthetic_lengths(20_000, np.random.default_rng(1), max_total=8192)
    assert max(a + b for a, b in pairs) <= 8192 and min(min(a, b) for a, b in pairs) >= 1


def test_arrivals_tiers_and_seeds():
    w = make_workload(20_000, qps=2.0, seed=5)
    assert [it.arrival_s for it in w] == sorted(it.arrival_s for it in w)
    gaps = np.diff([0.0] + [it.arrival_s for it in w])
    assert gaps.max() <= 3 / 2.0 + 1e-12  # clipped at 3/QPS
    assert effective_qps(w) == pytest.approx(2.0 * clipped_rate_factor(3.0), rel=0.03)
    assert clipped_rate_factor(3.0) == pytest.approx(1 / (1 - math.exp(-3)))
    st = workload_stats(w)
    assert st["paying_fraction"] == pytest.approx(0.05, abs=0.006)
    assert all((it.tbt_slo_s == 0.1) == (it.tier == "paying") for it in w)
    assert make_workload(100, 2.0, seed=5) == w[:100]
    # tiers and lengths do not depend on the rate
    w1 = make_workload(100, 0.5, seed=5)
    assert [(it.tier, it.prompt_len, it.output_len) for it in w1] == [(it.tier, it.prompt_len, it.output_len)
                                                                      for it in w[:100]]
    unclipped = make_workload(20_000, qps=2.0, seed=5, clip_factor=None)
    assert effective_qps(unclipped) == pytest.approx(2.0, rel=0.03)


def test_to_request():
    it = make_workload(1, 1.0, seed=0, paying_prob=1.0)[0]
    r = it.to_request()
    assert r.num_prompt_tokens == it.prompt_len and r.max_tokens == it.output_len and r.tbt_slo_s == 0.1
    assert r.is_paying


def test_paper_trace(needs_trace):
    pairs = load_trace(str(needs_trace))
    assert len(pairs) == 30_731
    assert sum(p for p, _ in pairs) / len(pairs) == pytest.approx(2340.0, rel=1e-3)
    w = make_workload(2000, 1.0, seed=42, trace="paper")
    assert all((it.prompt_len, it.output_len) in set(pairs) for it in w[:200])
    assert len({(it.prompt_len, it.output_len) for it in w}) > 1900  # shuffled, not the head of the file
    assert make_workload(50, 1.0, seed=42, trace="paper") == w[:50]
    assert make_workload(50, 1.0, seed=43, trace="paper") != w[:50]


def test_missing_trace_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError):
        make_workload(5, 1.0, trace=str(tmp_path / "nope.csv"))


def test_custom_trace_file(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n10,5,15,2\n20,7,27,3\n")
    w = make_workload(5, 1.0, trace=str(f))  # more requests than rows: reshuffled passes
    assert {(it.prompt_len, it.output_len) for it in w} == {(10, 5), (20, 7)}


def test_clip_lengths():
    assert clip_lengths(1000, 300, 128, 48) == (128, 48)
    assert clip_lengths(20, 5, 128, 48) == (20, 5)  # shorter ones are untouched
    assert clip_lengths(1000, 300) == (1000, 300)  # 0 = no cap
    assert clip_lengths(0, 0, 8, 8) == (1, 1)
    assert clip_lengths(8000, 500, max_total=8192) == (7692, 500)  # the prompt gives way to the output
    assert clip_lengths(10, 9000, max_total=8192) == (1, 8191)


def test_clip_workload_keeps_arrivals_and_tiers():
    w = make_workload(300, qps=2.0, seed=3, paying_prob=0.2)
    c = clip_workload(w, max_prompt=128, max_output=48)
    assert [(it.req_id, it.arrival_s, it.tier, it.tbt_slo_s) for it in c] == \
        [(it.req_id, it.arrival_s, it.tier, it.tbt_slo_s) for it in w]
    assert all((a.prompt_len, a.output_len) == (min(b.prompt_len, 128), min(b.output_len, 48)) for a, b in zip(c, w))
    assert any(it.prompt_len < 128 for it in c) and max(it.prompt_len for it in c) == 128
    assert clip_workload(w) == w
    mp, md = mean_lengths(length_pairs(None, seed=3, n_synthetic=2000, max_prompt=128, max_output=48))
    assert 100 < mp <= 128 and 30 < md <= 48
