"""SchedulerService: a thin servicer over the dispatcher: decode, call it, encode.

Submit decodes and validates (ValueError -> INVALID_ARGUMENT naming the field),
admits (AdmissionRejected -> RESOURCE_EXHAUSTED), routes, then streams the
request's ``TokenEvent``s; the last one carries finish reason, usage and
timings. A client that cancels (or drops) the stream aborts the request: its KV
is freed now and the executor is told in the next plan's ``finished_ids``.

Session is the same for many requests of one gateway on one bidi stream, with their
events batched per step (``scheduler_svc/session.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time

from scheduler_svc import submit_codec
from scheduler_svc.config import ServiceConfig
from scheduler_svc.dispatcher import Dispatcher
from scheduler_svc.pool_load import pool_load
from scheduler_svc.session import GatewaySession, event_to_pb, start_span
from scheduler_svc.step_loop import Clock
from telemetry import step_tracing, tracing
from wire.grpc_server import ServiceServer, keepalive_server_options, start_server
from wire.pb.slai.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    async def Submit(self, request, context):
        d = self.dispatcher
        stream = d.submit(submit_codec.request_from_submit_pb(request, d.clock()))
        start_span(d, stream, context.invocation_metadata())
        try:
            while True:
                item = await stream.get()  # ttft_s / tbt_s: the client's view, across failovers
                if isinstance(item, BaseException):
                    raise item
                yield event_to_pb(d, stream, item)
                if item.finish_reason is not None:
                    return
        finally:
            if not stream.done:  # the client went away: free the request's KV
                d.abort(stream.req_id)

    async def Session(self, request_iterator, context):
        session = GatewaySession(self.dispatcher)

        async def read() -> None:
            error = None
            try:
                async for msg in request_iterator:
                    session.on_message(msg)
            except Exception as exc:  # noqa: BLE001 - e.g. a malformed message: messages() raises it
                error = exc
            finally:
                session.input_closed(error)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            async for msg in session.messages():
                yield msg
        finally:
            reader.cancel()
            session.close()

    async def Abort(self, request, context):
        return scheduler_pb2.AbortResponse(found=self.dispatcher.abort(request.request_id))

    async def Stats(self, request, context):
        d = self.dispatcher
        num_queued, num_tokens = d.queued()
        tbt = d.tbt_hist
        return submit_codec.stats_to_pb(d.config.policy, d.executor_stats(), num_queued, num_tokens,
                                        num_tbt_samples=tbt.count, tbt_p50_s=tbt.quantile(0.5) or 0.0,
                                        tbt_p99_s=tbt.quantile(0.99) or 0.0)


async def serve(config: ServiceConfig, address: str = "127.0.0.1:0", clock: Clock = time.monotonic,
                client_factory=None, metrics=None) -> tuple[ServiceServer, Dispatcher]:
    """Start the scheduler; health turns SERVING when an executor is ready.

    ``metrics``: a ``telemetry.metrics.SchedulerMetrics`` to feed (None: no metrics). Request and step
    spans are recorded when tracing is on (``telemetry.tracing.init_tracing`` ran with an exporter).
    ``config.service_token`` (when set) is required on every SchedulerService RPC and sent to the executors.
    """
    holder: dict[str, ServiceServer] = {}

    def on_health(ok: bool) -> None:
        srv = holder.get("srv")
        if srv is not None:
            asyncio.get_running_loop().create_task(srv.set_serving(ok))

    spans = step_tracing.RequestSpans(clock) if tracing.is_tracing_enabled() else None
    dispatcher = Dispatcher(config, clock=clock, client_factory=client_factory, on_health=on_health,
                            metrics=metrics, spans=spans)
    if metrics is not None:  # the endpoint picker's vllm:* gauges, read from the pool at each scrape
        metrics.watch_pool(lambda: pool_load(dispatcher))
    servicer = SchedulerServicer(dispatcher)
    srv = await start_server([lambda s: scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, s)],
                             [SERVICE_NAME], address, serving=False, service_token=config.service_token,
                             options=keepalive_server_options())  # gateways ping their Session streams
    holder["srv"] = srv
    dispatcher.start()
    return srv, dispatcher
