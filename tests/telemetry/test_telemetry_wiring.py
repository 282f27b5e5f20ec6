"""The services feed Prometheus metrics and, with tracing on, request/step spans."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from telemetry import names as N
from telemetry import tracing
from telemetry.metrics import ExecutorMetrics, SchedulerMetrics
from tests.scheduler_svc.helpers import RecordingRunner, collect, start_stack, submit_msg, tokens_of, wait_for
from wire.pb.slai.v1 import common_pb2


@pytest.fixture
def span_exporter(monkeypatch):
    for name in ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_SAMPLER"):
        monkeypatch.delenv(name, raising=False)
    tracing.shutdown_tracing()
    exporter = InMemorySpanExporter()
    tracing.init_tracing("slai-test", exporter=exporter)
    yield exporter
    tracing.shutdown_tracing()


async def test_metrics_are_fed():
    sm, em = SchedulerMetrics(), ExecutorMetrics()
    st = await start_stack([RecordingRunner()], metrics=sm, executor_metrics=em)
    try:
        await asyncio.gather(collect(st.stub, submit_msg("m1", 8, 5, tier=common_pb2.TIER_PAYING)),
                             collect(st.stub, submit_msg("m2", 8, 3)))
        ex = st.dispatcher.drivers[0].address
        r = sm.registry
        # gauges come from the plan's stats: the release-only plan after the last step zeroes them
        await wait_for(lambda: r.get_sample_value(N.M_NUM_REQUESTS_RUNNING, {N.L_EXECUTOR: ex}) == 0)
    finally:
        await st.close()
    assert r.get_sample_value(N.M_STEPS + "_total", {N.L_EXECUTOR: ex}) >= 5
    assert r.get_sample_value(N.M_GENERATION_TOKENS + "_total", {N.L_TIER: "paying"}) == 5
    assert r.get_sample_value(N.M_GENERATION_TOKENS + "_total", {N.L_TIER: "free"}) == 3
    assert r.get_sample_value(N.M_E2E_REQUEST_LATENCY + "_count", {N.L_TIER: "free"}) == 1
    assert r.get_sample_value(N.M_NUM_REQUESTS_RUNNING, {N.L_EXECUTOR: ex}) == 0
    assert em.registry.get_sample_value(N.M_BATCH_INFERENCE_DURATION + "_count", {N.L_PHASE: "total"}) >= 5


async def test_request_and_step_spans(span_exporter):
    st = await start_stack([RecordingRunner()])
    try:
        results = await asyncio.gather(collect(st.stub, submit_msg("t1", 8, 4)),
                                       collect(st.stub, submit_msg("t2", 8, 2)))
        assert [len(tokens_of(r)) for r in results] == [4, 2]
        await wait_for(lambda: {s.attributes.get(N.GEN_AI_REQUEST_ID) for s in span_exporter.get_finished_spans()
                                if s.name == N.SPAN_SCHEDULER_REQUEST} == {"t1", "t2"})
    finally:
        await st.close()
    spans = span_exporter.get_finished_spans()
    reqs = {s.attributes[N.GEN_AI_REQUEST_ID]: s for s in spans if s.name == N.SPAN_SCHEDULER_REQUEST}
    assert set(reqs) == {"t1", "t2"}
    steps = [s for s in spans if s.name == N.SPAN_SCHEDULER_STEP]
    ex_steps = [s for s in spans if s.name == N.SPAN_EXECUTOR_STEP]
    assert steps and len(ex_steps) == len(steps)
    linked = {link.context.span_id for s in steps for link in s.links}
    assert {reqs["t1"].context.span_id, reqs["t2"].context.span_id} <= linked
    step_ids = {s.context.span_id for s in steps}
    assert all(e.parent is not None and e.parent.span_id in step_ids for e in ex_steps)
