"""slai-adaptive: slack-sized steps capped by KV use, no deferral when KV is tight, aging SRPT prefills."""

from __future__ import annotations

from scheduler_svc.core import SchedulerConfig, Tier, make_core
from scheduler_svc.core.step_model import OnlineStepModel
from tests.builders import (
    decode_ids,
    fake_step_result,
    make_request,
    prefill_chunks,
    step,
)


def paper_step_s(tokens: int) -> float:
    return max(0.0234, 0.00695 + 0.0000912 * tokens)


def _paper_step(core, now):
    """One step timed by the paper's cost model (keeps the policy's step-time fit honest)."""
    plan = core.schedule(now)
    now += paper_step_s(plan.num_tokens)
    core.update(plan, fake_step_result(plan), now)
    return plan, now


def _warm(core, now=0.0):
    """Run prefill-heavy steps timed by the paper's cost model until the step model is fitted."""
    for i in range(40):
        core.add(make_request(300 + 37 * (i % 11), 1, arrival_s=now), now)
    while not core.policy.step_model.ready:
        _, now = _paper_step(core, now)
    while core.requests:
        _, _, now = step(core, now, dt=0.03)
    return now


def test_online_step_model_recovers_a_linear_cost():
    m = OnlineStepModel()
    for x in range(128, 2048, 37):
        m.observe(x, 0.007 + 0.0001 * x)
    assert abs(m.a - 0.007) < 1e-6 and abs(m.b - 0.0001) < 1e-9
    assert m.max_tokens_within(0.107) == 1000


def test_steps_grow_when_no_deadline_is_tight_and_shrink_for_paying_decodes():
    core = make_core("slai-adaptive", num_blocks=20000)
    now = _warm(core)
    core.add(make_request(6000, 2, arrival_s=now), now)
    plan, _, now = step(core, now, dt=paper_step_s(2048))
    assert plan.num_tokens == 2048  # nothing to protect: the largest step
    paying = make_request(16, 50, tier=Tier.PAYING, arrival_s=now)
    core.add(paying, now)
    _, _, now = step(core, now, dt=paper_step_s(2048))
    while paying.is_prefill:
        _, _, now = step(core, now)
    plan, _, now = step(core, now, dt=0.05)
    # 0.8 x 0.1 s of slack: about (0.08 - 0.00695) / 0.0000912 = 800 tokens
    assert 700 <= plan.num_tokens <= 820, plan.num_tokens


def test_short_newcomer_overtakes_a_long_paused_prefill():
    core = make_core("slai-adaptive", num_blocks=20000, config=SchedulerConfig(max_token_budget=512))
    long = make_request(5000, 1)
    core.add(long, 0.0)
    _, _, now = step(core, 0.0)
    short = make_request(100, 1, arrival_s=now)
    core.add(short, now)
    plan = core.schedule(now)
    chunks = prefill_chunks(plan)
    assert chunks[short.req_id] == 100 and chunks[long.req_id] == 412
    assert plan.new[0].req_id == short.req_id


def test_aging_bounds_how_long_a_long_prompt_can_be_overtaken():
    for rate, first in ((1000.0, "long"), (0.0, "short")):
        core = make_core("slai-adaptive", num_blocks=20000, config=SchedulerConfig(aging_tokens_per_s=rate))
        long = make_request(3000, 1, arrival_s=0.0)
        short = make_request(1000, 1, arrival_s=5.0)  # 5 s younger: worth 5,000 tokens at 1,000 tok/s
        core.add(long, 0.0)
        core.add(short, 5.0)
        assert core.policy.waiting.peek() is {"long": long, "short": short}[first]


def _budgets_as_kv_fills(overrides=()):
    """(KV used when a step is scheduled, its budget) while long-output requests fill a 1,000-block pool."""
    core = make_core("slai-adaptive", num_blocks=1000, overrides=overrides)
    now = _warm(core)
    seen = []
    for _ in range(9):  # each: 1,584-token prompt = 99 blocks, then decodes (free tier: no tight deadline)
        hog = make_request(1584, 2000, arrival_s=now)
        core.add(hog, now)
        while hog.is_prefill:
            _, now = _paper_step(core, now)
        kv = core.kv_used_fraction()
        _, now = _paper_step(core, now)
        seen.append((kv, core.policy.last_budget))
    return seen


def test_step_budget_shrinks_as_kv_use_rises():
    seen = _budgets_as_kv_fills()
    kvs = [kv for kv, _ in seen]
    assert kvs == sorted(kvs) and kvs[0] < 0.5 < 0.85 < kvs[-1] < 0.95, kvs
    budgets = [b for _, b in seen]
    assert budgets == sorted(budgets, reverse=True), seen  # never grows while KV grows
    assert all(b == 2048 for kv, b in seen if kv <= 0.5), seen  # plenty of memory: the largest step
    kv, b = seen[-1]
    expected = 2048 - (2048 - 384) * (kv - 0.5) / (0.95 - 0.5)  # linear from kv_step_low to kv_step_high
    assert abs(b - expected) <= 1 and b < 700, seen
    # the cap is the policy's choice: disabled, the same pool keeps the largest step
    assert all(b == 2048 for _, b in _budgets_as_kv_fills(["kv_min_token_budget=2048"]))


def test_kv_cap_reaches_its_floor_and_stays_there():
    policy = make_core("slai-adaptive", num_blocks=100).policy
    caps = [policy.kv_budget_cap(kv / 100) for kv in range(101)]
    assert caps[:51] == [2048] * 51 and caps[95:] == [384] * 6
    assert caps == sorted(caps, reverse=True)


def _free_decode_steps(overrides):
    """Steps (of 20 prefill-heavy ones) in which a free-tier decode ran."""
    core = make_core("slai-adaptive", num_blocks=4000, overrides=overrides)
    free = make_request(16, 40)
    core.add(free, 0.0)
    _, _, now = step(core, 0.0)
    for _ in range(20):  # enough queued prompt tokens to fill every budget
        core.add(make_request(2048, 1, arrival_s=now), now)
    ran = []
    for i in range(20):
        plan, _, now = step(core, now, dt=0.03)
        assert plan.num_tokens == plan.stats.num_decodes + plan.stats.num_prefill_tokens == 512
        if free.req_id in decode_ids(plan):
            ran.append(i)
    return ran


def test_no_decode_is_deferred_at_or_above_the_memory_limit():
    # below memory_limit (0.8): SLAI's deferral, LST = end + 0.5 - 5 x 0.03 s: about every 12th step
    below = _free_decode_steps([])
    assert 1 <= len(below) <= 3, below
    # at or above it (here: any KV in use), every decode runs every step
    assert _free_decode_steps(["memory_limit=0.0001"]) == list(range(20))


def test_kv_step_settings_are_validated():
    import pytest
    for bad in ({"kv_step_low": 0.9, "kv_step_high": 0.9}, {"kv_step_high": 1.2}, {"kv_step_low": -0.1},
                {"kv_min_token_budget": 0}):
        with pytest.raises(ValueError):
            SchedulerConfig(**bad)


def _first_chunk_step(ttft_slo_s, steps=20, **config):
    """Index of the step that first prefills a long paying prompt while six short paying prompts arrive
    every step (shortest-first alone never reaches it); None if it never does."""
    core = make_core("slai-adaptive", num_blocks=20000, config=SchedulerConfig(max_token_budget=512, **config))
    long = make_request(4000, 1, tier=Tier.PAYING, ttft_slo_s=ttft_slo_s)
    core.add(long, 0.0)
    now = 0.0
    for i in range(steps):
        for _ in range(6):
            core.add(make_request(100, 1, tier=Tier.PAYING, arrival_s=now), now)
        plan, _, now = step(core, now, dt=0.05)
        chunks = prefill_chunks(plan)
        if long.req_id in chunks:
            assert plan.new[0].req_id == long.req_id  # its first chunk, ahead of the short ones
            return i, now - 0.05
    return None


def test_a_due_ttft_objective_jumps_the_shortest_first_order():
    assert _first_chunk_step(None) is None  # no objective: SRPT keeps serving the short ones
    i, t = _first_chunk_step(1.0)  # due after half of its 1 s objective
    assert 0.5 <= t < 0.55, (i, t)
    i, t = _first_chunk_step(1.0, ttft_urgent_fraction=0.0)  # due at once
    assert i == 0


def test_a_free_tiers_due_objective_does_not_jump_paying_prompts():
    core = make_core("slai-adaptive", num_blocks=20000, config=SchedulerConfig(max_token_budget=512))
    free = make_request(4000, 1, ttft_slo_s=0.2)
    core.add(free, 0.0)
    now = 0.0
    for _ in range(6):  # due after 0.1 s, but six short paying prompts arrive every step
        for _ in range(6):
            core.add(make_request(100, 1, tier=Tier.PAYING, arrival_s=now), now)
        plan, _, now = step(core, now, dt=0.05)
        assert free.req_id not in prefill_chunks(plan)
    for _ in range(3):  # no more arrivals: the free prompt follows the paying backlog
        plan, _, now = step(core, now, dt=0.05)
        if free.req_id in prefill_chunks(plan):
            break
    assert plan.new[-1].req_id == free.req_id  # after the step's paying prompts
    assert not any(r.is_paying for r in core.policy.waiting)


def cpu_step_s(plan) -> float:
    """A CPU-like step: 0.12 s before any token, 2.5 ms per prefill token, 1 ms per decode (a 512-token
    step takes 1.4 s, against a 0.3 s paying TBT)."""
    return 0.12 + 0.0025 * plan.stats.num_prefill_tokens + 0.001 * plan.stats.num_decodes


def _cpu_steps_with_paying_decodes(overrides):
    """(step times, prefill tokens per step) while four paying requests decode (TBT 0.3 s) and a 2,000-token
    free prompt waits, on a CPU-like host whose step-time fit was learned from its own steps."""
    core = make_core("slai-adaptive", num_blocks=20000, overrides=overrides)
    now = 0.0

    def run_one():
        nonlocal now
        plan = core.schedule(now)
        now += cpu_step_s(plan)
        core.update(plan, fake_step_result(plan), now)
        return plan

    for i in range(200):  # mixed steps of varied shapes until the fit is ready
        if core.policy.step_model.ready:
            break
        core.add(make_request(20 + 23 * (i % 9), 3 + i % 5, arrival_s=now), now)
        run_one()
    assert core.policy.step_model.ready
    while core.requests:
        run_one()
    paying = [make_request(16, 400, tier=Tier.PAYING, tbt_slo_s=0.3, arrival_s=now) for _ in range(4)]
    for r in paying:
        core.add(r, now)
    while any(r.is_prefill for r in paying):
        run_one()
    long = make_request(2000, 1, arrival_s=now)
    core.add(long, now)
    times, prefill = [], []
    for _ in range(30):
        t0 = now
        plan = run_one()
        times.append(now - t0)
        prefill.append(plan.stats.num_prefill_tokens)
    return times, prefill


def test_min_prefill_chunk_lets_steps_fit_a_tbt_objective_that_a_tau_step_outlasts():
    # by default tau (512) is the floor: a step with the long prompt's chunk outlasts the 0.3 s TBT
    times, prefill = _cpu_steps_with_paying_decodes([])
    assert max(times) > 1.0 and max(prefill) >= 400, (times, prefill)
    # with min_prefill_chunk the step is sized to the slack, and the prompt still moves every step
    times, prefill = _cpu_steps_with_paying_decodes(["min_prefill_chunk=16"])
    assert max(times) <= 0.3, times
    assert min(prefill) >= 16 and sum(prefill) >= 30 * 16, prefill
