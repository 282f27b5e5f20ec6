"""The gateway's HTTP/1.1 connections: read timeouts, a connection limit, lingering close.

uvicorn's h11 protocol (the gateway runs it; httptools is not installed) closes
idle keep-alive connections, but it has no deadline for a request's headers or
body: a client that connects and sends nothing, half a request line, or a body
one byte at a time keeps its connection, and its file descriptor, forever.
:class:`GuardedH11Protocol` adds, per connection (docs/gateway.md, "Transport limits"):

* a **header deadline**: a request's headers must be complete ``header_timeout_s``
  after the connection opened (or after the first byte of a later request on a
  keep-alive connection). Otherwise: 408 if part of a request came, then close;
  a connection that sent nothing is just closed.
* a **body deadline**: the whole body must arrive within ``body_timeout_s`` after
  the headers (a trickling body gets 408 and the connection is closed). It also
  bounds how long the rest of a body is read and dropped after an early answer.
* a **connection limit**: a connection beyond ``max_connections`` open ones gets
  503 at once and is closed.
* an **early answer** hook: a request can be answered as soon as its headers are
  parsed, before uvicorn makes it an ASGI task (the gateway answers 429 there while
  it is full: ``gateway.http_guard.full_gateway_answer``). Answered in the same
  callback that read it, a burst of rejected requests gets its answers while the
  burst is still being read, not after all of it has been parsed.
* a **lingering close**: closing a socket that still has unread input makes the
  kernel send RST, and a client still busy writing its body may then lose the
  answer (413, 408, 503) waiting in its receive buffer. So when the client may
  still be sending, the gateway half-closes (FIN after the answer) and reads and
  drops input for at most ``LINGER_S`` seconds / ``LINGER_MAX_BYTES`` bytes
  before closing, as nginx does.
"""

from __future__ import annotations

import asyncio
import http
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.http_guard import error_body

LINGER_S = 3.0
LINGER_MAX_BYTES = 64 << 20

# (method, target, headers) -> None, or (status, JSON body, extra headers) to answer with now
EarlyAnswer = Callable[[bytes, bytes, Any], "tuple[int, bytes, tuple[tuple[bytes, bytes], ...]] | None"]


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 2048


def raw_response(status: int, message: str, kind: str) -> bytes:
    """A complete ``Connection: close`` response with an OpenAI-shaped error body."""
    body = error_body(message, kind)
    head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


class _LingeringTransport:
    """The connection's transport as uvicorn sees it: ``close()`` lingers when the client may still send."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedH11Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self.lingering = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def pause_reading(self) -> None:
        if not self.lingering:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.lingering:
            self._transport.resume_reading()

    def close(self) -> None:
        if self.is_closing():
            return
        if not self._protocol.peer_may_send() or not self._transport.can_write_eof():
            self._transport.close()
            return
        self.lingering = True
        self._transport.write_eof()  # sent after the buffered answer
        self._transport.resume_reading()
        self._protocol.start_linger()

    def abort_linger(self) -> None:
        self._transport.close()


class _Connection(h11.Connection):
    """uvicorn's h11 connection, showing each request to the protocol before uvicorn sees it."""

    def __init__(self, protocol: GuardedH11Protocol, max_incomplete_event_size: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size)
        self._protocol = protocol

    def next_event(self) -> Any:
        while True:
            event = super().next_event()
            if type(event) is not h11.Request or not self._protocol.answer_early(event):
                return event
            # Answered: uvicorn drops the request's body (our side is DONE) and then starts the
            # next cycle, as after any early response; unless the client asked us to close.
            if self.our_state is not h11.DONE:
                return h11.NEED_DATA


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus the deadlines and limits of this module.

    ``limits`` and ``early_answer`` are set on a subclass per server (:func:`protocol_class`).
    """

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    early_answer: ClassVar[EarlyAnswer | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        max_event = self.config.h11_max_incomplete_event_size
        self.conn = _Connection(self, DEFAULT_MAX_INCOMPLETE_EVENT_SIZE if max_event is None else max_event)
        self._deadline: asyncio.TimerHandle | None = None
        self._deadline_kind = ""  # "header" | "body" | "linger" | ""
        self._rejected = False  # over the connection limit: answered 503 before any request
        self._stopping = False  # the server is shutting down: close without lingering
        self._dropped = 0  # bytes read and dropped while lingering

    # ------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]
        if len(self.connections) > self.limits.max_connections:
            self._rejected = True
            self.transport.write(raw_response(
                503, f"connection limit reached ({self.limits.max_connections} open connections); retry later",
                "service_unavailable"))
            self.transport.close()
            return
        self._arm("header", self.limits.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            self._dropped += len(data)
            if self._dropped > LINGER_MAX_BYTES:
                self.transport.abort_linger()  # type: ignore[attr-defined]
            return
        super().data_received(data)
        self._follow_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # ------------------------------------------------------------ uvicorn hooks
    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._disarm()  # keep-alive: uvicorn's idle timer takes over until the next byte comes
        else:
            self._follow_request()

    def shutdown(self) -> None:
        self._stopping = True
        if self._deadline_kind == "linger":
            self.transport.abort_linger()  # type: ignore[attr-defined]
            return
        super().shutdown()

    def answer_early(self, request: h11.Request) -> bool:
        """Answer ``request`` now if the ``early_answer`` hook says so (then True)."""
        hook = type(self).early_answer
        answer = hook(request.method, request.target, request.headers) if hook is not None else None
        if answer is None:
            return False
        status, body, extra = answer
        head = h11.Response(status_code=status, reason=http.HTTPStatus(status).phrase.encode(), headers=[
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra])
        self.transport.write(self.conn.send(head) + self.conn.send(h11.Data(data=body))
                             + self.conn.send(h11.EndOfMessage()))
        self.server_state.total_requests += 1
        if self.conn.our_state is not h11.DONE:  # the client asked to close (or HTTP/1.0)
            self.transport.close()
        return True

    # ------------------------------------------------------------ deadlines
    def peer_may_send(self) -> bool:
        """The client may still be writing: in a request's body, or not yet heard (503 at connect)."""
        return not self._stopping and (self._rejected or self.conn.their_state is h11.SEND_BODY)

    def start_linger(self) -> None:
        self._arm("linger", LINGER_S)

    def _follow_request(self) -> None:
        """Arm the deadline that fits where the client's request stands."""
        if self._deadline_kind == "linger":
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            if self._deadline_kind != "header":  # a new request started: its headers are due
                self._arm("header", self.limits.header_timeout_s)
        elif state is h11.SEND_BODY:
            if self._deadline_kind != "body":
                self._arm("body", self.limits.body_timeout_s)
        else:
            self._disarm()

    def _arm(self, kind: str, seconds: float) -> None:
        self._disarm()
        self._deadline_kind = kind
        self._deadline = self.loop.call_later(seconds, self._on_deadline)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None
        self._deadline_kind = ""

    def _on_deadline(self) -> None:
        kind, self._deadline, self._deadline_kind = self._deadline_kind, None, ""
        if kind == "linger":
            self.transport.abort_linger()  # type: ignore[attr-defined]
            return
        if self.transport.is_closing():
            return
        if kind == "header":
            # NOTE: trailing_data is what h11 holds of a request it could not parse yet.
            if self.conn.trailing_data[0]:
                self.transport.write(raw_response(
                    408, f"request headers not complete within {self.limits.header_timeout_s:g} s",
                    "request_timeout"))
            self.transport.close()
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            self.transport.write(raw_response(
                408, f"body: not complete within {self.limits.body_timeout_s:g} s of the headers",
                "request_timeout"))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() says http.disconnect, its sends are dropped
            cycle.message_event.set()
        self.transport.close()


def protocol_class(limits: ConnectionLimits, early_answer: EarlyAnswer | None = None) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` subclass bound to ``limits``, for ``uvicorn.Config(http=...)``."""
    return type("GatewayH11Protocol", (GuardedH11Protocol,),
                {"limits": limits, "early_answer": staticmethod(early_answer) if early_answer else None})
