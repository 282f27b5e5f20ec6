"""One gateway's Session stream: many requests on one bidi stream, their events batched per flush.

A gateway opens one ``Session`` per scheduler and sends ``submit`` / ``abort``
messages on it. Each request's ``RequestStream`` (the dispatcher's) notifies the
session when it has something to send instead of waking a per-request task; the
session's writer then takes everything ready in one go and sends it as one
``SchedulerMessage``: the token events of one step of every executor (they are
delivered in one synchronous ``on_events`` call), plus whatever else became ready
while the previous message was being written (gRPC flow control). So a gateway
gets one message per step, not one per request per token (docs/scheduler.md,
"The session stream").

Every message carries the pool's load (outstanding tokens, live requests); with no
events the writer still sends the load every ``LOAD_INTERVAL_S`` when it changed, so
gateways routing across pools see it fresh.

Ending the stream (the gateway went away) aborts the session's live requests.
"""

from __future__ import annotations

import asyncio
import logging

from scheduler_svc import submit_codec
from scheduler_svc.core.token_event import TokenEvent
from scheduler_svc.dispatcher import Dispatcher, RequestStream
from wire.grpc_server import status_for
from wire.pb.slai.v1 import scheduler_pb2

log = logging.getLogger(__name__)

LOAD_INTERVAL_S = 0.1  # load-only messages while idle, at most this often


def event_to_pb(d: Dispatcher, stream: RequestStream, item: TokenEvent) -> scheduler_pb2.TokenEvent:
    """A stream's token event as protobuf; a final one gets the client's usage and timings (across
    failovers) and is recorded in the metrics. Shared by Submit and Session."""
    if item.finish_reason is None:
        return submit_codec.token_event_to_pb(item)
    final = stream.final_fields(item)
    req = stream.req
    if d.metrics is not None:
        d.metrics.record_finish(req.tier, final["e2e_s"], final["queue_s"], prompt_tokens=final["prompt_tokens"],
                                completion_tokens=final["completion_tokens"], finish_reason=item.finish_reason)
    return submit_codec.final_token_event_to_pb(item, **final)


def error_to_pb(request_id: str, exc: BaseException) -> scheduler_pb2.RequestError:
    """The status Submit would have ended with, as a per-request error on a Session."""
    code, message, trailers = status_for(exc)
    if code.name == "INTERNAL":
        log.error("request %s failed: %r", request_id, exc)
    retry = getattr(exc, "retry_after_s", 0.0) if trailers else 0.0
    return scheduler_pb2.RequestError(request_id=request_id, code=code.value[0], message=message,
                                      retry_after_s=retry)


def start_span(d: Dispatcher, stream: RequestStream, carrier) -> None:
    """The request's server span (tracing on), a child of the gateway's trace context in ``carrier``."""
    if d.spans is None:
        return
    req = stream.req
    d.spans.start(req.req_id, carrier=carrier, tier=req.tier, max_tokens=req.max_tokens,
                  temperature=req.sampling.temperature, top_p=req.sampling.top_p,
                  prompt_tokens=req.num_prompt_tokens, tbt_slo_s=req.tbt_slo_s, ttft_slo_s=req.ttft_slo_s)


class GatewaySession:
    """The requests of one Session stream and what is ready to be sent to its gateway."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.d = dispatcher
        self.streams: dict[str, RequestStream] = {}  # this session's live requests
        self._ready: dict[str, RequestStream] = {}  # streams with items to send, in the order they got them
        self._errors: list[scheduler_pb2.RequestError] = []
        self._wake = asyncio.Event()
        self.input_done = False  # the gateway closed its side
        self._input_error: Exception | None = None  # ... because its stream broke
        self._last_load: tuple | None = None
        self.num_messages = 0
        self.num_events = 0

    # ------------------------------------------------------------------ gateway -> scheduler
    def on_message(self, msg: scheduler_pb2.GatewayMessage) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "submit":
            self._submit(msg.submit)
        elif kind == "abort":
            rid = msg.abort.request_id
            if rid in self.streams:  # a session aborts only its own requests
                self.d.abort(rid)
        else:
            self._errors.append(error_to_pb("", ValueError("GatewayMessage: set submit or abort")))
            self._wake.set()

    def _submit(self, sub: scheduler_pb2.SessionSubmit) -> None:
        rid = sub.request.request_id
        d = self.d
        try:
            if rid in self.streams:
                raise ValueError(f"request_id {rid!r} is already in use")
            stream = d.submit(submit_codec.request_from_submit_pb(sub.request, d.clock()))
        except Exception as exc:  # noqa: BLE001 - the request's status goes back on the stream
            self._errors.append(error_to_pb(rid, exc))
            self._wake.set()
            return
        start_span(d, stream, tuple(sub.trace_context.items()))
        self.streams[rid] = stream
        stream.notify = self._on_ready
        if stream.done or stream.num_pending_tokens:  # an immediate event (it can never run)
            self._on_ready(stream)

    def _on_ready(self, stream: RequestStream) -> None:
        self._ready[stream.req_id] = stream
        self._wake.set()

    def input_closed(self, error: Exception | None = None) -> None:
        """The gateway closed its side; with ``error`` (its stream broke) :meth:`messages` raises it."""
        self.input_done = True
        self._input_error = error
        self._wake.set()

    # ------------------------------------------------------------------ scheduler -> gateway
    def take_batch(self) -> scheduler_pb2.SchedulerMessage | None:
        """Everything ready now as one message (None when there is nothing, not even a changed load)."""
        ready, self._ready = self._ready, {}
        errors, self._errors = self._errors, []
        events = []
        d = self.d
        for stream in ready.values():
            for item in stream.drain():
                if isinstance(item, BaseException):
                    errors.append(error_to_pb(stream.req_id, item))
                    self.streams.pop(stream.req_id, None)
                    break
                events.append(event_to_pb(d, stream, item))
                if item.finish_reason is not None:
                    self.streams.pop(stream.req_id, None)
                    break
        load = d.load()
        if not events and not errors and load == self._last_load:
            return None
        self._last_load = load
        msg = scheduler_pb2.SchedulerMessage(events=events, errors=errors)
        msg.load.outstanding_tokens, msg.load.num_requests, msg.load.num_healthy_executors, msg.load.num_queued = load
        self.num_messages += 1
        self.num_events += len(events)
        return msg

    async def messages(self):
        """The session's outgoing messages until the gateway has closed its side and nothing is live."""
        yield self.take_batch() or scheduler_pb2.SchedulerMessage()  # the load, at once
        while not (self.input_done and not self.streams and not self._ready and not self._errors):
            try:
                await asyncio.wait_for(self._wake.wait(), LOAD_INTERVAL_S)
            except TimeoutError:
                pass
            self._wake.clear()
            if self._input_error is not None:  # raised in the handler task, which ends the call
                raise self._input_error
            msg = self.take_batch()
            if msg is not None:
                yield msg

    def close(self) -> None:
        """The stream ended: abort what is still live (frees its KV)."""
        for rid, stream in list(self.streams.items()):
            stream.notify = None
            if not stream.done:
                self.d.abort(rid)
        self.streams.clear()
