"""Tracing helpers: no-op when unconfigured, step spans with links, executor child spans, propagation."""

from __future__ import annotations

import time

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from scheduler_svc.core import EventKind, LifecycleEvent, StepResult, Tier, make_core
from telemetry import names as N
from telemetry import step_tracing, tracing
from tests.builders import fake_step_result, make_requests
from tests.telemetry.conftest import spans_named


def run_traced(core, spans: step_tracing.RequestSpans, dt: float = 0.05, forward_ns: int = 20_000_000,
               links_from=None):
    """The scheduler driver loop with the hooks it should call; the executor hook runs inline."""
    now = 0.0
    while core.requests:
        plan = core.schedule(now)
        with step_tracing.step_span(plan, spans if links_from is None else links_from, executor="e0") as step:
            r = fake_step_result(plan)
            result = StepResult(step_id=r.step_id, req_ids=r.req_ids, token_ids=r.token_ids, prepare_ns=1_000,
                                forward_ns=forward_ns, sample_ns=2_000, total_ns=forward_ns + 3_000)
            step_tracing.executor_step_span(step.traceparent, result, num_seqs=plan.num_seqs)  # executor side
            step.end(result)
        now += dt
        events = core.update(plan, result, now)
        spans.on_step(core.drain_events(), events)


# ---------------------------------------------------------------- off
def test_unconfigured_installs_nothing_and_helpers_are_cheap():
    assert tracing.init_tracing("slai-scheduler") is None
    assert not tracing.is_tracing_enabled()
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)

    core = make_core(record_events=tracing.is_tracing_enabled())
    reqs = make_requests(4)
    spans = step_tracing.RequestSpans()
    for r in reqs:
        spans.start(r.req_id, None, tier=r.tier)
        core.add(r, 0.0)
    plan = core.schedule(0.0)
    assert len(spans) == 0 and core.drain_events() == []
    assert tracing.start_request_span("x") is trace.INVALID_SPAN
    assert tracing.grpc_metadata() == () and tracing.grpc_server_interceptors() == []

    n = 20_000
    t0 = time.perf_counter()
    for _ in range(n):
        with step_tracing.step_span(plan, spans) as step:
            step.end(None)
        spans.on_step((), ())
        step_tracing.executor_step_span(step.traceparent, None)
    per_step_us = (time.perf_counter() - t0) / n * 1e6
    assert step.traceparent == ""
    assert per_step_us < 5.0, f"no-op step hooks cost {per_step_us:.2f} µs"  # ≈ 0.5 µs measured


def test_sdk_disabled_wins_over_endpoint(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.init_tracing("slai-gateway") is None
    monkeypatch.setenv("OTEL_SDK_DISABLED", "false")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert tracing.init_tracing("slai-gateway") is None


def test_env_names_the_service(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=ci")
    provider = tracing.init_tracing("slai-gateway", set_global=False)
    assert provider.resource.attributes["service.name"] == "slai-gateway"
    assert provider.resource.attributes["deployment.environment"] == "ci"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gw-from-env")
    provider = tracing.init_tracing("slai-gateway", set_global=False)
    assert provider.resource.attributes["service.name"] == "gw-from-env"


# ---------------------------------------------------------------- W3C propagation
def test_traceparent_round_trip_and_carriers(memory_exporter):
    span = tracing.start_request_span("r1", tier=Tier.PAYING, max_tokens=8, temperature=0.5, top_p=0.9)
    tp = tracing.traceparent_of(span)
    sc = span.get_span_context()
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, trace.set_span_in_context(span))
    assert tp == carrier["traceparent"]  # same string as OTel's own W3C propagator
    assert tp.startswith(f"00-{sc.trace_id:032x}-{sc.span_id:016x}-")
    for carrier in ({"traceparent": tp}, ((N.TRACEPARENT_HEADER, tp),), tracing.grpc_metadata(span), tp):
        parent = trace.get_current_span(tracing.extract_context(carrier)).get_span_context()
        assert (parent.trace_id, parent.span_id, parent.is_remote) == (sc.trace_id, sc.span_id, True)
    for bad in ("", "00-zz-11-01", "00-" + "0" * 32 + "-" + "1" * 16 + "-01", "garbage"):
        assert tracing.context_from_traceparent(bad) is None
    span.end()
    (finished,) = memory_exporter.get_finished_spans()
    assert finished.name == N.SPAN_GATEWAY_REQUEST
    assert finished.attributes[N.GEN_AI_REQUEST_ID] == "r1"
    assert finished.attributes[N.SLAI_TIER] == "paying"
    assert finished.attributes[N.GEN_AI_REQUEST_TOP_P] == 0.9


async def test_parent_crosses_a_real_grpc_call(memory_exporter):
    """Gateway -> scheduler: metadata from grpc_metadata(span) parents the scheduler's request span."""
    spans = step_tracing.RequestSpans()

    def handle(request: bytes, context) -> bytes:
        spans.start("r1", context.invocation_metadata(), tier="free", prompt_tokens=3)
        return b"ok"

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Svc", {"Call": grpc.unary_unary_rpc_method_handler(handle)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        gw = tracing.start_request_span("r1", tier="free")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await channel.unary_unary("/test.Svc/Call")(b"x", metadata=tracing.grpc_metadata(gw)) == b"ok"
        spans.end("r1")
        tracing.end_request_span(gw, finish_reason="length", prompt_tokens=3, completion_tokens=2, ttft_s=0.1,
                                   e2e_s=0.3, queue_s=0.01, num_preemptions=0, max_tbt_s=0.2)
    finally:
        await server.stop(None)
    (sched,) = spans_named(memory_exporter, N.SPAN_SCHEDULER_REQUEST)
    (gateway,) = spans_named(memory_exporter, N.SPAN_GATEWAY_REQUEST)
    assert sched.parent.span_id == gateway.context.span_id
    assert sched.context.trace_id == gateway.context.trace_id
    assert gateway.attributes[N.GEN_AI_LATENCY_E2E] == 0.3
    assert gateway.attributes[N.GEN_AI_USAGE_COMPLETION_TOKENS] == 2


# ---------------------------------------------------------------- step spans
@pytest.mark.parametrize("by_mapping", [False, True])
def test_step_span_links_requests_and_carries_plan_stats(memory_exporter, by_mapping):
    core = make_core(record_events=True)
    spans = step_tracing.RequestSpans()
    reqs = make_requests(5, prompt_len=16, max_tokens=3)
    for r in reqs:
        spans.start(r.req_id, None, tier=r.tier, max_tokens=r.max_tokens, prompt_tokens=r.num_prompt_tokens,
                    tbt_slo_s=r.tbt_slo_s)
        core.add(r, 0.0)
    run_traced(core, spans, links_from=spans.contexts if by_mapping else None)
    assert len(spans) == 0 and spans.contexts == {} and spans.links == {}  # every request span ended on FINISHED

    request_spans = {s.attributes[N.GEN_AI_REQUEST_ID]: s for s in spans_named(memory_exporter,
                                                                                N.SPAN_SCHEDULER_REQUEST)}
    assert set(request_spans) == {r.req_id for r in reqs}
    steps = spans_named(memory_exporter, N.SPAN_SCHEDULER_STEP)
    assert len(steps) == 3  # one prefill step + two decode steps, never one span per token
    first = min(steps, key=lambda s: s.attributes[N.SLAI_STEP_ID])
    linked = {(link.context.trace_id, link.context.span_id) for link in first.links}
    assert linked == {(s.context.trace_id, s.context.span_id) for s in request_spans.values()}
    # each step is the child of ONE of its requests (round-robin by step id), linked to all of them
    owners = {(s.parent.trace_id, s.parent.span_id) for s in steps}
    assert owners <= linked and len(owners) == len(steps)
    assert first.attributes[N.SLAI_STEP_NUM_PREFILL_TOKENS] == 5 * 16
    assert first.attributes[N.SLAI_STEP_NUM_DECODES] == 0
    assert first.attributes[N.SLAI_STEP_NUM_RUNNING] == 5
    assert first.attributes[N.SLAI_STEP_FORWARD_NS] == 20_000_000
    assert 0 < first.attributes[N.SLAI_STEP_KV_USED_FRACTION] < 1
    for key in (N.SLAI_STEP_NUM_CRITICAL_DECODES, N.SLAI_STEP_NUM_NONCRITICAL_DECODES, N.SLAI_STEP_OFFSET,
                N.SLAI_STEP_NUM_PREEMPTED):
        assert key in first.attributes
    last = max(steps, key=lambda s: s.attributes[N.SLAI_STEP_ID])
    assert last.attributes[N.SLAI_STEP_NUM_DECODES] == 5

    r = request_spans[reqs[0].req_id]
    assert [e.name for e in r.events] == [N.EVENT_QUEUED, N.EVENT_SCHEDULED, N.EVENT_FIRST_TOKEN, N.EVENT_FINISHED]
    assert r.attributes[N.GEN_AI_USAGE_COMPLETION_TOKENS] == 3
    assert r.attributes[N.GEN_AI_LATENCY_TIME_TO_FIRST_TOKEN] == pytest.approx(0.05)
    assert r.attributes[N.GEN_AI_LATENCY_E2E] == pytest.approx(0.15)
    assert r.attributes[N.GEN_AI_LATENCY_TIME_IN_QUEUE] == pytest.approx(0.0)
    assert r.attributes[N.GEN_AI_RESPONSE_FINISH_REASONS] == ("length",)
    assert r.events[-1].timestamp - r.events[0].timestamp == pytest.approx(0.15e9, abs=1e3)


def test_executor_span_is_the_child_of_the_traceparent(memory_exporter):
    core = make_core(record_events=True)
    spans = step_tracing.RequestSpans()
    for r in make_requests(2, max_tokens=2):
        spans.start(r.req_id, None)
        core.add(r, 0.0)
    run_traced(core, spans, forward_ns=7_000_000)
    steps = {s.context.span_id: s for s in spans_named(memory_exporter, N.SPAN_SCHEDULER_STEP)}
    executor_steps = spans_named(memory_exporter, N.SPAN_EXECUTOR_STEP)
    assert len(executor_steps) == len(steps) == 2
    for ex in executor_steps:
        parent = steps[ex.parent.span_id]
        assert ex.context.trace_id == parent.context.trace_id
        assert ex.attributes[N.SLAI_STEP_ID] == parent.attributes[N.SLAI_STEP_ID]
        assert ex.attributes[N.SLAI_STEP_FORWARD_NS] == 7_000_000
        assert ex.end_time - ex.start_time == 7_003_000  # the span covers total_ns
    step_tracing.executor_step_span("", StepResult())  # no traceparent: scheduler not tracing, nothing recorded
    step_tracing.executor_step_span("not-a-traceparent", StepResult())
    assert len(spans_named(memory_exporter, N.SPAN_EXECUTOR_STEP)) == 2


def test_step_links_are_capped_at_128(memory_exporter):
    core = make_core()
    for r in make_requests(1):
        core.add(r, 0.0)
    plan = core.schedule(0.0)
    contexts = [SpanContext(i + 1, i + 1, is_remote=False, trace_flags=TraceFlags(1)) for i in range(200)]
    step = step_tracing.step_span(plan, contexts)
    assert step.traceparent.startswith("00-")
    step.end()
    step.end()  # idempotent
    (span,) = spans_named(memory_exporter, N.SPAN_SCHEDULER_STEP)
    assert len(span.links) == N.MAX_STEP_LINKS
    assert span.attributes[N.SLAI_STEP_NUM_LINKS_DROPPED] == 200 - N.MAX_STEP_LINKS


def test_step_span_records_errors_and_skips_empty_plans(memory_exporter):
    core = make_core()
    assert step_tracing.step_span(core.schedule(0.0), {}).traceparent == ""  # empty plan: no span
    core = make_core()
    core.add(make_requests(1)[0], 0.0)
    plan = core.schedule(0.0)
    with pytest.raises(ConnectionError):
        with step_tracing.step_span(plan, {}):
            raise ConnectionError("executor lost")
    (span,) = spans_named(memory_exporter, N.SPAN_SCHEDULER_STEP)
    assert span.status.status_code == trace.StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]


def test_preemptions_and_aborts_on_the_request_span(memory_exporter):
    spans = step_tracing.RequestSpans(clock=lambda: 0.0)
    spans.start("a", None, tier="paying")
    spans.start("b", None, tier="free")
    spans.on_step([LifecycleEvent(EventKind.QUEUED, "a", 1.0), LifecycleEvent(EventKind.SCHEDULED, "a", 1.5),
                   LifecycleEvent(EventKind.PREEMPTED, "a", 2.0), LifecycleEvent(EventKind.SCHEDULED, "a", 2.5),
                   LifecycleEvent(EventKind.FIRST_TOKEN, "a", 3.0), LifecycleEvent(EventKind.FINISHED, "a", 4.0,
                                                                                   "abort"),
                   LifecycleEvent(EventKind.QUEUED, "unknown", 1.0)])
    spans.end("b", error="stream cancelled")
    a, b = (spans_named(memory_exporter, N.SPAN_SCHEDULER_REQUEST)[i] for i in (0, 1))
    assert a.attributes[N.SLAI_NUM_PREEMPTIONS] == 1
    assert a.attributes[N.GEN_AI_LATENCY_TIME_IN_QUEUE] == 0.5  # first SCHEDULED counts
    assert a.attributes[N.GEN_AI_LATENCY_TIME_TO_FIRST_TOKEN] == 2.0
    assert a.status.status_code == trace.StatusCode.ERROR
    assert b.status.status_code == trace.StatusCode.ERROR and len(spans) == 0


async def test_optional_grpc_instrumentation_with_the_shared_server(memory_exporter):
    """grpc_*_interceptors plug OTel's aio instrumentation into wire.grpc_server; health is not traced."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from wire.grpc_server import start_server

    seen = []

    async def handle(request: bytes, context) -> bytes:
        seen.append(trace.get_current_span().get_span_context())
        return b"ok"

    add = lambda s: s.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(  # noqa: E731
        "test.Svc", {"Call": grpc.unary_unary_rpc_method_handler(handle)}),))
    srv = await start_server([add], ["test.Svc"], interceptors=tracing.grpc_server_interceptors())
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}",
                                             interceptors=tracing.grpc_client_interceptors()) as channel:
            assert await channel.unary_unary("/test.Svc/Call")(b"x") == b"ok"
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    finally:
        await srv.stop(0)
    finished = memory_exporter.get_finished_spans()
    server = [s for s in finished if s.kind == trace.SpanKind.SERVER]
    client = [s for s in finished if s.kind == trace.SpanKind.CLIENT]
    assert [s.name for s in server] == ["/test.Svc/Call"] and [s.name for s in client] == ["/test.Svc/Call"]
    assert server[0].parent.span_id == client[0].context.span_id
    assert seen[0].span_id == server[0].context.span_id  # the handler runs inside the server span


def test_step_tracing_can_be_thinned(monkeypatch):
    monkeypatch.setenv(N.TRACE_STEP_EVERY_ENV, "3")
    monkeypatch.setenv(N.TRACE_STEP_LINKS_ENV, "2")
    memory_exporter = InMemorySpanExporter()
    tracing.init_tracing("slai-test", exporter=memory_exporter)
    core = make_core(record_events=True)
    spans = step_tracing.RequestSpans()
    for r in make_requests(4, max_tokens=6):
        spans.start(r.req_id, None)
        core.add(r, 0.0)
    run_traced(core, spans)  # 6 steps: the 3rd and the 6th are traced
    steps = spans_named(memory_exporter, N.SPAN_SCHEDULER_STEP)
    assert sorted(s.attributes[N.SLAI_STEP_ID] for s in steps) == [3, 6]
    assert all(len(s.links) == 2 and s.attributes[N.SLAI_STEP_NUM_LINKS_DROPPED] == 2 for s in steps)
    assert len(spans_named(memory_exporter, N.SPAN_EXECUTOR_STEP)) == 2  # untraced steps carry no traceparent
    assert len(spans_named(memory_exporter, N.SPAN_SCHEDULER_REQUEST)) == 4  # requests are all traced
