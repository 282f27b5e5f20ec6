"""``TokenLogprob`` / ``Logprobs`` messages <-> ``contract.logprobs`` values, shared by every boundary
that carries them (executor -> scheduler -> gateway; docs/gateway.md, "Log probabilities")."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from contract.logprobs import SampleLogprobs, TokenLogprob
from wire.pb.slai.v1 import common_pb2


def fill_token_logprob(msg: common_pb2.TokenLogprob, t: TokenLogprob) -> None:
    msg.token_id, msg.logprob = t.token_id, t.logprob
    if t.top_ids:
        msg.top_token_ids.extend(t.top_ids)
        msg.top_logprobs.extend(t.top_logprobs)


def token_logprob_from_pb(msg: common_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(msg.token_id, msg.logprob, tuple(msg.top_token_ids), tuple(msg.top_logprobs))


def add_logprobs(field, values: Sequence[SampleLogprobs | None]) -> None:
    """Append one ``Logprobs`` per value to the repeated ``field`` (an empty message for None)."""
    for v in values:
        m = field.add()
        if v is None:
            continue
        if v.token is not None:
            fill_token_logprob(m.token, v.token)
        if v.prompt is not None:
            m.has_prompt = True
            for t in v.prompt:
                fill_token_logprob(m.prompt.add(), t)


def logprobs_from_pb(msgs: Iterable[common_pb2.Logprobs]) -> tuple[SampleLogprobs | None, ...]:
    """The inverse of :func:`add_logprobs`."""
    out: list[SampleLogprobs | None] = []
    for m in msgs:
        token = token_logprob_from_pb(m.token) if m.HasField("token") else None
        prompt = tuple(token_logprob_from_pb(t) for t in m.prompt) if m.has_prompt else None
        out.append(None if token is None and prompt is None else SampleLogprobs(token, prompt))
    return tuple(out)
