"""One request through real processes (gateway -> scheduler -> fake executor), traced over OTLP.

The client sends a W3C ``traceparent`` (gRPC metadata, then an HTTP header); every service exports to
the in-process OTLP receiver with its own ``service.name``. Trace shape (docs/observability.md, 'Trace shape')::

    client span (the test's traceparent)
      └─ gateway.generate            slai-gateway    gen_ai.* request, usage and latency attributes
           └─ scheduler.request      slai-scheduler  events queued/scheduled/first_token/finished
                └─ scheduler.step    slai-scheduler  child of ONE request of its batch, LINKED to all; slai.step.*
                     └─ executor.step slai-executor  slai.step.forward_ns etc.

A request alone in the system parents every step, so the client's trace id holds the gateway and
scheduler request spans, the steps and their executor children; the links reach the same steps.
"""

from __future__ import annotations

import os

import grpc
import httpx
import pytest

from gateway.client import build_request
from telemetry import names as N
from wire.pb.slai.v1 import gateway_pb2_grpc

pytestmark = pytest.mark.slow

MAX_TOKENS = 6


def _value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(x) for x in v.array_value.values)
    return getattr(v, kind) if kind else None


def attrs(span) -> dict:
    return {a.key: _value(a.value) for a in span.attributes}


def _traceparent() -> tuple[str, bytes, bytes]:
    trace_id, span_id = os.urandom(16), os.urandom(8)
    return f"00-{trace_id.hex()}-{span_id.hex()}-01", trace_id, span_id


class TraceView:
    """The received spans around one client trace id."""

    def __init__(self, spans: list, trace_id: bytes) -> None:
        self.all = spans
        self.trace_id = trace_id
        self.in_trace = [(svc, s) for svc, s in spans if s.trace_id == trace_id]

    def one(self, name: str):
        found = [(svc, s) for svc, s in self.in_trace if s.name == name]
        assert len(found) == 1, (name, [s.name for _, s in self.in_trace])
        return found[0]

    def steps_linked_to(self, span) -> list:
        return [(svc, s) for svc, s in self.all if s.name == N.SPAN_SCHEDULER_STEP
                and any(link.trace_id == span.trace_id and link.span_id == span.span_id for link in s.links)]

    def children_of(self, span) -> list:
        return [(svc, s) for svc, s in self.all if s.trace_id == span.trace_id and s.parent_span_id == span.span_id]

    def reaches(self, client_span_id: bytes) -> bool:
        """The gateway span's parent chain has arrived, up to the client's span (HTTP's server spans end,
        and are exported, after the gateway's own)."""
        found = [s for _, s in self.in_trace if s.name == N.SPAN_GATEWAY_REQUEST]
        if not found:
            return False
        by_id = {s.span_id: s for _, s in self.in_trace}
        node = found[0]
        while node.parent_span_id in by_id:
            node = by_id[node.parent_span_id]
        return node.parent_span_id == client_span_id

    def complete(self) -> bool:
        names = {s.name for _, s in self.in_trace}
        if not {N.SPAN_GATEWAY_REQUEST, N.SPAN_SCHEDULER_REQUEST} <= names:
            return False
        _, req = self.one(N.SPAN_SCHEDULER_REQUEST)
        steps = self.steps_linked_to(req)
        # every linked step's executor child has arrived (the executor exports on its own schedule)
        return len(steps) >= MAX_TOKENS and all(
            any(s.name == N.SPAN_EXECUTOR_STEP for _, s in self.children_of(step)) for _, step in steps)


def check_request_trace(view: TraceView, client_span_id: bytes, request_id: str, prompt_tokens: int,
                        timings) -> None:
    # ---- gateway.generate: the client's trace, the request's gen_ai.* attributes
    svc, gw = view.one(N.SPAN_GATEWAY_REQUEST)
    assert svc == N.SERVICE_GATEWAY
    a = attrs(gw)
    assert a[N.GEN_AI_REQUEST_ID] == request_id
    assert a[N.GEN_AI_REQUEST_MAX_TOKENS] == MAX_TOKENS
    assert a[N.GEN_AI_USAGE_PROMPT_TOKENS] == prompt_tokens
    assert a[N.GEN_AI_USAGE_COMPLETION_TOKENS] == MAX_TOKENS
    assert a[N.GEN_AI_RESPONSE_FINISH_REASONS] == ("length",)
    assert a[N.GEN_AI_LATENCY_TIME_IN_QUEUE] == pytest.approx(timings.queue_s) and timings.queue_s >= 0
    assert a[N.GEN_AI_LATENCY_TIME_TO_FIRST_TOKEN] == pytest.approx(timings.ttft_s) and timings.ttft_s > 0
    assert a[N.GEN_AI_LATENCY_E2E] == pytest.approx(timings.e2e_s) and timings.e2e_s >= timings.ttft_s
    # its parent chain (gRPC: direct; HTTP: through the front end's server spans) ends at the client's span
    by_id = {s.span_id: s for _, s in view.in_trace}
    node = gw
    while node.parent_span_id in by_id:
        node = by_id[node.parent_span_id]
    assert node.parent_span_id == client_span_id

    # ---- scheduler.request: child of the gateway span, lifecycle events in order
    svc, req = view.one(N.SPAN_SCHEDULER_REQUEST)
    assert svc == N.SERVICE_SCHEDULER
    assert req.parent_span_id == gw.span_id
    assert attrs(req)[N.GEN_AI_REQUEST_ID] == request_id
    events = [e.name for e in req.events]
    assert events == [N.EVENT_QUEUED, N.EVENT_SCHEDULED, N.EVENT_FIRST_TOKEN, N.EVENT_FINISHED], events
    stamps = [e.time_unix_nano for e in req.events]
    assert stamps == sorted(stamps)

    # ---- scheduler.step: LINKED to the request span, with the batch's slai.step.* attributes; a request
    # alone in the system is every step's parent, so the steps sit in the client's own trace
    steps = view.steps_linked_to(req)
    assert {svc for svc, _ in steps} == {N.SERVICE_SCHEDULER}
    assert all(step.trace_id == view.trace_id and step.parent_span_id == req.span_id for _, step in steps)
    step_attrs = [attrs(step) for _, step in steps]
    for sa in step_attrs:
        for key in (N.SLAI_STEP_ID, N.SLAI_STEP_NUM_SEQS, N.SLAI_STEP_NUM_PREFILL_TOKENS, N.SLAI_STEP_NUM_DECODES,
                    N.SLAI_STEP_NUM_CRITICAL_DECODES, N.SLAI_STEP_NUM_NONCRITICAL_DECODES,
                    N.SLAI_STEP_KV_USED_FRACTION, N.SLAI_STEP_OFFSET, N.SLAI_STEP_FORWARD_NS):
            assert key in sa, (key, sa)
        assert sa[N.SLAI_STEP_NUM_SEQS] == 1  # this test's requests run alone
        assert sa[N.SLAI_STEP_NUM_DECODES] == sa[N.SLAI_STEP_NUM_CRITICAL_DECODES] + \
            sa[N.SLAI_STEP_NUM_NONCRITICAL_DECODES]
    # the prompt is prefilled once (possibly in chunks); every later token is one decode
    assert sum(sa[N.SLAI_STEP_NUM_PREFILL_TOKENS] for sa in step_attrs) == prompt_tokens
    assert sum(sa[N.SLAI_STEP_NUM_DECODES] for sa in step_attrs) == MAX_TOKENS - 1

    # ---- executor.step: the child of each step span, in the step's trace, with the executor's timings
    for (_, step), sa in zip(steps, step_attrs):
        kids = view.children_of(step)
        assert [(svc, s.name) for svc, s in kids] == [(N.SERVICE_EXECUTOR, N.SPAN_EXECUTOR_STEP)]
        ea = attrs(kids[0][1])
        assert ea[N.SLAI_STEP_ID] == sa[N.SLAI_STEP_ID]
        assert ea[N.SLAI_STEP_FORWARD_NS] >= 20_000_000  # paper cost model: >= 23.4 ms a step
        assert ea[N.SLAI_STEP_TOTAL_NS] >= ea[N.SLAI_STEP_FORWARD_NS]
        assert ea[N.SLAI_STEP_FORWARD_NS] == sa[N.SLAI_STEP_FORWARD_NS]  # the scheduler saw the same result

    # ---- ONE trace id, the client's, covers spans of all three services
    assert {svc for svc, _ in view.in_trace} == {N.SERVICE_GATEWAY, N.SERVICE_SCHEDULER, N.SERVICE_EXECUTOR}


def test_grpc_request_is_one_trace_across_gateway_scheduler_executor(traced_stack):
    traceparent, trace_id, client_span = _traceparent()
    metadata = (("traceparent", traceparent), ("authorization", f"Bearer {traced_stack.keys['paying']}"))
    with grpc.insecure_channel(traced_stack.stack.gateway_address) as ch:
        chunks = list(gateway_pb2_grpc.GatewayServiceStub(ch).Generate(
            build_request("Tracing across three services", max_tokens=MAX_TOKENS, ignore_eos=True),
            metadata=metadata, timeout=20))
    last = chunks[-1]
    assert last.usage.completion_tokens == MAX_TOKENS

    spans = traced_stack.wait_for_spans(lambda got: TraceView(got, trace_id).complete())
    check_request_trace(TraceView(spans, trace_id), client_span, last.request_id, last.usage.prompt_tokens,
                        last.timings)


def test_http_request_continues_the_traceparent_header(traced_stack):
    traceparent, trace_id, client_span = _traceparent()
    st = traced_stack.stack
    resp = httpx.post(f"{st.http_base}/v1/completions", timeout=20,
                      headers={"traceparent": traceparent, "authorization": f"Bearer {traced_stack.keys['free']}"},
                      json={"prompt": "Tracing over HTTP", "max_tokens": MAX_TOKENS, "ignore_eos": True})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["usage"]["completion_tokens"] == MAX_TOKENS

    spans = traced_stack.wait_for_spans(
        lambda got: TraceView(got, trace_id).complete() and TraceView(got, trace_id).reaches(client_span))
    view = TraceView(spans, trace_id)
    _, gw = view.one(N.SPAN_GATEWAY_REQUEST)
    a = attrs(gw)
    assert a[N.SLAI_TIER] == "free"

    class Timings:  # the HTTP body has no timings: take the gateway span's own (checked against the scheduler's)
        queue_s = a[N.GEN_AI_LATENCY_TIME_IN_QUEUE]
        ttft_s = a[N.GEN_AI_LATENCY_TIME_TO_FIRST_TOKEN]
        e2e_s = a[N.GEN_AI_LATENCY_E2E]

    check_request_trace(view, client_span, a[N.GEN_AI_REQUEST_ID], body["usage"]["prompt_tokens"], Timings)
    # the gateway relays the scheduler's timings: both request spans agree
    ra = attrs(view.one(N.SPAN_SCHEDULER_REQUEST)[1])
    assert ra[N.GEN_AI_LATENCY_TIME_TO_FIRST_TOKEN] == pytest.approx(Timings.ttft_s, abs=1e-3)
    assert ra[N.GEN_AI_LATENCY_TIME_IN_QUEUE] == pytest.approx(Timings.queue_s, abs=1e-3)
