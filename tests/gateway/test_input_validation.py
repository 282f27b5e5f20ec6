"""Request parsing and validation: every bad input is a 400 / INVALID_ARGUMENT naming the field.

Regression tests for inputs that used to give 500 / UNKNOWN (huge integers, deep nesting,
lone surrogates, malformed protobuf), for the size bounds on ids and names, and for the
OpenAI parameter table (gateway/openai_params.py): every parameter is honoured or refused.
"""

from __future__ import annotations

import json
import re

import grpc
import httpx
import pytest

from gateway.openai_params import CHAT, COMPLETIONS, ROWS, UNSUPPORTED
from gateway.validation import MAX_CONTENT_PARTS, MAX_MESSAGES
from wire.pb.slai.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

from .conftest import MAX_MODEL_LEN

SHORT = 300  # an error that repeats client input repeats at most a short prefix of it
PATHS = {COMPLETIONS: "/v1/completions", CHAT: "/v1/chat/completions"}
BASE = {COMPLETIONS: {"model": "tiny-model", "prompt": "hi", "max_tokens": 3},
        CHAT: {"model": "tiny-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}}


@pytest.fixture
async def http(stack):
    async with httpx.AsyncClient(base_url=stack.http_base, timeout=30) as client:
        yield client


async def post(http, endpoint: str, body=None, raw: bytes | None = None, **extra) -> httpx.Response:
    if raw is None:
        raw = json.dumps({**BASE[endpoint], **extra} if body is None else body).encode()
    return await http.post(PATHS[endpoint], content=raw, headers={"content-type": "application/json"})


def assert_400(r: httpx.Response, param: str, limit: int = SHORT) -> str:
    assert r.status_code == 400, r.text[:500]
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["message"].startswith(param + ":") and len(err["message"]) <= limit, err["message"][:500]
    return err["message"]


async def assert_still_serves(http) -> None:
    for endpoint in PATHS:
        r = await post(http, endpoint)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 3


# ---------------------------------------------------------------- known 500s, now 400s
async def test_integer_beyond_float_range_names_the_field(http):
    huge = "1" + "0" * 400  # 1e400 written as an integer: float() overflows
    for name in ("temperature", "top_p"):
        raw = ('{"model": "tiny-model", "prompt": "hi", "%s": %s}' % (name, huge)).encode()
        assert_400(await post(http, COMPLETIONS, raw=raw), name)
    for name in ("max_tokens", "seed", "top_k", "n"):  # integers are not repeated back in full either
        raw = ('{"model": "tiny-model", "prompt": "hi", "%s": %s}' % (name, huge)).encode()
        assert_400(await post(http, COMPLETIONS, raw=raw), name, limit=100)
    raw = b'{"prompt": "hi", "temperature": 1e400}'  # a float literal parses as inf
    assert_400(await post(http, COMPLETIONS, raw=raw), "temperature")
    raw = ('{"prompt": "hi", "max_tokens": %s}' % ("9" * 5000)).encode()  # beyond Python's int-digit limit
    assert_400(await post(http, COMPLETIONS, raw=raw), "body")
    await assert_still_serves(http)


async def test_deeply_nested_json_is_400_body(http):
    depth = 50_000
    for raw in (b"[" * depth + b"]" * depth,
                b'{"prompt": "hi", "user": ' + b"[" * depth + b"]" * depth + b"}",
                b'{"prompt": ' + b'{"a":' * depth + b"1" + b"}" * depth + b"}"):
        assert_400(await post(http, COMPLETIONS, raw=raw), "body")
    await assert_still_serves(http)


async def test_lone_surrogates_are_400_naming_the_field(http):
    # ensure_ascii JSON carries the surrogate as an escape, exactly as a client would send it
    assert_400(await post(http, COMPLETIONS, prompt="x\ud800y"), "prompt")
    assert_400(await post(http, COMPLETIONS, prompt=["\udfff"]), "prompt")
    assert_400(await post(http, CHAT, messages=[{"role": "user", "content": "a\ud83d"}]), "messages[0].content")
    assert_400(await post(http, CHAT, messages=[{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]),
               "messages[0].content")
    assert_400(await post(http, COMPLETIONS, stop=["\ud800"]), "stop")
    msg = assert_400(await post(http, COMPLETIONS, model="m\ud800"), "model")
    assert "\\ud800" in msg  # escaped, so the reply is valid UTF-8
    assert_400(await post(http, COMPLETIONS, request_id="r\ud800"), "request_id")
    assert_400(await post(http, CHAT, messages=[{"role": "\ud800", "content": "x"}]), "messages[0].role")
    r = await post(http, COMPLETIONS, **{"\ud800": 1})
    assert r.status_code == 400 and "\\ud800" in r.json()["error"]["message"]
    await assert_still_serves(http)


async def test_raw_garbage_bodies_are_400_body(http):
    for raw in (b"", b"\xff\xfe\x00", b"{not json", b"[1, 2]", b'"text"', b"null", b"NaN", b"\x00" * 1000,
                b'{"prompt": "hi"' + b" " * 10000):
        assert_400(await post(http, COMPLETIONS, raw=raw), "body")


# ---------------------------------------------------------------- size bounds, short messages
async def test_oversized_request_id_and_model_are_rejected_with_short_messages(http):
    assert_400(await post(http, COMPLETIONS, request_id="r" * (1 << 20)), "request_id")
    assert_400(await post(http, COMPLETIONS, request_id="r" * 129), "request_id")
    assert_400(await post(http, COMPLETIONS, request_id="has space"), "request_id")
    assert_400(await post(http, COMPLETIONS, model="m" * 100_000), "model")
    assert_400(await post(http, COMPLETIONS, model="m" * 200), "model")  # unknown, clipped
    r = await post(http, COMPLETIONS, request_id="ok-id_1.2:3")
    assert r.status_code == 200 and r.json()["id"] == "cmpl-ok-id_1.2:3"


async def test_messages_that_repeat_input_repeat_only_a_prefix(http):
    big = "z" * 100_000
    assert_400(await post(http, CHAT, messages=[{"role": big, "content": "x"}]), "messages[0].role")
    r = await post(http, COMPLETIONS, **{big: 1})
    assert r.status_code == 400 and len(r.json()["error"]["message"]) <= SHORT
    r = await post(http, CHAT, messages=[{"role": "user", "content": "x", big: 1}])
    assert_400(r, "messages[0]")
    assert_400(await post(http, CHAT, messages=[{"role": "user", "content": [{"type": big, "text": "x"}]}]),
               "messages[0].content[0].type")
    assert_400(await post(http, COMPLETIONS, stream=True, stream_options={big: True}), "stream_options")
    assert_400(await post(http, CHAT, metadata={big: "x"}), "metadata")


async def test_list_sizes_are_bounded(http, stack):
    many = [{"role": "user", "content": ""}] * (MAX_MESSAGES + 1)
    assert_400(await post(http, CHAT, messages=many), "messages")
    parts = [{"type": "text", "text": "a"}] * (MAX_CONTENT_PARTS + 1)
    assert_400(await post(http, CHAT, messages=[{"role": "user", "content": parts}]), "messages[0].content")
    assert_400(await post(http, COMPLETIONS, stop=["a"] * 17), "stop")
    n_before = len(stack.fake.submits)
    assert_400(await post(http, COMPLETIONS, prompt=list(range(MAX_MODEL_LEN))), "prompt")
    assert_400(await post(http, COMPLETIONS, prompt=[5] * 100_000), "prompt")
    assert_400(await post(http, COMPLETIONS, prompt=["a", "b"]), "prompt")  # a batch
    assert_400(await post(http, COMPLETIONS, prompt=[[1], [2]]), "prompt")
    assert_400(await post(http, COMPLETIONS, top_k=2**40), "top_k")
    assert len(stack.fake.submits) == n_before


async def test_types_are_strict(http):
    for name, value in (("stream", 1), ("ignore_eos", 1), ("ignore_eos", "true"), ("max_tokens", True),
                        ("max_tokens", 5.0), ("temperature", "1"), ("temperature", True), ("n", True),
                        ("seed", 1.5), ("top_k", False), ("model", 5), ("request_id", 7), ("stop", [1]),
                        ("stream_options", True), ("user", 5), ("top_p", [1])):
        assert_400(await post(http, COMPLETIONS, **{name: value}), name)
    assert_400(await post(http, COMPLETIONS, stream=True, stream_options={"include_usage": "yes"}),
               "stream_options.include_usage")
    assert_400(await post(http, COMPLETIONS, stream_options={"include_usage": True}), "stream_options")
    assert_400(await post(http, CHAT, messages=[{"role": "user", "content": 3}]), "messages[0].content")
    assert_400(await post(http, CHAT, messages=[{"role": 3, "content": "x"}]), "messages[0].role")
    assert_400(await post(http, CHAT, messages=["hi"]), "messages[0]")
    assert_400(await post(http, CHAT, messages={"role": "user"}), "messages")
    assert_400(await post(http, CHAT, messages=[{"role": "user", "content": [{"type": "image_url",
                                                                              "image_url": {"url": "x"}}]}]),
               "messages[0].content[0].type")
    assert_400(await post(http, CHAT, messages=[{"role": "user", "content": [{"type": "text"}]}]),
               "messages[0].content[0].text")


# ---------------------------------------------------------------- the OpenAI parameter table
# Values a client would really send for the parameters the issue named.
NAMED_BAD = [
    (COMPLETIONS, "best_of", 2), (COMPLETIONS, "suffix", "tail"),
    (COMPLETIONS, "response_format", {"type": "json_object"}),
    (CHAT, "tools", [{"type": "function", "function": {"name": "f"}}]), (CHAT, "tool_choice", "required"),
    (CHAT, "functions", [{"name": "f"}]), (CHAT, "function_call", {"name": "f"}),
    (CHAT, "response_format", {"type": "json_schema", "json_schema": {}}),
    (CHAT, "modalities", ["text", "audio"]), (CHAT, "audio", {"voice": "alloy"}), (CHAT, "store", True),
    (CHAT, "service_tier", "flex"), (CHAT, "reasoning_effort", "low"), (CHAT, "prediction", {"type": "content"}),
    (CHAT, "web_search_options", {}), (CHAT, "echo", True), (CHAT, "best_of", 1), (COMPLETIONS, "tools", []),
    (COMPLETIONS, "prompt_logprobs", 1), (CHAT, "min_p", 0.1), (COMPLETIONS, "use_beam_search", True),
    # honoured, out of range or of the wrong type (issue 15: a 400 naming the field)
    (COMPLETIONS, "logprobs", 21), (COMPLETIONS, "logprobs", -1), (COMPLETIONS, "logprobs", True),
    (CHAT, "logprobs", 5), (CHAT, "top_logprobs", 21), (CHAT, "top_logprobs", 3),  # the last: without logprobs
    (COMPLETIONS, "n", 0), (COMPLETIONS, "n", 129), (CHAT, "n", 10**9),
    (COMPLETIONS, "presence_penalty", 2.5), (CHAT, "frequency_penalty", -3), (CHAT, "repetition_penalty", 0),
    (COMPLETIONS, "repetition_penalty", -1), (COMPLETIONS, "logit_bias", {"5": 101}),
    (CHAT, "logit_bias", {"x": 1}), (CHAT, "logit_bias", {"1": "a"}), (CHAT, "logit_bias", {"999999": 1}),
    (COMPLETIONS, "min_tokens", -1), (COMPLETIONS, "min_tokens", 10_000), (CHAT, "stop_token_ids", [-1]),
    (CHAT, "stop_token_ids", [10**6]), (CHAT, "stop_token_ids", "2"), (COMPLETIONS, "echo", 1),
]


async def test_unsupported_values_are_400_naming_the_parameter(http):
    # one gateway for all cases (a fixture per case would cost more than the requests)
    for endpoint, name, value in NAMED_BAD:
        assert_400(await post(http, endpoint, **{name: value}), name)
    await assert_still_serves(http)


async def test_every_unsupported_row_refuses_other_values_and_accepts_its_off_values(http, stack):
    for endpoint in PATHS:
        rows = [p for p in ROWS if p.kind == UNSUPPORTED and endpoint in p.endpoints]
        assert rows
        for p in rows:
            for bad in ("bogus-value", 12345, [1], {"x": 1}):
                if bad not in p.accepted:
                    assert_400(await post(http, endpoint, **{p.name: bad}), p.name)
        off = {p.name: p.accepted[0] for p in rows if p.accepted}
        r = await post(http, endpoint, **off)
        assert r.status_code == 200, (endpoint, r.text)
        nulls = {p.name: None for p in rows}
        r = await post(http, endpoint, **nulls)
        assert r.status_code == 200, (endpoint, r.text)
        for p in rows:  # every "off" value, one at a time
            for value in p.accepted:
                r = await post(http, endpoint, **{p.name: value})
                assert r.status_code == 200, (endpoint, p.name, value, r.text)


async def test_default_values_are_accepted(http, stack):
    r = await post(http, COMPLETIONS, logprobs=False)
    assert r.status_code == 200, r.text
    r = await post(http, COMPLETIONS, logprobs=None, echo=False, best_of=1, suffix=None, presence_penalty=0,
                   frequency_penalty=0.0, logit_bias={}, n=1, user="end-user-42", seed=3, top_k=-1,
                   stream=False, response_format={"type": "text"})
    assert r.status_code == 200, r.text
    r = await post(http, CHAT, logprobs=False, top_logprobs=None, tools=None, tool_choice="none",
                   parallel_tool_calls=True, response_format={"type": "text"}, presence_penalty=0, n=1,
                   user="u", metadata={"team": "a"}, store=False, modalities=["text"], service_tier="auto",
                   max_completion_tokens=3, messages=[{"role": "user", "content": "hi", "name": None,
                                                       "tool_calls": []}])
    assert r.status_code == 200, r.text
    assert stack.fake.submits[-1].max_tokens == 3


async def test_unknown_and_wrong_endpoint_keys_are_400(http):
    msg = assert_400(await post(http, COMPLETIONS, frobnicate=1), "frobnicate")
    assert "unrecognized" in msg
    assert_400(await post(http, COMPLETIONS, messages=[{"role": "user", "content": "x"}]), "messages")
    assert_400(await post(http, CHAT, prompt="x"), "prompt")
    assert_400(await post(http, COMPLETIONS, max_completion_tokens=3), "max_completion_tokens")
    assert_400(await post(http, CHAT, messages=[{"role": "user", "content": "x", "name": "bob"}]),
               "messages[0].name")
    assert_400(await post(http, CHAT, messages=[{"role": "user", "content": "x", "weight": 1}]), "messages[0]")
    assert_400(await post(http, COMPLETIONS, stream=True, stream_options={"continuous_usage_stats": True}),
               "stream_options.continuous_usage_stats")


def _sse_events(text: str) -> list:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


async def test_vllm_bench_serve_payloads_work(http, stack):
    # what `vllm bench serve --backend openai` / `openai-chat` send (vllm/benchmarks/lib/endpoint_request_func.py)
    completions = {"model": "tiny-model", "prompt": "hello the", "repetition_penalty": 1.0, "max_tokens": 7,
                   "logprobs": None, "stream": True, "stream_options": {"include_usage": True},
                   "ignore_eos": True, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
                   "frequency_penalty": 0.0, "presence_penalty": 0.0}
    chat = {"model": "tiny-model", "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
            "max_completion_tokens": 7, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True, "temperature": 0.0}
    for endpoint, body in ((COMPLETIONS, completions), (CHAT, chat)):
        r = await post(http, endpoint, body=body)
        assert r.status_code == 200, r.text
        events = _sse_events(r.text)
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 7
        assert stack.fake.submits[-1].sampling.ignore_eos


# ---------------------------------------------------------------- gRPC
def _raw(ch: grpc.aio.Channel, method: str, stream_request: bool = False):
    ident = dict(request_serializer=lambda b: b, response_deserializer=lambda b: b)
    return ch.stream_stream(method, **ident) if stream_request else ch.unary_stream(method, **ident)


async def _generate(ch, request) -> list:
    stub = gateway_pb2_grpc.GatewayServiceStub(ch)
    return [c async for c in stub.Generate(request, timeout=30)]


async def assert_invalid(coro, field: str, limit: int = SHORT) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await coro
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.value.code(), err.value.details())
    details = err.value.details()
    assert details.startswith(field + ":") and len(details) <= limit, details[:500]
    return details


async def test_malformed_protobuf_is_invalid_argument_for_every_service(stack, gw_channel):
    for raw in (b"\xff\xff\xff", b"\x0a\x02\xff\xfe", b"\x3a\x05abc", b"\x0a" + b"\xff" * 11):
        details = await assert_invalid(_raw(gw_channel, "/slai.v1.GatewayService/Generate")(raw, timeout=30)
                                       .read(), "request")
        assert "GenerateRequest" in details
    unary = gw_channel.unary_unary("/slai.v1.GatewayService/Abort", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
    await assert_invalid(unary(b"\xff", timeout=30), "request")
    health = gw_channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda b: b,
                                    response_deserializer=lambda b: b)
    await assert_invalid(health(b"\xff\xff", timeout=30), "request")
    # a stream of requests (server reflection is stream-stream): the bad message ends the call
    call = _raw(gw_channel, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", True)(
        iter([b"\xff\xff"]), timeout=30)
    await assert_invalid(call.read(), "request")
    chunks = await _generate(gw_channel, gateway_pb2.GenerateRequest(prompt="hi", max_tokens=3))
    assert chunks[-1].usage.completion_tokens == 3


async def test_grpc_ids_names_and_unsupported_fields(stack, gw_channel):
    def req(**kw):
        return gateway_pb2.GenerateRequest(prompt="hi", max_tokens=3, **kw)

    await assert_invalid(_generate(gw_channel, req(request_id="r" * (1 << 20))), "request_id")
    await assert_invalid(_generate(gw_channel, req(request_id="a b")), "request_id")
    await assert_invalid(_generate(gw_channel, req(model="m" * 100_000)), "model")
    await assert_invalid(_generate(gw_channel, req(model="x" * 200)), "model")
    bad_role = gateway_pb2.GenerateRequest(chat=gateway_pb2.ChatMessages(
        messages=[gateway_pb2.ChatMessage(role="r" * 100_000, content="x")]))
    await assert_invalid(_generate(gw_channel, bad_role), "messages[0].role")
    many = gateway_pb2.GenerateRequest(chat=gateway_pb2.ChatMessages(
        messages=[gateway_pb2.ChatMessage(role="user", content="")] * (MAX_MESSAGES + 1)))
    await assert_invalid(_generate(gw_channel, many), "messages")
    msg = req()
    msg.sampling.stop_token_ids.append(10**6)
    await assert_invalid(_generate(gw_channel, msg), "stop_token_ids")
    msg = req(n=1000)
    await assert_invalid(_generate(gw_channel, msg), "n")
    msg = req()
    msg.sampling.logprobs = 50
    await assert_invalid(_generate(gw_channel, msg), "logprobs")
    msg = req()
    msg.sampling.presence_penalty = 3
    await assert_invalid(_generate(gw_channel, msg), "presence_penalty")
    await assert_invalid(_generate(gw_channel, req(stop=["s"] * 17)), "stop")
    sampling = common_pb2.SamplingParams(temperature=float("inf"))
    msg = req()
    msg.sampling.CopyFrom(sampling)
    await assert_invalid(_generate(gw_channel, msg), "temperature")
    stub = gateway_pb2_grpc.GatewayServiceStub(gw_channel)
    await assert_invalid(stub.Abort(gateway_pb2.GatewayAbortRequest(request_id="r" * (1 << 20)), timeout=30),
                         "request_id")
    chunks = await _generate(gw_channel, req(request_id="fine-1"))
    assert chunks[-1].request_id == "fine-1" and chunks[-1].usage.completion_tokens == 3


def test_docs_list_every_parameter_of_the_table():
    from pathlib import Path

    from gateway.openai_params import MESSAGE_ROWS, STREAM_OPTION_ROWS

    doc = (Path(__file__).resolve().parents[2] / "docs" / "gateway.md").read_text()
    section = doc[doc.index("### OpenAI parameters"):doc.index("## Errors")]
    missing = sorted({p.name for p in (*ROWS, *MESSAGE_ROWS, *STREAM_OPTION_ROWS)} - set(re.findall(r"`([a-z_]+)`", section)))
    assert not missing, f"docs/gateway.md does not mention {missing}"
