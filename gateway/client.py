"""A small Python client for the gateway's gRPC API, async and sync.

    async with GatewayClient("127.0.0.1:50051") as c:
        async for d in c.stream("Once upon a time", max_tokens=32):
            print(d.text, end="", flush=True)
        result = await c.generate(messages=[("user", "What is the capital of France?")])

    with SyncGatewayClient("127.0.0.1:50051") as c:
        print(c.generate("Hello").text)

Errors are ``grpc.RpcError`` with the gateway's status (INVALID_ARGUMENT,
UNAUTHENTICATED, RESOURCE_EXHAUSTED with ``retry-after-s``, UNAVAILABLE).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator, Sequence

import grpc

from gateway import codec
from gateway.types import Delta, GenerationInput, Timings
from wire.pb.slai.v1 import gateway_pb2, gateway_pb2_grpc

Messages = Sequence[tuple[str, str]] | Sequence[dict]


@dataclass(slots=True)
class Completion:
    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: Timings | None = None

    def add(self, d: Delta) -> None:
        self.request_id = d.request_id or self.request_id
        self.text += d.text
        self.token_ids.extend(d.token_ids)
        if d.finish_reason is not None:
            self.finish_reason, self.timings = d.finish_reason, d.timings
            self.prompt_tokens, self.completion_tokens = d.prompt_tokens, d.completion_tokens


def build_request(prompt: str | None = None, *, messages: Messages | None = None, max_tokens: int = 0,
                  temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                  ignore_eos: bool = False, stop: Sequence[str] = (), model: str = "",
                  request_id: str = "") -> gateway_pb2.GenerateRequest:
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt and messages")
    turns = None
    if messages is not None:
        turns = tuple((m["role"], m["content"]) if isinstance(m, dict) else (m[0], m[1]) for m in messages)
    return codec.generate_input_to_pb(GenerationInput(
        prompt=prompt, messages=turns, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        seed=seed, ignore_eos=ignore_eos, stop=tuple(stop), model=model, request_id=request_id))


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


class GatewayClient:
    """grpc.aio client; one channel, many concurrent streams."""

    def __init__(self, address: str = "127.0.0.1:50051", api_key: str | None = None,
                 timeout_s: float | None = None, channel: grpc.aio.Channel | None = None) -> None:
        self._channel = channel or grpc.aio.insecure_channel(address)
        self._stub = gateway_pb2_grpc.GatewayServiceStub(self._channel)
        self._metadata = _metadata(api_key)
        self.timeout_s = timeout_s

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def stream(self, prompt: str | None = None, **kw) -> AsyncIterator[Delta]:
        """Deltas as they arrive; cancelling the iteration cancels the request."""
        call = self._stub.Generate(build_request(prompt, **kw), metadata=self._metadata, timeout=self.timeout_s)
        try:
            async for chunk in call:
                yield codec.delta_from_pb(chunk)
        finally:
            call.cancel()

    def stream_raw(self, request: gateway_pb2.GenerateRequest) -> grpc.aio.UnaryStreamCall:
        """The raw call (for load generators that stamp every chunk themselves)."""
        return self._stub.Generate(request, metadata=self._metadata, timeout=self.timeout_s)

    async def generate(self, prompt: str | None = None, **kw) -> Completion:
        out = Completion()
        async for d in self.stream(prompt, **kw):
            out.add(d)
        return out

    async def abort(self, request_id: str) -> bool:
        resp = await self._stub.Abort(gateway_pb2.GatewayAbortRequest(request_id=request_id),
                                      metadata=self._metadata, timeout=5.0)
        return resp.found


class SyncGatewayClient:
    """Blocking client on a plain grpc channel."""

    def __init__(self, address: str = "127.0.0.1:50051", api_key: str | None = None,
                 timeout_s: float | None = None) -> None:
        self._channel = grpc.insecure_channel(address)
        self._stub = gateway_pb2_grpc.GatewayServiceStub(self._channel)
        self._metadata = _metadata(api_key)
        self.timeout_s = timeout_s

    def __enter__(self) -> SyncGatewayClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def stream(self, prompt: str | None = None, **kw) -> Iterator[Delta]:
        call = self._stub.Generate(build_request(prompt, **kw), metadata=self._metadata, timeout=self.timeout_s)
        try:
            for chunk in call:
                yield codec.delta_from_pb(chunk)
        finally:
            call.cancel()

    def generate(self, prompt: str | None = None, **kw) -> Completion:
        out = Completion()
        for d in self.stream(prompt, **kw):
            out.add(d)
        return out

    def abort(self, request_id: str) -> bool:
        return self._stub.Abort(gateway_pb2.GatewayAbortRequest(request_id=request_id),
                                metadata=self._metadata, timeout=5.0).found
