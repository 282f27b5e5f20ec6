"""The driver of one executor: the three-line loop around a ``SchedulerCore`` (design habit 2).

    plan   = core.schedule(clock())
    result = await client.step(plan)        # one persistent bidi stream
    events = core.update(plan, result, clock())

Everything the scheduler decides is in the core; this file only connects it to
an executor and keeps the books:

* the clock is injected (``time.monotonic`` by default; a virtual clock makes the
  service loop step-for-step comparable with the simulator);
* closed loop (paper.md 3.3): ``update``'s now minus ``schedule``'s now is the
  full iteration as the scheduler sees it, and feeds the core's batch-time
  estimator; the executor's ``forward_ns`` / ``total_ns`` are kept alongside;
* an idle core sleeps on an ``asyncio.Event`` woken by ``submit`` / ``abort``;
  a plan that only releases ids (finished / preempted) is still sent;
* a failed or timed-out step marks the executor lost: the sink takes the
  requests back (``core.take_back_all``) and the driver reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Protocol

from common import telemetry
from scheduler_svc.config import ServiceConfig
from scheduler_svc.core.plan import BatchPlan, StepResult, TokenEvent
from scheduler_svc.core.request import Request
from scheduler_svc.core.scheduler import SchedulerCore
from scheduler_svc.core.policies.registry import POLICIES
from scheduler_svc.executor_client import ExecutorClient, ExecutorLost
from scheduler_svc.stats import DriverStats

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class DriverSink(Protocol):
    """Where a driver reports (implemented by the dispatcher)."""

    def on_events(self, driver: ExecutorDriver, events: list[TokenEvent]) -> None: ...

    def on_lost(self, driver: ExecutorDriver, requests: list[Request], reason: str) -> None: ...

    def on_ready(self, driver: ExecutorDriver) -> None: ...


def work_of(req: Request) -> int:
    """Tokens still to process (the term ``core.outstanding_tokens`` sums)."""
    return req.num_outstanding_tokens


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
        self.work = 0  # sum of work_of() over the core's requests, kept incrementally (routing)
        self._work_of: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        self.recorded_plans: list[BatchPlan] | None = None  # tests: set to [] to record
        self.metrics = metrics  # common.metrics.SchedulerMetrics or None
        self.spans = spans  # common.telemetry.RequestSpans or None (tracing on)

    # ------------------------------------------------------------------ inputs (synchronous, from the dispatcher)
    def submit(self, req: Request) -> TokenEvent | None:
        """Queue ``req`` on this executor's core; an immediate event means it can never run."""
        ev = self.core.add(req, self.clock())
        if ev is None:
            w = work_of(req)
            self._work_of[req.req_id] = w
            self.work += w
            self._wake.set()
        return ev

    def abort(self, req_id: str) -> TokenEvent | None:
        core = self.core
        if core is None:
            return None
        ev = core.abort(req_id, self.clock())
        if ev is not None:
            self.work -= self._work_of.pop(req_id, 0)
            self._wake.set()  # the release must reach the executor even when idle
        return ev

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
        cls, _, _ = POLICIES[self.config.policy]
        cfg = self.config.scheduler_config()
        changes = {}
        if info.block_size and info.block_size != cfg.block_size:
            changes["block_size"] = info.block_size  # the executor's KV geometry wins
        if info.max_model_len and info.max_model_len < cfg.max_model_len:
            changes["max_model_len"] = info.max_model_len
        if changes:
            cfg = cfg.replace(**changes)
        self.core = SchedulerCore(cls(cfg), num_blocks=info.num_blocks, config=cfg,
                                  record_events=self.spans is not None)  # lifecycle events feed request spans
        self.num_blocks = info.num_blocks
        self.work = 0
        self._work_of.clear()
        self.stats.reset()

    def _lose(self, reason: str) -> None:
        log.warning("executor %s lost: %s", self.address, reason)
        self.healthy = False
        self.stats.num_failures += 1
        core, self.core = self.core, None
        taken = core.take_back_all(self.clock()) if core is not None else []
        self.work = 0
        self._work_of.clear()
        self.sink.on_lost(self, taken, reason)

    # ------------------------------------------------------------------ the loop
    async def _loop(self) -> None:
        core, client, clock, stats = self.core, self.client, self.clock, self.stats
        wake = self._wake
        metrics, spans, name = self.metrics, self.spans, self.address
        perf = time.perf_counter
        while True:
            if not core.has_work:
                wake.clear()
                await wake.wait()
                continue
            p0 = perf()
            start = clock()
            plan = core.schedule(start)
            p1 = perf()
            if plan.is_empty and not plan.finished_ids and not plan.preempted_ids:
                core.update(plan, StepResult(step_id=plan.step_id), start)
                wake.clear()  # nothing runnable until a submit or an abort
                await wake.wait()
                continue
            if self.recorded_plans is not None:
                self.recorded_plans.append(plan)
            with telemetry.step_span(plan, spans if spans is not None else (), executor=name) as span:
                result = await client.step(plan, span.traceparent)
                span.end(result)
            p2 = perf()
            events = core.update(plan, result, clock())
            self._update_work(plan)
            if spans is not None:
                spans.on_step(core.drain_events(), events)
            if events:
                self.sink.on_events(self, events)
            if metrics is not None:
                metrics.record_step(name, plan.stats, step_s=p2 - p1 if not plan.is_empty else None,
                                    forward_ns=result.forward_ns, mean_batch_s=core.mean_batch_s)
            stats.observe(plan, result, decision_s=p1 - p0, rpc_s=p2 - p1, iteration_s=perf() - p0)

    def _update_work(self, plan: BatchPlan) -> None:
        """Re-measure the work of requests this step touched (O(batch), not O(queue))."""
        reqs = self.core.requests
        if not reqs:
            self.work = 0
            self._work_of.clear()
            return
        table = self._work_of
        delta = 0
        for rid in plan.scheduled_ids() + plan.preempted_ids:
            req = reqs.get(rid)
            old = table.get(rid, 0)
            if req is None:
                table.pop(rid, None)
                delta -= old
            else:
                new = work_of(req)
                table[rid] = new
                delta += new - old
        self.work += delta
