"""The gateway's Session stream to one scheduler: every request of this gateway on one bidi stream.

:class:`SchedulerSession` opens ``SchedulerService.Session`` lazily, sends each
request's submit and abort on it, and demultiplexes the scheduler's batched
``SchedulerMessage`` (the token events of a step for all of this gateway's requests)
into one :class:`SessionCall` per request (a callback into the request's buffer). It also keeps the pool's published load
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

import grpc

from gateway.scheduler_errors import error_from_pb, is_final, scheduler_error
from wire.pb.slai.v1 import scheduler_pb2

log = logging.getLogger(__name__)


class CallCancelled(Exception):
    """Handed to a :class:`SessionCall`'s sink after ``cancel()`` (the request was aborted here)."""


class SessionCall:
    """One request on a Session. The session's reader hands each of its ``TokenEvent`` messages (the
    last one is final), or the exception that ends it (its error, ``ConnectionError`` when the stream
    broke, :class:`CallCancelled` after :meth:`cancel`), straight to ``sink`` on the event loop: one
    call per item, nothing after the end.

    NOTE: a callback, not a queue read by a task per request: a token then costs no task wakeup
    between the session's reader and the request's buffer (docs/gateway.md, "Gateway streaming
    capacity"). A sink must not block; it only files the item.
    """

    __slots__ = ("_session", "cancelled", "finished", "request_id", "sink")

    def __init__(self, session: SchedulerSession, request_id: str, sink) -> None:
        self.request_id = request_id
        self._session = session
        self.sink = sink
        self.finished = False  # its final event or error was handed over (nothing more will be)
        self.cancelled = False

    def put(self, item) -> None:
        """A ``TokenEvent`` or the exception that ends the call (from the session's reader)."""
        if self.finished:
            return
        if isinstance(item, BaseException) or is_final(item):
            self.finished = True
        try:
            self.sink(item)
        except Exception:  # noqa: BLE001 - one request's bug must not break the shared stream
            log.exception("request %s: its sink failed", self.request_id)

    def cancel(self) -> None:
        """Abort the request at the scheduler and end the call with :class:`CallCancelled` (idempotent)."""
        if self.cancelled:
            return
        self.cancelled = True
        if not self.finished:
            self._session.abort(self.request_id)
        self.put(CallCancelled(self.request_id))


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

    def submit(self, msg: scheduler_pb2.SubmitRequest, sink, trace_metadata=()) -> SessionCall:
        """Start a request whose events go to ``sink`` (see :class:`SessionCall`). ``ValueError`` if its
        id is live here."""
        rid = msg.request_id
        if rid in self._calls:
            raise ValueError(f"request_id {rid!r} is already in use")
        self._ensure_open()
        call = SessionCall(self, rid, sink)
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
            rid = ev.request_id
            c = calls.get(rid)
            if c is None:
                continue  # aborted here already
            if ev.finish_reason:  # final (is_final, inlined: this runs per token)
                del calls[rid]
            c.put(ev)
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
