"""``n``, admission per completion, and the sampling options as the scheduler receives them (fake scheduler)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.gateway.conftest import EOS_ID, start_stack

BODY = {"model": "tiny-model", "prompt": "hello the", "max_tokens": 3}


@pytest.fixture
async def small(tiny_model_dir):
    st, sched = await start_stack(tiny_model_dir, max_concurrent_requests=3)
    st.fake.reply_ids = st.tokenizer.encode("the quick brown fox", add_special_tokens=False)
    async with httpx.AsyncClient(base_url=st.http_base, timeout=30) as http:
        yield st, http
    await st.running.stop(0.5)
    await sched.stop(0)


async def test_n_fans_out_with_seed_streams_and_counts_usage(small):
    st, http = small
    r = await http.post("/v1/completions", json={**BODY, "n": 3, "seed": 7, "request_id": "job"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "cmpl-job" and [c["index"] for c in out["choices"]] == [0, 1, 2]
    subs = st.fake.submits[-3:]
    assert sorted(s.request_id for s in subs) == ["job-0", "job-1", "job-2"]
    assert sorted(s.sampling.seed for s in subs) == [7, 8, 9]
    assert out["usage"]["completion_tokens"] == 9 and out["usage"]["prompt_tokens"] == len(subs[0].prompt_token_ids)
    r = await http.post("/v1/chat/completions", json={"model": "tiny-model", "n": 2, "max_tokens": 2, "stream": True,
                                                      "messages": [{"role": "user", "content": "hi"}],
                                                      "stream_options": {"include_usage": True}})
    events = [line for line in r.text.split("\n\n") if line.startswith("data: {")]
    finishes = [c["index"] for e in events for c in json.loads(e[6:])["choices"] if c["finish_reason"]]
    assert sorted(finishes) == [0, 1] and r.text.rstrip().endswith("data: [DONE]")
    assert '"completion_tokens": 4' in events[-1]
    unseeded = st.fake.submits[-2:]
    assert not any(s.sampling.HasField("seed") for s in unseeded)


async def test_n_needs_a_slot_per_completion(small):
    st, http = small
    st.fake.delay_s = 0.02
    long = asyncio.ensure_future(http.post("/v1/completions", json={**BODY, "max_tokens": 60, "ignore_eos": True}))
    await asyncio.sleep(0.2)
    r = await http.post("/v1/completions", json={**BODY, "n": 3})  # 1 slot taken, 3 needed of 3
    assert r.status_code == 429 and r.headers["retry-after"], r.text
    r = await http.post("/v1/completions", json={**BODY, "n": 4})  # more than the gateway ever admits
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
    assert (await long).status_code == 200
    st.fake.delay_s = 0.0
    r = await http.post("/v1/completions", json={**BODY, "n": 3})
    assert r.status_code == 200 and len(r.json()["choices"]) == 3


async def test_sampling_options_reach_the_scheduler(small):
    st, http = small
    r = await http.post("/v1/completions", json={
        **BODY, "presence_penalty": 0.5, "frequency_penalty": -0.25, "repetition_penalty": 1.3,
        "logit_bias": {"7": 5, "3": -100}, "min_tokens": 2, "stop_token_ids": [9], "logprobs": 2})
    assert r.status_code == 200, r.text
    s = st.fake.submits[-1].sampling
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty, s.min_tokens) == (0.5, -0.25, 1.3, 2)
    assert dict(s.logit_bias) == {7: 5.0, 3: -100.0} and s.logprobs == 2 and not s.HasField("prompt_logprobs")
    assert list(s.stop_token_ids) == [EOS_ID, 9] and not s.ignore_eos
    # ignore_eos ignores the model's EOS, never the client's stop_token_ids (vLLM)
    r = await http.post("/v1/completions", json={**BODY, "ignore_eos": True, "stop_token_ids": [9]})
    s = st.fake.submits[-1].sampling
    assert list(s.stop_token_ids) == [9] and not s.ignore_eos
    # echo with logprobs asks for the prompt's too; the fake scheduler sends none: nulls, not made-up numbers
    r = await http.post("/v1/completions", json={**BODY, "echo": True, "logprobs": 1})
    assert st.fake.submits[-1].sampling.prompt_logprobs == 1
    choice = r.json()["choices"][0]
    assert choice["text"].startswith("hello the") and choice["logprobs"]["token_logprobs"][0] is None
    assert choice["logprobs"]["text_offset"][0] == 0


async def test_grpc_n_and_options(small):
    import grpc

    from wire.pb.slai.v1 import gateway_pb2, gateway_pb2_grpc

    st, _ = small
    msg = gateway_pb2.GenerateRequest(prompt="hello the", max_tokens=2, n=2, request_id="g")
    msg.sampling.seed = 1
    msg.sampling.frequency_penalty = 1.5
    msg.sampling.logit_bias[5] = -3.0
    async with grpc.aio.insecure_channel(st.grpc_address) as ch:
        chunks = [c async for c in gateway_pb2_grpc.GatewayServiceStub(ch).Generate(msg)]
    finals = sorted(c.index for c in chunks if c.finish_reason)
    assert finals == [0, 1] and all(c.request_id == "g" for c in chunks)
    subs = {s.request_id: s for s in st.fake.submits[-2:]}
    assert set(subs) == {"g-0", "g-1"} and {s.sampling.seed for s in subs.values()} == {1, 2}
    assert all(s.sampling.frequency_penalty == 1.5 and dict(s.sampling.logit_bias) == {5: -3.0}
               for s in subs.values())
