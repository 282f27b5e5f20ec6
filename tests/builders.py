"""Builders for core tests: requests, cores and step results, all through the core's public API."""

from __future__ import annotations

import itertools

from contract.tiers import DEFAULT_TBT_S
from scheduler_svc.core import BatchPlan, Request, SchedulerCore, StepResult, Tier, make_core

_ids = itertools.count()


def make_request(prompt_len: int = 32, max_tokens: int = 4, *, tier: Tier = Tier.FREE, arrival_s: float = 0.0,
                 tbt_slo_s: float | None = None, req_id: str | None = None, token_ids: bool = False,
                 ttft_slo_s: float | None = None) -> Request:
    """A request; ``tbt_slo_s`` defaults to the tier's paper value (0.1 s / 0.5 s); no TTFT objective unless given."""
    if tbt_slo_s is None:
        tbt_slo_s = DEFAULT_TBT_S[tier]
    rid = req_id if req_id is not None else f"r{next(_ids)}"
    ids = tuple(range(1, prompt_len + 1)) if token_ids else None
    return Request(rid, prompt_len, max_tokens, arrival_s, tier=tier, tbt_slo_s=tbt_slo_s, ttft_slo_s=ttft_slo_s,
                   prompt_token_ids=ids)


def make_requests(n: int, prompt_len: int = 32, max_tokens: int = 4, **kw) -> list[Request]:
    return [make_request(prompt_len, max_tokens, **kw) for _ in range(n)]


def core_with(policy: str, *reqs: Request, num_blocks: int = 4000, now: float = 0.0) -> SchedulerCore:
    """A core running ``policy`` with ``reqs`` added at ``now``."""
    core = make_core(policy, num_blocks=num_blocks)
    for r in reqs:
        core.add(r, now)
    return core


def fake_step_result(plan: BatchPlan, token: int = 7) -> StepResult:
    """What a runner would return: one token for every slice that samples."""
    ids = plan.sampling_ids()
    return StepResult(step_id=plan.step_id, req_ids=ids, token_ids=tuple(token for _ in ids))


def step(core: SchedulerCore, now: float, dt: float = 0.05, token: int = 7):
    """schedule -> fake execute -> update. Returns (plan, events, end time)."""
    plan = core.schedule(now)
    events = core.update(plan, fake_step_result(plan, token), now + dt)
    return plan, events, now + dt


def run_to_completion(core: SchedulerCore, now: float = 0.0, dt: float = 0.05, max_steps: int = 100_000):
    plans = []
    for _ in range(max_steps):
        if not core.requests:
            return plans, now
        plan, _, now = step(core, now, dt)
        plans.append(plan)
    raise AssertionError("requests never finished")


def decode_ids(plan: BatchPlan) -> list[str]:
    return [c.req_id for c in plan.cached if c.is_decode]


def prefill_chunks(plan: BatchPlan) -> dict[str, int]:
    out = {s.req_id: s.num_new_tokens for s in plan.new}
    out.update({c.req_id: c.num_new_tokens for c in plan.cached if not c.is_decode})
    return out
