"""qoserve: dynamic chunking, hybrid priority, relegation under overload."""

from __future__ import annotations

from scheduler_svc.core import SchedulerConfig, Tier, make_core
from tests.builders import fake_step_result, make_request, step


def run_all(core, now, max_steps=5000):
    """Steps with a linear step time until every request finishes.
    Returns first-token times and the ids ever relegated, by id."""
    ttft, relegated = {}, set()
    for _ in range(max_steps):
        if not core.requests:
            return ttft, relegated
        plan = core.schedule(now)
        relegated.update(r.req_id for r in core.policy.waiting.relegated)
        end = now + 0.01 + 1e-4 * plan.num_tokens
        for e in core.update(plan, fake_step_result(plan), end):
            if e.is_first:
                ttft[e.req_id] = e.ttft_s
        now = end
    raise AssertionError("requests never finished")


def surge(relegation: bool):
    """40 free 1,000-token prompts at once (about 4 s of prefill against a 0.5 s TTFT
    objective) and one paying prompt among them."""
    core = make_core("qoserve", num_blocks=20000, config=SchedulerConfig(relegation=relegation))
    reqs = [make_request(1000, 2) for _ in range(40)]
    paying = make_request(1000, 2, tier=Tier.PAYING)
    reqs.insert(20, paying)
    for r in reqs:
        core.add(r, 0.0)
    return core, reqs, paying


def test_overload_relegates_some_free_requests_and_serves_the_rest_in_time():
    core, reqs, paying = surge(relegation=True)
    ttft, relegated = run_all(core, 0.0)
    assert 20 <= len(relegated) < 40 and paying.req_id not in relegated
    assert len(ttft) == len(reqs)  # relegated requests are served too, later
    kept = [ttft[r.req_id] for r in reqs if r.req_id not in relegated]
    assert max(kept) <= 0.5 and ttft[paying.req_id] <= 0.5
    assert min(ttft[i] for i in relegated) > max(kept)
    # without relegation the same surge makes most requests miss their objective
    core2, _, _ = surge(relegation=False)
    ttft2, none = run_all(core2, 0.0)
    assert not none
    assert sum(t <= 0.5 for t in ttft2.values()) < sum(t <= 0.5 for t in ttft.values())


def test_hybrid_priority_moves_from_deadline_order_to_short_first_with_alpha():
    for alpha, first in ((0.0, "long"), (1.0, "short")):
        core = make_core("qoserve", num_blocks=20000, config=SchedulerConfig(hybrid_alpha=alpha))
        core.add(make_request(512, 1), 0.0)
        _, _, now = step(core, 0.0, dt=0.05)  # a measured step: prefill time can be predicted
        reqs = {"long": make_request(3000, 1, arrival_s=now), "short": make_request(100, 1, arrival_s=now + 0.05)}
        core.add(reqs["long"], now)
        core.add(reqs["short"], now + 0.05)
        plan = core.schedule(now + 0.05)
        assert plan.new[0].req_id == reqs[first].req_id, alpha
