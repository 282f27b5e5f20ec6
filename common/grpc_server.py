"""Build a grpc.aio server the same way in every service (design habit 12).

* one interceptor maps exceptions to status codes: ``ValueError`` ->
  INVALID_ARGUMENT, ``AdmissionRejected`` -> RESOURCE_EXHAUSTED (with a
  ``retry-after-s`` trailing metadata hint), ``LookupError`` -> NOT_FOUND,
  ``ConnectionError`` -> UNAVAILABLE, anything else -> INTERNAL (logged once);
* standard ``grpc.health.v1`` health and server reflection;
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

log = logging.getLogger(__name__)


class AdmissionRejected(Exception):
    """The service is full; the client should retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple]:
    """The gRPC status, message and trailing metadata for an exception."""
    if isinstance(exc, AdmissionRejected):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), (("retry-after-s", f"{exc.retry_after_s:.3f}"),)
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc), ()
    if isinstance(exc, LookupError):
        return grpc.StatusCode.NOT_FOUND, str(exc), ()
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return grpc.StatusCode.UNAVAILABLE, str(exc) or type(exc).__name__, ()
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", ()


async def _abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    code, message, trailers = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("unhandled error in RPC", exc_info=exc)
    if trailers:
        context.set_trailing_metadata(trailers)
    await context.abort(code, message)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions raised by servicer methods into clear status codes."""

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None

        def wrap_unary(fn):
            async def inner(request, context):
                try:
                    return await fn(request, context)
                except (grpc.aio.AbortError, grpc.RpcError):
                    raise
                except Exception as exc:  # noqa: BLE001 - the one place errors become statuses
                    await _abort_with(context, exc)
            return inner

        def wrap_stream(fn):
            async def inner(request, context):
                try:
                    async for item in fn(request, context):
                        yield item
                except (grpc.aio.AbortError, grpc.RpcError):
                    raise
                except Exception as exc:  # noqa: BLE001
                    await _abort_with(context, exc)
            return inner

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap_unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                wrap_stream(handler.stream_stream), handler.request_deserializer, handler.response_serializer)
        return handler


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
                       serving: bool = True, options: Iterable[tuple[str, Any]] = ()) -> ServiceServer:
    """Start a grpc.aio server on ``address`` (``host:port``; port 0 picks one, or ``unix:PATH``)."""
    # NOTE: gRPC core keeps the first of two equal keys, so ``options`` must replace the defaults, not follow them.
    merged = {"grpc.max_send_message_length": 64 << 20, "grpc.max_receive_message_length": 64 << 20, **dict(options)}
    server = grpc.aio.server(interceptors=[ErrorInterceptor(), *interceptors], options=list(merged.items()))
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
