"""The gateway proves itself to a scheduler that requires the service token (in-process, fake scheduler)."""

from __future__ import annotations

import grpc
import httpx
import pytest

from wire.grpc_server import start_server
from wire.pb.slai.v1 import gateway_pb2, gateway_pb2_grpc, scheduler_pb2_grpc

from .conftest import FakeScheduler, start_stack

TOKEN = "gateway-test-service-token-0123456789"


async def _guarded_scheduler(fake: FakeScheduler):
    return await start_server([lambda s: scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(fake, s)],
                              ["slai.v1.SchedulerService"], "127.0.0.1:0", service_token=TOKEN)


async def test_gateway_sends_the_token_on_submit_abort_and_stats(tiny_model_dir):
    fake = FakeScheduler(delay_s=0.01)
    sched = await _guarded_scheduler(fake)
    st, _ = await start_stack(tiny_model_dir, fake=fake, scheduler_address=f"127.0.0.1:{sched.port}",
                              service_token=TOKEN)
    try:
        assert TOKEN not in repr(st.running.service.config)
        async with httpx.AsyncClient(base_url=st.http_base, timeout=10) as http:
            r = await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 3
        async with grpc.aio.insecure_channel(st.grpc_address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            msg = gateway_pb2.GenerateRequest(prompt="hi", max_tokens=200, request_id="to-abort")
            msg.sampling.ignore_eos = True
            call = stub.Generate(msg, timeout=10)
            first = await call.read()
            assert first.request_id == "to-abort"
            assert (await stub.Abort(gateway_pb2.GatewayAbortRequest(request_id="to-abort"), timeout=10)).found
        assert "to-abort" in fake.aborted  # the Abort RPC got through the scheduler's token check
        assert (await st.running.service.stats()).policy == "fake"
        assert len(fake.submits) == 2
    finally:
        await st.running.stop(0.2)
        await sched.stop(0)


async def test_gateway_without_the_token_reports_503_naming_it(tiny_model_dir):
    fake = FakeScheduler()
    sched = await _guarded_scheduler(fake)
    st, _ = await start_stack(tiny_model_dir, fake=fake, scheduler_address=f"127.0.0.1:{sched.port}")
    try:
        async with httpx.AsyncClient(base_url=st.http_base, timeout=10) as http:
            r = await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
        assert r.status_code == 503, r.text
        assert "SLAI_SERVICE_TOKEN" in r.json()["error"]["message"]
        async with grpc.aio.insecure_channel(st.grpc_address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in gateway_pb2_grpc.GatewayServiceStub(ch).Generate(
                        gateway_pb2.GenerateRequest(prompt="hi", max_tokens=3), timeout=10):
                    pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "service token" in err.value.details()
        assert fake.submits == []  # refused before the servicer
    finally:
        await st.running.stop(0.2)
        await sched.stop(0)
