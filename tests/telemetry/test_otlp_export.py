"""End to end over the wire: the real OTLPSpanExporter to an in-process OTLP/gRPC receiver."""

from __future__ import annotations

from scheduler_svc.core import make_core
from telemetry import names as N
from telemetry import step_tracing, tracing
from tests.builders import make_requests
from tests.telemetry.otlp_receiver import OtlpReceiver
from tests.telemetry.test_tracing import run_traced


def test_otlp_exporter_delivers_step_and_request_spans():
    with OtlpReceiver() as rx:
        provider = tracing.init_tracing(N.SERVICE_SCHEDULER, endpoint=rx.endpoint)
        assert provider is not None
        core = make_core(record_events=True)
        spans = step_tracing.RequestSpans()
        for r in make_requests(3, max_tokens=4):
            spans.start(r.req_id, None, tier=r.tier, max_tokens=r.max_tokens)
            core.add(r, 0.0)
        run_traced(core, spans)
        tracing.shutdown_tracing()  # flushes the BatchSpanProcessor
        got = rx.spans()
    assert {service for service, _ in got} == {N.SERVICE_SCHEDULER}
    names = [s.name for _, s in got]
    assert names.count(N.SPAN_SCHEDULER_REQUEST) == 3
    assert names.count(N.SPAN_SCHEDULER_STEP) == names.count(N.SPAN_EXECUTOR_STEP) == 4
    steps = {s.span_id: s for _, s in got if s.name == N.SPAN_SCHEDULER_STEP}
    requests = {s.span_id for _, s in got if s.name == N.SPAN_SCHEDULER_REQUEST}
    for step in steps.values():
        assert {link.span_id for link in step.links} == requests
        assert any(a.key == N.SLAI_STEP_NUM_DECODES for a in step.attributes)
    for _, s in got:
        if s.name == N.SPAN_EXECUTOR_STEP:
            assert s.parent_span_id in steps and s.trace_id == steps[s.parent_span_id].trace_id


def test_env_endpoint_turns_tracing_on(monkeypatch):
    with OtlpReceiver() as rx:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://{rx.endpoint}")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "gw-env")
        assert tracing.init_tracing(N.SERVICE_GATEWAY, set_global=False) is not None
        span = tracing.start_request_span("r1", tier="paying")
        tracing.end_request_span(span, finish_reason="stop", completion_tokens=1)
        tracing.shutdown_tracing()
        ((service, span_pb),) = rx.spans()
    assert service == "gw-env" and span_pb.name == N.SPAN_GATEWAY_REQUEST
