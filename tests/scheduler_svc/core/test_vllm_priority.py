"""vllm-priority: vLLM v1's priority scheduling with the tier as priority."""

from __future__ import annotations

from scheduler_svc.core import SchedulerConfig, Tier, make_core
from tests.builders import core_with, decode_ids, make_request, prefill_chunks, step


def test_paying_first_then_fcfs_within_a_tier():
    free_early = make_request(300, 2, arrival_s=0.0)
    free_late = make_request(100, 2, arrival_s=0.1)
    paying = make_request(300, 2, tier=Tier.PAYING, arrival_s=0.2)
    core = make_core("vllm-priority", num_blocks=4000)
    for r in (free_early, free_late, paying):
        core.add(r, r.arrival_s)
    plan = core.schedule(0.2)
    # paying first; then the earlier free request (not the shorter one) gets the rest of the budget
    assert [s.req_id for s in plan.new] == [paying.req_id, free_early.req_id]
    assert prefill_chunks(plan) == {paying.req_id: 300, free_early.req_id: 212}


def test_kv_shortage_preempts_the_free_request_for_a_paying_one():
    # two one-block prompts fill the pool; the first decode needs a second block
    core = make_core("vllm-priority", num_blocks=2, config=SchedulerConfig(watermark=0.0))
    free = make_request(16, 3, arrival_s=0.0)
    paying = make_request(16, 3, tier=Tier.PAYING, arrival_s=0.1)
    core.add(free, 0.0)
    core.add(paying, 0.1)
    _, _, now = step(core, 0.1)
    plan, _, _ = step(core, now)
    # Sarathi-FCFS would preempt the latest arrival (the paying request); priority preempts free
    assert decode_ids(plan) == [paying.req_id] and plan.preempted_ids == (free.req_id,)
    assert not plan.new  # no admission in a step that preempted


def test_decodes_and_prefill_chunks_share_one_budget():
    decoders = [make_request(16, 30) for _ in range(5)]
    core = core_with("vllm-priority", *decoders)
    _, _, now = step(core, 0.0)
    big = make_request(3000, 1, arrival_s=now)
    core.add(big, now)
    for _ in range(3):
        plan, _, now = step(core, now)
        assert set(decode_ids(plan)) == {r.req_id for r in decoders}
        assert prefill_chunks(plan) == {big.req_id: 512 - 5}
