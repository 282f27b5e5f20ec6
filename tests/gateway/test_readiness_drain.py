"""Readiness follows the scheduler; a drain that runs out of time ends streams with a clear message.

Against the in-process fake scheduler: the gateway's gRPC health and ``/health`` turn NOT_SERVING / 503
while the scheduler is gone or not serving and come back with it; at the drain deadline the gateway ends
the remaining gRPC streams with UNAVAILABLE, SSE streams with an error event and ``[DONE]``, and
non-streamed HTTP requests with a 503.
"""

from __future__ import annotations

import asyncio
import json

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from wire.grpc_server import start_server
from wire.pb.slai.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, scheduler_pb2_grpc

from .conftest import FakeScheduler, start_stack

HANG_GUARD_S = 30.0
GATEWAY_SERVICE = "slai.v1.GatewayService"


async def wait_until(pred, timeout_s: float = HANG_GUARD_S, interval_s: float = 0.05) -> None:
    """Poll an async predicate until it holds (the timeout only guards against a hang)."""
    async def loop():
        while not await pred():
            await asyncio.sleep(interval_s)
    await asyncio.wait_for(loop(), timeout_s)


async def health_status(channel, service: str = "") -> int:
    resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return resp.status


async def both_health(channel) -> set[int]:
    return {await health_status(channel, ""), await health_status(channel, GATEWAY_SERVICE)}


async def serve_fake(fake: FakeScheduler, port: int):
    return await start_server([lambda s: scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(fake, s)],
                              ["slai.v1.SchedulerService"], f"127.0.0.1:{port}")


def long_request(max_tokens: int = 200) -> gateway_pb2.GenerateRequest:
    msg = gateway_pb2.GenerateRequest(prompt="Hello", max_tokens=max_tokens)
    msg.sampling.CopyFrom(common_pb2.SamplingParams(ignore_eos=True))
    return msg


async def test_readiness_follows_the_scheduler_and_requests_fail_fast_while_it_is_down(tiny_model_dir):
    st, sched = await start_stack(tiny_model_dir, health_interval_s=0.1)
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    port = st.scheduler_port
    try:
        async with grpc.aio.insecure_channel(st.grpc_address) as ch, httpx.AsyncClient(timeout=10) as http:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            assert await both_health(ch) == {SERVING}
            assert (await http.get(st.http_base + "/health")).status_code == 200

            # the scheduler goes away: not ready, and requests fail fast with a message
            await sched.stop(0)
            await wait_until(lambda: _eq(both_health(ch), {NOT_SERVING}))
            r = await http.get(st.http_base + "/health")
            assert r.status_code == 503
            body = r.json()
            assert body["status"] == "unavailable"
            assert f"127.0.0.1:{port}" in body["reason"] and "unreachable" in body["reason"], body
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(_collect(stub.Generate(long_request(3))), HANG_GUARD_S)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "scheduler unavailable" in err.value.details()
            r = await asyncio.wait_for(http.post(st.http_base + "/v1/completions",
                                                 json={"prompt": "hi", "max_tokens": 3}), HANG_GUARD_S)
            assert r.status_code == 503 and "scheduler unavailable" in r.json()["error"]["message"]

            # it comes back on the same address: ready again, requests succeed
            sched = await serve_fake(st.fake, port)
            await wait_until(lambda: _eq(both_health(ch), {SERVING}))
            assert (await http.get(st.http_base + "/health")).json()["status"] == "ok"
            chunks = await asyncio.wait_for(_collect(stub.Generate(long_request(3))), HANG_GUARD_S)
            assert chunks[-1].usage.completion_tokens == 3

            # reachable but not serving (e.g. no executor ready) also makes the gateway not ready
            await sched.set_serving(False)
            await wait_until(lambda: _eq(both_health(ch), {NOT_SERVING}))
            r = await http.get(st.http_base + "/health")
            assert r.status_code == 503 and "NOT_SERVING" in r.json()["reason"]
            await sched.set_serving(True)
            await wait_until(lambda: _eq(both_health(ch), {SERVING}))
    finally:
        await st.running.stop(0.2)
        await sched.stop(0)


async def test_drain_deadline_ends_every_kind_of_stream_with_a_clear_message(tiny_model_dir):
    fake = FakeScheduler(delay_s=0.25)  # 200 tokens take 50 s: every request outlives the drain
    st, sched = await start_stack(tiny_model_dir, fake=fake)
    service = st.running.service
    stopped = False
    try:
        async with grpc.aio.insecure_channel(st.grpc_address) as ch, httpx.AsyncClient(timeout=HANG_GUARD_S) as http:
            call = gateway_pb2_grpc.GatewayServiceStub(ch).Generate(long_request())
            await call.read()  # streaming
            sse_lines: list[str] = []
            sse_started = asyncio.Event()

            async def sse() -> None:
                body = {"prompt": "hi", "max_tokens": 200, "ignore_eos": True, "stream": True}
                async with http.stream("POST", st.http_base + "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line:
                            sse_lines.append(line)
                            sse_started.set()

            sse_task = asyncio.ensure_future(sse())
            plain_task = asyncio.ensure_future(http.post(st.http_base + "/v1/completions", json={
                "prompt": "hi", "max_tokens": 200, "ignore_eos": True}))
            await asyncio.wait_for(sse_started.wait(), HANG_GUARD_S)
            await wait_until(lambda: _true(service.num_in_flight == 3))

            stopped = True
            await asyncio.wait_for(st.running.stop(grace_s=0.3), HANG_GUARD_S)

            # gRPC: UNAVAILABLE saying why
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(_read_rest(call), HANG_GUARD_S)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "gateway is shutting down" in err.value.details()
            # SSE: some tokens, then an error event, then [DONE]
            await asyncio.wait_for(sse_task, HANG_GUARD_S)
            assert sse_lines[-1] == "data: [DONE]", sse_lines[-3:]
            error = json.loads(sse_lines[-2].removeprefix("data: "))["error"]
            assert "gateway is shutting down" in error["message"] and error["type"] == "service_unavailable"
            assert any('"text"' in line for line in sse_lines[:-2])
            # non-streamed: a 503 JSON error
            r = await asyncio.wait_for(plain_task, HANG_GUARD_S)
            assert r.status_code == 503
            assert "gateway is shutting down" in r.json()["error"]["message"]
        # the cut requests were cancelled at the scheduler too (their KV is freed)
        await wait_until(lambda: _true(len(fake.cancelled) == 3))
        assert service.num_in_flight == 0
    finally:
        if not stopped:
            await st.running.stop(0)
        await sched.stop(0)


async def _collect(call) -> list:
    return [c async for c in call]


async def _read_rest(call) -> list:
    out = []
    while (msg := await call.read()) is not grpc.aio.EOF:
        out.append(msg)
    return out


async def _eq(awaitable, expected) -> bool:
    try:
        return await awaitable == expected
    except grpc.aio.AioRpcError:
        return False


async def _true(value: bool) -> bool:
    return value
