"""One test per SLAI step (as numbered in scheduler_svc/core/policies/slai.py): each fails if that step is wrong."""

from __future__ import annotations

import pytest

from scheduler_svc.core import RequestStatus, SchedulerConfig, Tier, make_core
from tests.builders import core_with, decode_ids, make_request, prefill_chunks, run_to_completion, step


def _long_prompts(core, n, now, length=2048):
    """Keep prefill pressure on: enough queued prompt tokens to fill every budget."""
    for _ in range(n):
        core.add(make_request(length, 1, arrival_s=now), now)


def test_paying_decodes_are_critical_every_step_and_free_ones_wait_for_their_lst():
    core = make_core("slai", num_blocks=4000)
    paying = make_request(16, 40, tier=Tier.PAYING)
    free = make_request(16, 40, tier=Tier.FREE)
    core.add(paying, 0.0)
    core.add(free, 0.0)
    now = 0.0
    _, _, now = step(core, now)  # both prefilled; first tokens out
    _long_prompts(core, 20, now)
    free_steps, plans = [], []
    for i in range(20):
        plan, _, now = step(core, now, dt=0.05)
        plans.append(plan)
        assert paying.req_id in decode_ids(plan), f"paying decode skipped at step {i}"
        if free.req_id in decode_ids(plan):
            free_steps.append(i)
        assert plan.num_tokens == 512  # prefill fills the budget: no non-critical decodes fit
        assert plan.stats.num_noncritical_decodes == 0
    # free: LST = end + 0.5 - 5 * 0.05 = end + 0.25 s -> about 5 steps skipped between tokens
    gaps = [b - a for a, b in zip(free_steps, free_steps[1:])]
    assert len(gaps) >= 2 and all(5 <= g <= 6 for g in gaps), free_steps
    assert all(p.stats.num_critical_decodes == len(decode_ids(p)) for p in plans)


def test_non_critical_decodes_use_leftover_budget():
    core = make_core("slai", num_blocks=4000)
    free = make_request(16, 10)
    core.add(free, 0.0)
    _, _, now = step(core, 0.0)
    plan, _, _ = step(core, now)  # nothing else to do: the free decode runs non-critical
    assert decode_ids(plan) == [free.req_id]
    assert plan.stats.num_noncritical_decodes == 1 and plan.stats.num_critical_decodes == 0


def test_spf_with_paying_users_first():
    a, b, c = make_request(300), make_request(100), make_request(200)
    p = make_request(400, tier=Tier.PAYING)
    core = core_with("slai", a, b, c, p)
    plan = core.schedule(0.0)
    assert [s.req_id for s in plan.new] == [p.req_id, b.req_id, c.req_id]
    assert prefill_chunks(plan) == {p.req_id: 400, b.req_id: 100, c.req_id: 12}


def test_spf_without_priority_orders_by_length_only():
    a, b, c = make_request(300), make_request(100), make_request(200)
    p = make_request(400, tier=Tier.PAYING)
    core = core_with("slai-spf-dynamic", a, b, c, p)
    plan = core.schedule(0.0)
    assert [s.req_id for s in plan.new] == [b.req_id, c.req_id, a.req_id]
    assert prefill_chunks(plan)[a.req_id] == 212


def test_fcfs_variant_keeps_arrival_order():
    core = make_core("slai-fcfs-fixed", num_blocks=4000)
    a, b = make_request(300), make_request(100)
    core.add(a, 0.0)
    core.add(b, 0.0)
    assert [s.req_id for s in core.schedule(0.0).new] == [a.req_id, b.req_id]


def test_paused_prefill_continues_before_new_admissions():
    core = make_core("slai", num_blocks=4000)
    big = make_request(1000)
    core.add(big, 0.0)
    _, _, now = step(core, 0.0)  # 512 of 1000
    small = make_request(10)
    core.add(small, now)
    plan = core.schedule(now)
    assert prefill_chunks(plan) == {big.req_id: 488, small.req_id: 10}
    assert plan.cached[0].req_id == big.req_id  # continued first, though longer than the newcomer


@pytest.mark.parametrize("prompt_blocks, expected_offset", [(50, 5.0), (97, 10.0)])
def test_offset_switches_to_10_at_96_percent_kv(prompt_blocks, expected_offset):
    core = make_core("slai", num_blocks=100)
    req = make_request(16 * prompt_blocks - 1, 50)  # prefill leaves room for the first decode
    core.add(req, 0.0)
    now = 0.0
    while req.is_prefill:
        _, _, now = step(core, now, dt=0.05)
    plan, _, now = step(core, now, dt=0.05)
    assert plan.stats.offset == expected_offset
    # LST = end + 0.5 - delta * 0.05: critical right away only with delta = 10
    assert (plan.stats.num_critical_decodes == 1) == (expected_offset == 10.0)


def test_fixed_offset_ignores_memory():
    core = make_core("slai-spf-fixed", num_blocks=100)
    req = make_request(16 * 97 - 1, 5)
    core.add(req, 0.0)
    now = 0.0
    while req.is_prefill:
        _, _, now = step(core, now)
    plan, _, _ = step(core, now)
    assert plan.stats.offset == 10.0  # the fixed variant's delta, whatever the KV use


def test_decode_preempts_the_paused_prefill_first():
    core = make_core("slai", num_blocks=100, config=SchedulerConfig(watermark=0.0))
    a = make_request(16, 5, tier=Tier.PAYING)
    b = make_request(99 * 16, 2)  # takes every other block
    core.add(a, 0.0)
    core.add(b, 0.0)
    _, _, now = step(core, 0.0)  # a prefilled (1 block), b partially prefilled (99 blocks)
    assert core.allocator.num_free_blocks == 0
    plan, _, now = step(core, now)  # a's decode needs block 2: b, the paused prefill, is the victim
    assert decode_ids(plan) == [a.req_id]
    assert plan.preempted_ids == (b.req_id,)  # the executor drops it before running this plan
    assert b.status == RequestStatus.PREEMPTED and b.num_preemptions == 1
    run_to_completion(core, now)
    assert a.num_output_tokens == 5 and b.num_output_tokens == 2
    core.allocator.check_invariants()


def test_decode_preempts_itself_when_no_prefill_is_paused_and_never_another_decode():
    core = make_core("slai", num_blocks=2, config=SchedulerConfig(watermark=0.0))
    a, c = make_request(16, 3), make_request(16, 3)
    core.add(a, 0.0)
    core.add(c, 0.0)
    _, _, now = step(core, 0.0)
    plan, _, now = step(core, now)  # both need a 2nd block, none free: a (first in LST order) preempts itself
    assert a.status == RequestStatus.PREEMPTED and a.req_id in plan.preempted_ids
    assert decode_ids(plan) == [c.req_id] and c.status == RequestStatus.RUNNING
    assert plan.stats.num_preempted == 1


def test_preempted_request_is_resorted_by_prompt_plus_outputs():
    core = make_core("slai", num_blocks=2, config=SchedulerConfig(watermark=0.0))
    a, c = make_request(16, 3), make_request(16, 3)
    core.add(a, 0.0)
    core.add(c, 0.0)
    _, _, now = step(core, 0.0)
    step(core, now)  # a preempted with 1 output: its "prompt" is now 17 tokens
    shorter = make_request(10, 1)
    core.add(shorter, now)
    assert a.num_tokens == 17
    assert core.policy.waiting.peek() is shorter  # front insert, then SPF re-sort


def test_decode_cap_limits_decodes_per_step():
    core = make_core("slai", num_blocks=4000, config=SchedulerConfig(max_decodes=4))
    reqs = [make_request(8, 20, tier=Tier.PAYING) for _ in range(10)]
    for r in reqs:
        core.add(r, 0.0)
    _, _, now = step(core, 0.0)
    for _ in range(10):
        plan, _, now = step(core, now)
        assert len(decode_ids(plan)) <= 4


def test_token_budget_is_never_exceeded_and_filled_exactly_by_chunks():
    core = make_core("slai", num_blocks=4000, config=SchedulerConfig(token_budget=64))
    for _ in range(5):
        core.add(make_request(100, 3), 0.0)
    plans, _ = run_to_completion(core)
    assert all(p.num_tokens <= 64 for p in plans)
    assert plans[0].num_tokens == 64


def test_sequence_cap_limits_admissions():
    core = make_core("slai", num_blocks=4000, config=SchedulerConfig(max_num_seqs=3))
    for _ in range(6):
        core.add(make_request(10, 5), 0.0)
    plan = core.schedule(0.0)
    assert len(plan.new) == 3 and core.num_running == 3


def test_first_lst_uses_zero_mean_so_first_decode_waits_a_full_tbt():
    core = make_core("slai", num_blocks=4000)
    r = make_request(16, 3, tbt_slo_s=0.5)
    core.add(r, 0.0)
    core.schedule(0.0)
    # no step has completed yet: mean batch time is 0 until this update
    assert core.mean_batch_s == 0.0


def test_mean_batch_time_is_cumulative_and_feeds_deadlines():
    core = make_core("slai", num_blocks=4000)
    core.add(make_request(16, 10), 0.0)
    now = 0.0
    for dt in (0.1, 0.2, 0.3):
        _, _, now = step(core, now, dt=dt)
    assert core.mean_batch_s == pytest.approx(0.2)
    ewma = make_core("slai", num_blocks=4000, config=SchedulerConfig(mean_estimator="ewma(0.5)"))
    ewma.add(make_request(16, 10), 0.0)
    now = 0.0
    for dt in (0.1, 0.2, 0.3):
        _, _, now = step(ewma, now, dt=dt)
    assert ewma.mean_batch_s == pytest.approx(0.1 + 0.5 * 0.1 + 0.5 * (0.3 - 0.15))
