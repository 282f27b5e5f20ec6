"""fairbatching: steps sized by decode slack, decodes deferred while they have slack."""

from __future__ import annotations

from scheduler_svc.core import Tier, make_core
from tests.builders import decode_ids, fake_step_result, make_request, prefill_chunks


def cost_s(plan) -> float:
    """A linear step time, so the policy's online fit has something to learn."""
    return 0.01 + 1e-4 * plan.num_tokens


def run_step(core, now):
    plan = core.schedule(now)
    end = now + cost_s(plan)
    return plan, core.update(plan, fake_step_result(plan), end), end


def warm_core(policy="fairbatching"):
    """A core whose step-time fit is ready: single prompts of varied sizes, one step each."""
    core = make_core(policy, num_blocks=20000)
    now = 0.0
    for i in range(25):
        core.add(make_request(150 + 15 * i, 1, arrival_s=now), now)
        _, _, now = run_step(core, now)
    assert not core.requests and core.policy.steps.model.ready
    return core, now


def with_decode_and_backlog(tier, *others):
    core, now = warm_core()
    dec = make_request(16, 50, tier=tier, arrival_s=now)
    for r in (dec, *others):
        r.arrival_s = now
        core.add(r, now)
    _, _, now = run_step(core, now)  # their first tokens now
    for _ in range(4):
        core.add(make_request(3000, 1, arrival_s=now), now)
    return core, dec, now


def test_budget_grows_with_slack_and_shrinks_near_a_deadline():
    # a free decode (0.5 s TBT) that just produced a token: a big prefill burst
    core, dec, now = with_decode_and_backlog(Tier.FREE)
    plan = core.schedule(now)
    assert core.policy.steps.last_budget == 2048
    assert sum(prefill_chunks(plan).values()) == 2048 and dec.req_id not in decode_ids(plan)  # deferred
    # a paying decode (0.1 s TBT) 70 ms after its token: a small step, and the decode is in it
    core, dec, now = with_decode_and_backlog(Tier.PAYING)
    plan = core.schedule(now + 0.07)
    assert core.policy.steps.last_budget < 512
    assert decode_ids(plan) == [dec.req_id] and plan.num_tokens == core.policy.steps.last_budget


def test_deferred_decodes_still_meet_their_tbt():
    paying = make_request(16, 50, tier=Tier.PAYING)
    core, dec, now = with_decode_and_backlog(Tier.FREE, paying)
    times = {dec.req_id: [dec.last_token_s], paying.req_id: [paying.last_token_s]}
    deferred = 0
    for _ in range(30):
        plan, events, now = run_step(core, now)
        deferred += dec.req_id not in decode_ids(plan)
        for e in events:
            if e.req_id in times:
                times[e.req_id].append(e.time_s)
    gaps = {k: [b - a for a, b in zip(v, v[1:])] for k, v in times.items()}
    assert deferred >= 10  # the free decode gave most steps to the prefills ...
    assert max(gaps[dec.req_id]) <= 0.5  # ... and still met its objective
    assert max(gaps[paying.req_id]) <= 0.1
