"""The only module that converts between core values and protobuf (design habit 10).

Domain types never grow ``to_pb()``; servicers call these functions. Round trips
are tested in tests/common/test_codec.py.
"""

from __future__ import annotations

from common.pb.slai.v1 import common_pb2, executor_pb2, scheduler_pb2
from scheduler_svc.core.plan import BatchPlan, CachedRequestSlice, NewRequestSlice, StepResult, TokenEvent
from scheduler_svc.core.request import SamplingParams, Tier

FINISH_TO_PB = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
    "ignored": common_pb2.FINISH_REASON_IGNORED,
    "error": common_pb2.FINISH_REASON_ERROR,
}
FINISH_FROM_PB = {v: k for k, v in FINISH_TO_PB.items()}

TIER_TO_PB = {Tier.PAYING: common_pb2.TIER_PAYING, Tier.FREE: common_pb2.TIER_FREE}
TIER_FROM_PB = {common_pb2.TIER_PAYING: Tier.PAYING, common_pb2.TIER_FREE: Tier.FREE}


# ---------------------------------------------------------------- sampling
def sampling_to_pb(s: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                    stop_token_ids=s.stop_token_ids, ignore_eos=s.ignore_eos)
    if s.seed is not None:
        msg.seed = s.seed
    return msg


def sampling_from_pb(msg: common_pb2.SamplingParams) -> SamplingParams:
    """Raises ValueError (-> INVALID_ARGUMENT) for out-of-range values."""
    return SamplingParams(
        temperature=float(msg.temperature),
        top_p=float(msg.top_p) if msg.top_p > 0 else 1.0,
        top_k=int(msg.top_k),
        seed=int(msg.seed) if msg.HasField("seed") else None,
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=bool(msg.ignore_eos),
    )


# ---------------------------------------------------------------- plans (scheduler -> executor)
def plan_to_pb(plan: BatchPlan, traceparent: str = "") -> executor_pb2.StepRequest:
    return executor_pb2.StepRequest(
        step_id=plan.step_id,
        new=[executor_pb2.NewRequest(
            request_id=s.req_id, token_ids=s.token_ids, sampling=sampling_to_pb(s.sampling),
            block_ids=s.block_ids, num_computed_tokens=s.num_computed_tokens,
            num_new_tokens=s.num_new_tokens, sample=s.sample) for s in plan.new],
        cached=[executor_pb2.CachedRequest(
            request_id=c.req_id, new_block_ids=c.new_block_ids, num_computed_tokens=c.num_computed_tokens,
            num_new_tokens=c.num_new_tokens, is_decode=c.is_decode, sample=c.sample) for c in plan.cached],
        finished_ids=plan.finished_ids,
        preempted_ids=plan.preempted_ids,
        traceparent=traceparent,
    )


def plan_from_pb(msg: executor_pb2.StepRequest) -> BatchPlan:
    return BatchPlan(
        step_id=msg.step_id,
        new=tuple(NewRequestSlice(
            req_id=n.request_id, token_ids=tuple(n.token_ids), num_tokens=len(n.token_ids),
            sampling=sampling_from_pb(n.sampling), block_ids=tuple(n.block_ids),
            num_computed_tokens=n.num_computed_tokens, num_new_tokens=n.num_new_tokens, sample=n.sample)
            for n in msg.new),
        cached=tuple(CachedRequestSlice(
            req_id=c.request_id, new_block_ids=tuple(c.new_block_ids), num_computed_tokens=c.num_computed_tokens,
            num_new_tokens=c.num_new_tokens, is_decode=c.is_decode, sample=c.sample) for c in msg.cached),
        finished_ids=tuple(msg.finished_ids),
        preempted_ids=tuple(msg.preempted_ids),
    )


# ---------------------------------------------------------------- results (executor -> scheduler)
def result_to_pb(r: StepResult, error: str = "") -> executor_pb2.StepResponse:
    return executor_pb2.StepResponse(
        step_id=r.step_id, request_ids=r.req_ids, token_ids=r.token_ids, prepare_ns=r.prepare_ns,
        forward_ns=r.forward_ns, sample_ns=r.sample_ns, total_ns=r.total_ns, error=error)


def result_from_pb(msg: executor_pb2.StepResponse) -> StepResult:
    return StepResult(
        step_id=msg.step_id, req_ids=tuple(msg.request_ids), token_ids=tuple(msg.token_ids),
        prepare_ns=msg.prepare_ns, forward_ns=msg.forward_ns, sample_ns=msg.sample_ns, total_ns=msg.total_ns)


# ---------------------------------------------------------------- token events (scheduler -> gateway)
def token_event_to_pb(ev: TokenEvent) -> scheduler_pb2.TokenEvent:
    msg = scheduler_pb2.TokenEvent(
        request_id=ev.req_id, token_ids=ev.token_ids, finish_reason=FINISH_TO_PB[ev.finish_reason],
        time_s=ev.time_s, ttft_s=ev.ttft_s or 0.0, tbt_s=ev.tbt_s or 0.0)
    if ev.finish_reason is not None:
        msg.usage.prompt_tokens = ev.num_prompt_tokens
        msg.usage.completion_tokens = ev.num_output_tokens
    return msg


def token_event_from_pb(msg: scheduler_pb2.TokenEvent) -> TokenEvent:
    return TokenEvent(
        req_id=msg.request_id, token_ids=tuple(msg.token_ids), finish_reason=FINISH_FROM_PB[msg.finish_reason],
        time_s=msg.time_s, is_first=msg.ttft_s > 0, num_prompt_tokens=msg.usage.prompt_tokens,
        num_output_tokens=msg.usage.completion_tokens, ttft_s=msg.ttft_s or None, tbt_s=msg.tbt_s or None)
