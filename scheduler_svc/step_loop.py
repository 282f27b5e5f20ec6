"""The driver of one executor: the three-line loop around a ``SchedulerCore``.

    plan   = core.schedule(clock())
    result = await client.step(plan)        # one persistent bidi stream
    events = core.update(plan, result, clock())

Everything the scheduler decides is in the core; this file only connects it to
an executor and keeps the books:

* the clock is injected (``time.monotonic`` by default; a virtual clock makes the
  service loop step-for-step comparable with the simulator);
* closed loop (SLAI's batch-time feedback; docs/scheduler.md, 'The driver loop'):
  the core times each step from the moment it could start (plan sent, or the
  previous result back) to its result, and feeds its batch-time estimator; the
  executor's ``forward_ns`` / ``total_ns`` are kept alongside;
* planning ahead (``ServiceConfig.pipeline``, on by default): while step N runs,
  the driver waits for its result only until ``pipeline_lead_s`` before N's
  predicted end (``StepTimePredictor``: the executor's recent ``total_ns`` for
  steps of a similar token count), then decides
  step N+1 with ``core.schedule`` (which advances N optimistically, see the core)
  and queues it on the stream. The executor then starts N+1 as soon as N is
  done instead of idling through update, fan-out, decision and two RPC hops;
  arrivals in the last ``pipeline_lead_s`` of a step wait one step more. The
  executor reports how long it waited for each plan (``idle_ns``): that is the
  overlap measurement in Stats;
* an idle core sleeps on an ``asyncio.Event`` woken by ``submit`` / ``abort``;
  a plan that only releases ids (finished / preempted) is still sent;
* a failed or timed-out step marks the executor lost: the sink takes the
  requests back (``core.take_back_all``) and the driver reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from contract.plan import BatchPlan, StepResult
from scheduler_svc.config import ServiceConfig
from scheduler_svc.core import SchedulerCore, core_for
from scheduler_svc.core.config import CPU_MIN_PREFILL_CHUNK
from scheduler_svc.core.request import Request
from scheduler_svc.core.step_predictor import StepTimePredictor
from scheduler_svc.core.token_event import TokenEvent
from scheduler_svc.executor_client import ExecutorClient, ExecutorLost
from scheduler_svc.stats import DriverStats
from scheduler_svc.work_ledger import WorkLedger
from telemetry import step_tracing

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class DriverSink(Protocol):
    """Where a driver reports (implemented by the dispatcher)."""

    def on_events(self, driver: ExecutorDriver, events: list[TokenEvent]) -> None: ...

    def on_lost(self, driver: ExecutorDriver, requests: list[Request], reason: str) -> None: ...

    def on_ready(self, driver: ExecutorDriver) -> None: ...


@dataclass(slots=True)
class _Sent:
    """A plan on the stream, waiting for its result."""

    plan: BatchPlan
    span: Any  # step_tracing.StepSpan (a shared no-op when tracing is off)
    decision_s: float  # time in core.schedule
    sent_at: float  # perf_counter when the write began
    busy: bool  # decided without the core having been idle (the executor's wait is overhead)
    ahead: bool  # decided while the previous step ran


class ExecutorDriver:
    """Owns one executor's ``SchedulerCore`` and step stream."""

    def __init__(self, index: int, client: ExecutorClient, config: ServiceConfig, sink: DriverSink,
                 clock: Clock = time.monotonic, metrics=None, spans=None) -> None:
        self.index = index
        self.address = client.address
        self.client = client
        self.config = config
        self.sink = sink
        self.clock = clock
        self.core: SchedulerCore | None = None
        self.healthy = False
        self.num_blocks = 0
        self.stats = DriverStats()
        self.ledger = WorkLedger()  # this executor's outstanding work (routing)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        self.recorded_plans: list[BatchPlan] | None = None  # tests: set to [] to record
        self.metrics = metrics  # telemetry.metrics.SchedulerMetrics or None
        self.spans = spans  # telemetry.tracing.RequestSpans or None (tracing on)
        self._last_result_perf = 0.0  # perf_counter when the last step result arrived
        client.on_closed = self._wake.set  # a stream that ends while idle wakes the loop (it then reconnects)

    # ------------------------------------------------------------------ inputs (synchronous, from the dispatcher)
    def submit(self, req: Request) -> TokenEvent | None:
        """Queue ``req`` on this executor's core; an immediate event means it can never run."""
        ev = self.core.add(req, self.clock())
        if ev is None:
            self.ledger.add(req)
            self._wake.set()
        return ev

    def abort(self, req_id: str) -> TokenEvent | None:
        core = self.core
        if core is None:
            return None
        ev = core.abort(req_id, self.clock())
        if ev is not None:
            self.ledger.remove(req_id)
            self._wake.set()  # the release must reach the executor even when idle
        return ev

    @property
    def work(self) -> int:
        """Tokens this executor still has to process (what the router balances)."""
        return self.ledger.total

    @property
    def num_requests(self) -> int:
        return len(self.core.requests) if self.core is not None else 0

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name=f"driver-{self.address}")

    async def close(self) -> None:
        """Stop the driver; never waits more than a second for it."""
        self._closed = True
        try:  # fails a pending step at once
            await asyncio.wait_for(self.client.close(), 1.0)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - shutting down
            log.warning("executor %s: channel did not close cleanly", self.address)
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=1.0)
            if not done:
                log.warning("driver %s did not stop within 1 s", self.address)

    async def run(self) -> None:
        """Connect, step until the executor is lost, take its requests back, reconnect."""
        backoff = self.config.reconnect_initial_s
        sc = self.config.scheduler_config()
        cap = self.config.kv_blocks_cap or None
        while not self._closed:
            try:
                info = await self.client.connect(cap, sc.token_budget)
            except ExecutorLost as exc:
                log.info("executor %s not available (%s); retry in %.2f s", self.address, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, self.config.reconnect_max_s)
                continue
            backoff = self.config.reconnect_initial_s
            self._build_core(info)
            self.healthy = True
            log.info("executor %s ready: %d blocks x %d tokens, model %s on %s", self.address, info.num_blocks,
                     info.block_size, info.model, info.device)
            self.sink.on_ready(self)
            try:
                await self._loop()
            except ExecutorLost as exc:
                self._lose(str(exc))
            except Exception as exc:  # noqa: BLE001 - a bug must not strand requests
                log.exception("driver %s crashed", self.address)
                self._lose(f"scheduler error: {type(exc).__name__}: {exc}")

    def _build_core(self, info) -> None:
        cfg = self.config.scheduler_config()
        changes = {}
        if info.block_size and info.block_size != cfg.block_size:
            changes["block_size"] = info.block_size  # the executor's KV geometry wins
        if info.max_model_len and info.max_model_len < cfg.max_model_len:
            changes["max_model_len"] = info.max_model_len
        if cfg.min_prefill_chunk < 0:  # auto: small steps where a model runs on a CPU (not a fake runner)
            changes["min_prefill_chunk"] = CPU_MIN_PREFILL_CHUNK if info.runs_model_on_cpu else 0
        if changes:
            cfg = cfg.replace(**changes)
        self.core = core_for(self.config.policy, cfg, info.num_blocks,
                             record_events=self.spans is not None)  # lifecycle events feed request spans
        self.num_blocks = info.num_blocks
        self.ledger.clear()
        self.stats.reset()

    def _lose(self, reason: str) -> None:
        log.warning("executor %s lost: %s", self.address, reason)
        self.healthy = False
        self.stats.num_failures += 1
        core, self.core = self.core, None
        taken = core.take_back_all(self.clock()) if core is not None else []
        self.ledger.clear()
        self.sink.on_lost(self, taken, reason)

    # ------------------------------------------------------------------ the loop
    async def _loop(self) -> None:
        inflight: deque[_Sent] = deque()
        predictor = StepTimePredictor()
        busy = True
        try:
            while True:
                if not inflight:
                    sent = await self._plan_and_send(busy) if self.core.has_work else None
                    if sent is None:  # nothing runnable until a submit, an abort or the stream's end
                        self._wake.clear()
                        if self.client.stream_closed:
                            raise ExecutorLost(f"executor {self.address}: step stream ended while idle")
                        await self._wake.wait()
                        busy = False
                        continue
                    inflight.append(sent)
                head = inflight[0]
                result = await self._result_of(head, inflight, predictor)
                inflight.popleft()
                self._apply(head, result)
                predictor.observe(head.plan.num_tokens, result.total_ns * 1e-9)
                busy = True
        finally:
            for sent in inflight:
                sent.span.end(error="executor lost")

    async def _plan_and_send(self, busy: bool, running: BatchPlan | None = None) -> _Sent | None:
        """``core.schedule`` and write the plan; None (and nothing sent) if it carries nothing.
        ``running``: the plan in flight, when planning ahead of it."""
        core = self.core
        perf = time.perf_counter
        p0 = perf()
        plan = core.schedule(self.clock())
        decision_s = perf() - p0
        if plan.is_empty and not plan.finished_ids and not plan.preempted_ids:
            core.update(plan, StepResult(step_id=plan.step_id), self.clock())
            return None
        if running is not None:  # the step in flight was advanced, and this plan may have preempted
            self.ledger.update(running.scheduled_ids() + plan.preempted_ids, core.requests)
        if self.recorded_plans is not None:
            self.recorded_plans.append(plan)
        span = step_tracing.step_span(plan, self.spans if self.spans is not None else (), executor=self.address)
        sent_at = perf()
        try:
            await self.client.send(plan, span.traceparent)
        except BaseException as exc:
            span.end(error=exc)
            raise
        return _Sent(plan, span, decision_s, sent_at, busy, running is not None)

    async def _result_of(self, head: _Sent, inflight: deque[_Sent], predictor: StepTimePredictor) -> StepResult:
        """Wait for ``head``'s result; when pipelining, plan the next step shortly before it is due."""
        client, core = self.client, self.core
        if not self.config.pipeline or len(inflight) > 1 or not core.has_work:
            return await client.receive(head.plan)
        task = asyncio.ensure_future(client.receive(head.plan))
        try:
            started = max(head.sent_at, self._last_result_perf)  # a queued plan starts when the one before ends
            due = started + predictor.predict(head.plan.num_tokens) - self.config.pipeline_lead_s
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.wait({task}, timeout=delay)
            decided_at = None
            if not task.done() and core.has_work:
                decided_at = time.perf_counter()
                sent = await self._plan_and_send(busy=True, running=head.plan)
                if sent is not None:
                    inflight.append(sent)
                else:
                    decided_at = None  # nothing was queued
            result = await task
            if decided_at is not None:  # the decision instant, measured: its lead over the result
                self.stats.observe_ahead_lead(time.perf_counter() - decided_at)
            return result
        except BaseException:
            task.cancel()
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: the error that matters is the one propagating
            raise

    def _apply(self, sent: _Sent, result: StepResult) -> None:
        """``core.update`` and the books: work, spans, fan-out, metrics, stats."""
        core, plan = self.core, sent.plan
        now_perf = time.perf_counter()
        sent.span.end(result)
        events = core.update(plan, result, self.clock())
        # (+ waiting requests whose cached prefix changed: prefix caching)
        self.ledger.update(plan.scheduled_ids() + plan.preempted_ids + tuple(core.take_rematched_ids()),
                           core.requests)
        if self.spans is not None:
            self.spans.on_step(core.drain_events(), events)
        if events:
            self.sink.on_events(self, events)
        # the step could start when it was sent, or when the step before it came back
        started = max(sent.sent_at, self._last_result_perf)
        self._last_result_perf = now_perf
        step_s = now_perf - started
        if self.metrics is not None:
            self.metrics.record_step(self.address, plan.stats, step_s=step_s if not plan.is_empty else None,
                                     forward_ns=result.forward_ns, mean_batch_s=core.mean_batch_s)
        self.stats.observe(plan, result, decision_s=sent.decision_s, rpc_s=step_s, busy=sent.busy, ahead=sent.ahead)
