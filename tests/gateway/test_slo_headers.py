"""llm-d's SLO headers (x-llm-d-slo-ttft-ms / -tpot-ms) loosen a request's objectives, never tighten them.

Checked where it matters, in the SubmitRequest the scheduler receives, over HTTP and gRPC.
"""

from __future__ import annotations

import grpc
import httpx
import pytest

from gateway.auth import parse_key_data
from gateway.slo_headers import TPOT_HEADER, TTFT_HEADER
from wire.pb.slai.v1 import gateway_pb2, gateway_pb2_grpc

from .conftest import start_stack

# paying: 100 ms TBT, 1 s TTFT; free: 500 ms TBT, TTFT left to the scheduler (0)
KEYS = {"keys": {"sk-pay": "paying", "sk-free": "free"},
        "tiers": {"paying": {"tbt_slo_s": 0.1, "ttft_slo_s": 1.0}, "free": {"tbt_slo_s": 0.5}}}


@pytest.fixture
async def keyed(tiny_model_dir):
    st, sched = await start_stack(tiny_model_dir, keys=parse_key_data(KEYS))
    yield st
    await st.running.stop(0.2)
    await sched.stop(0)


async def post(st, key: str, headers: dict) -> httpx.Response:
    async with httpx.AsyncClient(base_url=st.http_base, timeout=10) as http:
        return await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                               headers={"authorization": f"Bearer {key}", **headers})


@pytest.mark.parametrize("key, headers, tbt, ttft", [
    ("sk-pay", {}, 0.1, 1.0),  # no header: the tier's objectives
    ("sk-pay", {TPOT_HEADER: "250", TTFT_HEADER: "3000"}, 0.25, 3.0),  # looser: taken
    ("sk-pay", {TPOT_HEADER: "20", TTFT_HEADER: "100"}, 0.1, 1.0),  # tighter: capped at the tier's
    ("sk-pay", {TPOT_HEADER: "100.5"}, 0.1005, 1.0),  # one of the two, fractional ms
    ("sk-free", {TPOT_HEADER: "50"}, 0.5, 0.0),  # a free key cannot buy the paying TBT
    ("sk-free", {TPOT_HEADER: "800", TTFT_HEADER: "10"}, 0.8, 0.0),  # TTFT 0 = scheduler's: left alone
])
async def test_http_headers_loosen_but_never_tighten(keyed, key, headers, tbt, ttft):
    r = await post(keyed, key, headers)
    assert r.status_code == 200, r.text
    sub = keyed.fake.submits[-1]
    assert sub.tbt_slo_s == pytest.approx(tbt) and sub.ttft_slo_s == pytest.approx(ttft)


@pytest.mark.parametrize("header, value", [
    (TTFT_HEADER, "fast"), (TPOT_HEADER, "-5"), (TPOT_HEADER, "0"), (TTFT_HEADER, "nan"), (TTFT_HEADER, "inf"),
    (TPOT_HEADER, ""), (TTFT_HEADER, "1e999"), (TPOT_HEADER, "12ms"),
])
async def test_http_garbage_is_400_naming_the_header(keyed, header, value):
    r = await post(keyed, "sk-pay", {header: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == header and header in err["message"]
    assert not keyed.fake.submits  # rejected before anything reached the scheduler


async def test_http_repeated_header_with_different_values_is_400(keyed):
    async with httpx.AsyncClient(base_url=keyed.http_base, timeout=10) as http:
        r = await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                            headers=[("authorization", "Bearer sk-pay"), (TPOT_HEADER, "200"), (TPOT_HEADER, "300")])
    assert r.status_code == 400 and TPOT_HEADER in r.json()["error"]["message"]


async def test_streamed_request_gets_them_too(keyed):
    async with httpx.AsyncClient(base_url=keyed.http_base, timeout=10) as http:
        r = await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True},
                            headers={"authorization": "Bearer sk-pay", TTFT_HEADER: "5000"})
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        assert keyed.fake.submits[-1].ttft_slo_s == pytest.approx(5.0)
        r = await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True},
                            headers={"authorization": "Bearer sk-pay", TTFT_HEADER: "soon"})
        assert r.status_code == 400 and r.json()["error"]["param"] == TTFT_HEADER


async def test_grpc_metadata_loosens_and_garbage_is_invalid_argument(keyed):
    async with grpc.aio.insecure_channel(keyed.grpc_address) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        req = gateway_pb2.GenerateRequest(prompt="hi", max_tokens=2)
        chunks = [c async for c in stub.Generate(req, metadata=(("authorization", "Bearer sk-pay"),
                                                                 (TPOT_HEADER, "300"), (TTFT_HEADER, "50")))]
        assert chunks
        sub = keyed.fake.submits[-1]
        assert sub.tbt_slo_s == pytest.approx(0.3) and sub.ttft_slo_s == pytest.approx(1.0)  # TTFT not tightened
        with pytest.raises(grpc.aio.AioRpcError) as err:
            _ = [c async for c in stub.Generate(req, metadata=(("authorization", "Bearer sk-pay"),
                                                                (TTFT_HEADER, "whenever")))]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert TTFT_HEADER in err.value.details()
