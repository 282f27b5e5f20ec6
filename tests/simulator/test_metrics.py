"""Metric definitions (simulator/metrics.py) on hand-built timestamps."""

import numpy as np
import pytest

from scheduler_svc.core.token_event import TokenEvent
from simulator.metrics import MetricsCollector, SloCriterion, from_timestamps

FREE = {"req_id": "f", "arrival_s": 0.0, "tier": "free", "tbt_slo_s": 0.5, "prompt_len": 10,
        "token_times": [0.5, 0.6, 0.8, 1.8]}
PAYING = {"req_id": "p", "arrival_s": 1.0, "tier": "paying", "tbt_slo_s": 0.1, "prompt_len": 20,
          "token_times": [1.2, 1.25, 1.45]}


def test_ttft_tbt_e2e_attainment_throughput():
    s = from_timestamps([FREE, PAYING]).summary()
    assert s["ttft_p50_s"] == pytest.approx(0.35)  # median of 0.5 and 0.2
    assert s["ttft_p50_s_by_tier"] == {"paying": pytest.approx(0.2), "free": pytest.approx(0.5)}
    # TBT: gaps only, no zero for the first token
    assert s["tbt_p50_s_by_tier"]["free"] == pytest.approx(0.2)
    assert s["tbt_p99_s_by_tier"]["free"] == pytest.approx(np.percentile([0.1, 0.2, 1.0], 99))
    assert s["tbt_p99_s_by_tier"]["paying"] == pytest.approx(np.percentile([0.05, 0.2], 99))
    assert s["tbt_max_s_by_tier"]["free"] == pytest.approx(1.0)
    assert s["tbt_p50_s"] == pytest.approx(np.percentile([0.1, 0.2, 1.0, 0.05, 0.2], 50))
    assert s["slo_attainment_by_tier"] == {"free": pytest.approx(2 / 3), "paying": pytest.approx(0.5)}
    assert s["e2e_p50_s"] == pytest.approx(np.percentile([1.8, 0.45], 50))
    assert s["makespan_s"] == pytest.approx(1.8)
    assert s["throughput_tokens_per_s"] == pytest.approx(7 / 1.8)
    assert s["throughput_total_tokens_per_s"] == pytest.approx((7 + 30) / 1.8)
    assert s["num_finished"] == 2 and s["num_unfinished"] == 0


def test_token_events_give_the_same_numbers():
    c = MetricsCollector()
    for r in (FREE, PAYING):
        c.register(r["req_id"], r["arrival_s"], r["tier"], r["tbt_slo_s"], r["prompt_len"])
    for r in (FREE, PAYING):
        for i, t in enumerate(r["token_times"]):
            last = i == len(r["token_times"]) - 1
            c.on_event(TokenEvent(req_id=r["req_id"], token_ids=(7,), time_s=t, finish_reason="length" if last else None))
    assert c.summary() == from_timestamps([FREE, PAYING]).summary()


def test_preemption_gap_is_one_sample_and_multi_token_events():
    c = MetricsCollector()
    c.register("a", 0.0, "free", 0.5)
    c.on_token("a", 1.0)
    c.on_token("a", 9.0)  # a recompute stall: one large sample
    c.on_token("a", 9.1, n=3, finish_reason="length")  # 3 tokens delivered together
    assert list(c.tbt_samples("free")) == pytest.approx([8.0, 0.1, 0.0, 0.0])
    assert c.records["a"].num_tokens == 5


def test_criterion():
    crit = SloCriterion()
    ok = {"ttft_p50_s": 0.4, "tbt_p99_s_by_tier": {"paying": 0.1, "free": 0.3}, "num_unfinished": 0}
    assert crit.passes(ok)
    assert not crit.passes({**ok, "ttft_p50_s": 0.5})  # strict "<"
    assert not crit.passes({**ok, "tbt_p99_s_by_tier": {"paying": 0.11, "free": 0.3}})
    assert not crit.passes({**ok, "num_unfinished": 1})
    assert crit.margin(ok) == pytest.approx(0.0)
