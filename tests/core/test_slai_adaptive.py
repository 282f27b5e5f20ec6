"""slai-adaptive: slack-sized steps and shortest-remaining-prefill-first with aging."""

from __future__ import annotations

from scheduler_svc.core import SchedulerConfig, Tier, make_core
from scheduler_svc.core.step_model import OnlineStepModel
from tests.conftest import make_request, prefill_chunks, step


def paper_step_s(tokens: int) -> float:
    return max(0.0234, 0.00695 + 0.0000912 * tokens)


def _warm(core, now=0.0):
    """Run prefill-heavy steps timed by the paper's cost model until the step model is fitted."""
    for i in range(40):
        core.add(make_request(300 + 37 * (i % 11), 1, arrival_s=now), now)
    while not core.policy.step_model.ready:
        plan = core.schedule(now)
        from tests.conftest import fake_step_result
        now += paper_step_s(plan.num_tokens)
        core.update(plan, fake_step_result(plan), now)
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
