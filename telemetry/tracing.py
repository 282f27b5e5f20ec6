"""Tracing at the edges, never in the pure core: one ``init_tracing`` and a few cheap helpers.

Off unless configured. ``init_tracing`` reads the standard OTEL_* environment
(``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_TRACES_EXPORTER=otlp|console`` turns
it on; ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` keeps it
off; ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER[_ARG]`` are honoured by the SDK). When nothing is
configured it installs nothing and every helper returns after one flag test
(well under 1 µs; see ``benchmarks/telemetry_overhead.py``).

Trace shape::

    gateway.generate (root, or child of the client's traceparent header)
      └─ scheduler.request (Submit; events queued/scheduled/preempted/first_token/finished)
           └─ scheduler.step (child of ONE request of its batch, round-robin; LINKS to <= 128 of them)
                └─ executor.step (child via StepRequest.traceparent; prepare/forward/sample ns)

One span per step and per request, never per token: a span costs 35-70 µs on the CI VM, and
OTLP-encoding a step span's links ≈ 9 µs each in the exporter thread (docs/observability.md, 'Overhead').
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from telemetry import names as N

log = logging.getLogger(__name__)

__all__ = [
    "context_from_traceparent", "end_request_span", "extract_context", "grpc_client_interceptors", "grpc_metadata",
    "grpc_server_interceptors", "http_headers", "init_tracing", "is_tracing_enabled", "mark_first_token",
    "shutdown_tracing", "start_request_span", "state", "tier_label", "traceparent_of", "ROOT_CONTEXT",
]


class _State:
    __slots__ = ("enabled", "tracer", "provider", "service_name", "step_every", "step_count", "max_step_links")

    def __init__(self) -> None:
        self.enabled = False
        self.tracer: trace.Tracer | None = None
        self.provider: Any = None
        self.service_name = ""
        self.step_every = 1  # trace one scheduler step in this many
        self.step_count = 0
        self.max_step_links = N.MAX_STEP_LINKS


state = _State()  # the process's tracing state; telemetry.step_tracing reads it too
ROOT_CONTEXT = Context()  # an empty context: spans started with it begin a new trace


# ---------------------------------------------------------------- setup
def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _configured_by_env() -> str | None:
    """``"otlp"`` / ``"console"`` when the environment asks for traces, else None."""
    if _env_true("OTEL_SDK_DISABLED"):
        return None
    wanted = [e.strip().lower() for e in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()]
    if "none" in wanted:
        return None
    if "console" in wanted:
        return "console"
    if "otlp" in wanted or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or \
            os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return "otlp"
    return None


def _resource(service_name: str) -> Any:
    from opentelemetry.sdk.resources import Resource
    # NOTE: precedence is OTEL_SERVICE_NAME > service.name in OTEL_RESOURCE_ATTRIBUTES > the argument;
    # Resource.create lets passed attributes win over the environment, so pass ours only as a fallback.
    named_by_env = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", "")
    return Resource.create() if named_by_env else Resource.create({"service.name": service_name})


def _env_int(name: str, default: int, low: int, high: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    return max(low, min(high, value))


def init_tracing(service_name: str, *, exporter: Any = None, endpoint: str | None = None,
                 batch: bool | None = None, sampler: Any = None, set_global: bool | None = None,
                 step_every: int | None = None, max_step_links: int | None = None) -> Any:
    """Set up tracing for this process; returns the ``TracerProvider`` or None when tracing stays off.

    With no arguments the OTEL_* environment decides (see the module docstring). Tests and
    benchmarks pass ``exporter`` (e.g. ``InMemorySpanExporter()``) or ``endpoint`` (an OTLP/gRPC
    ``host:port``, insecure), which turn tracing on regardless of the environment.
    ``batch`` picks BatchSpanProcessor (default for network exporters) over SimpleSpanProcessor
    (default for an in-memory exporter, so tests see spans at once). ``set_global`` also installs the
    provider as OTel's global one (default: only on the environment path; the global can be set once
    per process, while tests call this repeatedly). Calling it again replaces the previous setup.
    ``step_every`` / ``max_step_links`` (env ``SLAI_TRACE_STEP_EVERY`` / ``SLAI_TRACE_STEP_LINKS``) thin out
    ``scheduler.step`` spans: one step in N is traced, with at most that many links.
    """
    if exporter is None and endpoint is None:
        kind = _configured_by_env()
        if kind is None:
            shutdown_tracing()
            return None
        if kind == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter
            exporter = ConsoleSpanExporter()
        else:
            if os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc").startswith("http"):
                log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=http/* is not installed; exporting OTLP over gRPC")
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            exporter = OTLPSpanExporter()  # endpoint, headers, timeout, insecure: from OTEL_EXPORTER_OTLP_*
        if set_global is None:
            set_global = True
    elif exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"))

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    shutdown_tracing()
    provider = TracerProvider(resource=_resource(service_name), sampler=sampler)  # None: OTEL_TRACES_SAMPLER
    if batch is None:
        batch = not isinstance(exporter, InMemorySpanExporter)
    provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
    if set_global:
        trace.set_tracer_provider(provider)
    state.provider = provider
    state.tracer = provider.get_tracer("slai-serve")
    state.service_name = service_name
    state.step_every = step_every if step_every is not None else _env_int(N.TRACE_STEP_EVERY_ENV, 1, 1, 1 << 30)
    state.max_step_links = (max_step_links if max_step_links is not None else
                             _env_int(N.TRACE_STEP_LINKS_ENV, N.MAX_STEP_LINKS, 0, N.MAX_STEP_LINKS))
    state.step_count = 0
    state.enabled = True
    log.info("tracing on for %s (%s)", service_name, type(exporter).__name__)
    return provider


def shutdown_tracing() -> None:
    """Flush and stop the provider set up by ``init_tracing``; helpers become no-ops again."""
    provider, state.provider = state.provider, None
    state.enabled = False
    state.tracer = None
    if provider is not None:
        provider.shutdown()


def is_tracing_enabled() -> bool:
    """Build the core with ``record_events=is_tracing_enabled()`` so nobody pays for unused events."""
    return state.enabled


# ---------------------------------------------------------------- W3C propagation
def traceparent_of(span: Span | SpanContext | None) -> str:
    """The W3C ``traceparent`` of a span (or span context); "" when invalid."""
    sc = span if isinstance(span, SpanContext) else (span.get_span_context() if span is not None else None)
    if sc is None or not sc.is_valid:
        return ""
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


def context_from_traceparent(traceparent: str) -> Context | None:
    """A context whose current span is the remote parent named by ``traceparent``; None if malformed."""
    parts = traceparent.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff" or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3][:2], 16)
    except ValueError:
        return None
    sc = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))
    if not sc.is_valid:
        return None
    return trace.set_span_in_context(NonRecordingSpan(sc), ROOT_CONTEXT)


def _find_traceparent(carrier: Any) -> str:
    if carrier is None:
        return ""
    if isinstance(carrier, str):
        return carrier
    get = getattr(carrier, "get", None)
    if get is not None and isinstance(carrier, Mapping):  # HTTP headers (starlette's are case-insensitive)
        value = get(N.TRACEPARENT_HEADER)
        return value if isinstance(value, str) else ""
    for item in carrier:  # gRPC metadata: (key, value) pairs or _Metadatum
        key, value = item[0], item[1]
        if key == N.TRACEPARENT_HEADER:
            return value if isinstance(value, str) else value.decode()
    return ""


def extract_context(carrier: Any) -> Context | None:
    """The parent context in HTTP headers, gRPC metadata or a bare traceparent string; None if absent."""
    if not state.enabled:
        return None
    tp = _find_traceparent(carrier)
    return context_from_traceparent(tp) if tp else None


def grpc_metadata(span: Span | None = None) -> tuple[tuple[str, str], ...]:
    """Metadata carrying ``span``'s (default: the current span's) traceparent; () when off.

    Pass it as ``metadata=`` of an outgoing call, e.g. the gateway's ``Submit``.
    """
    if not state.enabled:
        return ()
    tp = traceparent_of(span if span is not None else trace.get_current_span())
    return ((N.TRACEPARENT_HEADER, tp),) if tp else ()


def http_headers(span: Span | None = None) -> dict[str, str]:
    """``{"traceparent": ...}`` for an outgoing HTTP call; {} when off."""
    return dict(grpc_metadata(span))


def _health_filter() -> Any:
    from opentelemetry.instrumentation.grpc import filters
    return filters.negate(filters.any_of(filters.health_check(), filters.service_prefix("grpc.reflection")))


def grpc_server_interceptors() -> list[Any]:
    """OTel's aio server interceptor (one span per RPC, health/reflection excluded); [] when off.

    Optional: ``start_request_span`` already extracts the gateway's traceparent from metadata.
    """
    if not state.enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor
    return [aio_server_interceptor(tracer_provider=state.provider, filter_=_health_filter())]


def grpc_client_interceptors() -> list[Any]:
    """OTel's aio client interceptors (inject traceparent from the current span); [] when off."""
    if not state.enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors
    return list(aio_client_interceptors(tracer_provider=state.provider, filter_=_health_filter()))


# ---------------------------------------------------------------- request spans (gateway and scheduler)
def tier_label(tier: Any) -> str:
    """"paying" / "free" from a ``Tier``, a proto enum value name or a string."""
    name = getattr(tier, "name", None)
    return (name if isinstance(name, str) else str(tier)).lower().removeprefix("tier_")


def start_request_span(request_id: str, *, carrier: Any = None, name: str = N.SPAN_GATEWAY_REQUEST,
                       tier: Any = None, max_tokens: int | None = None, temperature: float | None = None,
                       top_p: float | None = None, prompt_tokens: int | None = None,
                       tbt_slo_s: float | None = None, ttft_slo_s: float | None = None,
                       model: str | None = None) -> Span:
    """Start a request span with gen_ai.* / slai.* attributes; ``trace.INVALID_SPAN`` when off.

    The parent is the traceparent in ``carrier`` (HTTP headers, gRPC metadata) if any, else the current
    span; the current span also wins when it already belongs to the carrier's trace (a server span of the
    front end, e.g. FastAPI's). Not made current: pass the span to ``grpc_metadata``/``end_request_span`` explicitly.
    """
    if not state.enabled:
        return trace.INVALID_SPAN
    attrs: dict[str, Any] = {N.GEN_AI_REQUEST_ID: request_id}
    for key, value in ((N.SLAI_TIER, None if tier is None else tier_label(tier)),
                       (N.GEN_AI_REQUEST_MAX_TOKENS, max_tokens), (N.GEN_AI_REQUEST_TEMPERATURE, temperature),
                       (N.GEN_AI_REQUEST_TOP_P, top_p), (N.GEN_AI_USAGE_PROMPT_TOKENS, prompt_tokens),
                       (N.SLAI_TBT_SLO_S, tbt_slo_s), (N.SLAI_TTFT_SLO_S, ttft_slo_s),
                       (N.GEN_AI_RESPONSE_MODEL, model)):
        if value is not None:
            attrs[key] = value
    parent = extract_context(carrier)
    if parent is not None:
        # NOTE: a server span that already continues the caller's trace (FastAPI's own "POST /v1/..." span,
        # a gRPC server interceptor's) is current here: nest under it rather than beside it.
        current = trace.get_current_span().get_span_context()
        if current.is_valid and current.trace_id == trace.get_current_span(parent).get_span_context().trace_id:
            parent = None
    kind = SpanKind.SERVER if name == N.SPAN_GATEWAY_REQUEST else SpanKind.INTERNAL
    return state.tracer.start_span(name, context=parent, kind=kind, attributes=attrs)


def mark_first_token(span: Span) -> None:
    """A ``first_chunk`` event on the gateway span (call once, when the first chunk goes out)."""
    if state.enabled:
        span.add_event(N.EVENT_GATEWAY_FIRST_CHUNK)


def end_request_span(span: Span, *, finish_reason: str | None = None, prompt_tokens: int | None = None,
                     completion_tokens: int | None = None, ttft_s: float | None = None,
                     e2e_s: float | None = None, queue_s: float | None = None,
                     num_preemptions: int | None = None, max_tbt_s: float | None = None,
                     error: BaseException | str | None = None, end_time_ns: int | None = None) -> None:
    """Set usage and latency attributes and end the span.

    The timing keywords are the fields of ``gateway.codec.timings_from_pb``'s ``Timings``: ``end_request_span(span,
    finish_reason=..., completion_tokens=..., **dataclasses.asdict(codec.timings_from_pb(msg.timings)))``.
    """
    if not state.enabled or not span.is_recording():
        return
    attrs: dict[str, Any] = {}
    for key, value in ((N.GEN_AI_USAGE_PROMPT_TOKENS, prompt_tokens),
                       (N.GEN_AI_USAGE_COMPLETION_TOKENS, completion_tokens),
                       (N.GEN_AI_LATENCY_TIME_TO_FIRST_TOKEN, ttft_s), (N.GEN_AI_LATENCY_E2E, e2e_s),
                       (N.GEN_AI_LATENCY_TIME_IN_QUEUE, queue_s), (N.SLAI_NUM_PREEMPTIONS, num_preemptions),
                       (N.SLAI_MAX_TBT_S, max_tbt_s)):
        if value is not None:
            attrs[key] = value
    if finish_reason:
        attrs[N.GEN_AI_RESPONSE_FINISH_REASONS] = (finish_reason,)
    span.set_attributes(attrs)
    if error is not None:
        if isinstance(error, BaseException):
            span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, str(error)))
    span.end(end_time=end_time_ns)
