"""Build a grpc.aio server the same way in every service: one error interceptor, health, reflection, drain.

* one interceptor maps exceptions to status codes: ``ValueError`` ->
  INVALID_ARGUMENT, ``AdmissionRejected`` -> RESOURCE_EXHAUSTED (with a
  ``retry-after-s`` trailing metadata hint), ``LookupError`` -> NOT_FOUND,
  ``ConnectionError`` -> UNAVAILABLE, anything else -> INTERNAL (logged once);
  a request whose bytes do not parse as its message type is INVALID_ARGUMENT
  too (grpc.aio itself would answer UNKNOWN);
* standard ``grpc.health.v1`` health and server reflection;
* with ``service_token``, :class:`wire.service_auth.ServiceTokenInterceptor` runs first:
  every other RPC without the token gets UNAUTHENTICATED (health and reflection stay open);
* graceful drain: health goes NOT_SERVING, then in-flight calls get ``grace_s``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from wire.rpc_handlers import rebuild_handler
from wire.service_auth import ServiceTokenInterceptor

log = logging.getLogger(__name__)


# The largest gRPC message any of our services sends or accepts by default: a 64 Ki-token plan or
# prompt is ~0.3 MB, so this leaves room for long prompts while bounding a malformed peer.
# The gateway's public receive limit is its --max-body-bytes instead.
MAX_MESSAGE_BYTES = 64 << 20


def message_size_options(max_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Channel/server options that set both directions' message size limit."""
    return [("grpc.max_send_message_length", max_bytes), ("grpc.max_receive_message_length", max_bytes)]


# NOTE: a peer whose host vanishes (power loss, a partitioned network, a deleted network namespace)
# sends no RST: without keepalive a long-lived stream to it (the gateway's Session) waits forever.
# Callers ping every 2 s while a call is open and give up after 2 s more without an answer; servers
# must then accept pings that often (their default allows one per 5 min and answers more with GOAWAY).
def keepalive_client_options(interval_ms: int = 2000, timeout_ms: int = 2000) -> list[tuple[str, int]]:
    """Channel options: detect a silent peer within ``interval_ms + timeout_ms`` while a call is open."""
    return [("grpc.keepalive_time_ms", interval_ms), ("grpc.keepalive_timeout_ms", timeout_ms),
            ("grpc.keepalive_permit_without_calls", 0), ("grpc.http2.max_pings_without_data", 0)]


def keepalive_server_options(min_interval_ms: int = 1000) -> list[tuple[str, int]]:
    """Server options that accept the callers' keepalive pings (see ``keepalive_client_options``)."""
    return [("grpc.http2.min_ping_interval_without_data_ms", min_interval_ms),
            ("grpc.http2.max_ping_strikes", 0)]


class AdmissionRejected(Exception):
    """The service is full; the client should retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(TimeoutError):
    """A request ran past the service's own deadline for it (gRPC DEADLINE_EXCEEDED, HTTP 504)."""


MAX_STATUS_MESSAGE_CHARS = 1024  # backstop: messages clip client input themselves


def _bounded(message: str) -> str:
    """A status message of bounded size that always encodes (no lone surrogates)."""
    if len(message) > MAX_STATUS_MESSAGE_CHARS:
        message = message[:MAX_STATUS_MESSAGE_CHARS] + "..."
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple]:
    """The gRPC status, message and trailing metadata for an exception."""
    if isinstance(exc, AdmissionRejected):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, _bounded(str(exc)), (
            ("retry-after-s", f"{exc.retry_after_s:.3f}"),)
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, _bounded(str(exc)), ()
    if isinstance(exc, LookupError):
        return grpc.StatusCode.NOT_FOUND, _bounded(str(exc)), ()
    if isinstance(exc, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED, _bounded(str(exc)), ()
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return grpc.StatusCode.UNAVAILABLE, _bounded(str(exc) or type(exc).__name__), ()
    return grpc.StatusCode.INTERNAL, _bounded(f"internal error: {type(exc).__name__}: {exc}"), ()


async def _abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    code, message, trailers = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("unhandled error in RPC", exc_info=exc)
    if trailers:
        context.set_trailing_metadata(trailers)
    await context.abort(code, message)


class MalformedRequest(ValueError):
    """The request's bytes are not a valid message of the method's request type."""


class _Unparsed:
    """What the deserializer returns for bytes it cannot parse (see :func:`_tolerant`)."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = MalformedRequest(f"request: malformed protobuf: {str(error)[:300]}")


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    # NOTE: grpc.aio turns an exception raised by the request deserializer into UNKNOWN
    # ("Unexpected <class DecodeError>") and logs a traceback per call; returning a marker
    # instead lets the wrapped handler answer INVALID_ARGUMENT with a message.
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError and whatever a custom deserializer raises
            return _Unparsed(exc)
    return deserialize


async def _parsed(requests):
    """A request stream that raises :class:`MalformedRequest` at the first message that did not parse.

    The exception is raised in whichever task iterates the stream. A servicer that iterates it
    in the handler's own task gets INVALID_ARGUMENT from :class:`ErrorInterceptor`; one that
    reads it in a task of its own must hand the exception to the handler task and raise it there.
    """
    # NOTE: the status is not sent here with ``context.abort``: called from a reader task, the abort
    # races the handler task (which may finish and release the call while the status is in flight,
    # so the client sees only its deadline); only the handler task ends a call.
    async for request in requests:
        if isinstance(request, _Unparsed):
            raise request.error
        yield request


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions raised by servicer methods into clear status codes."""

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None

        def checked(request, context, request_streaming: bool):
            if request_streaming:
                return _parsed(request)
            if isinstance(request, _Unparsed):
                raise request.error
            return request

        def wrap_unary(fn, request_streaming: bool = False):
            async def inner(request, context):
                try:
                    return await fn(checked(request, context, request_streaming), context)
                except (grpc.aio.AbortError, grpc.RpcError):
                    raise
                except Exception as exc:  # noqa: BLE001 - the one place errors become statuses
                    await _abort_with(context, exc)
            return inner

        def wrap_stream(fn, request_streaming: bool = False):
            async def inner(request, context):
                try:
                    async for item in fn(checked(request, context, request_streaming), context):
                        yield item
                except (grpc.aio.AbortError, grpc.RpcError):
                    raise
                except Exception as exc:  # noqa: BLE001
                    await _abort_with(context, exc)
            return inner

        return rebuild_handler(
            handler, lambda fn, request_streaming, response_streaming:
            (wrap_stream if response_streaming else wrap_unary)(fn, request_streaming),
            _tolerant(handler.request_deserializer))


@dataclass
class ServiceServer:
    """A started aio server with its health servicer."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    service_names: tuple[str, ...]

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Drain: report NOT_SERVING, refuse new calls, give in-flight calls ``grace_s``."""
        await self.set_serving(False)
        await self.server.stop(grace_s)


async def start_server(add_servicers: Iterable[Callable[[grpc.aio.Server], None]], service_names: Iterable[str],
                       address: str = "127.0.0.1:0", interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
                       serving: bool = True, options: Iterable[tuple[str, Any]] = (),
                       service_token: str = "") -> ServiceServer:
    """Start a grpc.aio server on ``address`` (``host:port``; port 0 picks one, or ``unix:PATH``).

    ``service_token``: require it on every RPC but health and reflection ("" = no check).
    """
    auth = [ServiceTokenInterceptor(service_token)] if service_token else []
    # NOTE: gRPC core keeps the first of two equal keys, so ``options`` must replace the defaults, not follow them.
    merged = {**dict(message_size_options()), **dict(options)}
    server = grpc.aio.server(interceptors=[*auth, ErrorInterceptor(), *interceptors], options=list(merged.items()))
    for add in add_servicers:
        add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = tuple(service_names)
    reflection.enable_server_reflection((*names, reflection.SERVICE_NAME, health.SERVICE_NAME), server)
    port = server.add_insecure_port(address)
    if port == 0 and not address.startswith("unix:"):
        raise OSError(f"could not bind {address}")
    await server.start()
    srv = ServiceServer(server=server, health=health_servicer, port=port, service_names=names)
    await srv.set_serving(serving)
    return srv


async def wait_for_stop_signal() -> None:
    """Block until SIGTERM or SIGINT arrives; the caller then drains and stops."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
