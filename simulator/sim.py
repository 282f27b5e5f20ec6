"""Discrete-event simulator that drives the real scheduling core (no second copy of any policy to drift).

One event loop (:func:`run_events`) over K executors (one ``SchedulerCore``
each), a virtual clock and a heap of events keyed ``(time, kind, seq)``; at
equal times arrivals sort before step-ends, which sort before schedule events.
:class:`Simulator` is the one-executor case; ``simulator.cluster`` routes
arrivals across several. The loop feeds each core exactly as the live service
does::

    plan   = core.schedule(now)
    dt     = cost_model.step_time_s(plan)            # incl. fixed per-step overhead
    events = core.update(plan, result, now + dt)     # at the STEP_END event

An idle executor (empty plan) waits for the next arrival. With ``plan_ahead_lead_s``
(:class:`Simulator`, :func:`simulate`) each plan is decided where the live scheduler
decides it, shortly before the running step's predicted end (``simulator/plan_ahead.py``). Per-step statistics
(``plan.stats``) are recorded for queue-length-over-time plots.

No grpc or torch here.
"""

from __future__ import annotations

import heapq
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

from contract.cost_models import PAPER_MODEL, CostModel
from scheduler_svc.core import SchedulerConfig, SchedulerCore, StepResult, make_core
from simulator.arrivals import admit
from simulator.metrics import MetricsCollector, steady_window_start
from simulator.workloads import WorkloadItem

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
    prefix_cache: dict[str, Any] = field(default_factory=dict)  # prefix_cache_summary()
    # planning ahead simulated (simulator/plan_ahead.py): num_steps_planned_ahead, mean_plan_ahead_lead_s
    plan_ahead: dict[str, Any] = field(default_factory=dict)

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
        s.update(self.prefix_cache)
        s.update(self.plan_ahead)  # (empty by default: the default output keeps its keys)
        return s


class SimExecutor:
    """One simulated executor: a core plus the state the loop needs (``Routable`` for the service's router)."""

    __slots__ = ("index", "core", "steps", "busy", "busy_time_s", "num_assigned", "tokens_assigned", "kv_used_max")

    def __init__(self, index: int, core: SchedulerCore, steps: StepLog | None = None) -> None:
        self.index = index
        self.core = core
        self.steps = steps  # per-step statistics, when recorded
        self.busy = False  # a step is in flight, or a schedule event is queued
        self.busy_time_s = 0.0
        self.num_assigned = 0
        self.tokens_assigned = 0  # prompt + output tokens routed here
        self.kv_used_max = 0.0

    @property
    def work(self) -> int:  # the router's load signal: outstanding tokens
        return self.core.outstanding_tokens()

    @property
    def num_requests(self) -> int:
        return len(self.core.requests)


def prefix_cache_summary(cores: list[SchedulerCore]) -> dict[str, Any]:
    """Prefix-cache counters summed over ``cores`` (vLLM's names, in tokens), and the hit rate.

    Empty when nothing was looked up (no token ids: the paper trace), so such
    runs report exactly what they did before prefix caching existed.
    """
    caches = [c.prefix_cache for c in cores if c.prefix_cache is not None]
    queries = sum(pc.num_query_tokens for pc in caches)
    if not queries:
        return {}
    hits = sum(pc.num_hit_tokens for pc in caches)
    return {"prefix_cache_queries": queries, "prefix_cache_hits": hits, "prefix_cache_hit_rate": hits / queries,
            "prefix_cache_evictions": sum(pc.num_evictions for pc in caches)}


def run_events(executors: list[SimExecutor], items: list[WorkloadItem], cost: CostModel, metrics: MetricsCollector,
               route, max_sim_time_s: float | None = None) -> tuple[float, float, bool]:
    """Drive ``executors`` through ``items`` (sorted by arrival); ``route(item)`` picks each one's executor.

    Returns (simulated end time, wall seconds, stalled: stopped with requests that could never be scheduled).
    """
    on_token, on_step_events = metrics.on_token, metrics.on_step_events
    for it in items:
        metrics.register(it.req_id, it.arrival_s, it.tier, it.tbt_slo_s, it.prompt_len, it.output_len)
    heap: list[tuple[float, int, int, Any]] = []
    seq = 0
    push, pop = heapq.heappush, heapq.heappop
    if items:
        push(heap, (items[0].arrival_s, ARRIVAL, 0, 0))
    next_arrival = 0
    stalled = False
    now = 0.0
    wall0 = time.perf_counter()
    while heap:
        t, kind, _, payload = pop(heap)
        now = t
        if max_sim_time_s is not None and t > max_sim_time_s:
            break
        if kind == ARRIVAL:
            ex = admit(items[payload], t, route, on_token)
            next_arrival = payload + 1
            seq += 1
            if next_arrival < len(items):
                push(heap, (items[next_arrival].arrival_s, ARRIVAL, seq, next_arrival))
            if not ex.busy:
                ex.busy = True
                seq += 1
                push(heap, (t, SCHEDULE, seq, ex))
            continue
        if kind == STEP_END:
            ex, plan = payload
            core = ex.core
            ids = plan.sampling_ids()
            result = StepResult(plan.step_id, ids, (0,) * len(ids))
            on_step_events(core.update(plan, result, t), t)
            if heap and heap[0][0] <= t:  # another event at this very instant goes first
                seq += 1
                push(heap, (t, SCHEDULE, seq, ex))
                continue
        else:
            ex = payload
            core = ex.core
        # SCHEDULE, or straight on after a step end (saves an event: the loop's hot path)
        plan = core.schedule(t)
        if not plan.new and not plan.cached:  # plan.is_empty
            core.update(plan, StepResult(step_id=plan.step_id), t)
            ex.busy = False  # idle until its next arrival
            if next_arrival >= len(items) and core.requests:
                stalled = True  # nothing will ever change
            continue
        dt = cost.step_time_s(plan)
        ex.busy_time_s += dt
        st = plan.stats
        if ex.steps is not None:
            log = ex.steps.cols
            log["t"].append(t)
            log["dt"].append(dt)
            log["prefill_tokens"].append(st.num_prefill_tokens)
            log["decodes"].append(st.num_decodes)
            log["critical_decodes"].append(st.num_critical_decodes)
            log["kv_used"].append(st.kv_used_fraction)
            log["num_waiting"].append(st.num_waiting)
            log["num_running"].append(st.num_running)
            log["num_preempted"].append(st.num_preempted)
        if st.kv_used_fraction > ex.kv_used_max:
            ex.kv_used_max = st.kv_used_fraction
        seq += 1
        push(heap, (t + dt, STEP_END, seq, (ex, plan)))
    metrics.num_preemptions = sum(e.core.num_preemptions for e in executors)
    return now, time.perf_counter() - wall0, stalled


class Simulator:
    """The event loop around one ``SchedulerCore``."""

    def __init__(self, core: SchedulerCore, cost_model: CostModel = PAPER_MODEL, policy: str = "",
                 record_steps: bool = True, max_sim_time_s: float | None = None,
                 steady_fraction: float | None = 0.5, plan_ahead_lead_s: float | None = None) -> None:
        self.core = core
        # None: decide each step at the previous one's end (the default); a lead: decide it where the live
        # scheduler does, that long before the running step's predicted end (simulator/plan_ahead.py)
        self.plan_ahead_lead_s = plan_ahead_lead_s
        self.steady_fraction = steady_fraction  # the metrics' steady-state window: arrivals after this share
        self.cost = cost_model
        self.policy = policy or core.policy.name
        self.max_sim_time_s = max_sim_time_s
        self.now = 0.0  # the virtual clock
        self.metrics = MetricsCollector()
        self.steps = StepLog()
        self.executor = SimExecutor(0, core, self.steps if record_steps else None)

    def run(self, items: list[WorkloadItem]) -> SimResult:
        ex, core = self.executor, self.core
        items = sorted(items, key=lambda it: it.arrival_s)
        if self.steady_fraction is not None:
            self.metrics.steady_from_s = steady_window_start((it.arrival_s for it in items), self.steady_fraction)
        counts: dict[str, int] = {}
        if self.plan_ahead_lead_s is None:
            self.now, wall, stalled = run_events([ex], items, self.cost, self.metrics, lambda it: ex,
                                                 self.max_sim_time_s)
        else:
            from simulator.plan_ahead import run_events_ahead

            self.now, wall, stalled = run_events_ahead([ex], items, self.cost, self.metrics, lambda it: ex,
                                                       self.plan_ahead_lead_s, self.max_sim_time_s, counts)
        return SimResult(policy=self.policy, metrics=self.metrics, steps=self.steps, sim_time_s=self.now,
                         wall_time_s=wall, num_steps=core.num_steps, num_preemptions=core.num_preemptions,
                         busy_time_s=ex.busy_time_s, kv_used_max=ex.kv_used_max, stalled=stalled,
                         prefix_cache=prefix_cache_summary([core]),
                         plan_ahead=_plan_ahead_summary(counts))


def _plan_ahead_summary(counts: dict[str, Any]) -> dict[str, Any]:
    if not counts:
        return {}
    n = counts["num_steps_planned_ahead"]
    return {"num_steps_planned_ahead": n, "mean_plan_ahead_lead_s": counts["sum_plan_ahead_lead_s"] / n if n else 0.0}


def simulate(policy: str, items: list[WorkloadItem], cost_model: CostModel = PAPER_MODEL,
             num_blocks: int = 14733, overrides: list[str] | tuple[str, ...] = (), record_steps: bool = True,
             max_sim_time_s: float | None = None, steady_fraction: float | None = 0.5,
             plan_ahead_lead_s: float | None = None) -> SimResult:
    """Run ``items`` through a fresh core running ``policy``; ``steady_fraction``, ``plan_ahead_lead_s``:
    see :class:`Simulator`."""
    core = build_core(policy, num_blocks, overrides)
    return Simulator(core, cost_model, policy, record_steps, max_sim_time_s, steady_fraction,
                     plan_ahead_lead_s).run(items)
