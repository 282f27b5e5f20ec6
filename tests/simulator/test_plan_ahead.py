"""The simulator's planning ahead (simulator/plan_ahead.py): each plan decided where the live driver decides it."""

from __future__ import annotations

import itertools

import pytest

from contract.cost_models import PAPER_MODEL, CostModel
from simulator.sim import simulate
from simulator.workloads import WorkloadItem, make_workload

STEP_S = 0.1
FLAT = CostModel(name="flat", a0_ms=1e3 * STEP_S)  # every step takes 100 ms, whatever it holds
LEAD_S = 0.003


def _items(b_arrival: float) -> list[WorkloadItem]:
    """A (arrives at 0, decodes for a while) and B (arrives at ``b_arrival``, one prefill step)."""
    return [WorkloadItem("a", 0.0, 16, 10, "paying", 0.1), WorkloadItem("b", b_arrival, 16, 3, "paying", 0.1)]


def _ttft(b_arrival: float, lead: float | None) -> float:
    res = simulate("sarathi-fcfs", _items(b_arrival), FLAT, num_blocks=64, plan_ahead_lead_s=lead)
    rec = res.metrics.records["b"]
    return rec.first_token_s - rec.arrival_s


def test_an_arrival_inside_the_lead_window_waits_one_step_more():
    # step 1 [0, 0.1) has no prediction yet: step 2 is decided at 0.0; step 2 [0.1, 0.2) is predicted to
    # take 0.1 s, so step 3 is decided at 0.2 - lead = 0.197 and B, arriving at 0.198, misses it
    assert _ttft(0.198, None) == pytest.approx(0.3 - 0.198)  # decided at 0.2: B runs in step 3
    assert _ttft(0.198, LEAD_S) == pytest.approx(0.4 - 0.198)  # one step more, as on the live stack
    # an arrival before the window is in the very same step either way
    assert _ttft(0.15, LEAD_S) == pytest.approx(_ttft(0.15, None)) == pytest.approx(0.3 - 0.15)
    # a larger lead widens the window
    assert _ttft(0.15, 0.06) == pytest.approx(0.4 - 0.15)


def test_plans_decided_ahead_take_no_time_of_their_own():
    """Deciding ahead moves decisions, not steps: the same tokens, each step priced by the cost model."""
    items = _items(0.198)
    at_end = simulate("sarathi-fcfs", items, FLAT, num_blocks=64)
    ahead = simulate("sarathi-fcfs", items, FLAT, num_blocks=64, plan_ahead_lead_s=LEAD_S)
    for res in (at_end, ahead):
        s = res.summary()
        assert s["num_finished"] == 2 and s["mean_step_s"] == pytest.approx(STEP_S)
        assert list(res.steps.cols["dt"]) == pytest.approx([STEP_S] * res.num_steps)
        starts = list(res.steps.cols["t"])  # back to back while there is work
        assert all(b - a == pytest.approx(STEP_S) for a, b in itertools.pairwise(starts))
    assert ahead.num_steps == at_end.num_steps == 10  # A decodes 10 tokens; B (3 tokens, a step later) fits beside
    # every step but the first was decided while the one before it ran (the first had nothing before it)
    assert ahead.summary()["num_steps_planned_ahead"] == 9
    # step 2 was decided at 0 (no prediction yet: 0.1 s ahead of step 1's end), the others 3 ms ahead
    assert ahead.summary()["mean_plan_ahead_lead_s"] == pytest.approx((STEP_S + 8 * LEAD_S) / 9)
    assert "num_steps_planned_ahead" not in at_end.summary()  # the default output keeps its keys


@pytest.mark.parametrize("policy", ["slai", "sarathi-fcfs", "slai-adaptive"])
def test_paper_workload_completes_and_stays_close_to_deciding_at_the_end(policy, needs_trace):
    items = make_workload(120, 2.2, seed=7, trace="paper", paying_prob=0.05, max_total=8192)
    at_end = simulate(policy, items, PAPER_MODEL, record_steps=False).summary()
    ahead = simulate(policy, items, PAPER_MODEL, record_steps=False, plan_ahead_lead_s=LEAD_S).summary()
    assert ahead["num_finished"] == at_end["num_finished"] == len(items) and not ahead["stalled"]
    assert ahead["throughput_tokens_per_s"] == pytest.approx(at_end["throughput_tokens_per_s"], rel=0.05)
    assert ahead["num_steps"] == pytest.approx(at_end["num_steps"], rel=0.15)
    # arrivals can only lose by a decision made earlier: the median first token is not sooner by much
    assert ahead["ttft_p50_s"] >= 0.9 * at_end["ttft_p50_s"]


def test_a_negative_lead_is_refused():
    with pytest.raises(ValueError, match="lead_s"):
        simulate("sarathi-fcfs", _items(0.2), FLAT, num_blocks=64, plan_ahead_lead_s=-0.001)
