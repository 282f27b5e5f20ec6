"""Scheduler and executor spans: request lifecycles, ``scheduler.step`` with links, ``executor.step``.

Built on ``telemetry.tracing`` (setup, request spans, context helpers). Everything is a
no-op after one flag test while tracing is off.

Scheduler driver loop (one per executor)::

    plan = core.schedule(now)
    with step_tracing.step_span(plan, spans.contexts, executor=name) as step:
        await stream.write(executor_codec.plan_to_pb(plan, step.traceparent))
        result = executor_codec.result_from_pb(await stream.read())
        step.end(result)
    events = core.update(plan, result, now)
    spans.on_step(core.drain_events(), events)

Executor ``Step`` handler, after the response is built::

    step_tracing.executor_step_span(msg.traceparent, out)
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Mapping

from opentelemetry.attributes import BoundedAttributes
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    set_span_in_context,
)

from contract.lifecycle import EventKind
from telemetry import names as N
from telemetry.tracing import ROOT_CONTEXT, context_from_traceparent, start_request_span, state, traceparent_of

_EVENT_NAMES = {EventKind.QUEUED: N.EVENT_QUEUED, EventKind.SCHEDULED: N.EVENT_SCHEDULED,
                EventKind.PREEMPTED: N.EVENT_PREEMPTED, EventKind.FIRST_TOKEN: N.EVENT_FIRST_TOKEN,
                EventKind.FINISHED: N.EVENT_FINISHED}
# NOTE: one shared, empty, immutable attribute set for every link: the SDK would otherwise build (and lock) a
# fresh BoundedAttributes per link per span, ≈ 3 µs each, i.e. ≈ 0.4 ms for a step with 128 links.
_NO_ATTRS = BoundedAttributes(immutable=True)


class _Open:
    __slots__ = ("span", "queued_s", "scheduled_s", "first_token_s", "num_preemptions", "completion_tokens")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.queued_s: float | None = None
        self.scheduled_s: float | None = None
        self.first_token_s: float | None = None
        self.num_preemptions = 0
        self.completion_tokens: int | None = None


class RequestSpans:
    """The scheduler's open ``scheduler.request`` spans, keyed by request id.

    ``contexts`` (req id -> SpanContext) and ``links`` (req id -> Link) are what ``step_span`` links to.
    Lifecycle events become span events with the core's timestamps; a FINISHED event sets
    gen_ai.latency.* and ends the span. ``clock`` must be the clock the service passes to the core as ``now``.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.contexts: dict[str, SpanContext] = {}
        self.links: dict[str, Link] = {}
        self._open: dict[str, _Open] = {}
        self._offset_ns = time.time_ns() - int(clock() * 1e9)  # core clock -> epoch ns

    def __len__(self) -> int:
        return len(self._open)

    def start(self, req_id: str, carrier: Any = None, **attributes: Any) -> None:
        """Open the request's span (in ``Submit``). ``carrier``: ``context.invocation_metadata()``.

        ``attributes``: the keywords of ``telemetry.start_request_span`` (tier, max_tokens, temperature,
        top_p, prompt_tokens, tbt_slo_s, ttft_slo_s). Starting an id already open keeps the old span.
        """
        if not state.enabled or req_id in self._open:
            return
        span = start_request_span(req_id, carrier=carrier, name=N.SPAN_SCHEDULER_REQUEST, **attributes)
        self._open[req_id] = _Open(span)
        sc = self.contexts[req_id] = span.get_span_context()
        self.links[req_id] = Link(sc, _NO_ATTRS)

    def on_step(self, lifecycle_events: Iterable[Any], token_events: Iterable[Any] = ()) -> None:
        """Turn ``core.drain_events()`` into span events; final TokenEvents give completion tokens."""
        if not state.enabled:
            return
        opened = self._open
        for ev in token_events:
            if ev.finish_reason is not None:
                o = opened.get(ev.req_id)
                if o is not None:
                    o.completion_tokens = ev.num_output_tokens
        for ev in lifecycle_events:
            o = opened.get(ev.req_id)
            if o is None:
                continue
            kind, t = int(ev.kind), ev.time_s
            ts = self._offset_ns + int(t * 1e9)
            if kind == EventKind.FINISHED:
                self._finish(ev.req_id, o, t, ts, ev.detail)
                continue
            if kind == EventKind.QUEUED:
                o.queued_s = t if o.queued_s is None else o.queued_s
            elif kind == EventKind.SCHEDULED:
                o.scheduled_s = t if o.scheduled_s is None else o.scheduled_s
            elif kind == EventKind.PREEMPTED:
                o.num_preemptions += 1
            elif kind == EventKind.FIRST_TOKEN:
                o.first_token_s = t if o.first_token_s is None else o.first_token_s
            o.span.add_event(_EVENT_NAMES[kind], {N.SLAI_FINISH_REASON: ev.detail} if ev.detail else None, ts)

    def end(self, req_id: str, error: BaseException | str | None = None) -> None:
        """End a span the core will not finish (stream cancelled, executor lost with no replacement)."""
        o = self._open.pop(req_id, None)
        self.contexts.pop(req_id, None)
        self.links.pop(req_id, None)
        if o is None:
            return
        if error is not None:
            if isinstance(error, BaseException):
                o.span.record_exception(error)
            o.span.set_status(Status(StatusCode.ERROR, str(error)))
        o.span.end()

    def _finish(self, req_id: str, o: _Open, t: float, ts: int, reason: str) -> None:
        span = o.span
        span.add_event(N.EVENT_FINISHED, {N.SLAI_FINISH_REASON: reason} if reason else None, ts)
        attrs: dict[str, Any] = {N.SLAI_NUM_PREEMPTIONS: o.num_preemptions}
        if reason:
            attrs[N.GEN_AI_RESPONSE_FINISH_REASONS] = (reason,)
        if o.completion_tokens is not None:
            attrs[N.GEN_AI_USAGE_COMPLETION_TOKENS] = o.completion_tokens
        if o.queued_s is not None:
            attrs[N.GEN_AI_LATENCY_E2E] = t - o.queued_s
            if o.scheduled_s is not None:
                attrs[N.GEN_AI_LATENCY_TIME_IN_QUEUE] = o.scheduled_s - o.queued_s
            if o.first_token_s is not None:
                attrs[N.GEN_AI_LATENCY_TIME_TO_FIRST_TOKEN] = o.first_token_s - o.queued_s
        span.set_attributes(attrs)
        if reason == "abort":
            span.set_status(Status(StatusCode.ERROR, "aborted"))
        del self._open[req_id]
        self.contexts.pop(req_id, None)
        self.links.pop(req_id, None)
        span.end(end_time=max(ts, getattr(span, "start_time", None) or 0))  # sampled-out spans have none


class StepSpan:
    """An open ``scheduler.step`` span: put ``traceparent`` in the StepRequest, then ``end(result)``."""

    __slots__ = ("span", "traceparent", "_ended")

    def __init__(self, span: Span | None, traceparent: str) -> None:
        self.span = span
        self.traceparent = traceparent
        self._ended = span is None

    def end(self, result: Any = None, error: BaseException | str | None = None) -> None:
        """Add the executor's timings (a core StepResult or a StepResponse) and end the span. Idempotent."""
        if self._ended:
            return
        self._ended = True
        span = self.span
        if result is not None:
            span.set_attributes({key: getattr(result, field) for field, key in N.STEP_RESULT_ATTRIBUTES})
            if getattr(result, "error", ""):
                error = error or result.error
        if error is not None:
            if isinstance(error, BaseException):
                span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, str(error)))
        span.end()

    def __enter__(self) -> StepSpan:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if not self._ended:
            self.end(error=exc)
        return False


_NOOP_STEP = StepSpan(None, "")


def _plan_links(plan: Any, requests: Any) -> tuple[list[Link], int]:
    ids = [s.req_id for s in plan.new] + [c.req_id for c in plan.cached]
    if isinstance(requests, RequestSpans):
        links = [link for link in map(requests.links.get, ids) if link is not None]
    elif isinstance(requests, Mapping):
        links = [Link(sc, _NO_ATTRS) for sc in map(requests.get, ids) if sc is not None]
    else:
        links = [Link(sc, _NO_ATTRS) for sc in requests]
    cap = state.max_step_links
    return links[:cap], max(0, len(links) - cap)


def _attach_links(span: Span, links: list[Link]) -> None:
    # NOTE: the SDK's public paths (start_span(links=...), add_link) re-wrap every link's attributes; links
    # built here already carry an immutable empty set, so extend the SDK span's (empty, bounded) link list
    # directly. Falls back to add_link if the SDK's internals ever change shape.
    from opentelemetry.sdk.util import BoundedList
    current = getattr(span, "_links", None)
    if type(current) is BoundedList and not current:
        current.extend(links)  # bounded by OTEL_SPAN_LINK_COUNT_LIMIT, overflow counted as dropped
    else:
        for link in links:
            span.add_link(link.context, link.attributes)


def step_span(plan: Any, requests: Any = (), *, executor: str = "") -> StepSpan:
    """Start ``scheduler.step`` for ``plan`` (a core BatchPlan), with span LINKS to all its requests.

    NOTE: a step serves many requests, so it cannot be the child of all of them. It is the child of ONE
    of them, chosen round-robin by step id over the batch (and linked to every one). So each request's
    trace holds some of the steps that served it, with their ``executor.step`` children: one request gives
    one trace spanning gateway, scheduler and executor, and a request alone in the system gets every step.

    ``requests``: the scheduler's ``RequestSpans`` (fastest), a Mapping req id -> SpanContext (the plan's
    request ids are looked up), or an iterable of SpanContexts. At most ``MAX_STEP_LINKS`` links (or
    ``SLAI_TRACE_STEP_LINKS``); the rest are counted in ``slai.step.num_links_dropped``. Returns a shared
    no-op ``StepSpan`` (traceparent "") when tracing is off, the plan is empty, or the step is skipped by
    ``SLAI_TRACE_STEP_EVERY``.
    """
    if not state.enabled or (not plan.new and not plan.cached):
        return _NOOP_STEP
    if state.step_every > 1:
        state.step_count += 1
        if state.step_count % state.step_every:
            return _NOOP_STEP
    stats = plan.stats
    attrs: dict[str, Any] = {key: getattr(stats, field) for field, key in N.PLAN_STATS_ATTRIBUTES}
    attrs[N.SLAI_STEP_ID] = plan.step_id
    attrs[N.SLAI_STEP_NUM_SEQS] = len(plan.new) + len(plan.cached)
    if executor:
        attrs[N.SLAI_EXECUTOR] = executor
    links, dropped = _plan_links(plan, requests)
    parent = ROOT_CONTEXT
    if links:
        owner = links[plan.step_id % len(links)].context
        parent = set_span_in_context(NonRecordingSpan(owner))
    span = state.tracer.start_span(N.SPAN_SCHEDULER_STEP, context=parent, kind=SpanKind.CLIENT, attributes=attrs)
    if span.is_recording():
        if links:
            _attach_links(span, links)
        if dropped:
            span.set_attribute(N.SLAI_STEP_NUM_LINKS_DROPPED, dropped)
    return StepSpan(span, traceparent_of(span))


def executor_step_span(traceparent: str, result: Any, *, executor: str = "", num_seqs: int | None = None,
                       end_time_ns: int | None = None) -> None:
    """Record ``executor.step`` as the child of the scheduler's step span, after the step ran.

    ``result``: the StepResponse (or core StepResult) with prepare/forward/sample/total ns; the span
    covers ``total_ns`` up to now. Nothing is recorded without a traceparent (scheduler not tracing).
    """
    if not state.enabled or not traceparent:
        return
    parent = context_from_traceparent(traceparent)
    if parent is None:
        return
    end = end_time_ns if end_time_ns is not None else time.time_ns()
    attrs: dict[str, Any] = {key: getattr(result, field) for field, key in N.STEP_RESULT_ATTRIBUTES}
    attrs[N.SLAI_STEP_ID] = result.step_id
    sampled = getattr(result, "req_ids", None)
    attrs[N.SLAI_STEP_NUM_SAMPLED] = len(sampled if sampled is not None else result.request_ids)
    if num_seqs is not None:
        attrs[N.SLAI_STEP_NUM_SEQS] = num_seqs
    if executor:
        attrs[N.SLAI_EXECUTOR] = executor
    span = state.tracer.start_span(N.SPAN_EXECUTOR_STEP, context=parent, kind=SpanKind.SERVER,
                                    attributes=attrs, start_time=end - int(result.total_ns))
    if getattr(result, "error", ""):
        span.set_status(Status(StatusCode.ERROR, result.error))
    span.end(end_time=end)
