"""The gateway's transport limits: body size, read deadlines, connection limit, early admission.

Raw sockets stand in for misbehaving clients (half-open, trickling, oversized);
httpx, the openai-style SSE stream and gRPC for well-behaved ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import statistics
import threading
import time

import grpc
import httpx
import pytest

from gateway.tokenizer import LONG_TEXT_CHARS
from wire.pb.slai.v1 import gateway_pb2, gateway_pb2_grpc

from .conftest import start_stack

GUARD_S = 30.0  # only guards against a hang


@contextlib.asynccontextmanager
async def running_stack(model_dir, delay_s: float = 0.0, **config):
    st, sched = await start_stack(model_dir, **config)
    st.fake.reply_ids = st.tokenizer.encode("Hello there.", add_special_tokens=False)
    st.fake.delay_s = delay_s
    try:
        yield st
    finally:
        await st.running.stop(0.2)
        await sched.stop(0)


async def wait_until(predicate, timeout: float = GUARD_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body."""
    status = int((await reader.readline()).split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    return status, headers, body


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes (a reset counts as closed)."""
    data = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            data += chunk
    return data


def post_head(path: str, extra: str) -> bytes:
    return f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{extra}\r\n".encode()


class TimedStream:
    """A streamed completion in the background; records when each SSE event arrived."""

    def __init__(self, base: str, max_tokens: int) -> None:
        self.times: list[float] = []
        self.finish: str | None = None
        self.task = asyncio.ensure_future(self._run(base, max_tokens))

    async def _run(self, base: str, max_tokens: int) -> None:
        body = {"prompt": "Hi", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
        async with httpx.AsyncClient(base_url=base, timeout=GUARD_S) as http:
            async with http.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        self.times.append(time.monotonic())
                        choice = json.loads(line[6:])["choices"][0]
                        self.finish = choice["finish_reason"] or self.finish

    def gaps_between(self, start: float, end: float) -> list[float]:
        t = self.times
        return [b - a for a, b in zip(t, t[1:]) if b >= start and a <= end]


# ---------------------------------------------------------------- body size
async def test_oversized_bodies_get_413_at_once_while_a_stream_flows(tiny_model_dir):
    limit = 64 << 10
    async with running_stack(tiny_model_dir, delay_s=0.01, max_body_bytes=limit) as st:
        stream = TimedStream(st.http_base, max_tokens=200)  # about 2 s: it runs through what follows
        await wait_until(lambda: len(stream.times) >= 15)
        usual = statistics.median(b - a for a, b in zip(stream.times, stream.times[1:]))
        t0 = time.monotonic()

        # Content-Length above the limit: answered from the headers alone (no body byte sent)
        reader, writer = await asyncio.open_connection("127.0.0.1", st.http_port)
        writer.write(post_head("/v1/completions", "content-length: 1000000000\r\n"))
        status, headers, body = await asyncio.wait_for(read_response(reader), GUARD_S)
        err = json.loads(body)["error"]
        assert status == 413 and err["param"] == "body" and "1000000000" in err["message"]
        assert headers["connection"] == "close"
        assert await asyncio.wait_for(read_until_closed(reader), GUARD_S) == b""
        writer.close()

        # chunked: cut off at the limit, without waiting for the end of the body
        reader, writer = await asyncio.open_connection("127.0.0.1", st.http_port)
        writer.write(post_head("/v1/completions", "transfer-encoding: chunked\r\n"))
        chunk = b"x" * (16 << 10)
        for _ in range(limit // len(chunk) + 2):
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))  # no final 0-chunk: the body never ends
        status, _, body = await asyncio.wait_for(read_response(reader), GUARD_S)
        assert status == 413 and json.loads(body)["error"]["param"] == "body"
        writer.close()

        # clients that write the whole body before reading still get the 413 (lingering close)
        async with httpx.AsyncClient(base_url=st.http_base, timeout=GUARD_S) as http:
            r = await http.post("/v1/completions", content=b"x" * (4 << 20))
            assert r.status_code == 413 and r.json()["error"]["param"] == "body"

            async def chunks():
                for _ in range(64):
                    yield b"y" * (64 << 10)

            r = await http.post("/v1/completions", content=chunks())
            assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
            health = await http.get("/health")
            assert health.status_code == 200
            # a body under the limit is served as usual
            r = await http.post("/v1/completions", json={"prompt": "Hi " + "a" * 100, "max_tokens": 3})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        t1 = time.monotonic()

        await asyncio.wait_for(stream.task, GUARD_S)
        assert stream.finish == "length"
        during = stream.gaps_between(t0, t1)
        assert during and max(during) < max(10 * usual, 1.0), (max(during), usual)
        await wait_until(lambda: st.running.service.admission.in_use == 0)  # every slot came back


async def test_grpc_message_over_the_limit_is_resource_exhausted(tiny_model_dir):
    async with running_stack(tiny_model_dir, max_body_bytes=8 << 10) as st:
        async with grpc.aio.insecure_channel(st.grpc_address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(gateway_pb2.GenerateRequest(prompt="x" * (16 << 10))):
                    pass
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in err.value.details()
            chunks = [c async for c in stub.Generate(gateway_pb2.GenerateRequest(prompt="Hi", max_tokens=2))]
            assert chunks[-1].usage.completion_tokens == 2


# ---------------------------------------------------------------- read deadlines
async def test_half_open_and_slow_connections_are_closed_after_their_deadline(tiny_model_dir):
    async with running_stack(tiny_model_dir, header_timeout_s=0.5, body_timeout_s=0.5) as st:
        kinds = ("silent", "partial-headers", "partial-body")
        conns = []
        for i in range(201):
            reader, writer = await asyncio.open_connection("127.0.0.1", st.http_port)
            kind = kinds[i % 3]
            if kind == "partial-headers":
                writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
            elif kind == "partial-body":
                writer.write(post_head("/v1/completions", "content-length: 100\r\n") + b'{"prompt": "Hi')
            conns.append((kind, reader, writer))

        async def trickle(writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while not writer.is_closing():
                    writer.write(b" ")  # one byte every 50 ms: the body deadline is for the whole body
                    await writer.drain()
                    await asyncio.sleep(0.05)

        t_reader, t_writer = await asyncio.open_connection("127.0.0.1", st.http_port)
        t_writer.write(post_head("/v1/completions", "content-length: 100000\r\n"))
        trickler = asyncio.ensure_future(trickle(t_writer))

        # a keep-alive connection whose second request stalls in its headers
        k_reader, k_writer = await asyncio.open_connection("127.0.0.1", st.http_port)
        k_writer.write(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        assert (await asyncio.wait_for(read_response(k_reader), GUARD_S))[0] == 200
        k_writer.write(b"GET /hea")

        async with httpx.AsyncClient(base_url=st.http_base, timeout=GUARD_S) as http:  # meanwhile, served
            r = await http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 200

        results = await asyncio.wait_for(asyncio.gather(*(read_until_closed(r) for _, r, _ in conns)), GUARD_S)
        for (kind, _, writer), data in zip(conns, results):
            if kind == "silent":
                assert data == b""  # nothing asked, nothing answered
            else:
                assert data.startswith(b"HTTP/1.1 408 "), (kind, data[:80])
                assert b'"type": "request_timeout"' in data
            writer.close()
        assert (await asyncio.wait_for(read_until_closed(t_reader), GUARD_S)).startswith(b"HTTP/1.1 408 ")
        assert (await asyncio.wait_for(read_until_closed(k_reader), GUARD_S)).startswith(b"HTTP/1.1 408 ")
        t_writer.close()
        k_writer.close()
        await asyncio.wait_for(trickler, GUARD_S)
        await wait_until(lambda: st.running.service.admission.in_use == 0)


async def test_connections_beyond_the_limit_get_503_and_are_closed(tiny_model_dir):
    async with running_stack(tiny_model_dir, max_connections=16) as st:
        idle = [await asyncio.open_connection("127.0.0.1", st.http_port) for _ in range(16)]
        reader, writer = await asyncio.open_connection("127.0.0.1", st.http_port)
        writer.write(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        status, headers, body = await asyncio.wait_for(read_response(reader), GUARD_S)
        assert status == 503 and headers["connection"] == "close"
        assert "connection limit" in json.loads(body)["error"]["message"]
        assert await asyncio.wait_for(read_until_closed(reader), GUARD_S) == b""
        writer.close()
        for _, w in idle[:4]:
            w.close()

        async def health() -> int:
            async with httpx.AsyncClient(base_url=st.http_base, timeout=GUARD_S) as http:
                return (await http.get("/health")).status_code

        deadline = time.monotonic() + GUARD_S
        while (code := await health()) != 200:  # room again once the server saw the closes
            assert code == 503 and time.monotonic() < deadline
            await asyncio.sleep(0.05)
        for _, w in idle[4:]:
            w.close()


# ---------------------------------------------------------------- admission
def rejected_count(service) -> float:
    from telemetry import names
    return service.metrics.registry.get_sample_value(
        names.M_GATEWAY_REQUESTS + "_total", {names.L_TIER: "paying", names.L_OUTCOME: "rejected"}) or 0.0


class TokenizerSpy:
    """Counts the tokenizer's encode calls and the threads they ran on."""

    def __init__(self, monkeypatch, tokenizer) -> None:
        self.threads: list[str] = []
        encode = tokenizer.encode

        def spy(*args, **kwargs):
            self.threads.append(threading.current_thread().name)
            return encode(*args, **kwargs)

        monkeypatch.setattr(tokenizer, "encode", spy)

    @property
    def calls(self) -> int:
        return len(self.threads)


async def test_full_gateway_answers_429_before_reading_or_tokenizing(tiny_model_dir, monkeypatch):
    async with running_stack(tiny_model_dir, delay_s=0.02, max_concurrent_requests=2) as st:
        service = st.running.service
        streams = [TimedStream(st.http_base, max_tokens=200) for _ in range(2)]
        await wait_until(lambda: all(s.times for s in streams))
        spy = TokenizerSpy(monkeypatch, service.tokenizer)
        async with httpx.AsyncClient(base_url=st.http_base, timeout=GUARD_S) as http:
            for path, body in (("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
                               ("/v1/completions", {"prompt": "Hi", "stream": True}),
                               ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})):
                r = await http.post(path, json=body)
                assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
                assert r.json()["error"]["type"] == "rate_limit_error"
            # not even parsed: a body that is not JSON gets the 429 too
            r = await http.post("/v1/completions", content=b"{not json")
            assert r.status_code == 429
            assert (await http.get("/health")).status_code == 200
        async with grpc.aio.insecure_channel(st.grpc_address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                stub = gateway_pb2_grpc.GatewayServiceStub(ch)
                async for _ in stub.Generate(gateway_pb2.GenerateRequest(prompt="Hi")):
                    pass
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert spy.calls == 0
        assert rejected_count(service) == 5
        for s in streams:
            s.task.cancel()
        await asyncio.gather(*(s.task for s in streams), return_exceptions=True)
        await wait_until(lambda: service.admission.in_use == 0)
        async with httpx.AsyncClient(base_url=st.http_base, timeout=GUARD_S) as http:
            r = await http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 200 and spy.calls == 1


async def test_a_request_still_sending_its_body_holds_its_slot(tiny_model_dir):
    async with running_stack(tiny_model_dir, max_concurrent_requests=1) as st:
        body = json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", st.http_port)
        writer.write(post_head("/v1/completions", f"content-length: {len(body)}\r\n") + body[:5])
        async with httpx.AsyncClient(base_url=st.http_base, timeout=GUARD_S) as http:
            deadline = time.monotonic() + GUARD_S
            while (r := await http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})).status_code != 429:
                assert time.monotonic() < deadline  # 200 until the server has read the slow request's headers
            writer.write(body[5:])
            status, _, answer = await asyncio.wait_for(read_response(reader), GUARD_S)
            assert status == 200 and json.loads(answer)["usage"]["completion_tokens"] == 2
            r = await http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 200
        writer.close()


async def test_admission_gate_holds_one_slot_per_request():
    from gateway.admission import Admission, current_slot
    from gateway.auth import open_store
    from gateway.http_guard import AdmissionGate

    admission = Admission(1)
    seen = []

    async def app(scope, receive, send):
        seen.append((current_slot() is not None, admission.in_use))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    gate = AdmissionGate(app, admission, open_store())
    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    await gate(scope, None, send)
    assert seen == [(True, 1)] and admission.in_use == 0 and sent[0]["status"] == 200
    held = admission.acquire()
    sent.clear()
    await gate(scope, None, send)
    assert sent[0]["status"] == 429 and len(seen) == 1  # the app never ran
    held.release()
    await gate({**scope, "method": "GET", "path": "/health"}, None, send)  # not a generation: no slot
    assert seen[-1] == (False, 0)


# ---------------------------------------------------------------- prompt size and tokenizing
async def test_prompt_too_long_for_the_model_is_400_without_tokenizing(tiny_model_dir, monkeypatch):
    async with running_stack(tiny_model_dir) as st:
        service = st.running.service
        spy = TokenizerSpy(monkeypatch, service.tokenizer)
        too_long = "x" * (service.max_prompt_chars + 1)
        async with httpx.AsyncClient(base_url=st.http_base, timeout=GUARD_S) as http:
            r = await http.post("/v1/completions", json={"prompt": too_long})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
            assert "characters" in r.json()["error"]["message"]
            half = too_long[: len(too_long) // 2 + 1]
            r = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": half}] * 2})
            assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
            r = await http.post("/v1/completions", json={"prompt": [5] * service.max_model_len})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
            assert spy.calls == 0
            # a long prompt within the bound is tokenized on a worker thread, a short one inline
            long_prompt = "the " * 300
            assert LONG_TEXT_CHARS < len(long_prompt) <= service.max_prompt_chars
            r = await http.post("/v1/completions", json={"prompt": long_prompt})
            assert r.status_code == 400 and "tokens" in r.json()["error"]["message"]
            r = await http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 200
        assert spy.threads[0].startswith("gateway-prepare") and spy.threads[1] == threading.main_thread().name
        async with grpc.aio.insecure_channel(st.grpc_address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in gateway_pb2_grpc.GatewayServiceStub(ch).Generate(
                        gateway_pb2.GenerateRequest(prompt=too_long)):
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("prompt:")
        assert spy.calls == 2
        await wait_until(lambda: service.admission.in_use == 0)


# ---------------------------------------------------------------- socket options and flags
async def test_http_connections_have_nodelay():
    """A response's second write must not wait for the client's delayed ACK (+40 ms per request)."""
    from gateway.server import _bind_socket

    sock = _bind_socket("127.0.0.1", 0)
    seen: list[int] = []

    class Probe(asyncio.Protocol):
        def connection_made(self, transport):
            seen.append(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        await wait_until(lambda: seen)
        writer.close()
        assert seen[0] != 0
    finally:
        server.close()


def test_transport_flags(capsys):
    import argparse

    from gateway.__main__ import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args([]))
    assert (config.max_body_bytes, config.header_timeout_s, config.body_timeout_s, config.max_connections) == (
        4 << 20, 10.0, 30.0, 2048)
    config = config_from_args(parser.parse_args(["--max-body-bytes", "65536", "--header-timeout", "2.5",
                                                 "--body-timeout", "7", "--max-connections", "10"]))
    assert (config.max_body_bytes, config.header_timeout_s, config.body_timeout_s, config.max_connections) == (
        65536, 2.5, 7.0, 10)
    assert config_from_args(parser.parse_args([])).keep_alive_timeout_s == 30.0  # above httpx's own 5 s
    assert config_from_args(parser.parse_args(["--keep-alive-timeout", "3"])).keep_alive_timeout_s == 3.0
    for flag, value in (("--max-body-bytes", "12"), ("--header-timeout", "0"), ("--max-connections", "x"),
                        ("--keep-alive-timeout", "0")):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([flag, value])
        assert exc.value.code == 2 and flag in capsys.readouterr().err
