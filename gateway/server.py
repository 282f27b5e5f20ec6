"""GatewayService over gRPC, plus the process that serves gRPC and HTTP on one loop.

The servicer is thin: authenticate, decode, call
:class:`~gateway.service.GenerationService`, encode. Exceptions become statuses
in ``wire.grpc_server``'s interceptor; only UNAUTHENTICATED is raised here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass
from typing import AsyncIterator

import grpc

from gateway import codec
from gateway.auth import KeyStore, Unauthenticated
from gateway.config import GatewayConfig
from gateway.readiness import SchedulerWatcher
from gateway.service import GenerationService
from gateway.validation import check_request_id
from wire.grpc_server import ServiceServer, start_server
from wire.pb.slai.v1 import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name


def metadata_value(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return None


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, service: GenerationService, keys: KeyStore) -> None:
        self.service = service
        self.keys = keys

    async def Generate(self, request: gateway_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[gateway_pb2.GenerateChunk]:
        try:
            tier = self.keys.resolve(metadata_value(context, "authorization"))
        except Unauthenticated as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        inp = codec.generate_input_from_pb(request)
        async for delta in self.service.generate(inp, tier, context.invocation_metadata()):
            yield codec.delta_to_pb(delta)

    async def Abort(self, request: gateway_pb2.GatewayAbortRequest,
                    context: grpc.aio.ServicerContext) -> gateway_pb2.GatewayAbortResponse:
        try:
            self.keys.resolve(metadata_value(context, "authorization"))
        except Unauthenticated as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        if not request.request_id:
            raise ValueError("request_id: must not be empty")
        check_request_id(request.request_id)
        return gateway_pb2.GatewayAbortResponse(found=await self.service.abort(request.request_id))


def _bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # NOTE: IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only for sockets whose
    # proto is TCP, and accepted sockets inherit it. With proto 0 every HTTP reply (headers
    # and body are separate writes) waited ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


# NOTE: after the drain deadline the gateway ends the remaining streams itself; this is how long
# those terminal messages get to reach the clients before the servers close for good.
CUT_MARGIN_S = 1.0


@dataclass
class RunningGateway:
    """A started gateway: gRPC server, HTTP server task, the shared service and its scheduler watcher."""

    service: GenerationService
    grpc_server: ServiceServer
    grpc_port: int
    http_port: int | None
    _http_server: object | None = None
    _http_task: asyncio.Task | None = None
    watcher: SchedulerWatcher | None = None

    async def stop(self, grace_s: float = 5.0) -> None:
        """Drain, then cut: NOT_SERVING and no new calls at once; in-flight requests get ``grace_s`` to
        finish. Any still running then end with a "gateway is shutting down" error that the gateway sends
        itself (gRPC UNAVAILABLE; HTTP 503, or an SSE error event and ``data: [DONE]``) before the servers
        close, instead of a dropped connection."""
        if self.watcher is not None:
            await self.watcher.stop()  # it must not flip health back to SERVING
        self.service.readiness.draining = True
        await self.grpc_server.set_serving(False)
        # the servers' own limits are only a backstop behind the cut below
        stops = [self.grpc_server.server.stop(grace_s + CUT_MARGIN_S)]
        if self._http_server is not None:
            self._http_server.config.timeout_graceful_shutdown = grace_s + CUT_MARGIN_S
            self._http_server.should_exit = True  # uvicorn stops accepting, waits for open responses
            stops.append(asyncio.wait_for(asyncio.shield(self._http_task), grace_s + CUT_MARGIN_S + 1.0))
        cut = asyncio.get_running_loop().create_task(self._cut_at(grace_s))
        for res in await asyncio.gather(*stops, return_exceptions=True):
            if isinstance(res, BaseException) and not isinstance(res, asyncio.TimeoutError):
                log.debug("stop: %r", res)
        cut.cancel()
        if self._http_task is not None and not self._http_task.done():
            self._http_task.cancel()
            with contextlib.suppress(BaseException):
                await self._http_task
        await self.service.close()

    async def _cut_at(self, grace_s: float) -> None:
        """Wait until nothing is in flight or ``grace_s`` has passed; then end what is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.service.num_in_flight and loop.time() < deadline:
            await asyncio.sleep(min(0.05, max(deadline - loop.time(), 0.0)))
        if self.service.num_in_flight:
            n = self.service.finish_in_flight(
                f"gateway is shutting down: the drain timeout ({grace_s:g} s) ran out before this request finished")
            log.warning("drain timeout (%g s): ended %d request(s) still in flight", grace_s, n)


async def start_gateway(config: GatewayConfig, service: GenerationService, keys: KeyStore) -> RunningGateway:
    """Start gRPC (``config.grpc_address``) and, unless ``http_port < 0``, HTTP on this loop.

    Health (gRPC and ``/health``) is SERVING only while the scheduler's is (``gateway.readiness``)."""
    servicer = GatewayServicer(service, keys)
    grpc_server = await start_server(
        [lambda s: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, s)],
        [SERVICE_NAME], config.grpc_address, serving=False,
        # a larger request fails RESOURCE_EXHAUSTED "Received message larger than max" before the servicer runs
        options=[("grpc.max_receive_message_length", config.max_body_bytes)])
    running = RunningGateway(service=service, grpc_server=grpc_server, grpc_port=grpc_server.port, http_port=None)
    # health follows the scheduler's: SERVING only while it is (checked once now, then every interval)
    running.watcher = SchedulerWatcher(service.scheduler_health, service.readiness, grpc_server.set_serving,
                                       config.health_interval_s)
    await running.watcher.check_once()
    if config.http_port >= 0:
        import uvicorn

        from gateway.http_api import build_app
        from gateway.http_guard import full_gateway_answer, guard_app
        from gateway.http_transport import ConnectionLimits, protocol_class

        class _Server(uvicorn.Server):
            # NOTE: the gateway process owns SIGINT/SIGTERM (it drains gRPC too);
            # uvicorn must not install its own handlers on the shared loop.
            @contextlib.contextmanager
            def capture_signals(self):
                yield

        # body limit and admission run before FastAPI; read deadlines and the connection
        # limit in the protocol (docs/gateway.md, "Transport limits")
        def rejected(tier) -> None:
            service.metrics.record_request(tier, "rejected")

        app = guard_app(build_app(service, keys), service.admission, keys, config.max_body_bytes, rejected)
        limits = ConnectionLimits(config.header_timeout_s, config.body_timeout_s, config.max_connections)
        protocol = protocol_class(limits, full_gateway_answer(service.admission, keys, rejected))
        sock = _bind_socket(config.http_host, config.http_port)
        uv_config = uvicorn.Config(app, http=protocol, interface="asgi3", log_level="warning",
                                   access_log=False, lifespan="off",
                                   timeout_keep_alive=config.keep_alive_timeout_s,
                                   timeout_graceful_shutdown=int(max(config.drain_timeout_s, 1)))
        http = _Server(uv_config)
        running._http_server = http
        running._http_task = asyncio.create_task(http.serve(sockets=[sock]))
        running.http_port = sock.getsockname()[1]
        for _ in range(500):  # wait until uvicorn accepts (it does in a few ms)
            if http.started or running._http_task.done():
                break
            await asyncio.sleep(0.01)
        if running._http_task.done():
            await running._http_task  # raise its startup error
    running.watcher.start()
    return running
