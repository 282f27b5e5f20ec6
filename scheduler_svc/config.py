"""Scheduler service configuration: one frozen dataclass, validated, no I/O.

The scheduling knobs themselves live in ``scheduler_svc.core.config.SchedulerConfig``
(set with ``--set name=value``); this file holds the service's own: executors,
routing, admission bounds, tier defaults, failure handling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from contract.tiers import FREE_TBT_S, PAYING_TBT_S, Tier
from scheduler_svc.core.config import SchedulerConfig
from scheduler_svc.core.policies.registry import POLICIES, policy_config

ROUTINGS = ("least-work", "round-robin", "power-of-two")


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    policy: str = field(default="slai", metadata={"help": "scheduling policy (core registry name)"})
    executors: tuple[str, ...] = field(default=(), metadata={"help": "executor addresses host:port or unix:PATH"})
    routing: str = field(default="least-work", metadata={"help": "least-work | round-robin | power-of-two"})
    overrides: tuple[str, ...] = field(default=(), metadata={"help": "name=value SchedulerConfig overrides"})
    max_queued_requests: int = field(default=10_000, metadata={"help": "admission: max requests not yet admitted"})
    max_queued_tokens: int = field(default=8_000_000, metadata={"help": "admission: max queued prompt tokens"})
    paying_tbt_s: float = field(default=PAYING_TBT_S, metadata={"help": "TBT SLO of paying requests that carry none"})
    free_tbt_s: float = field(default=FREE_TBT_S, metadata={"help": "TBT SLO of free requests that carry none"})
    step_timeout_s: float = field(default=30.0, metadata={"help": "a step slower than this marks the executor lost"})
    connect_timeout_s: float = field(default=10.0, metadata={"help": "Info/Warmup deadline on (re)connect"})
    warmup_timeout_s: float = field(default=300.0, metadata={"help": "Warmup deadline (model warm-up can be slow)"})
    kv_blocks_cap: int = field(default=0, metadata={"help": "cap executors' KV blocks (0 = all they have)"})
    reconnect_initial_s: float = field(default=0.1, metadata={"help": "first reconnect backoff"})
    reconnect_max_s: float = field(default=5.0, metadata={"help": "largest reconnect backoff"})
    routing_seed: int = field(default=0, metadata={"help": "seed of power-of-two sampling"})
    pipeline: bool = field(default=True, metadata={
        "help": "plan step N+1 while step N runs, so the executor never waits for a plan"})
    pipeline_lead_s: float = field(default=0.003, metadata={
        "help": "plan ahead this long before the running step's predicted end"})
    # NOTE: repr=False keeps the secret out of logs and tracebacks that print the config
    service_token: str = field(default="", repr=False, metadata={
        "help": "shared token required from callers and sent to executors (wire.service_auth); '' = none"})
    stream_buffer_tokens: int = field(default=512, metadata={
        "help": "untaken tokens of one Submit stream past which its stall timer runs"})
    stream_stall_timeout_s: float = field(default=30.0, metadata={
        "help": "abort a request whose stream held stream_buffer_tokens untaken tokens this long; 0 = never"})

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose from {', '.join(POLICIES)}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")
        if self.pipeline_lead_s < 0:
            raise ValueError("pipeline_lead_s must be >= 0")
        if not self.stream_stall_timeout_s >= 0:  # also rejects NaN
            raise ValueError("stream_stall_timeout_s must be >= 0 (0 = never abort)")
        for name in ("max_queued_requests", "max_queued_tokens", "stream_buffer_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("paying_tbt_s", "free_tbt_s", "step_timeout_s", "connect_timeout_s", "warmup_timeout_s",
                     "reconnect_initial_s", "reconnect_max_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        self.scheduler_config()  # validates the overrides early

    def scheduler_config(self) -> SchedulerConfig:
        """The policy's variant settings, then the user's ``--set`` overrides (which win)."""
        return policy_config(self.policy, self.overrides)

    def tier_tbt_s(self, tier: Tier) -> float:
        return self.paying_tbt_s if tier == Tier.PAYING else self.free_tbt_s
