"""The simulator drives the real core: timing semantics, no lost requests, determinism."""

import pytest

from contract.cost_models import CostModel
from scheduler_svc.core.policies.registry import POLICIES
from simulator.sim import ARRIVAL, SCHEDULE, STEP_END, Simulator, build_core, simulate
from simulator.workloads import WorkloadItem, make_workload


def item(i: int, arrival: float, prompt: int, output: int, tier: str = "free") -> WorkloadItem:
    return WorkloadItem(req_id=f"r{i}", arrival_s=arrival, prompt_len=prompt, output_len=output, tier=tier,
                        tbt_slo_s=0.1 if tier == "paying" else 0.5)

FLAT10 = CostModel(name="flat10", a0_ms=10.0)  # every step takes exactly 10 ms


def test_event_priorities():
    assert ARRIVAL < STEP_END < SCHEDULE


def test_single_request_timing():
    res = simulate("sarathi-fcfs", [item(0, 1.0, prompt=100, output=5)], FLAT10)
    rec = res.metrics.records["r0"]
    assert rec.first_token_s == pytest.approx(1.01)  # prefill step 1.00 -> 1.01 samples the first token
    assert rec.last_token_s == pytest.approx(1.05)
    assert list(res.metrics.tbt_samples("free")) == pytest.approx([0.01] * 4)
    assert res.num_steps == 5 and res.sim_time_s == pytest.approx(1.05)
    # update's now = schedule's now + step time
    st = res.steps.cols
    assert list(st["t"]) == pytest.approx([1.0, 1.01, 1.02, 1.03, 1.04])
    assert list(st["dt"]) == pytest.approx([0.01] * 5)


def test_arrival_at_a_step_end_joins_the_next_step():
    # r1 arrives exactly when step 1 ends: it must be scheduled at that instant
    res = simulate("sarathi-fcfs", [item(0, 0.0, 10, 3), item(1, 0.01, 10, 2)], FLAT10)
    assert res.metrics.records["r1"].first_token_s == pytest.approx(0.02)


def test_idle_executor_waits_for_the_next_arrival():
    res = simulate("slai", [item(0, 0.0, 10, 2), item(1, 5.0, 10, 2)], FLAT10)
    assert res.metrics.records["r1"].first_token_s == pytest.approx(5.01)
    assert res.num_steps == 4
    assert res.busy_time_s == pytest.approx(0.04)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_no_request_lost(policy):
    # small KV so that every policy runs near memory and some preempt
    items = make_workload(40, qps=8.0, seed=3)
    items = [type(it)(it.req_id, it.arrival_s, 20 + it.prompt_len % 600, 1 + it.output_len % 150, it.tier,
                      it.tbt_slo_s) for it in items]
    res = simulate(policy, items, num_blocks=160)
    s = res.summary()
    assert s["num_finished"] == 40 and s["num_unfinished"] == 0 and not res.stalled
    for it in items:
        rec = res.metrics.records[it.req_id]
        assert rec.num_tokens == it.output_len and rec.finish_reason == "length"
    assert res.num_preemptions == s["num_preemptions"]


def test_preemptions_happen_under_memory_pressure():
    items = [item(i, 0.01 * i, 400, 300) for i in range(12)]
    total = sum(simulate(p, items, num_blocks=120).num_preemptions for p in ("slai", "sarathi-fcfs", "vllm"))
    assert total > 0


def test_stall_is_reported_not_looped():
    res = simulate("slai", [item(0, 0.0, 500, 2)], FLAT10, num_blocks=10)
    assert res.stalled and res.summary()["num_unfinished"] == 1


def test_deterministic():
    items = make_workload(60, qps=3.0, seed=11)
    a = simulate("slai", items).summary()
    b = simulate("slai", make_workload(60, qps=3.0, seed=11)).summary()
    for k in ("wall_time_s", "sim_speed"):
        a.pop(k), b.pop(k)
    assert a == b


def test_overrides_win_over_the_variant():
    core = build_core("slai", 100, ["fcfs=true", "token_budget=256"])
    assert core.config.fcfs is True and core.config.token_budget == 256
    with pytest.raises(ValueError):
        build_core("nope")


def test_max_sim_time_stops_the_run():
    items = make_workload(50, qps=1.0, seed=1)
    res = Simulator(build_core("slai"), max_sim_time_s=5.0).run(items)
    assert res.sim_time_s <= 5.0 + 1 and res.summary()["num_unfinished"] > 0


def test_metrics_agree_with_the_cores_token_events():
    core = build_core("slai", num_blocks=1200)
    seen = []
    update = core.update

    def spy(plan, result, now):
        events = update(plan, result, now)
        seen.extend(events)
        return events

    core.update = spy
    items = make_workload(30, qps=4.0, seed=2)
    res = Simulator(core).run(items)
    assert res.summary()["num_finished"] == 30 and res.num_preemptions > 0  # preemption gaps included
    ttft = {e.req_id: e.ttft_s for e in seen if e.is_first}
    for rid, rec in res.metrics.records.items():
        assert rec.first_token_s - rec.arrival_s == pytest.approx(ttft[rid], abs=1e-12)
    core_tbt = sorted(e.tbt_s for e in seen if e.tbt_s is not None)
    assert sorted(res.metrics.tbt_samples()) == pytest.approx(core_tbt, abs=1e-12)
