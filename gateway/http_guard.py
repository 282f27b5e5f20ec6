"""Pure ASGI middlewares in front of the FastAPI app: body size limit and early admission.

Both run before FastAPI does any work on a request, and neither reads more of
the body than it must (docs/gateway.md, "Transport limits"):

* :class:`BodyLimit` answers 413 at once when ``Content-Length`` is above the
  limit, and otherwise counts body bytes as the app receives them, so a chunked
  body is cut off at the limit instead of being buffered whole.
* :class:`AdmissionGate` takes the request's admission slot before the body is
  read or parsed; a full gateway answers 429 with ``Retry-After`` right away.
  :func:`full_gateway_answer` gives the same 429 one step earlier, from the
  connection itself (``gateway.http_transport``), while the gateway is full.

Errors have OpenAI's shape, like every other gateway error.
"""

from __future__ import annotations

import json
import math
from typing import Any, Awaitable, Callable

from gateway.admission import Admission, holding
from gateway.auth import KeyStore, Unauthenticated
from wire.grpc_server import AdmissionRejected

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
_GENERATION_TARGETS = frozenset(p.encode() for p in GENERATION_PATHS)


def error_body(message: str, kind: str, param: str | None = None) -> bytes:
    """OpenAI's error JSON (the same shape as ``gateway.http_api.error_response``)."""
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": None}}).encode()


async def send_error(send: Send, status: int, message: str, kind: str, param: str | None = None,
                     headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    body = error_body(message, kind, param)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


class BodyTooLarge(Exception):
    """Raised into the app by :class:`BodyLimit`'s ``receive`` when the body passes the limit."""


class BodyLimit:
    """413 for a request body above ``max_bytes``, decided before the body is read past the limit.

    The 413 carries ``Connection: close``: the rest of the body is not worth reading
    (the server's transport lets the client read the answer first, see
    ``gateway.http_transport``).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, send: Send, size: str) -> Awaitable[None]:
        return send_error(send, 413, f"body: {size} is larger than this gateway's limit of {self.max_bytes} bytes",
                          "invalid_request_error", "body", headers=((b"connection", b"close"),))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(send, f"Content-Length {int(length)}")
            return
        received = 0
        exceeded = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                raise BodyTooLarge()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if exceeded:
                return  # the app's answer to a cut-off body is replaced by the 413
            response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            pass  # the app let it through; answered below
        if exceeded and not response_started:
            await self._too_large(send, "the request body")


def retry_after_value(exc: AdmissionRejected) -> str:
    """A 429's ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(exc.retry_after_s)))


def retry_after(exc: AdmissionRejected) -> tuple[tuple[bytes, bytes], ...]:
    """The 429's ``Retry-After`` header, as raw ASGI headers."""
    return ((b"retry-after", retry_after_value(exc).encode()),)


def _resolve(keys: KeyStore, authorization: bytes | None) -> Any | None:
    """The tier policy of an ``Authorization`` value; None for a bad key (the app answers 401)."""
    try:
        return keys.resolve(authorization.decode("latin-1") if authorization is not None else None)
    except Unauthenticated:
        return None


class AdmissionGate:
    """Takes a generation request's admission slot first; 429 when the gateway is full.

    The slot is held while the app runs (body read, parse, tokenize, stream) and
    released on any exit; ``GenerationService.generate`` claims it through
    :func:`gateway.admission.current_slot`. A request with a bad API key passes
    through without a slot (the app answers 401 before any work).
    """

    def __init__(self, app: ASGIApp, admission: Admission, keys: KeyStore,
                 on_reject: Callable[[Any], None] = lambda tier: None) -> None:
        self.app = app
        self.admission = admission
        self.keys = keys
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        tier = _resolve(self.keys, header(scope, b"authorization"))
        if tier is None:
            await self.app(scope, receive, send)
            return
        try:
            slot = self.admission.acquire()
        except AdmissionRejected as exc:
            self.on_reject(tier.tier)
            await send_error(send, 429, str(exc), "rate_limit_error", headers=retry_after(exc))
            return
        with holding(slot):
            await self.app(scope, receive, send)


def full_gateway_answer(admission: Admission, keys: KeyStore, on_reject: Callable[[Any], None] = lambda tier: None):
    """A hook for ``gateway.http_transport``: the 429 for a generation request while every slot is taken.

    It runs when the request's headers have been parsed, before the request becomes
    an ASGI task, so under a burst each rejection costs only the header parse. It
    takes no slot: while slots are free it answers None and :class:`AdmissionGate`
    decides.
    """

    def answer(method: bytes, target: bytes, headers: Any) -> tuple[int, bytes, tuple] | None:
        if method != b"POST" or target.partition(b"?")[0] not in _GENERATION_TARGETS:
            return None
        try:
            admission.check()
            return None
        except AdmissionRejected as exc:
            tier = _resolve(keys, next((v for k, v in headers if k == b"authorization"), None))
            if tier is None:
                return None  # the app answers 401
            on_reject(tier.tier)
            return 429, error_body(str(exc), "rate_limit_error"), retry_after(exc)

    return answer


def guard_app(app: ASGIApp, admission: Admission, keys: KeyStore, max_body_bytes: int,
              on_reject: Callable[[Any], None] = lambda tier: None) -> ASGIApp:
    """``app`` behind the body limit and the admission gate (body limit outermost)."""
    return BodyLimit(AdmissionGate(app, admission, keys, on_reject), max_body_bytes)
