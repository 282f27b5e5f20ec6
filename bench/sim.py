"""Discrete-event simulator that drives the real scheduling core (design habit 9).

One executor (one ``SchedulerCore``) per run, a virtual clock and a heap of
events keyed ``(time, kind, seq)``; at equal times arrivals sort before
step-ends, which sort before schedule events. The loop feeds the core exactly
as the live service does::

    plan   = core.schedule(now)
    dt     = cost_model.step_time_s(plan)            # incl. fixed per-step overhead
    events = core.update(plan, result, now + dt)     # at the STEP_END event

An idle executor (empty plan) waits for the next arrival. Per-step statistics
(``plan.stats``) are recorded for queue-length-over-time plots.

No grpc or torch here.
"""

from __future__ import annotations

import heapq
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

from bench.cost_models import PAPER_MODEL, CostModel
from bench.metrics import MetricsCollector
from bench.workloads import WorkloadItem
from scheduler_svc.core import SchedulerConfig, SchedulerCore, StepResult, make_core

# event kinds: the value is the tie-break at equal times
ARRIVAL, STEP_END, SCHEDULE = 0, 1, 2

STEP_FIELDS = ("t", "dt", "prefill_tokens", "decodes", "critical_decodes", "kv_used", "num_waiting",
               "num_running", "num_preempted")


def build_core(policy: str, num_blocks: int = 14733, overrides: list[str] | tuple[str, ...] = (),
               base: SchedulerConfig | None = None) -> SchedulerCore:
    """A core running ``policy``; ``overrides`` (``name=value``) win over the variant's settings."""
    return make_core(policy, num_blocks, config=base, overrides=overrides)


@dataclass(slots=True)
class StepLog:
    """Column-wise per-step statistics (compact: arrays of doubles)."""

    cols: dict[str, array] = field(default_factory=lambda: {k: array("d") for k in STEP_FIELDS})

    def __len__(self) -> int:
        return len(self.cols["t"])

    def as_lists(self, every: int = 1) -> dict[str, list[float]]:
        return {k: list(v[::every]) for k, v in self.cols.items()}


@dataclass(slots=True)
class SimResult:
    policy: str
    metrics: MetricsCollector
    steps: StepLog
    sim_time_s: float
    wall_time_s: float
    num_steps: int
    num_preemptions: int
    busy_time_s: float
    kv_used_max: float
    stalled: bool  # stopped with requests that could never be scheduled

    def summary(self) -> dict[str, Any]:
        s = self.metrics.summary()
        s.update(
            policy=self.policy,
            num_steps=self.num_steps,
            num_preemptions=self.num_preemptions,
            mean_step_s=self.busy_time_s / self.num_steps if self.num_steps else None,
            busy_fraction=self.busy_time_s / self.sim_time_s if self.sim_time_s > 0 else None,
            kv_used_max=self.kv_used_max,
            sim_time_s=self.sim_time_s,
            wall_time_s=self.wall_time_s,
            sim_speed=self.sim_time_s / self.wall_time_s if self.wall_time_s > 0 else None,
            stalled=self.stalled,
        )
        return s


class Simulator:
    """Heap-driven event loop around one ``SchedulerCore``."""

    def __init__(self, core: SchedulerCore, cost_model: CostModel = PAPER_MODEL, policy: str = "",
                 record_steps: bool = True, max_sim_time_s: float | None = None) -> None:
        self.core = core
        self.cost = cost_model
        self.policy = policy or core.policy.name
        self.record_steps = record_steps
        self.max_sim_time_s = max_sim_time_s
        self.now = 0.0  # the virtual clock
        self._heap: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self.metrics = MetricsCollector()
        self.steps = StepLog()

    def _push(self, t: float, kind: int, payload: Any = None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, kind, self._seq, payload))

    def run(self, items: list[WorkloadItem]) -> SimResult:
        core, cost, metrics = self.core, self.cost, self.metrics
        on_token = metrics.on_token
        log = self.steps.cols if self.record_steps else None
        items = sorted(items, key=lambda it: it.arrival_s)
        for it in items:
            metrics.register(it.req_id, it.arrival_s, it.tier, it.tbt_slo_s, it.prompt_len, it.output_len)
        heap = self._heap
        next_arrival = 0
        if items:
            self._push(items[0].arrival_s, ARRIVAL, 0)
        busy = False  # a step is in flight, or a schedule event is queued
        busy_time = 0.0
        kv_max = 0.0
        stalled = False
        wall0 = time.perf_counter()
        while heap:
            t, kind, _, payload = heapq.heappop(heap)
            self.now = t
            if self.max_sim_time_s is not None and t > self.max_sim_time_s:
                break
            if kind == ARRIVAL:
                it = items[payload]
                ev = core.add(it.to_request(), t)
                if ev is not None:
                    on_token(ev.req_id, t, 0, ev.finish_reason)
                next_arrival = payload + 1
                if next_arrival < len(items):
                    self._push(items[next_arrival].arrival_s, ARRIVAL, next_arrival)
                if not busy:
                    busy = True
                    self._push(t, SCHEDULE)
                continue
            if kind == STEP_END:
                plan = payload
                ids = plan.sampling_ids()
                result = StepResult(step_id=plan.step_id, req_ids=ids, token_ids=(0,) * len(ids))
                for ev in core.update(plan, result, t):
                    on_token(ev.req_id, t, 1, ev.finish_reason)
                if heap and heap[0][0] <= t:  # an arrival at this very instant is queued first
                    self._push(t, SCHEDULE)
                    continue
            # SCHEDULE, or straight on after a step end (saves an event: the loop's hot path)
            plan = core.schedule(t)
            if plan.is_empty:
                core.update(plan, StepResult(step_id=plan.step_id), t)
                busy = False  # idle until the next arrival
                if next_arrival >= len(items) and core.requests:
                    stalled = True  # nothing will ever change
                continue
            dt = cost.step_time_s(plan)
            busy_time += dt
            if log is not None:
                st = plan.stats
                log["t"].append(t)
                log["dt"].append(dt)
                log["prefill_tokens"].append(st.num_prefill_tokens)
                log["decodes"].append(st.num_decodes)
                log["critical_decodes"].append(st.num_critical_decodes)
                log["kv_used"].append(st.kv_used_fraction)
                log["num_waiting"].append(st.num_waiting)
                log["num_running"].append(st.num_running)
                log["num_preempted"].append(st.num_preempted)
            if plan.stats.kv_used_fraction > kv_max:
                kv_max = plan.stats.kv_used_fraction
            self._push(t + dt, STEP_END, plan)
        wall = time.perf_counter() - wall0
        metrics.num_preemptions = core.num_preemptions
        return SimResult(policy=self.policy, metrics=metrics, steps=self.steps, sim_time_s=self.now,
                         wall_time_s=wall, num_steps=core.num_steps, num_preemptions=core.num_preemptions,
                         busy_time_s=busy_time, kv_used_max=kv_max, stalled=stalled)


def simulate(policy: str, items: list[WorkloadItem], cost_model: CostModel = PAPER_MODEL,
             num_blocks: int = 14733, overrides: list[str] | tuple[str, ...] = (), record_steps: bool = True,
             max_sim_time_s: float | None = None) -> SimResult:
    """Run ``items`` through a fresh core running ``policy``."""
    core = build_core(policy, num_blocks, overrides)
    return Simulator(core, cost_model, policy, record_steps, max_sim_time_s).run(items)
