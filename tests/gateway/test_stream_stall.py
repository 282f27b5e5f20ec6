"""Clients that stop reading: the gateway buffers a bounded number of tokens, then aborts the request upstream.

The fake scheduler emits large token batches fast; a client that stops reading blocks the gateway's
send (HTTP: see StalledAsgiClient; gRPC: a small HTTP/2 window) within a chunk or two.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import grpc
import httpx
import pytest

from gateway.__main__ import add_arguments, config_from_args
from wire.pb.slai.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

from .conftest import start_stack

BUFFER_TOKENS = 300
STALL_S = 0.5
TOKENS_PER_EVENT = 128
NORMAL_EVENTS = 40
# NOTE: gRPC C-core grows a stream's receive window to megabytes (BDP probing) while the application does
# not read; a small fixed window makes this client's transport full after a chunk or two.
SMALL_WINDOW = (("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0))


@pytest.fixture
async def flood(tiny_model_dir):
    st, sched = await start_stack(tiny_model_dir, stream_buffer_tokens=BUFFER_TOKENS, stream_stall_timeout_s=STALL_S,
                                  max_model_len=10_000_000)
    st.fake.reply_ids = st.tokenizer.encode("Hello wörld, ça va? The quick brown fox.", add_special_tokens=False)
    st.fake.tokens_per_event = TOKENS_PER_EVENT
    st.fake.delay_s = 0.002
    yield st
    await st.running.stop(0.5)
    await sched.stop(0)


async def until(pred, timeout_s: float = 30.0) -> None:
    """Poll ``pred`` (a guard against a hang, not a timing assumption)."""
    async def loop():
        while not pred():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(loop(), timeout_s)


def median_gap(times: list[float]) -> float:
    return statistics.median(b - a for a, b in zip(times, times[1:]))


async def http_stream_times(st, rid: str) -> tuple[list[float], dict]:
    """A normal SSE stream of NORMAL_EVENTS events: arrival times of its chunks, and its last event."""
    times, last = [], None
    async with httpx.AsyncClient(base_url=st.http_base, timeout=30) as http:
        async with http.stream("POST", "/v1/completions", json={
                "prompt": "hi", "max_tokens": NORMAL_EVENTS * TOKENS_PER_EVENT, "stream": True, "ignore_eos": True,
                "request_id": rid, "stream_options": {"include_usage": True}}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    times.append(time.perf_counter())
                    last = json.loads(line[6:])
    return times, last


class StalledAsgiClient:
    """An HTTP client that stops reading, at the level the gateway sees it.

    uvicorn's ``send()`` blocks while the socket's write buffer is full (flow control). Over loopback the
    kernel autotunes that buffer to megabytes, so a real socket would take minutes of tokens to fill;
    here ``send()`` blocks right after the first SSE event instead, until ``resume()``.
    """

    def __init__(self, service, body: dict) -> None:
        from gateway.auth import open_store
        from gateway.http_api import build_app

        raw = json.dumps(body).encode()
        self._request = {"type": "http.request", "body": raw, "more_body": False}
        self._resume = asyncio.Event()
        self.first_event = asyncio.Event()
        self.sent = b""
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"application/json"),
                                              (b"content-length", str(len(raw)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        self.task = asyncio.ensure_future(build_app(service, open_store())(scope, self._receive, self._send))

    async def _receive(self) -> dict:
        if self._request is not None:
            msg, self._request = self._request, None
            return msg
        await asyncio.Event().wait()  # the client neither sends more nor hangs up
        raise AssertionError("unreachable")

    async def _send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200, message
            return
        self.sent += message.get("body", b"")
        if b"data: " in self.sent:
            self.first_event.set()
            await self._resume.wait()

    async def resume(self) -> list[dict]:
        """Read again, to the end: the SSE data events received in all."""
        self._resume.set()
        await asyncio.wait_for(self.task, 30)
        lines = self.sent.decode().split("\n")
        assert lines[-3] == "data: [DONE]", lines[-3:]
        return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


async def test_http_client_that_stops_reading_is_aborted_upstream(flood):
    st = flood
    alone, _ = await http_stream_times(st, "alone")

    stalled = StalledAsgiClient(st.running.service, {
        "prompt": "hi", "max_tokens": 9_000_000, "stream": True, "ignore_eos": True, "request_id": "stalled-http"})
    await asyncio.wait_for(stalled.first_event.wait(), 30)  # then it reads nothing
    normal = asyncio.ensure_future(http_stream_times(st, "beside"))
    await until(lambda: "stalled-http" in st.fake.aborted)  # the gateway's Abort (it also cancels the Submit)
    beside, last = await asyncio.wait_for(normal, 30)
    assert last["usage"]["completion_tokens"] == NORMAL_EVENTS * TOKENS_PER_EVENT
    # generous: this machine is shared; only a gateway that keeps working for the stalled stream breaks it
    assert median_gap(beside) <= 5 * median_gap(alone) + 0.05, (median_gap(beside), median_gap(alone))
    # the stalled request no longer holds a place at the gateway, though its client is still connected
    assert st.running.service.num_in_flight == 0

    events = await stalled.resume()  # if the client reads again: what waited, coalesced, then the abort
    assert events[-1]["choices"][0]["finish_reason"] == "abort"
    # the full buffer (>= BUFFER_TOKENS, more than one event's TOKENS_PER_EVENT) came as one event
    sentences = events[-1]["choices"][0]["text"].count("fox.")
    assert sentences >= BUFFER_TOKENS // len(st.fake.reply_ids) - 1 > TOKENS_PER_EVENT // len(st.fake.reply_ids) + 1


async def test_grpc_client_that_stops_reading_is_aborted_upstream(flood):
    st = flood
    request = gateway_pb2.GenerateRequest(prompt="hi", sampling=common_pb2.SamplingParams(ignore_eos=True))

    async def normal(channel, rid: str) -> tuple[list[float], gateway_pb2.GenerateChunk]:
        msg = gateway_pb2.GenerateRequest()
        msg.CopyFrom(request)
        msg.request_id, msg.max_tokens = rid, NORMAL_EVENTS * TOKENS_PER_EVENT
        times, last = [], None
        async for chunk in gateway_pb2_grpc.GatewayServiceStub(channel).Generate(msg, timeout=30):
            times.append(time.perf_counter())
            last = chunk
        return times, last

    async with grpc.aio.insecure_channel(st.grpc_address) as ch, \
            grpc.aio.insecure_channel(st.grpc_address, options=SMALL_WINDOW) as slow_ch:
        alone, _ = await normal(ch, "alone")
        stalled = gateway_pb2.GenerateRequest()
        stalled.CopyFrom(request)
        stalled.request_id, stalled.max_tokens = "stalled-grpc", 9_000_000
        call = gateway_pb2_grpc.GatewayServiceStub(slow_ch).Generate(stalled, timeout=60)
        first = await call.read()  # then this client reads nothing
        beside_task = asyncio.ensure_future(normal(ch, "beside"))
        await until(lambda: "stalled-grpc" in st.fake.aborted)  # the gateway's Abort (it also cancels the Submit)
        beside, last = await asyncio.wait_for(beside_task, 30)
        assert last.usage.completion_tokens == NORMAL_EVENTS * TOKENS_PER_EVENT
        assert median_gap(beside) <= 5 * median_gap(alone) + 0.05, (median_gap(beside), median_gap(alone))
        assert st.running.service.num_in_flight == 0

        chunks = [first]
        while (chunk := await asyncio.wait_for(call.read(), 30)) is not grpc.aio.EOF:
            chunks.append(chunk)
        assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
        received = sum(len(c.token_ids) for c in chunks)
        assert chunks[-1].usage.completion_tokens == received < stalled.max_tokens
        assert any(len(c.token_ids) > TOKENS_PER_EVENT for c in chunks)  # what waited came coalesced


def test_stall_flags_are_checked_and_named():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--stream-buffer-tokens", "32", "--stream-stall-timeout", "2.5"]))
    assert (config.stream_buffer_tokens, config.stream_stall_timeout_s) == (32, 2.5)
    for flag, value in (("--stream-buffer-tokens", "0"), ("--stream-stall-timeout", "-1"),
                        ("--stream-stall-timeout", "nan")):
        with pytest.raises(ValueError, match=f"^{flag} must be"):
            config_from_args(parser.parse_args([flag, value]))


async def test_token_buffer_bounds_coalesces_and_times_out():
    from gateway.stream_buffer import ABORTED, TokenBuffer

    stalls = []
    buf = TokenBuffer(max_tokens=4, stall_timeout_s=0.05, on_stall=lambda: stalls.append(buf.num_tokens))
    buf.push([1, 2])
    assert not buf.full
    buf.push([3, 4, 5])  # one event may overrun the bound
    assert buf.full and buf.num_tokens == 5
    assert await buf.take() == ([1, 2, 3, 4, 5], None)  # everything at once
    await asyncio.sleep(0.1)
    assert stalls == []  # the take disarmed the stall timer

    buf.push([6, 7, 8, 9])
    buf.push([10])  # the shared stream is never paused: the buffer goes on filling
    await until(lambda: stalls)  # nothing taken for stall_timeout_s with a full buffer: stalled, once
    assert stalls == [5]
    buf.close(ABORTED, [11])
    assert await buf.take() == ([6, 7, 8, 9, 10, 11], ABORTED)
    assert await buf.take() == ([], ABORTED)  # the end stays
    buf.push([12])
    assert await buf.take() == ([], ABORTED)  # nothing is added after the end

    idle = TokenBuffer(max_tokens=1, stall_timeout_s=0.0, on_stall=lambda: stalls.append("never"))
    idle.push([1, 2])
    await asyncio.sleep(0.05)
    assert stalls == [5]  # stall_timeout_s 0: never aborted
