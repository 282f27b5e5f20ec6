"""The OpenAI-compatible HTTP API, driven by the official openai client and raw httpx."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from gateway.auth import parse_key_data

from .conftest import EOS_ID, MAX_MODEL_LEN, start_stack

REPLY = "Hello wörld, ça va? 😀 The end."


def client(stack, key: str = "none") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.http_base + "/v1", api_key=key, max_retries=0, timeout=10)


async def test_models_and_health(stack):
    models = await client(stack).models.list()
    assert [m.id for m in models.data] == ["tiny-model"]
    async with httpx.AsyncClient() as http:
        r = await http.get(stack.http_base + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


async def test_completion_not_streamed(stack):
    resp = await client(stack).completions.create(model="tiny-model", prompt="Hi", max_tokens=100, temperature=0)
    assert resp.choices[0].text == REPLY
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens == len(stack.fake.reply_ids) + 1
    assert resp.usage.prompt_tokens == len(stack.tokenizer.encode("Hi"))


async def test_completion_streamed(stack):
    stream = await client(stack).completions.create(model="tiny-model", prompt="Hi", max_tokens=100, stream=True,
                                                    stream_options={"include_usage": True})
    texts, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.choices:
            texts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(texts) == REPLY and len(texts) > 5
    assert finish == "stop" and usage.completion_tokens == len(stack.fake.reply_ids) + 1


async def test_chat_streamed_and_not(stack):
    c = client(stack)
    msgs = [{"role": "user", "content": "What is up?"}]
    resp = await c.chat.completions.create(model="tiny-model", messages=msgs, max_tokens=100, temperature=0)
    assert resp.choices[0].message.content == REPLY and resp.choices[0].message.role == "assistant"
    assert list(stack.fake.submits[-1].prompt_token_ids) == stack.tokenizer.encode_chat(msgs)
    stream = await c.chat.completions.create(model="tiny-model", messages=msgs, max_tokens=5, stream=True,
                                             extra_body={"ignore_eos": True})
    parts, finish = [], None
    async for chunk in stream:
        parts.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "length"
    assert "".join(parts) == stack.tokenizer.decode(stack.fake.reply_ids[:5])


async def test_stop_strings_and_token_id_prompt(stack):
    resp = await client(stack).completions.create(model="tiny-model", prompt=[5, 6, 7], max_tokens=100, stop=["ça"])
    assert resp.choices[0].text == "Hello wörld, " and resp.choices[0].finish_reason == "stop"
    assert list(stack.fake.submits[-1].prompt_token_ids) == [5, 6, 7]


BAD_BODIES = [
    ({"model": "tiny-model", "prompt": ""}, "prompt"),
    ({"model": "tiny-model", "prompt": "x" * (MAX_MODEL_LEN * 4)}, "prompt"),
    ({"model": "tiny-model", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny-model", "prompt": "hi", "max_tokens": MAX_MODEL_LEN * 2}, "max_tokens"),
    ({"model": "tiny-model", "prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ({"model": "nope", "prompt": "hi"}, "model"),
    ({"model": "tiny-model", "prompt": "hi", "temperature": -0.5}, "temperature"),
    ({"model": "tiny-model", "prompt": "hi", "top_p": 0}, "top_p"),
    ({"model": "tiny-model", "prompt": "hi", "top_k": -3}, "top_k"),
    ({"model": "tiny-model", "prompt": "hi", "n": 0}, "n"),
    ({"model": "tiny-model", "prompt": "hi", "n": 129}, "n"),
    ({"model": "tiny-model", "prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"model": "tiny-model", "prompt": "hi", "stop": 5}, "stop"),
]


async def test_bad_requests_are_400_naming_the_field_while_others_stream(stack):
    stack.fake.delay_s = 0.005
    c = client(stack)
    long = asyncio.ensure_future(c.completions.create(model="tiny-model", prompt="Hi", max_tokens=80,
                                                      extra_body={"ignore_eos": True}))
    async with httpx.AsyncClient(base_url=stack.http_base, timeout=10) as http:
        for body, field in BAD_BODIES:
            r = await http.post("/v1/completions", json=body)
            assert r.status_code == 400, (body, r.text)
            err = r.json()["error"]
            assert err["param"] == field and field in err["message"], err
        r = await http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        r = await http.post("/v1/chat/completions", json={"model": "tiny-model", "messages": []})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": 3}]})
        assert r.status_code == 400 and "messages[0].content" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        await c.completions.create(model="tiny-model", prompt="", max_tokens=3)
    resp = await long
    assert resp.usage.completion_tokens == 80 and resp.choices[0].finish_reason == "length"


async def test_scheduler_full_is_429_with_retry_after(stack):
    stack.fake.reject_retry_after_s = 2.2
    async with httpx.AsyncClient(base_url=stack.http_base, timeout=10) as http:
        for stream in (False, True):
            r = await http.post("/v1/completions", json={"prompt": "hi", "stream": stream})
            assert r.status_code == 429 and r.headers["retry-after"] == "3"
    with pytest.raises(openai.RateLimitError):
        await client(stack).chat.completions.create(model="tiny-model", messages=[{"role": "user", "content": "x"}])


async def test_scheduler_down_is_503_fast(tiny_model_dir):
    import socket
    import time

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"127.0.0.1:{s.getsockname()[1]}"
    s.close()
    st, _ = await start_stack(tiny_model_dir, scheduler_address=dead)
    try:
        t0 = time.monotonic()
        with pytest.raises(openai.InternalServerError) as err:
            await client(st).completions.create(model="tiny-model", prompt="hi", max_tokens=3)
        assert err.value.status_code == 503 and time.monotonic() - t0 < 3.0
    finally:
        await st.running.stop(0.2)


async def test_api_keys_401_and_tier(tiny_model_dir):
    st, sched = await start_stack(tiny_model_dir, keys=parse_key_data({"sk-a": "free"}))
    try:
        with pytest.raises(openai.AuthenticationError):
            await client(st, "wrong").completions.create(model="tiny-model", prompt="hi", max_tokens=2)
        resp = await client(st, "sk-a").completions.create(model="tiny-model", prompt="hi", max_tokens=2)
        assert resp.usage.completion_tokens == 2
        assert st.fake.submits[-1].tier == 2  # TIER_FREE
        async with httpx.AsyncClient(base_url=st.http_base) as http:
            r = await http.post("/v1/completions", json={"prompt": "hi"})
            assert r.status_code == 401
    finally:
        await st.running.stop(0.2)
        await sched.stop(0)


async def test_http_client_disconnect_aborts_upstream(stack):
    stack.fake.delay_s = 0.01
    async with httpx.AsyncClient(base_url=stack.http_base, timeout=10) as http:
        async with http.stream("POST", "/v1/completions", json={
                "prompt": "hi", "max_tokens": 200, "stream": True, "ignore_eos": True}) as r:
            n = 0
            async for line in r.aiter_lines():
                n += line.startswith("data: ")
                if n >= 3:
                    break
    await stack.fake.wait_until(lambda: bool(stack.fake.cancelled))
    assert len(stack.fake.cancelled) == 1
    assert EOS_ID not in stack.fake.submits[-1].prompt_token_ids


async def test_return_token_ids_streamed_and_not(stack):
    """vLLM's return_token_ids: every token the scheduler sent reaches the client, once, in order."""
    reply = stack.fake.reply_ids
    body = {"prompt": "hi", "max_tokens": 12, "ignore_eos": True, "return_token_ids": True, "temperature": 0}
    async with httpx.AsyncClient(base_url=stack.http_base, timeout=30) as http:
        r = await http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == [reply[i % len(reply)] for i in range(12)]
        ids = []
        async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    ids.extend(json.loads(line[6:])["choices"][0]["token_ids"])
        assert ids == [reply[i % len(reply)] for i in range(12)]
        plain = await http.post("/v1/completions", json={**body, "return_token_ids": False})
        assert "token_ids" not in plain.json()["choices"][0]
        bad = await http.post("/v1/completions", json={**body, "return_token_ids": 1})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "return_token_ids"
