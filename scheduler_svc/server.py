"""SchedulerService: a thin servicer over the dispatcher: decode, call it, encode.

Submit decodes and validates (ValueError -> INVALID_ARGUMENT naming the field),
admits (AdmissionRejected -> RESOURCE_EXHAUSTED), routes, then streams the
request's ``TokenEvent``s; the last one carries finish reason, usage and
timings. A client that cancels (or drops) the stream aborts the request: its KV
is freed now and the executor is told in the next plan's ``finished_ids``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from scheduler_svc import submit_codec
from scheduler_svc.config import ServiceConfig
from scheduler_svc.dispatcher import Dispatcher
from scheduler_svc.pool_load import pool_load
from scheduler_svc.step_loop import Clock
from telemetry import step_tracing, tracing
from wire.grpc_server import ServiceServer, start_server
from wire.pb.slai.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    async def Submit(self, request, context):
        d = self.dispatcher
        stream = d.submit(submit_codec.request_from_submit_pb(request, d.clock()))
        req, metrics = stream.req, d.metrics
        if d.spans is not None:
            d.spans.start(req.req_id, carrier=context.invocation_metadata(), tier=req.tier,
                          max_tokens=req.max_tokens, temperature=req.sampling.temperature, top_p=req.sampling.top_p,
                          prompt_tokens=req.num_prompt_tokens, tbt_slo_s=req.tbt_slo_s, ttft_slo_s=req.ttft_slo_s)
        try:
            while True:
                item = await stream.get()  # ttft_s / tbt_s: the client's view, across failovers
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is None:
                    yield submit_codec.token_event_to_pb(item)
                    continue
                final = stream.final_fields(item)
                if metrics is not None:
                    metrics.record_finish(req.tier, final["e2e_s"], final["queue_s"],
                                          prompt_tokens=final["prompt_tokens"],
                                          completion_tokens=final["completion_tokens"],
                                          finish_reason=item.finish_reason)
                yield submit_codec.final_token_event_to_pb(item, **final)
                return
        finally:
            if not stream.done:  # the client went away: free the request's KV
                d.abort(stream.req_id)

    async def Abort(self, request, context):
        return scheduler_pb2.AbortResponse(found=self.dispatcher.abort(request.request_id))

    async def Stats(self, request, context):
        d = self.dispatcher
        num_queued, num_tokens = d.queued()
        return submit_codec.stats_to_pb(d.config.policy, d.executor_stats(), num_queued, num_tokens)


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
                             [SERVICE_NAME], address, serving=False, service_token=config.service_token)
    holder["srv"] = srv
    dispatcher.start()
    return srv, dispatcher
