"""The gateway's Session stream to one scheduler: every request of this gateway on one bidi stream.

:class:`SchedulerSession` opens ``SchedulerService.Session`` lazily, sends each
request's submit and abort on it, and demultiplexes the scheduler's batched
``SchedulerMessage`` (the token events of a step for all of this gateway's requests)
into one :class:`SessionCall` per request. It also keeps the pool's published load
(``PoolLoad``), which pool routing reads (``gateway/pools.py``).

When the stream breaks (the scheduler died or restarted), every call on it ends with
``ConnectionError`` (UNAVAILABLE, like a broken Submit stream); the next submit opens
a fresh stream. Protobuf stays here, in ``gateway/scheduler_client.py`` and ``gateway/scheduler_errors.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque

import grpc

from gateway.scheduler_errors import error_from_pb, is_final, scheduler_error
from wire.pb.slai.v1 import scheduler_pb2

log = logging.getLogger(__name__)


class CallCancelled(Exception):
    """Raised by a :class:`SessionCall`'s iterator after ``cancel()`` (the request was aborted here)."""


class SessionCall:
    """One request on a Session: ``async for`` its ``TokenEvent`` messages (the last one is final);
    ends with the request's error, or :class:`CallCancelled` after :meth:`cancel` (which aborts it
    at the scheduler)."""

    __slots__ = ("_items", "_session", "_waiter", "cancelled", "finished", "request_id")

    def __init__(self, session: SchedulerSession, request_id: str) -> None:
        self.request_id = request_id
        self._session = session
        self._items: deque = deque()
        self._waiter: asyncio.Future | None = None
        self.finished = False  # its final event or error arrived (nothing more will)
        self.cancelled = False

    def put(self, item) -> None:
        """A ``TokenEvent`` or the exception that ends the call (from the session's reader)."""
        self._items.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def cancel(self) -> None:
        """Abort the request at the scheduler and end the iteration (idempotent)."""
        if self.cancelled:
            return
        self.cancelled = True
        if not self.finished:
            self._session.abort(self.request_id)
        self.put(CallCancelled(self.request_id))

    def __aiter__(self):
        return self

    async def __anext__(self) -> scheduler_pb2.TokenEvent:
        if self.finished and not self._items:
            raise StopAsyncIteration
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        if isinstance(item, BaseException):
            self.finished = True
            self._items.clear()
            raise item
        if is_final(item):
            self.finished = True
        return item


class SchedulerSession:
    """One gateway's Session stream to one scheduler (opened on first use, reopened after a break)."""

    def __init__(self, stub, address: str, metadata: tuple) -> None:
        self._stub = stub
        self.address = address
        self._metadata = metadata
        self._calls: dict[str, SessionCall] = {}
        self._outbox: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self.load: scheduler_pb2.PoolLoad | None = None  # the last one the scheduler published
        self.load_at = 0.0  # time.monotonic() when it arrived
        self.on_load = None  # callback(load) for pool routing
        self.num_messages = 0
        self.num_events = 0

    @property
    def num_calls(self) -> int:
        return len(self._calls)

    def submit(self, msg: scheduler_pb2.SubmitRequest, trace_metadata=()) -> SessionCall:
        """Start a request; iterate the returned call for its events. ``ValueError`` if its id is live here."""
        rid = msg.request_id
        if rid in self._calls:
            raise ValueError(f"request_id {rid!r} is already in use")
        self._ensure_open()
        call = SessionCall(self, rid)
        self._calls[rid] = call
        sub = scheduler_pb2.SessionSubmit(request=msg)
        for k, v in trace_metadata or ():
            sub.trace_context[k] = v if isinstance(v, str) else v.decode()
        self._outbox.put_nowait(scheduler_pb2.GatewayMessage(submit=sub))
        return call

    def abort(self, request_id: str) -> None:
        """Abort one of this session's requests at the scheduler (its call ends here at once)."""
        if self._calls.pop(request_id, None) is not None and self._outbox is not None:
            self._outbox.put_nowait(scheduler_pb2.GatewayMessage(abort=scheduler_pb2.AbortRequest(
                request_id=request_id)))

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _ensure_open(self) -> None:
        if self._task is not None and not self._task.done():
            return
        self._outbox = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run(self._outbox),
                                                            name=f"session-{self.address}")

    async def _requests(self, outbox: asyncio.Queue):
        while True:
            msg = await outbox.get()
            if msg is None:
                return
            yield msg

    async def _run(self, outbox: asyncio.Queue) -> None:
        why = "the session stream ended"
        call = None
        try:
            call = self._stub.Session(self._requests(outbox), metadata=self._metadata, wait_for_ready=False)
            async for msg in call:
                self._on_message(msg)
        except grpc.aio.AioRpcError as exc:
            why = str(scheduler_error(exc))
        except asyncio.CancelledError:
            why = "the gateway is closing its session"
            if call is not None:
                call.cancel()
            raise
        except Exception as exc:  # every call must end, whatever broke
            log.exception("session to %s failed", self.address)
            why = f"session error: {type(exc).__name__}: {exc}"
        finally:
            self._fail_all(why if why.startswith("scheduler unavailable") else f"scheduler unavailable: {why}")

    def _fail_all(self, why: str) -> None:
        calls, self._calls = self._calls, {}
        if calls:
            log.warning("session to %s broke (%s): %d requests end", self.address, why, len(calls))
        for c in calls.values():
            c.put(ConnectionError(why))

    def _on_message(self, msg: scheduler_pb2.SchedulerMessage) -> None:
        calls = self._calls
        self.num_messages += 1
        self.num_events += len(msg.events)
        for ev in msg.events:
            c = calls.get(ev.request_id)
            if c is None:
                continue  # aborted here already
            c.put(ev)
            if is_final(ev):
                del calls[ev.request_id]
        for err in msg.errors:
            c = calls.pop(err.request_id, None)
            if c is not None:
                c.put(error_from_pb(err))
            elif not err.request_id:
                log.error("scheduler %s: %s", self.address, err.message)
        if msg.HasField("load"):
            self.load = msg.load
            self.load_at = time.monotonic()
            if self.on_load is not None:
                self.on_load(msg.load)
