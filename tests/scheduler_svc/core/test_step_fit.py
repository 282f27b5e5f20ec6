"""The online step-time fit over a step's composition, and slai-adaptive sizing steps with it."""

from __future__ import annotations

import random

import pytest

from scheduler_svc.core import Tier, make_core
from scheduler_svc.core.step_fit import OnlineStepFit, StepShape
from tests.builders import fake_step_result, make_request

# a GPU-shaped law (seconds): fixed + per token + per decode + per decode context token + mixing
LAW = (0.007, 0.00009, 0.00003, 0.0000002, 0.004)


def law_s(shape: StepShape) -> float:
    return sum(c * x for c, x in zip(LAW, shape.features()))


def _random_shapes(rng, n):
    for _ in range(n):
        decodes = rng.randrange(0, 200)
        yield StepShape(rng.randrange(0, 2048) if decodes else rng.randrange(128, 2048), decodes,
                        decodes * rng.randrange(16, 4000))


def test_fit_converges_to_a_known_linear_law():
    rng = random.Random(3)
    fit = OnlineStepFit()
    for shape in _random_shapes(rng, 400):
        fit.observe(shape, law_s(shape))
    assert fit.ready
    for got, want in zip(fit.coef, LAW):
        assert got == pytest.approx(want, rel=0.01)
    # with 2% measurement noise the coefficients wander, the predictions hardly
    noisy = OnlineStepFit()
    for shape in _random_shapes(rng, 2000):
        noisy.observe(shape, law_s(shape) * (1 + rng.uniform(-0.02, 0.02)))
    probe = StepShape(700, 120, 120 * 3000)
    assert noisy.predict(probe) == pytest.approx(law_s(probe), rel=0.02)
    # sizing inverts the law: the largest prefill whose mixed step fits the time
    limit = law_s(probe)
    assert abs(fit.max_prefill_within(limit, 120, 120 * 3000) - 700) <= 15
    assert fit.max_prefill_within(0.001, 120, 120 * 3000) == 0


def test_fit_is_not_ready_before_step_sizes_vary():
    fit = OnlineStepFit()
    for _ in range(100):
        fit.observe(StepShape(512, 0, 0), 0.05)  # one size only: slope unknown
    assert not fit.ready and fit.max_prefill_within(1.0, 0, 0) == 0
    fit.observe(StepShape(1024, 0, 0), 0.1)
    fit.observe(StepShape(256, 0, 0), 0.025)
    assert fit.ready and fit.coef[1] > 0
    with pytest.raises(ValueError):
        OnlineStepFit(forgetting=0.0)


def _law_step(core, now):
    """One step timed by LAW from the plan's composition (as a GPU would report it)."""
    plan = core.schedule(now)
    decodes = [c for c in plan.cached if c.is_decode]
    shape = StepShape(plan.stats.num_prefill_tokens, len(decodes), sum(c.num_computed_tokens for c in decodes))
    now += law_s(shape)
    core.update(plan, fake_step_result(plan), now)
    return plan, now


def _step_with_paying_decodes(context: int):
    """slai-adaptive after learning LAW; 40 paying decodes of ``context`` tokens each, and a
    long prompt waiting: the first plan that is sized to the decodes' TBT slack."""
    rng = random.Random(5)
    core = make_core("slai-adaptive", num_blocks=40000)
    now = 0.0
    for _ in range(60):  # varied steps: prompts of many lengths, some decoding a while
        core.add(make_request(rng.randrange(64, 3000), rng.randrange(1, 30), arrival_s=now), now)
    while core.requests:
        _, now = _law_step(core, now)
    assert core.policy.step_model.ready
    paying = [make_request(context, 500, tier=Tier.PAYING, arrival_s=now) for _ in range(40)]
    for r in paying:
        core.add(r, now)
    while any(r.is_prefill for r in paying):
        _, now = _law_step(core, now)
    _, now = _law_step(core, now)  # every paying request has a token time now
    for _ in range(4):  # enough prompt to fill any budget
        core.add(make_request(4000, 1, arrival_s=now), now)
    plan, end = _law_step(core, now)
    return plan, end - now


def test_steps_shrink_when_decodes_carry_long_contexts():
    short_plan, short_s = _step_with_paying_decodes(64)
    long_plan, long_s = _step_with_paying_decodes(2500)  # above token_budget's 512-token floor
    assert short_plan.stats.num_decodes == long_plan.stats.num_decodes == 40
    # 40 x 2,500 context tokens cost ~20 ms more than 40 x 64: ~220 fewer prefill tokens fit
    assert long_plan.stats.num_prefill_tokens < short_plan.stats.num_prefill_tokens - 150, (
        short_plan.stats.num_prefill_tokens, long_plan.stats.num_prefill_tokens)
    # both sized to 0.8 x the 0.1 s slack (a token-count-only estimate would fill the whole 0.1 s)
    assert short_s < 0.085 and long_s < 0.085, (short_s, long_s)
