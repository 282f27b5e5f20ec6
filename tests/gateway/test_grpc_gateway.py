"""GatewayService over gRPC against an in-process fake scheduler."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.auth import parse_key_data
from gateway.tokenizer import REPLACEMENT_CHAR
from wire.pb.slai.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

from .conftest import EOS_ID, MAX_MODEL_LEN, start_stack

REPLY = "Hello wörld, ça va? 😀 The end."


def req(prompt="Hello", **kw) -> gateway_pb2.GenerateRequest:
    sampling = kw.pop("sampling", None)
    msg = gateway_pb2.GenerateRequest(prompt=prompt, **kw)
    if sampling:
        msg.sampling.CopyFrom(sampling)
    return msg


async def collect(channel, request, metadata=None):
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    return [c async for c in stub.Generate(request, metadata=metadata, timeout=10)]


async def test_stream_text_tokens_and_final_chunk(stack, gw_channel):
    chunks = await collect(gw_channel, req("Hi there", max_tokens=100))
    text = "".join(c.text for c in chunks)
    assert text == REPLY
    assert all(REPLACEMENT_CHAR not in c.text for c in chunks)
    assert len(chunks) > 5  # streamed, not one blob
    last = chunks[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP
    ids = [t for c in chunks for t in c.token_ids]
    assert ids == stack.fake.reply_ids + [EOS_ID]
    assert last.usage.completion_tokens == len(ids)
    assert last.usage.prompt_tokens == len(stack.tokenizer.encode("Hi there"))
    assert last.timings.ttft_s > 0 and last.timings.e2e_s > 0
    assert len({c.request_id for c in chunks}) == 1
    sub = stack.fake.submits[-1]
    assert list(sub.sampling.stop_token_ids) == [EOS_ID]
    assert sub.sampling.temperature == 0 and sub.max_tokens == 100


async def test_max_tokens_length_and_ignore_eos(stack, gw_channel):
    sampling = common_pb2.SamplingParams(ignore_eos=True, temperature=0.7, top_p=0.9, top_k=20, seed=7)
    chunks = await collect(gw_channel, req(max_tokens=60, sampling=sampling))
    assert sum(len(c.token_ids) for c in chunks) == 60
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert chunks[-1].usage.completion_tokens == 60
    s = stack.fake.submits[-1].sampling
    assert s.ignore_eos and s.top_k == 20 and s.seed == 7 and abs(s.top_p - 0.9) < 1e-6


async def test_stop_string_cuts_output_and_aborts_scheduler(stack, gw_channel):
    stack.fake.delay_s = 0.002
    sampling = common_pb2.SamplingParams(ignore_eos=True)
    chunks = await collect(gw_channel, req(max_tokens=200, stop=["ça"], sampling=sampling))
    assert "".join(c.text for c in chunks) == "Hello wörld, "
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    n = chunks[-1].usage.completion_tokens
    assert n == sum(len(c.token_ids) for c in chunks) < 200
    rid = chunks[-1].request_id
    await stack.fake.wait_until(lambda: rid in stack.fake.cancelled and rid in stack.fake.aborted)


async def test_chat_applies_template(stack, gw_channel):
    msg = gateway_pb2.GenerateRequest(max_tokens=8)
    msg.chat.messages.add(role="user", content="Hi")
    chunks = await collect(gw_channel, msg)
    sent = list(stack.fake.submits[-1].prompt_token_ids)
    assert sent == stack.tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
    assert chunks[-1].usage.completion_tokens == 8


async def test_client_cancel_aborts_in_scheduler(stack, gw_channel):
    stack.fake.delay_s = 0.01
    stub = gateway_pb2_grpc.GatewayServiceStub(gw_channel)
    call = stub.Generate(req(max_tokens=200, request_id="cancel-me",
                             sampling=common_pb2.SamplingParams(ignore_eos=True)))
    got = 0
    async for _ in call:
        got += 1
        if got == 3:
            break
    call.cancel()
    await stack.fake.wait_until(lambda: "cancel-me" in stack.fake.cancelled)
    assert stack.running.service.num_in_flight == 0


async def test_gateway_abort_rpc(stack, gw_channel):
    stack.fake.delay_s = 0.01
    stub = gateway_pb2_grpc.GatewayServiceStub(gw_channel)
    call = stub.Generate(req(max_tokens=200, request_id="r-abort", sampling=common_pb2.SamplingParams(ignore_eos=True)))
    first = await call.read()
    assert first.request_id == "r-abort"
    resp = await stub.Abort(gateway_pb2.GatewayAbortRequest(request_id="r-abort"))
    assert resp.found
    rest = []
    while (c := await call.read()) is not grpc.aio.EOF:
        rest.append(c)
    assert rest[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
    assert "r-abort" in stack.fake.aborted


BAD = [
    (req(""), "prompt"),
    (req("x" * (MAX_MODEL_LEN * 4)), "prompt"),
    (req(max_tokens=MAX_MODEL_LEN + 1), "max_tokens"),
    (req(model="gpt-9"), "model"),
    (req(sampling=common_pb2.SamplingParams(temperature=-1)), "temperature"),
    (req(sampling=common_pb2.SamplingParams(top_p=1.5)), "top_p"),
    (req(stop=[""]), "stop"),
    (gateway_pb2.GenerateRequest(chat=gateway_pb2.ChatMessages()), "messages"),
    (gateway_pb2.GenerateRequest(chat=gateway_pb2.ChatMessages(
        messages=[gateway_pb2.ChatMessage(role="wizard", content="x")])), "role"),
    (gateway_pb2.GenerateRequest(chat=gateway_pb2.ChatMessages(
        messages=[gateway_pb2.ChatMessage(role="user", content="x" * (MAX_MODEL_LEN * 4))])), "messages"),
    (req(sampling=common_pb2.SamplingParams(temperature=float("nan"))), "temperature"),
]


async def test_bad_inputs_are_invalid_argument_and_others_keep_working(stack, gw_channel):
    stack.fake.delay_s = 0.005
    stub = gateway_pb2_grpc.GatewayServiceStub(gw_channel)
    long_call = stub.Generate(req(max_tokens=100, sampling=common_pb2.SamplingParams(ignore_eos=True)))
    long_task = asyncio.ensure_future(_drain(long_call))
    for bad, field in BAD:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(gw_channel, bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value.details())
        assert field in err.value.details()
    chunks = await long_task
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert sum(len(c.token_ids) for c in chunks) == 100


async def _drain(call):
    out = []
    while (c := await call.read()) is not grpc.aio.EOF:
        out.append(c)
    return out


async def test_scheduler_full_is_resource_exhausted_with_retry_after(stack, gw_channel):
    stack.fake.reject_retry_after_s = 2.5
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(gw_channel, req())
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(err.value.trailing_metadata())["retry-after-s"] == "2.500"
    stack.fake.reject_retry_after_s = None
    assert (await collect(gw_channel, req(max_tokens=3)))[-1].usage.completion_tokens == 3


async def test_gateway_concurrency_limit(tiny_model_dir):
    st, sched = await start_stack(tiny_model_dir, max_concurrent_requests=1)
    st.fake.delay_s = 0.02
    try:
        async with grpc.aio.insecure_channel(st.grpc_address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            call = stub.Generate(req(max_tokens=20, sampling=common_pb2.SamplingParams(ignore_eos=True)))
            await call.read()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(ch, req())
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await _drain(call)
    finally:
        await st.running.stop(0.2)
        await sched.stop(0)


async def test_scheduler_down_is_unavailable_fast(tiny_model_dir):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"127.0.0.1:{s.getsockname()[1]}"
    s.close()  # nothing listens there
    st, _ = await start_stack(tiny_model_dir, scheduler_address=dead)
    try:
        async with grpc.aio.insecure_channel(st.grpc_address) as ch:
            for _ in range(3):
                t0 = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await collect(ch, req())
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() - t0 < 3.0
    finally:
        await st.running.stop(0.2)


KEYS = {"keys": {"k-pay": "paying", "k-free": "free"}, "tiers": {"free": {"tbt_slo_s": 0.4, "ttft_slo_s": 2.0}}}


async def test_tiers_come_from_the_key_only(tiny_model_dir):
    st, sched = await start_stack(tiny_model_dir, keys=parse_key_data(KEYS))
    try:
        async with grpc.aio.insecure_channel(st.grpc_address) as ch:
            await collect(ch, req(max_tokens=2), metadata=(("authorization", "Bearer k-pay"),))
            sub = st.fake.submits[-1]
            assert sub.tier == common_pb2.TIER_PAYING and abs(sub.tbt_slo_s - 0.1) < 1e-6
            await collect(ch, req(max_tokens=2), metadata=(("authorization", "Bearer k-free"),))
            sub = st.fake.submits[-1]
            assert sub.tier == common_pb2.TIER_FREE and abs(sub.tbt_slo_s - 0.4) < 1e-6
            assert abs(sub.ttft_slo_s - 2.0) < 1e-6
            for md in ((("authorization", "Bearer nope"),), None):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await collect(ch, req(), metadata=md)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert len(st.fake.submits) == 2
    finally:
        await st.running.stop(0.2)
        await sched.stop(0)


async def test_no_key_file_everyone_gets_default_tier(stack, gw_channel):
    await collect(gw_channel, req(max_tokens=1), metadata=(("authorization", "Bearer whatever"),))
    assert stack.fake.submits[-1].tier == common_pb2.TIER_PAYING


async def test_health_and_reflection(stack, gw_channel):
    health = health_pb2_grpc.HealthStub(gw_channel)
    resp = await health.Check(health_pb2.HealthCheckRequest(service="slai.v1.GatewayService"))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_many_concurrent_streams(stack, gw_channel):
    sampling = common_pb2.SamplingParams(ignore_eos=True)
    results = await asyncio.gather(*(collect(gw_channel, req(max_tokens=20 + i, sampling=sampling))
                                     for i in range(32)))
    for i, chunks in enumerate(results):
        assert sum(len(c.token_ids) for c in chunks) == 20 + i
        assert chunks[-1].usage.completion_tokens == 20 + i


async def test_drain_lets_in_flight_streams_finish(tiny_model_dir):
    st, sched = await start_stack(tiny_model_dir)
    st.fake.delay_s = 0.01
    try:
        async with grpc.aio.insecure_channel(st.grpc_address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            call = stub.Generate(req(max_tokens=40, sampling=common_pb2.SamplingParams(ignore_eos=True)))
            await call.read()
            stopping = asyncio.ensure_future(st.running.stop(grace_s=5.0))

            async def refused() -> None:  # no new calls once draining has begun
                while True:
                    try:
                        await collect(ch, req(max_tokens=1))
                    except grpc.aio.AioRpcError:
                        return
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(refused(), 30)
            rest = await _drain(call)
            assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert rest[-1].usage.completion_tokens == 40
            await stopping
    finally:
        await sched.stop(0)
