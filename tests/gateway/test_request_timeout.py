"""The gateway's request timeout: a request still running after ``request_timeout_s`` is aborted at the
scheduler (its KV freed) and ends with DEADLINE_EXCEEDED (gRPC) or 504 (HTTP), without harming others."""

from __future__ import annotations

import grpc
import httpx
import pytest

from gateway.__main__ import add_arguments, config_from_args
from wire.pb.slai.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

from .conftest import start_stack

TIMEOUT_S = 0.5


@pytest.fixture
async def slow(tiny_model_dir):
    # one token every 20 ms with ignore_eos: a 250-token request needs 5 s, far past the timeout
    st, sched = await start_stack(tiny_model_dir, request_timeout_s=TIMEOUT_S)
    st.fake.reply_ids = st.tokenizer.encode("Hello there.", add_special_tokens=False)
    st.fake.delay_s = 0.02
    yield st
    await st.running.stop(0.5)
    await sched.stop(0)


def gen_request(rid: str, max_tokens: int) -> gateway_pb2.GenerateRequest:
    msg = gateway_pb2.GenerateRequest(request_id=rid, prompt="hi", max_tokens=max_tokens)
    msg.sampling.CopyFrom(common_pb2.SamplingParams(ignore_eos=True))
    return msg


async def test_grpc_request_past_timeout_ends_deadline_exceeded_and_is_aborted(slow):
    async with grpc.aio.insecure_channel(slow.grpc_address) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        got = 0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for chunk in stub.Generate(gen_request("late", 250)):
                got += len(chunk.token_ids)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "request timeout" in err.value.details() and "late" in err.value.details()
        assert 0 < got < 250  # it streamed until the timeout, then stopped
        await slow.fake.wait_until(lambda: "late" in slow.fake.aborted)  # its KV is freed upstream
        # a short request after it is served normally
        n = 0
        async for chunk in stub.Generate(gen_request("short", 5)):
            n += len(chunk.token_ids)
        assert n == 5


async def test_http_request_past_timeout_gets_504_naming_the_timeout(slow):
    async with httpx.AsyncClient(base_url=slow.http_base, timeout=30) as http:
        r = await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 250, "ignore_eos": True,
                                                     "request_id": "late-http"})
        assert r.status_code == 504
        body = r.json()["error"]
        assert body["type"] == "timeout" and "request timeout" in body["message"]
        await slow.fake.wait_until(lambda: "late-http" in slow.fake.aborted)
        ok = await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "ignore_eos": True})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_request_timeout_flag_reaches_config_and_rejects_nonsense():
    import argparse
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert config_from_args(p.parse_args(["--request-timeout", "12.5"])).request_timeout_s == 12.5
    with pytest.raises(SystemExit):
        p.parse_args(["--request-timeout", "0"])
