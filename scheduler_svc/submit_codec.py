"""The scheduler's side of the gateway <-> scheduler boundary: Submit, TokenEvent and Stats as protobuf.

Converts to and from the core's values (``Request``, ``TokenEvent``); the gateway's side of the
same messages is ``gateway/scheduler_client.py``. Round trips: tests/scheduler_svc/test_submit_codec.py.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from contract.sampling import SamplingParams
from scheduler_svc.core.request import Request
from scheduler_svc.core.token_event import TokenEvent
from scheduler_svc.core.token_ids import TokenIds
from wire.enums import FINISH_FROM_PB, FINISH_TO_PB, TIER_TO_PB, tier_from_pb
from wire.executor_codec import sampling_from_pb, sampling_to_pb
from wire.logprobs_codec import add_logprobs, logprobs_from_pb
from wire.pb.slai.v1 import common_pb2, scheduler_pb2


# ---------------------------------------------------------------- token events (scheduler -> gateway)
def token_event_to_pb(ev: TokenEvent) -> scheduler_pb2.TokenEvent:
    msg = scheduler_pb2.TokenEvent(
        request_id=ev.req_id, token_ids=ev.token_ids, finish_reason=FINISH_TO_PB[ev.finish_reason],
        time_s=ev.time_s, ttft_s=ev.ttft_s or 0.0, tbt_s=ev.tbt_s or 0.0)
    if ev.finish_reason is not None:
        msg.usage.prompt_tokens = ev.num_prompt_tokens
        msg.usage.completion_tokens = ev.num_output_tokens
    if ev.logprobs is not None:
        add_logprobs(msg.logprobs, ev.logprobs)
    return msg


def token_event_from_pb(msg: scheduler_pb2.TokenEvent) -> TokenEvent:
    return TokenEvent(
        req_id=msg.request_id, token_ids=tuple(msg.token_ids), finish_reason=FINISH_FROM_PB[msg.finish_reason],
        time_s=msg.time_s, is_first=msg.ttft_s > 0, num_prompt_tokens=msg.usage.prompt_tokens,
        num_output_tokens=msg.usage.completion_tokens, ttft_s=msg.ttft_s or None, tbt_s=msg.tbt_s or None,
        logprobs=logprobs_from_pb(msg.logprobs) if msg.logprobs else None)


# ---------------------------------------------------------------- submissions (gateway -> scheduler)
def _checked_sampling(msg: common_pb2.SamplingParams) -> SamplingParams:
    for name in ("temperature", "top_p"):
        v = getattr(msg, name)
        if not math.isfinite(v):
            raise ValueError(f"sampling.{name} must be finite, got {v}")
    try:
        return sampling_from_pb(msg)
    except ValueError as exc:
        raise ValueError(f"sampling.{exc}") from None


def request_from_submit_pb(msg: scheduler_pb2.SubmitRequest, now: float) -> Request:
    """A fresh core ``Request`` from a ``SubmitRequest``; ValueError names the bad field.

    ``tbt_slo_s`` / ``ttft_slo_s`` stay ``None`` when the message carries 0: the
    caller fills in the tier's defaults. Prompt ids are stored compactly
    (:class:`TokenIds`, 4 bytes a token) because 10k queued prompts must stay cheap.
    """
    if not msg.request_id:
        raise ValueError("request_id must be non-empty")
    if len(msg.prompt_token_ids) == 0:
        raise ValueError("prompt_token_ids must be non-empty")
    if msg.max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {msg.max_tokens}")
    for name in ("tbt_slo_s", "ttft_slo_s"):
        v = getattr(msg, name)
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v}")
    sampling = _checked_sampling(msg.sampling)
    ids = TokenIds(msg.prompt_token_ids)
    return Request(
        req_id=msg.request_id, num_prompt_tokens=len(ids), max_tokens=int(msg.max_tokens), arrival_s=now,
        tier=tier_from_pb(msg.tier), tbt_slo_s=float(msg.tbt_slo_s) if msg.tbt_slo_s > 0 else None,
        ttft_slo_s=float(msg.ttft_slo_s) if msg.ttft_slo_s > 0 else None, prompt_token_ids=ids,
        sampling=sampling)


def submit_to_pb(req: Request) -> scheduler_pb2.SubmitRequest:
    """The inverse of :func:`request_from_submit_pb` (clients and tests)."""
    return scheduler_pb2.SubmitRequest(
        request_id=req.req_id, prompt_token_ids=req.prompt_token_ids or (), max_tokens=req.max_tokens,
        sampling=sampling_to_pb(req.sampling), tier=TIER_TO_PB[req.tier], tbt_slo_s=req.tbt_slo_s or 0.0,
        ttft_slo_s=req.ttft_slo_s or 0.0)


# ---------------------------------------------------------------- final events and stats (scheduler -> gateway)
def final_token_event_to_pb(ev: TokenEvent, *, prompt_tokens: int, completion_tokens: int, ttft_s: float,
                            e2e_s: float, queue_s: float, max_tbt_s: float,
                            num_preemptions: int) -> scheduler_pb2.TokenEvent:
    """The last event of a stream: tokens (if any) + finish reason + usage + timings.

    Usage and timings are passed in because a request moved to another executor
    after a failure is two core requests; the stream reports the client's view.
    """
    msg = token_event_to_pb(ev)
    if ev.finish_reason is None:
        raise ValueError("final_token_event_to_pb needs a finish reason")
    msg.usage.prompt_tokens = prompt_tokens
    msg.usage.completion_tokens = completion_tokens
    msg.timings.ttft_s = ttft_s
    msg.timings.e2e_s = e2e_s
    msg.timings.queue_s = queue_s
    msg.timings.max_tbt_s = max_tbt_s
    msg.timings.num_preemptions = num_preemptions
    return msg


def error_event_to_pb(req_id: str) -> scheduler_pb2.TokenEvent:
    return scheduler_pb2.TokenEvent(request_id=req_id, finish_reason=common_pb2.FINISH_REASON_ERROR)


_EXECUTOR_STATS_FIELDS = tuple(f.name for f in scheduler_pb2.ExecutorStats.DESCRIPTOR.fields)


def stats_to_pb(policy: str, executors: Iterable[Any], num_queued_total: int,
                num_queued_prompt_tokens: int, *, num_tbt_samples: int = 0, tbt_p50_s: float = 0.0,
                tbt_p99_s: float = 0.0) -> scheduler_pb2.StatsResponse:
    """``executors``: values (dataclasses or objects) with the ExecutorStats field names."""
    return scheduler_pb2.StatsResponse(
        policy=policy, num_queued_total=num_queued_total, num_queued_prompt_tokens=num_queued_prompt_tokens,
        executors=[scheduler_pb2.ExecutorStats(**{k: getattr(e, k) for k in _EXECUTOR_STATS_FIELDS})
                   for e in executors],
        num_tbt_samples=num_tbt_samples, tbt_p50_s=tbt_p50_s, tbt_p99_s=tbt_p99_s)


def stats_from_pb(msg: scheduler_pb2.StatsResponse) -> dict[str, Any]:
    return {"policy": msg.policy, "num_queued_total": msg.num_queued_total,
            "num_queued_prompt_tokens": msg.num_queued_prompt_tokens,
            "num_tbt_samples": msg.num_tbt_samples, "tbt_p50_s": msg.tbt_p50_s, "tbt_p99_s": msg.tbt_p99_s,
            "executors": [{k: getattr(e, k) for k in _EXECUTOR_STATS_FIELDS} for e in msg.executors]}
