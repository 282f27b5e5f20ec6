"""The gateway's API boundary: GenerateRequest / GenerateChunk <-> the gateway's own values.

Round trips: tests/gateway/test_codec_gateway.py.
"""

from __future__ import annotations

from gateway.types import Delta, GenerationInput, Timings
from gateway.validation import MAX_MESSAGES
from wire.enums import FINISH_FROM_PB, FINISH_TO_PB
from wire.pb.slai.v1 import common_pb2, gateway_pb2


def generate_input_from_pb(msg: gateway_pb2.GenerateRequest) -> GenerationInput:
    """A GenerateRequest as the gateway's wire-neutral input (validated later, by the gateway).

    Raises ValueError for a field the gateway does not honour, so it is never silently dropped.
    """
    which = msg.WhichOneof("input")
    s = msg.sampling
    if which == "chat" and len(msg.chat.messages) > MAX_MESSAGES:  # before building a tuple per message
        raise ValueError(f"messages: at most {MAX_MESSAGES} messages, got {len(msg.chat.messages)}")
    if s.stop_token_ids:
        raise ValueError("sampling.stop_token_ids: not supported in GenerateRequest (the gateway adds the "
                         "model's EOS ids; use stop strings)")
    return GenerationInput(
        prompt=msg.prompt if which == "prompt" else None,
        messages=tuple((m.role, m.content) for m in msg.chat.messages) if which == "chat" else None,
        max_tokens=int(msg.max_tokens), temperature=float(s.temperature),
        top_p=float(s.top_p) if s.top_p != 0 else 1.0, top_k=int(s.top_k),
        seed=int(s.seed) if s.HasField("seed") else None, ignore_eos=bool(s.ignore_eos),
        stop=tuple(msg.stop), model=msg.model, request_id=msg.request_id)


def generate_input_to_pb(inp: GenerationInput) -> gateway_pb2.GenerateRequest:
    msg = gateway_pb2.GenerateRequest(max_tokens=inp.max_tokens, stop=inp.stop, model=inp.model,
                                      request_id=inp.request_id)
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
    return msg


def timings_from_pb(msg: common_pb2.RequestTimings) -> Timings:
    return Timings(ttft_s=msg.ttft_s, e2e_s=msg.e2e_s, queue_s=msg.queue_s, max_tbt_s=msg.max_tbt_s,
                   num_preemptions=msg.num_preemptions)


def delta_to_pb(d: Delta) -> gateway_pb2.GenerateChunk:
    msg = gateway_pb2.GenerateChunk(request_id=d.request_id, text=d.text, token_ids=d.token_ids,
                                    finish_reason=FINISH_TO_PB[d.finish_reason])
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
                 timings=timings_from_pb(msg.timings) if finish is not None else None)
