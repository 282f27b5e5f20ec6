"""The gateway's API boundary: GenerateRequest / GenerateChunk <-> the gateway's own values.

Round trips: tests/gateway/test_codec_gateway.py.
"""

from __future__ import annotations

from contract.logprobs import TokenLogprob
from gateway.types import Delta, GenerationInput, Timings
from gateway.validation import MAX_LOGIT_BIAS_KEYS, MAX_MESSAGES, MAX_STOP_TOKEN_IDS
from wire.enums import FINISH_FROM_PB, FINISH_TO_PB
from wire.logprobs_codec import fill_token_logprob, token_logprob_from_pb
from wire.pb.slai.v1 import common_pb2, gateway_pb2


def generate_input_from_pb(msg: gateway_pb2.GenerateRequest) -> GenerationInput:
    """A GenerateRequest as the gateway's wire-neutral input (validated later, by the gateway).

    Raises ValueError for a field the gateway does not honour, so it is never silently dropped.
    """
    which = msg.WhichOneof("input")
    s = msg.sampling
    if which == "chat" and len(msg.chat.messages) > MAX_MESSAGES:  # before building a tuple per message
        raise ValueError(f"messages: at most {MAX_MESSAGES} messages, got {len(msg.chat.messages)}")
    if len(s.logit_bias) > MAX_LOGIT_BIAS_KEYS:
        raise ValueError(f"logit_bias: at most {MAX_LOGIT_BIAS_KEYS} tokens, got {len(s.logit_bias)}")
    if len(s.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids, got {len(s.stop_token_ids)}")
    return GenerationInput(
        prompt=msg.prompt if which == "prompt" else None,
        messages=tuple((m.role, m.content) for m in msg.chat.messages) if which == "chat" else None,
        max_tokens=int(msg.max_tokens), temperature=float(s.temperature),
        top_p=float(s.top_p) if s.top_p != 0 else 1.0, top_k=int(s.top_k),
        seed=int(s.seed) if s.HasField("seed") else None, ignore_eos=bool(s.ignore_eos),
        stop=tuple(msg.stop), model=msg.model, request_id=msg.request_id, n=int(msg.n) or 1,
        presence_penalty=float(s.presence_penalty), frequency_penalty=float(s.frequency_penalty),
        repetition_penalty=float(s.repetition_penalty) if s.repetition_penalty != 0 else 1.0,
        logit_bias=tuple(sorted((int(k), float(v)) for k, v in s.logit_bias.items())),
        min_tokens=int(s.min_tokens), stop_token_ids=tuple(s.stop_token_ids),
        logprobs=int(s.logprobs) if s.HasField("logprobs") else None,
        prompt_logprobs=int(s.prompt_logprobs) if s.HasField("prompt_logprobs") else None,
        score_only=bool(msg.score_only))


def generate_input_to_pb(inp: GenerationInput) -> gateway_pb2.GenerateRequest:
    msg = gateway_pb2.GenerateRequest(max_tokens=inp.max_tokens, stop=inp.stop, model=inp.model,
                                      request_id=inp.request_id, n=inp.n if inp.n != 1 else 0,
                                      score_only=inp.score_only)
    if inp.messages is not None:
        msg.chat.messages.extend(gateway_pb2.ChatMessage(role=r, content=c) for r, c in inp.messages)
    else:
        msg.prompt = inp.prompt or ""
    msg.sampling.temperature = inp.temperature
    msg.sampling.top_p = inp.top_p
    msg.sampling.top_k = inp.top_k
    msg.sampling.ignore_eos = inp.ignore_eos
    if inp.seed is not None:
        msg.sampling.seed = inp.seed
    s = msg.sampling
    s.presence_penalty, s.frequency_penalty = inp.presence_penalty, inp.frequency_penalty
    s.repetition_penalty, s.min_tokens = inp.repetition_penalty, inp.min_tokens
    s.stop_token_ids.extend(inp.stop_token_ids)
    for tok, bias in inp.logit_bias:
        s.logit_bias[tok] = bias
    if inp.logprobs is not None:
        s.logprobs = inp.logprobs
    if inp.prompt_logprobs is not None:
        s.prompt_logprobs = inp.prompt_logprobs
    return msg


def timings_from_pb(msg: common_pb2.RequestTimings) -> Timings:
    return Timings(ttft_s=msg.ttft_s, e2e_s=msg.e2e_s, queue_s=msg.queue_s, max_tbt_s=msg.max_tbt_s,
                   num_preemptions=msg.num_preemptions)


def delta_to_pb(d: Delta) -> gateway_pb2.GenerateChunk:
    msg = gateway_pb2.GenerateChunk(request_id=d.request_id, text=d.text, token_ids=d.token_ids,
                                    finish_reason=FINISH_TO_PB[d.finish_reason], index=d.index)
    if d.logprobs is not None:
        for t, tid in zip(d.logprobs, d.token_ids):
            fill_token_logprob(msg.logprobs.add(), t if t is not None else TokenLogprob(tid, float("nan")))
    if d.prompt_logprobs is not None:
        for t in d.prompt_logprobs:
            fill_token_logprob(msg.prompt_logprobs.add(), t)
    if d.finish_reason is not None:
        msg.usage.prompt_tokens = d.prompt_tokens
        msg.usage.completion_tokens = d.completion_tokens
        t = d.timings or Timings()
        msg.timings.ttft_s, msg.timings.e2e_s, msg.timings.queue_s = t.ttft_s, t.e2e_s, t.queue_s
        msg.timings.max_tbt_s, msg.timings.num_preemptions = t.max_tbt_s, t.num_preemptions
    return msg


def delta_from_pb(msg: gateway_pb2.GenerateChunk) -> Delta:
    finish = FINISH_FROM_PB[msg.finish_reason]
    return Delta(request_id=msg.request_id, text=msg.text, token_ids=tuple(msg.token_ids), finish_reason=finish,
                 prompt_tokens=msg.usage.prompt_tokens, completion_tokens=msg.usage.completion_tokens,
                 timings=timings_from_pb(msg.timings) if finish is not None else None, index=msg.index,
                 logprobs=tuple(map(token_logprob_from_pb, msg.logprobs)) if msg.logprobs else None,
                 prompt_logprobs=tuple(map(token_logprob_from_pb, msg.prompt_logprobs))
                 if msg.prompt_logprobs else None)
