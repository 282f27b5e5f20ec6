"""Property tests over random workloads, for every policy (hypothesis)."""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler_svc.core import POLICIES, SchedulerConfig, Tier, make_core
from tests.builders import fake_step_result, make_request

workload = st.lists(
    st.tuples(st.integers(1, 600), st.integers(1, 40), st.booleans(), st.integers(0, 5)),  # prompt, out, paying, gap
    min_size=1, max_size=30)


def _run(policy: str, items, num_blocks: int, budget: int):
    cfg = SchedulerConfig(token_budget=budget, max_num_seqs=16, max_decodes=12, max_num_batched_tokens=1024,
                          max_model_len=4096)
    core = make_core(policy, num_blocks=num_blocks, config=cfg)
    on_step_end = core.policy.on_step_end

    def checked_on_step_end(served, now):  # the count policies rely on to skip re-testing each request
        n = core.last_served_prefilling
        assert n is None or n == sum(not r.is_decode for r in served), "the core miscounted prefilling requests"
        on_step_end(served, now)

    core.policy.on_step_end = checked_on_step_end
    # each policy's own step limit: vllm batches whole prompts; the slack-sized policies (slai-adaptive,
    # and the fairbatching and qoserve baselines: their docstrings) size steps up to max_token_budget
    slack_sized = max(budget, cfg.max_token_budget)
    limit_tokens = {"vllm": cfg.max_num_batched_tokens, "slai-adaptive": slack_sized, "fairbatching": slack_sized,
                    "qoserve": slack_sized}.get(policy, budget)
    pending = [make_request(p, d, tier=Tier.PAYING if pay else Tier.FREE) for p, d, pay, _ in items]
    gaps = [g for *_, g in items]
    reqs = list(pending)
    now, steps = 0.0, 0
    while pending or core.requests:
        while pending and gaps[0] == 0:
            gaps.pop(0)
            r = pending.pop(0)
            r.arrival_s = now
            core.add(r, now)
        if gaps:
            gaps[0] -= 1
        plan = core.schedule(now)
        ids = plan.scheduled_ids()
        assert len(ids) == len(set(ids)), "a request scheduled twice in one step"
        assert plan.num_tokens <= limit_tokens
        assert core.num_running <= cfg.max_num_seqs
        core.allocator.check_invariants()
        now += 0.01 + 0.0001 * plan.num_tokens
        core.update(plan, fake_step_result(plan), now)
        steps += 1
        assert steps < 20_000, "starvation: requests never finish"
    return reqs, core


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=workload, num_blocks=st.integers(45, 400), budget=st.sampled_from([64, 128, 512]))
def test_every_policy_finishes_every_request_with_exactly_its_tokens(items, num_blocks, budget):
    for policy in POLICIES:
        reqs, core = _run(policy, items, num_blocks, budget)
        ignored = [r for r in reqs if r.status.name == "FINISHED_IGNORED"]
        for r in reqs:
            if r not in ignored:
                assert r.num_output_tokens == r.max_tokens, (policy, r)
        assert core.allocator.num_used_blocks == 0, policy
        assert not core.requests and not core.running


@settings(max_examples=30, deadline=None)
@given(items=workload)
def test_slai_has_at_most_one_partial_prefill(items):
    core = make_core("slai", num_blocks=2000, config=SchedulerConfig(token_budget=128))
    for p, d, pay, _ in items:
        core.add(make_request(p, d, tier=Tier.PAYING if pay else Tier.FREE), 0.0)
    now = 0.0
    while core.requests:
        plan = core.schedule(now)
        now += 0.02
        core.update(plan, fake_step_result(plan), now)
        partial = [r for r in core.running.values() if r.is_prefill and r.num_computed_tokens > 0]
        assert len(partial) <= 1


@settings(max_examples=30, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["alloc", "append", "free"]), st.integers(0, 9),
                              st.integers(1, 100)), max_size=60))
def test_allocator_never_double_books_or_leaks(ops):
    from scheduler_svc.core import BlockAllocator
    a = BlockAllocator(40, 16, 0.0)
    sizes: Counter = Counter()
    for op, rid, n in ops:
        key = str(rid)
        if op == "alloc" and not a.owns_blocks(key) and a.can_allocate(n):
            a.allocate(key, n)
            sizes[key] = n
        elif op == "append" and a.owns_blocks(key) and a.blocks_for(sizes[key] + n) - len(a.block_table(key)) <= a.num_free_blocks:
            sizes[key] += n
            a.append(key, sizes[key])
        elif op == "free":
            a.free(key)
            sizes.pop(key, None)
        a.check_invariants()
        for k, n_tok in sizes.items():
            assert len(a.block_table(k)) == a.blocks_for(n_tok)
