"""The service loop and the simulator drive the same core: with the same virtual clock
and cost model they make identical plans (docs/scheduler.md, 'Parity with the simulator').

The service side runs the real driver, executor client, codec and executor gRPC
stream; only Submit is bypassed (requests are handed to the dispatcher in one
synchronous block so that all of them arrive at t = 0, before the first step,
exactly as the simulator's arrivals sort before its first schedule event).
"""

from __future__ import annotations

import asyncio

import pytest

from contract.cost_models import PAPER_MODEL, plan_features
from scheduler_svc import submit_codec
from simulator.sim import Simulator, build_core
from simulator.workloads import WorkloadItem
from tests.scheduler_svc.helpers import VirtualClock, VirtualTimeRunner, start_stack, submit_msg
from wire.pb.slai.v1 import common_pb2


def wire_cost(plan) -> float:
    """PAPER_MODEL's step time from the slices alone (plans off the wire carry no stats)."""
    f = plan_features(plan)
    return 1e-3 * PAPER_MODEL.time_ms(f["batch_tokens"], f["num_decodes"], f["sum_decode_context"],
                                      f["sum_chunk_context"])


def workload() -> list[WorkloadItem]:
    items = []
    for i in range(24):
        paying = i % 5 == 0
        items.append(WorkloadItem(req_id=f"q{i:02d}", arrival_s=0.0, prompt_len=40 + (i * 97) % 700,
                                  output_len=3 + (i * 13) % 40, tier="paying" if paying else "free",
                                  tbt_slo_s=0.1 if paying else 0.5))
    return items


def shape(plan):
    """A plan without prompt token ids (the simulator carries none)."""
    return (plan.step_id,
            tuple((s.req_id, s.num_tokens, s.block_ids, s.num_computed_tokens, s.num_new_tokens, s.sample)
                  for s in plan.new),
            plan.cached, plan.finished_ids, plan.preempted_ids, plan.stats)


def simulate(policy: str, items, num_blocks: int, overrides):
    core = build_core(policy, num_blocks, overrides)
    plans = []
    schedule = core.schedule

    def recording_schedule(now):
        plan = schedule(now)
        plans.append(plan)
        return plan

    core.schedule = recording_schedule
    result = Simulator(core, PAPER_MODEL, policy).run(items)
    tokens = {rid: rec.num_tokens for rid, rec in result.metrics.records.items()}
    return [p for p in plans if not p.is_empty], tokens, core


async def serve_virtual(policy: str, items, num_blocks: int, overrides):
    clock = VirtualClock()
    runner = VirtualTimeRunner(clock, wire_cost, num_blocks=num_blocks)
    st = await start_stack([runner], clock=clock, policy=policy, overrides=tuple(overrides), pipeline=False)
    try:
        d = st.dispatcher
        driver = d.drivers[0]
        driver.recorded_plans = []
        streams = []
        for it in items:  # one synchronous block: all arrive at t = 0 before the first step
            tier = common_pb2.TIER_PAYING if it.tier == "paying" else common_pb2.TIER_FREE
            msg = submit_msg(it.req_id, it.prompt_len, it.output_len, tier=tier, tbt_slo_s=it.tbt_slo_s)
            streams.append(d.submit(submit_codec.request_from_submit_pb(msg, clock())))

        async def drain(s):
            n = 0
            while True:
                ev = await s.get()
                n += len(ev.token_ids)
                if ev.finish_reason is not None:
                    return s.req_id, n

        tokens = dict(await asyncio.wait_for(asyncio.gather(*[drain(s) for s in streams]), 30))
        return [p for p in driver.recorded_plans if not p.is_empty], tokens, runner
    finally:
        await st.close()


@pytest.mark.parametrize("policy,num_blocks", [("slai", 4096), ("slai", 60), ("sarathi-fcfs", 60)])
async def test_service_and_simulator_make_identical_plans(policy, num_blocks):
    items = workload()
    # the service's requests carry token ids (with a common prefix), the simulator's none: no prefix caching
    overrides = ["token_budget=256", "enable_prefix_caching=false"]
    sim_plans, sim_tokens, sim_core = simulate(policy, items, num_blocks, overrides)
    svc_plans, svc_tokens, runner = await serve_virtual(policy, items, num_blocks, overrides)
    assert svc_tokens == sim_tokens == {it.req_id: it.output_len for it in items}
    assert len(svc_plans) == len(sim_plans)
    for a, b in zip(sim_plans, svc_plans):
        assert shape(a) == shape(b), f"first difference at step {a.step_id}"
    if num_blocks == 60:
        assert sum(p.stats.num_preempted for p in sim_plans) > 0  # the small pool exercises preemption
    assert runner.clock.now == pytest.approx(sum(wire_cost(p) for p in sim_plans))


async def test_slai_decodes_paying_requests_every_step():
    """Under prefill pressure, paying (0.1 s TBT) decodes are critical in every step; free ones wait."""
    clock = VirtualClock()
    runner = VirtualTimeRunner(clock, lambda plan: 0.025, num_blocks=4096)
    # (the prompts share a prefix: prefix caching off keeps the prefill pressure)
    st = await start_stack([runner], clock=clock, policy="slai", overrides=("token_budget=256",
                                                                           "enable_prefix_caching=false"),
                           pipeline=False)
    try:
        d = st.dispatcher
        d.drivers[0].recorded_plans = []
        streams = []
        for i in range(12):
            streams.append(d.submit(submit_codec.request_from_submit_pb(submit_msg(f"free{i}", 300, 30), clock())))
        for i in range(3):
            msg = submit_msg(f"pay{i}", 16, 20, tier=common_pb2.TIER_PAYING)
            streams.append(d.submit(submit_codec.request_from_submit_pb(msg, clock())))

        async def drain(s):
            while (await s.get()).finish_reason is None:
                pass

        await asyncio.wait_for(asyncio.gather(*[drain(s) for s in streams]), 30)
        plans = [p for p in d.drivers[0].recorded_plans if not p.is_empty]
    finally:
        await st.close()

    def decode_steps(rid):
        return [p.step_id for p in plans if any(c.req_id == rid and c.is_decode for c in p.cached)]

    for i in range(3):
        steps = decode_steps(f"pay{i}")
        assert len(steps) == 19 and steps == list(range(steps[0], steps[0] + 19)), steps  # every step
    assert any(p.stats.num_critical_decodes > 0 and p.stats.num_prefill_tokens > 0 for p in plans)
    def prefill_done_step(rid):
        return next(p.step_id for p in plans
                    if any(s.req_id == rid and s.sample for s in (*p.new, *p.cached) if not getattr(s, "is_decode", 0)))

    waits = [decode_steps(f"free{i}")[0] - prefill_done_step(f"free{i}") for i in range(12)]
    assert max(waits) > 5, f"free decodes should yield to prefills under SLAI: {waits}"


async def test_wall_clock_service_matches_simulator_token_counts():
    """Real time, real Submit RPCs, a FakeRunner that sleeps the cost model's step time (scaled by 0.1).

    Plans differ in detail (real step times include RPC and scheduling jitter, and arrivals are spread
    over the Submit calls), but every request gets exactly the tokens the simulator gives it.
    """
    from tests.scheduler_svc.helpers import RecordingRunner, collect, tokens_of

    items = workload()[:12]
    _, sim_tokens, _ = simulate("slai", items, 4096, ["token_budget=256"])
    runner = RecordingRunner(cost=lambda plan: 0.1 * wire_cost(plan), num_blocks=4096)
    st = await start_stack([runner], policy="slai", overrides=("token_budget=256",))
    try:
        msgs = [submit_msg(it.req_id, it.prompt_len, it.output_len,
                           tier=common_pb2.TIER_PAYING if it.tier == "paying" else common_pb2.TIER_FREE)
                for it in items]
        results = await asyncio.wait_for(asyncio.gather(*[collect(st.stub, m) for m in msgs]), 30)
    finally:
        await st.close()
    svc_tokens = {it.req_id: len(tokens_of(evs)) for it, evs in zip(items, results)}
    assert svc_tokens == sim_tokens
    assert all(evs[-1].usage.completion_tokens == sim_tokens[it.req_id] for it, evs in zip(items, results))
