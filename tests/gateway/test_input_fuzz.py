"""Property-based fuzzing of both front ends: no input yields a 5xx, UNKNOWN or INTERNAL.

Random JSON bodies (huge integers, NaN, lone surrogates, wrong types, deep nesting,
random and real OpenAI parameters, raw bytes) go to /v1/completions and
/v1/chat/completions; random GenerateRequest messages and raw bytes go to gRPC
Generate. Every error must be a 4xx / INVALID_ARGUMENT with a short, non-empty
message, and a normal request must still succeed after each one. The FakeScheduler
behind the real gateway (conftest.py) answers the requests that pass validation.
"""

from __future__ import annotations

import json

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.openai_params import MESSAGE_ROWS, ROWS
from wire.pb.slai.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

# Messages repeat at most 64 characters of client input, as repr (<= 10 characters each), so they stay
# well under the 1,024-character backstop cap (gateway/http_api.py, wire/grpc_server.py).
MAX_MESSAGE = 800
# derandomize: the same examples on every run (CI is repeatable); 5-8 s each on a loaded 2-core machine
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
PATHS = ("/v1/completions", "/v1/chat/completions")

# ---------------------------------------------------------------- JSON values
ODD_TEXT = st.sampled_from(["\ud800", "a\udfffb", "\ud83d", "\x00", "tiny-model", "user", "system", "text", "",
                            " ", "x" * 300, "auto", "none", "😀", "\u202e", "-1"])
TEXT = st.text(st.characters(exclude_categories=()), max_size=12) | ODD_TEXT  # surrogates included
INTS = (st.integers(-3, 300) | st.integers(-(10**400), 10**400)
        | st.sampled_from([2**31, 2**32, 2**63, 2**64, 2**64 - 1, -(2**63), 10**308, 10**309]))
SCALARS = st.none() | st.booleans() | INTS | st.floats() | TEXT
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=10)
NAMES = sorted({p.name for p in ROWS})
MESSAGE_KEYS = ["role", "content", *sorted({p.name for p in MESSAGE_ROWS})]

PARTS = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]) | TEXT,
                                        "text": TEXT | JSON}) | JSON, max_size=3)
MESSAGE = (st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]) | TEXT | JSON,
                                  "content": TEXT | PARTS | JSON},
                                 optional={k: JSON for k in MESSAGE_KEYS[2:]})
           | st.dictionaries(st.sampled_from(MESSAGE_KEYS) | TEXT, JSON, max_size=3) | JSON)
# values shaped like each honoured parameter (so validation gets past the types), or anything at all
SHAPED = {
    "model": st.sampled_from(["tiny-model", "", "other", "m" * 500]) | TEXT,
    "prompt": TEXT | st.lists(st.integers(-2, 500), max_size=6) | st.lists(TEXT, max_size=2) | JSON,
    "messages": st.lists(MESSAGE, max_size=4) | JSON,
    "max_tokens": INTS, "max_completion_tokens": INTS, "n": INTS, "seed": INTS, "top_k": INTS,
    "temperature": st.floats() | INTS, "top_p": st.floats() | INTS,
    "stream": st.booleans(), "ignore_eos": st.booleans(),
    "stream_options": st.dictionaries(st.sampled_from(["include_usage", "continuous_usage_stats"]) | TEXT,
                                      st.booleans() | JSON, max_size=2),
    "stop": TEXT | st.lists(TEXT, max_size=4),
    "request_id": st.sampled_from(["", "fuzz-1", "a b", "r" * 200]) | TEXT,
}


@st.composite
def http_bodies(draw) -> tuple[str, bytes]:
    path = draw(st.sampled_from(PATHS))
    kind = draw(st.sampled_from(["shaped", "shaped", "shaped", "any-json", "raw", "deep", "big-number"]))
    if kind == "raw":
        return path, draw(st.binary(max_size=300))
    if kind == "deep":
        n = draw(st.integers(1, 60_000))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        inner = opener * n + (b"1" if opener != b"[" else b"") + closer * n
        return path, draw(st.sampled_from([inner, b'{"prompt": "hi", "user": ' + inner + b"}"]))
    if kind == "big-number":
        digits = draw(st.integers(300, 6000))
        name = draw(st.sampled_from(["temperature", "top_p", "max_tokens", "seed", "presence_penalty"]))
        return path, ('{"prompt": "hi", "messages": [{"role": "user", "content": "x"}], "%s": %s}'
                      % (name, "7" * digits)).encode()
    if kind == "any-json":
        return path, json.dumps(draw(JSON)).encode()
    body = {}
    if draw(st.booleans()):
        body["model"] = "tiny-model"
    if path == PATHS[0]:
        body["prompt"] = draw(st.sampled_from(["hi", "Hello world"]))
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
    body["max_tokens"] = draw(st.integers(1, 8))
    for name in draw(st.lists(st.sampled_from(NAMES) | TEXT, max_size=4)):
        body[name] = draw(SHAPED[name]) if name in SHAPED else draw(JSON)
    return path, json.dumps(body).encode()  # ensure_ascii: surrogates travel as \\ud800 escapes


def _check_http(r: httpx.Response) -> None:
    assert r.status_code < 500, r.text[:500]
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and 0 < len(err["message"]) <= MAX_MESSAGE, err
        return
    assert r.status_code == 200
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events[:-1]), r.text[-500:]
    else:
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


async def _canary(http: httpx.AsyncClient, path: str) -> None:
    body = {"prompt": "hi"} if path == PATHS[0] else {"messages": [{"role": "user", "content": "hi"}]}
    r = await http.post(path, json={**body, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text


@pytest.fixture
async def http(stack):
    async with httpx.AsyncClient(base_url=stack.http_base, timeout=30) as client:
        yield client


@FUZZ
@given(case=http_bodies())
async def test_http_fuzz_never_5xx(stack, http, case):
    path, raw = case
    r = await http.post(path, content=raw, headers={"content-type": "application/json"})
    _check_http(r)
    await _canary(http, path)


# ---------------------------------------------------------------- gRPC
PB_TEXT = st.text(max_size=12) | st.sampled_from(["", "tiny-model", "user", "x" * 300, "😀", "\x00"])


@st.composite
def generate_requests(draw) -> gateway_pb2.GenerateRequest:
    msg = gateway_pb2.GenerateRequest(max_tokens=draw(st.integers(0, 2**32 - 1) | st.integers(0, 8)))
    which = draw(st.sampled_from(["prompt", "chat", "none"]))
    if which == "prompt":
        msg.prompt = draw(PB_TEXT | st.sampled_from(["hi", "Hello world"]))
    elif which == "chat":
        for _ in range(draw(st.integers(0, 3))):
            msg.chat.messages.add(role=draw(st.sampled_from(["user", "system", "assistant"]) | PB_TEXT),
                                  content=draw(PB_TEXT))
        if not msg.chat.messages:
            msg.chat.SetInParent()
    s = msg.sampling
    s.temperature = draw(st.floats(width=64) | st.sampled_from([0.0, 0.7]))
    s.top_p = draw(st.floats(width=64) | st.sampled_from([0.0, 1.0]))
    s.top_k = draw(st.integers(0, 2**32 - 1) | st.just(0))
    if draw(st.booleans()):
        s.seed = draw(st.integers(0, 2**64 - 1))
    if draw(st.integers(0, 9)) == 0:
        s.stop_token_ids.extend(draw(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=3)))
    s.ignore_eos = draw(st.booleans())
    msg.stop.extend(draw(st.lists(PB_TEXT, max_size=3) | st.lists(st.just("s"), min_size=17, max_size=20)))
    msg.model = draw(st.sampled_from(["", "tiny-model", "m" * 1000]) | PB_TEXT)
    msg.request_id = draw(st.sampled_from(["", "", "fuzz-id.1", "a b", "r" * 200]) | PB_TEXT)
    return msg


async def _call_generate(ch: grpc.aio.Channel, raw: bytes) -> None:
    call = ch.unary_stream("/slai.v1.GatewayService/Generate", request_serializer=lambda b: b,
                           response_deserializer=gateway_pb2.GenerateChunk.FromString)
    try:
        chunks = [c async for c in call(raw, timeout=30)]
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
        assert 0 < len(exc.details() or "") <= MAX_MESSAGE, exc.details()
        return
    assert chunks[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED


@FUZZ
@given(case=generate_requests().map(lambda m: m.SerializeToString()) | st.binary(max_size=200))
async def test_grpc_fuzz_never_unknown_or_internal(stack, gw_channel, case):
    await _call_generate(gw_channel, case)
    stub = gateway_pb2_grpc.GatewayServiceStub(gw_channel)
    chunks = [c async for c in stub.Generate(gateway_pb2.GenerateRequest(prompt="hi", max_tokens=2), timeout=30)]
    assert chunks[-1].usage.completion_tokens == 2
