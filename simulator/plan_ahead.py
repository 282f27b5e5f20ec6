"""The simulator's event loop with planning ahead, as the live scheduler does it (opt-in).

The live driver (``scheduler_svc/step_loop.py``, docs/scheduler.md, *The driver
loop*) does not decide step N+1 at the end of step N: it waits for N's result only
until ``pipeline_lead_s`` before N's *predicted* end (``StepTimePredictor``: the
executor's recent step times for steps of a similar size, less twice the recent
prediction error), then calls ``core.schedule`` (the core advances N optimistically
and decides N+1 for N's expected end) and queues the plan; the executor starts it
as soon as N is done. Requests that arrive between that decision and N's end wait
one step more. :func:`simulator.sim.run_events` decides at the step's end, so it
does not model that wait; this loop does, by construction:

* when a step starts (at ``t``, lasting ``dt`` by the cost model) and the core has
  work, a decision is due at ``max(t, t + predictor.predict(tokens) - lead_s)``,
  the live formula with the same predictor class fed the same way (each step's
  duration, here ``dt``, the executor's ``total_ns`` live);
* if that instant falls before the step's end, the next plan is decided there with
  ``core.schedule`` (the core's own advance, as live) and starts at the step's end;
  an empty plan is withdrawn with ``core.update`` as the live loop does;
* otherwise (the prediction came late, or nothing ran before) the next plan is
  decided at the step's end, exactly as in ``run_events``.

What it leaves out, on purpose: the live stack's own time (RPC hops, decision,
the sleep's overshoot); a simulation that adds a measured per-step overhead does so
through the cost model (``CostModel.with_overhead``). It is switched on where a
simulation stands in for the live stack (``simulate(..., plan_ahead_lead_s=...)``, as
``slai-serve agree`` does); the default simulator keeps deciding at the step's end,
bit for bit as before (docs/results.md, *Live agreement*).
"""

from __future__ import annotations

import heapq
import time
from typing import Any

from contract.cost_models import CostModel
from scheduler_svc.core import StepResult
from scheduler_svc.core.step_predictor import StepTimePredictor
from simulator.arrivals import admit
from simulator.metrics import MetricsCollector
from simulator.workloads import WorkloadItem

# event kinds: the value is the tie-break at equal times (arrivals first, as in simulator.sim; a decision
# ahead comes last, so that an arrival at that very instant is in the plan)
ARRIVAL, STEP_END, SCHEDULE, AHEAD = 0, 1, 2, 3


class _Lane:
    """One executor's pipelining state: the step running, the plan queued behind it, the predictor."""

    __slots__ = ("decided_at", "dt", "predictor", "queued", "running")

    def __init__(self) -> None:
        self.running = None  # the plan on the executor
        self.dt = 0.0  # its duration
        self.queued = None  # the plan decided ahead, waiting for the running one to end
        self.decided_at = 0.0  # when it was decided
        self.predictor = StepTimePredictor()


def run_events_ahead(executors: list, items: list[WorkloadItem], cost: CostModel, metrics: MetricsCollector,
                     route, lead_s: float, max_sim_time_s: float | None = None,
                     counts: dict[str, int] | None = None) -> tuple[float, float, bool]:
    """:func:`simulator.sim.run_events` with each plan decided where the live driver decides it.

    ``lead_s``: the scheduler's ``pipeline_lead_s`` (``ServiceConfig``). ``counts``, when given,
    gets ``num_steps_planned_ahead`` (steps decided while the one before them ran) and
    ``sum_plan_ahead_lead_s`` (how long before that step's end each was decided), as the live
    scheduler's Stats count them. Same arguments and result otherwise: (simulated end
    time, wall seconds, stalled).
    """
    if lead_s < 0:
        raise ValueError(f"lead_s must be >= 0, got {lead_s}")
    on_token, on_step_events = metrics.on_token, metrics.on_step_events
    for it in items:
        metrics.register(it.req_id, it.arrival_s, it.tier, it.tbt_slo_s, it.prompt_len, it.output_len)
    lanes = {ex.index: _Lane() for ex in executors}
    heap: list[tuple[float, int, int, Any]] = []
    seq = 0
    push, pop = heapq.heappush, heapq.heappop
    if items:
        push(heap, (items[0].arrival_s, ARRIVAL, 0, 0))
    next_arrival = 0
    stalled = False
    now = 0.0
    num_ahead = 0
    sum_lead = 0.0
    wall0 = time.perf_counter()

    def start(ex, plan, t: float) -> None:
        """``plan`` starts on ``ex`` at ``t``: its end, and the decision ahead of it."""
        nonlocal seq
        lane = lanes[ex.index]
        dt = cost.step_time_s(plan)
        ex.busy_time_s += dt
        _log_step(ex, plan, t, dt)
        lane.running, lane.dt = plan, dt
        seq += 1
        push(heap, (t + dt, STEP_END, seq, (ex, plan)))
        if ex.core.has_work:  # (the live loop's check when it starts waiting for this step)
            due = max(t, t + lane.predictor.predict(plan.num_tokens) - lead_s)
            if due < t + dt:
                seq += 1
                push(heap, (due, AHEAD, seq, (ex, plan)))

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
        if kind == AHEAD:
            ex, plan = payload
            lane, core = lanes[ex.index], ex.core
            if lane.running is not plan or lane.queued is not None or not core.has_work:
                continue
            ahead = core.schedule(t)
            if ahead.is_empty and not ahead.finished_ids and not ahead.preempted_ids:
                core.update(ahead, StepResult(step_id=ahead.step_id), t)  # withdrawn, as the live loop does
            else:
                lane.queued, lane.decided_at = ahead, t
            continue
        if kind == STEP_END:
            ex, plan = payload
            lane, core = lanes[ex.index], ex.core
            ids = plan.sampling_ids()
            result = StepResult(step_id=plan.step_id, req_ids=ids, token_ids=(0,) * len(ids))
            on_step_events(core.update(plan, result, t), t)
            lane.predictor.observe(plan.num_tokens, lane.dt)
            lane.running = None
            queued, lane.queued = lane.queued, None
            if queued is not None:
                if not queued.is_empty:
                    start(ex, queued, t)  # the executor found it queued: no decision at this end
                    num_ahead += 1
                    sum_lead += t - lane.decided_at
                    continue
                # only releases (nothing to run): applied at once; the next plan is decided now
                core.update(queued, StepResult(step_id=queued.step_id), t)
            if heap and heap[0][0] <= t:  # another event at this very instant goes first
                seq += 1
                push(heap, (t, SCHEDULE, seq, ex))
                continue
        else:
            ex = payload
            core = ex.core
        # SCHEDULE, or straight on after a step end with nothing queued: decided at the end
        plan = core.schedule(t)
        if plan.is_empty:
            core.update(plan, StepResult(step_id=plan.step_id), t)
            ex.busy = False  # idle until its next arrival
            if next_arrival >= len(items) and core.requests:
                stalled = True  # nothing will ever change
            continue
        start(ex, plan, t)
    metrics.num_preemptions = sum(e.core.num_preemptions for e in executors)
    if counts is not None:
        counts["num_steps_planned_ahead"] = num_ahead
        counts["sum_plan_ahead_lead_s"] = sum_lead
    return now, time.perf_counter() - wall0, stalled


def _log_step(ex, plan, t: float, dt: float) -> None:
    """The per-step statistics ``run_events`` keeps (same columns)."""
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
    ex.kv_used_max = max(ex.kv_used_max, st.kv_used_fraction)
