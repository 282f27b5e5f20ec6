"""Per-executor step statistics: decision time, RPC overhead, executor timings.

Times here are wall-clock (``time.perf_counter``), independent of the injected
scheduling clock, so they stay meaningful under a virtual clock. Recent samples
are kept in bounded rings for percentiles (benchmarks); means are cumulative.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from contract.plan import BatchPlan, PlanStats, StepResult

RING = 4096  # recent samples kept for percentiles


@dataclass(slots=True)
class DriverStats:
    num_steps: int = 0  # steps sent to the executor (including release-only plans)
    num_failures: int = 0  # times the executor was lost
    num_planned_ahead: int = 0  # steps decided while the step before them ran (pipelining)
    sum_decision_s: float = 0.0  # inside core.schedule
    sum_rpc_s: float = 0.0  # step start (plan sent, or previous result back) -> result back
    sum_executor_total_s: float = 0.0  # executor-reported total_ns
    sum_executor_idle_s: float = 0.0  # executor-reported idle_ns, busy periods only
    num_idle_samples: int = 0
    sum_ahead_lead_s: float = 0.0  # planned ahead: the running step's result minus the decision
    num_ahead_leads: int = 0
    last: PlanStats = field(default_factory=PlanStats)
    decision_ring: deque = field(default_factory=lambda: deque(maxlen=RING))
    overhead_ring: deque = field(default_factory=lambda: deque(maxlen=RING))

    def reset(self) -> None:
        failures = self.num_failures
        fresh = DriverStats()
        for name in self.__slots__:
            setattr(self, name, getattr(fresh, name))
        self.num_failures = failures

    def observe(self, plan: BatchPlan, result: StepResult, decision_s: float, rpc_s: float,
                busy: bool, ahead: bool) -> None:
        """One step. ``busy``: the scheduler had work when the executor became free, so the
        executor's idle_ns is scheduling overhead (not an empty system); ``ahead``: planned ahead."""
        self.num_steps += 1
        total_s = result.total_ns * 1e-9
        self.sum_decision_s += decision_s
        self.sum_rpc_s += rpc_s
        self.sum_executor_total_s += total_s
        self.num_planned_ahead += ahead
        if busy:
            self.sum_executor_idle_s += result.idle_ns * 1e-9
            self.num_idle_samples += 1
        self.decision_ring.append(decision_s)
        self.overhead_ring.append(rpc_s - total_s)
        if not plan.is_empty:
            self.last = plan.stats

    def observe_ahead_lead(self, lead_s: float) -> None:
        """A step was planned ahead ``lead_s`` before the result of the step it was queued behind."""
        self.sum_ahead_lead_s += lead_s
        self.num_ahead_leads += 1

    def _mean(self, total: float) -> float:
        return total / self.num_steps if self.num_steps else 0.0

    @property
    def mean_decision_s(self) -> float:
        return self._mean(self.sum_decision_s)

    @property
    def mean_rpc_overhead_s(self) -> float:
        """Step time seen by the scheduler (step start -> result) minus the executor's total_ns."""
        return self._mean(self.sum_rpc_s - self.sum_executor_total_s)

    @property
    def mean_executor_wait_s(self) -> float:
        """How long the executor waited for each plan while there was work (its own idle_ns):
        decision + encode + RPC, minus whatever planning ahead hid."""
        return self.sum_executor_idle_s / self.num_idle_samples if self.num_idle_samples else 0.0

    @property
    def mean_plan_ahead_lead_s(self) -> float:
        """How long before the running step's result each step planned ahead was decided: arrivals
        in that window wait a step more (the simulator models it: simulator/plan_ahead.py)."""
        return self.sum_ahead_lead_s / self.num_ahead_leads if self.num_ahead_leads else 0.0


@dataclass(frozen=True, slots=True)
class ExecutorStatsView:
    """One executor in ``Stats`` (field names = ``slai.v1.ExecutorStats``)."""

    address: str = ""
    healthy: bool = False
    num_waiting: int = 0
    num_running: int = 0
    num_blocks: int = 0
    kv_used_fraction: float = 0.0
    mean_batch_s: float = 0.0
    num_steps: int = 0
    num_preemptions: int = 0
    last_num_critical_decodes: int = 0
    last_num_noncritical_decodes: int = 0
    last_num_prefill_tokens: int = 0
    last_offset: float = 0.0
    mean_decision_s: float = 0.0
    mean_executor_wait_s: float = 0.0
    mean_rpc_overhead_s: float = 0.0
    num_steps_planned_ahead: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_hit_rate: float = 0.0
    mean_plan_ahead_lead_s: float = 0.0

