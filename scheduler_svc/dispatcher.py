"""Requests across executors: admission, routing, per-request streams, failover.

The dispatcher owns one driver per executor and one ``RequestStream`` per live
request (the client's view: it survives a move to another executor). It is all
synchronous bookkeeping on the event loop; the servicer awaits the streams.

Failover: when a driver loses its executor it hands back its requests
(``core.take_back_all``). Each is re-submitted to a healthy executor as a fresh
core request whose prompt is the original prompt + the tokens already streamed
and whose ``max_tokens`` is what is left, on the same client stream: nothing is
lost and nothing is sent twice. With no healthy executor left, the streams fail
with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from scheduler_svc.config import ServiceConfig
from scheduler_svc.core.request import Request
from scheduler_svc.core.router import Router
from scheduler_svc.core.token_event import TokenEvent
from scheduler_svc.executor_client import ExecutorClient
from scheduler_svc.stats import ExecutorStatsView
from scheduler_svc.step_loop import Clock, ExecutorDriver
from telemetry.log_histogram import LogHistogram
from wire.grpc_server import AdmissionRejected

log = logging.getLogger(__name__)


class RequestStream:
    """One client stream: a queue of ``TokenEvent`` (or an exception), plus the client's view.

    ``base_outputs`` counts tokens streamed by earlier executors (after a
    failover); usage and timings on the final event are in the client's terms.

    Token events the client has not taken yet are coalesced into one pending
    event (token ids concatenated, the latest counts and time, the largest TBT),
    so an unread stream holds its undelivered token ids, not one object per step;
    ``num_pending_tokens`` is what the dispatcher bounds (``stream_buffer_tokens``).

    NOTE: a list + one future instead of an ``asyncio.Queue`` (which holds three
    deques and an Event, ~1.5 KB): 10,000 queued requests each hold one of these.
    """

    __slots__ = ("req_id", "req", "_items", "_waiter", "driver", "num_prompt_tokens", "base_outputs", "base_preemptions",
                 "arrival_s", "first_scheduled_s", "first_token_s", "last_token_s", "max_tbt_s", "done",
                 "num_pending_tokens", "full_since", "notify")

    def __init__(self, req: Request) -> None:
        self.req_id = req.req_id
        self.req = req  # the current core request
        self._items: list = []
        self._waiter: asyncio.Future | None = None
        self.driver: ExecutorDriver | None = None
        self.num_prompt_tokens = req.num_prompt_tokens
        self.base_outputs = 0
        self.base_preemptions = 0
        self.arrival_s = req.arrival_s
        self.first_scheduled_s: float | None = None
        self.first_token_s: float | None = None
        self.last_token_s: float | None = None
        self.max_tbt_s = 0.0
        self.done = False  # the final item is queued
        self.num_pending_tokens = 0  # token ids queued and not taken by get()
        self.full_since: float | None = None  # when the pending tokens reached the bound (the dispatcher's)
        # set by a Session (scheduler_svc/session.py): called on every put instead of waking get()
        self.notify: Callable[[RequestStream], None] | None = None

    def put(self, item: TokenEvent | BaseException) -> TokenEvent | None:
        """Queue an event (or the exception that ends the stream).

        Returns the event as queued: ``ttft_s`` / ``tbt_s`` and ``is_first`` in the client's
        view (across failovers), before any coalescing."""
        items = self._items
        if isinstance(item, BaseException):
            items.append(item)
            view = None
        else:
            first = self.first_token_s is None and bool(item.token_ids)
            ttft, tbt = self.observe(item)
            view = item = TokenEvent(item.req_id, item.token_ids, item.finish_reason, item.time_s, first,
                                     item.num_prompt_tokens, item.num_output_tokens, ttft, tbt, item.logprobs)
            self.num_pending_tokens += len(item.token_ids)
            tail = items[-1] if items else None
            if (item.finish_reason is None and item.token_ids and isinstance(tail, TokenEvent)
                    and tail.finish_reason is None):
                items[-1] = _coalesce(tail, item)
            else:
                items.append(item)
        if self.notify is not None:
            self.notify(self)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        return view

    def drain(self) -> list:
        """Every queued item at once (what a Session sends at its next flush); never waits."""
        items, self._items = self._items, []
        self.num_pending_tokens = 0
        self.full_since = None
        return items

    async def get(self) -> TokenEvent | BaseException:
        """The next event (or the exception that ends the stream); token events not taken
        in time arrive coalesced. ``ttft_s`` / ``tbt_s`` are the client's view."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.pop(0)
        if not isinstance(item, BaseException):
            self.num_pending_tokens -= len(item.token_ids)
            self.full_since = None  # the client is reading
        return item

    def observe(self, ev: TokenEvent) -> tuple[float, float]:
        """Record a token event; returns (ttft_s, tbt_s) as the client sees them (0 if n/a)."""
        if not ev.token_ids:
            return 0.0, 0.0
        ttft = tbt = 0.0
        if self.first_token_s is None:
            self.first_token_s = ev.time_s
            ttft = ev.time_s - self.arrival_s
        else:
            tbt = ev.time_s - self.last_token_s
            if tbt > self.max_tbt_s:
                self.max_tbt_s = tbt
        self.last_token_s = ev.time_s
        return ttft, tbt

    def final_fields(self, ev: TokenEvent) -> dict:
        req = self.req
        first_sched = self.first_scheduled_s if self.first_scheduled_s is not None else req.first_scheduled_s
        end = ev.time_s
        return dict(
            prompt_tokens=self.num_prompt_tokens, completion_tokens=self.base_outputs + ev.num_output_tokens,
            ttft_s=(self.first_token_s - self.arrival_s) if self.first_token_s is not None else 0.0,
            e2e_s=end - self.arrival_s,
            queue_s=(first_sched - self.arrival_s) if first_sched is not None else 0.0,
            max_tbt_s=self.max_tbt_s, num_preemptions=self.base_preemptions + req.num_preemptions)


def _coalesce(a: TokenEvent, b: TokenEvent) -> TokenEvent:
    """``a`` then ``b`` as one event (both unfinished, ``b`` later)."""
    ids = a.token_ids
    if isinstance(ids, list):  # already a coalesced event's own list: extend in place, no quadratic copying
        ids.extend(b.token_ids)
    else:
        ids = [*ids, *b.token_ids]
    lps = a.logprobs
    if lps is not None or b.logprobs is not None:  # kept aligned with the token ids
        if not isinstance(lps, list):
            lps = list(lps) if lps is not None else [None] * (len(ids) - len(b.token_ids))
        lps.extend(b.logprobs if b.logprobs is not None else [None] * len(b.token_ids))
    return TokenEvent(a.req_id, ids, None, b.time_s, a.is_first, b.num_prompt_tokens, b.num_output_tokens,
                      a.ttft_s, max(a.tbt_s or 0.0, b.tbt_s or 0.0), lps)


class Dispatcher:
    def __init__(self, config: ServiceConfig, clock: Clock = time.monotonic,
                 client_factory: Callable[[str], ExecutorClient] | None = None,
                 on_health: Callable[[bool], None] | None = None, metrics=None, spans=None) -> None:
        self.config = config
        self.clock = clock
        self.router = Router(config.routing, config.routing_seed)
        factory = client_factory or (lambda addr: ExecutorClient(
            addr, config.step_timeout_s, config.connect_timeout_s, config.warmup_timeout_s,
            service_token=config.service_token))
        self.metrics = metrics  # telemetry.metrics.SchedulerMetrics or None
        self.spans = spans  # telemetry.tracing.RequestSpans or None
        self.drivers = [ExecutorDriver(i, factory(addr), config, self, clock, metrics=metrics, spans=spans)
                        for i, addr in enumerate(config.executors)]
        self.streams: dict[str, RequestStream] = {}
        self._on_health = on_health
        self._any_ready = asyncio.Event()
        self.num_failovers = 0
        self.num_stalled = 0  # streams aborted because their client stopped reading
        # every TBT gap since start, all tiers, in 1%-wide buckets: the quantiles Stats reports (the
        # Prometheus histogram's dashboard buckets are too coarse to compare tails with the simulator)
        self.tbt_hist = LogHistogram()

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        for d in self.drivers:
            d.start()

    async def wait_ready(self, timeout_s: float | None = None, all_executors: bool = False) -> None:
        async def ready() -> None:
            while not (all(d.healthy for d in self.drivers) if all_executors else self._any_ready.is_set()):
                await asyncio.sleep(0.01)
        await asyncio.wait_for(ready(), timeout_s)

    async def close(self) -> None:
        for d in self.drivers:
            await d.close()
        for s in list(self.streams.values()):
            self._fail(s, ConnectionError("scheduler shutting down"))

    def healthy_drivers(self) -> list[ExecutorDriver]:
        return [d for d in self.drivers if d.healthy]

    # ------------------------------------------------------------------ requests
    def submit(self, req: Request) -> RequestStream:
        """Admit and route ``req``; raises ValueError / AdmissionRejected / ConnectionError."""
        if req.req_id in self.streams:
            raise ValueError(f"request_id {req.req_id!r} is already in use")
        if req.tbt_slo_s is None:
            req.tbt_slo_s = self.config.tier_tbt_s(req.tier)
        self._admit(req)
        driver = self.router.pick(self.healthy_drivers())
        if driver is None:
            raise ConnectionError("no healthy executor")
        stream = RequestStream(req)
        self.streams[req.req_id] = stream
        self._place(stream, req, driver)
        return stream

    def _admit(self, req: Request) -> None:
        cfg = self.config
        num_queued, num_tokens = self.queued()
        if num_queued >= cfg.max_queued_requests:
            raise AdmissionRejected(f"queue full: {num_queued} requests waiting (max_queued_requests="
                                    f"{cfg.max_queued_requests})")
        if num_tokens + req.num_prompt_tokens > cfg.max_queued_tokens:
            raise AdmissionRejected(f"queue full: {num_tokens} prompt tokens waiting + {req.num_prompt_tokens} "
                                    f"> max_queued_tokens={cfg.max_queued_tokens}")

    def queued(self) -> tuple[int, int]:
        """(requests waiting for KV, their prompt tokens) over all executors."""
        n = t = 0
        for d in self.drivers:
            if d.core is not None:
                n += d.core.num_waiting
                t += d.core.num_waiting_tokens
        return n, t

    def _place(self, stream: RequestStream, req: Request, driver: ExecutorDriver) -> None:
        stream.req = req
        stream.driver = driver
        ev = driver.submit(req)
        if ev is not None:  # can never run (too long for the model)
            self._deliver(stream, ev)

    def abort(self, req_id: str) -> bool:
        stream = self.streams.get(req_id)
        if stream is None or stream.done:
            return False
        ev = stream.driver.abort(req_id) if stream.driver is not None else None
        self._deliver(stream, ev or TokenEvent(req_id=req_id, finish_reason="abort", time_s=self.clock(),
                                               num_prompt_tokens=stream.req.num_prompt_tokens))
        return True

    # ------------------------------------------------------------------ driver callbacks
    def on_events(self, driver: ExecutorDriver, events: list[TokenEvent]) -> None:
        streams = self.streams
        for ev in events:
            s = streams.get(ev.req_id)
            if s is not None:
                self._deliver(s, ev)

    def _deliver(self, s: RequestStream, ev: TokenEvent) -> None:
        view = s.put(ev)
        if ev.finish_reason is not None:
            s.done = True
            self.streams.pop(s.req_id, None)
        elif s.num_pending_tokens >= self.config.stream_buffer_tokens:
            self._check_stall(s)
        if ev.token_ids and not view.is_first:
            self.tbt_hist.add(view.tbt_s)
        if self.metrics is not None and ev.token_ids:
            # NOTE: recorded as tokens are made, not as the client takes them (they may arrive coalesced)
            first = view.is_first
            self.metrics.record_token_event(s.req.tier, view.ttft_s if first else None,
                                            None if first else view.tbt_s, s.req.tbt_slo_s)

    def _check_stall(self, s: RequestStream) -> None:
        """``s`` holds at least ``stream_buffer_tokens`` untaken tokens: abort it once it has
        for ``stream_stall_timeout_s`` (its client stopped reading; docs/scheduler.md)."""
        timeout_s = self.config.stream_stall_timeout_s
        if timeout_s <= 0:
            return
        now = self.clock()
        if s.full_since is None:
            s.full_since = now
        elif now - s.full_since >= timeout_s:
            log.warning("request %s: its client took nothing for %.1f s with %d tokens waiting; aborting it",
                        s.req_id, now - s.full_since, s.num_pending_tokens)
            self.num_stalled += 1
            self.abort(s.req_id)

    def _fail(self, s: RequestStream, exc: BaseException) -> None:
        if self.spans is not None:
            self.spans.end(s.req_id, exc)
        s.put(exc)
        s.done = True
        self.streams.pop(s.req_id, None)

    def on_ready(self, driver: ExecutorDriver) -> None:
        self._any_ready.set()
        if self._on_health is not None:
            self._on_health(True)

    def on_lost(self, driver: ExecutorDriver, requests: list[Request], reason: str) -> None:
        healthy = self.healthy_drivers()
        if not healthy:
            self._any_ready.clear()
            if self._on_health is not None:
                self._on_health(False)
        now = self.clock()
        for old in requests:
            s = self.streams.get(old.req_id)
            if s is None or s.done:
                continue
            target = self.router.pick(healthy)
            if target is None:
                self._fail(s, ConnectionError(
                    f"executor {driver.address} failed ({reason}) and no healthy executor is left; "
                    f"{s.base_outputs + old.num_output_tokens} tokens were delivered"))
                continue
            self._place(s, self._continuation(s, old, now), target)
            self.num_failovers += 1
        if requests:
            log.warning("executor %s lost: %d requests moved, %d executors healthy", driver.address,
                        len(requests), len(healthy))

    @staticmethod
    def _continuation(s: RequestStream, old: Request, now: float) -> Request:
        """A fresh request that continues ``old``: prompt + streamed tokens, the rest of max_tokens."""
        if s.first_scheduled_s is None:
            s.first_scheduled_s = old.first_scheduled_s
        s.base_outputs += old.num_output_tokens
        s.base_preemptions += old.num_preemptions
        ids = old.all_token_ids()
        return Request(req_id=old.req_id, num_prompt_tokens=len(ids) if ids is not None else old.num_tokens,
                       max_tokens=old.max_tokens - old.num_output_tokens, arrival_s=old.arrival_s, tier=old.tier,
                       tbt_slo_s=old.tbt_slo_s, ttft_slo_s=old.ttft_slo_s, prompt_token_ids=ids,
                       sampling=old.sampling)

    # ------------------------------------------------------------------ stats
    def load(self) -> tuple[int, int, int, int]:
        """(outstanding tokens, live requests, healthy executors, requests waiting for KV): the
        pool's load that Session streams publish to gateways (their pool routing balances it)."""
        work = healthy = queued = 0
        for d in self.drivers:
            work += d.work
            if d.healthy:
                healthy += 1
            if d.core is not None:
                queued += d.core.num_waiting
        return work, len(self.streams), healthy, queued

    def executor_stats(self) -> list[ExecutorStatsView]:
        out = []
        for d in self.drivers:
            core, st = d.core, d.stats
            last = st.last
            pc = core.prefix_cache if core else None
            queries, hits = (pc.num_query_tokens, pc.num_hit_tokens) if pc is not None else (0, 0)
            out.append(ExecutorStatsView(
                address=d.address, healthy=d.healthy,
                num_waiting=core.num_waiting if core else 0, num_running=core.num_running if core else 0,
                num_blocks=d.num_blocks, kv_used_fraction=core.kv_used_fraction() if core else 0.0,
                mean_batch_s=core.mean_batch_s if core else 0.0, num_steps=core.num_steps if core else 0,
                num_preemptions=core.num_preemptions if core else 0,
                last_num_critical_decodes=last.num_critical_decodes,
                last_num_noncritical_decodes=last.num_noncritical_decodes,
                last_num_prefill_tokens=last.num_prefill_tokens, last_offset=last.offset,
                mean_decision_s=st.mean_decision_s, mean_executor_wait_s=st.mean_executor_wait_s,
                mean_rpc_overhead_s=max(0.0, st.mean_rpc_overhead_s), num_steps_planned_ahead=st.num_planned_ahead,
                prefix_cache_queries=queries, prefix_cache_hits=hits,
                prefix_cache_hit_rate=hits / queries if queries else 0.0,
                mean_plan_ahead_lead_s=st.mean_plan_ahead_lead_s))
        return out
