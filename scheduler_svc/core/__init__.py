"""The pure scheduling core: stdlib only (no grpc, torch, numpy, opentelemetry).

Both the scheduler service and the simulator drive it with the same loop::

    plan = core.schedule(now)
    result = runner.execute(plan)
    events = core.update(plan, result, now)
"""

from contract.lifecycle import EventKind, LifecycleEvent
from contract.plan import BatchPlan, CachedRequestSlice, NewRequestSlice, PlanStats, StepResult
from contract.sampling import SamplingParams
from contract.tiers import Tier
from scheduler_svc.core.batch_time import CumulativeMean, Ewma, make_estimator
from scheduler_svc.core.config import SchedulerConfig
from scheduler_svc.core.kv_blocks import BlockAllocator
from scheduler_svc.core.policies.registry import PAPER_POLICIES, POLICIES, make_policy, policy_config, policy_names
from scheduler_svc.core.request import Request, RequestStatus
from scheduler_svc.core.scheduler import SchedulerCore
from scheduler_svc.core.token_event import TokenEvent


def make_core(policy: str = "slai", num_blocks: int = 14733, config: SchedulerConfig | None = None,
              record_events: bool = False, overrides: list[str] | tuple[str, ...] = ()) -> SchedulerCore:
    """A core running the named policy over ``num_blocks`` KV blocks.

    ``config`` is the base; the policy variant's settings apply on top, then
    ``overrides`` (``name=value`` strings), which win.
    """
    return core_for(policy, policy_config(policy, overrides, config), num_blocks, record_events)


def core_for(policy: str, config: SchedulerConfig, num_blocks: int, record_events: bool = False) -> SchedulerCore:
    """A core running the named policy with ``config`` exactly as given (already resolved by
    :func:`policy_config`, and perhaps adjusted, e.g. to an executor's KV geometry)."""
    return SchedulerCore(POLICIES[policy][0](config), num_blocks=num_blocks, config=config,
                         record_events=record_events)


__all__ = [
    "BatchPlan", "BlockAllocator", "CachedRequestSlice", "CumulativeMean", "EventKind", "Ewma", "LifecycleEvent",
    "NewRequestSlice", "PAPER_POLICIES", "POLICIES", "PlanStats", "Request", "RequestStatus", "SamplingParams",
    "SchedulerConfig", "SchedulerCore", "StepResult", "Tier", "TokenEvent", "core_for", "make_core", "make_estimator",
    "make_policy", "policy_config", "policy_names",
]
