"""gateway.client (async + sync) and the `slai-serve client` command against the fake stack."""

from __future__ import annotations

import argparse
import asyncio

import grpc
import pytest

from gateway import client_cli
from gateway.client import GatewayClient, SyncGatewayClient

REPLY = "Hello wörld, ça va? 😀 The end."


async def test_async_client_generate_and_stream(stack):
    async with GatewayClient(stack.grpc_address, timeout_s=10) as c:
        res = await c.generate("Hi", max_tokens=100)
        assert res.text == REPLY and res.finish_reason == "stop"
        assert res.completion_tokens == len(res.token_ids)
        res = await c.generate(messages=[{"role": "user", "content": "Hi"}], max_tokens=4, ignore_eos=True, seed=3)
        assert res.finish_reason == "length" and len(res.token_ids) == 4
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c.generate("")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_sync_client_in_a_thread(stack):
    def work():
        with SyncGatewayClient(stack.grpc_address, timeout_s=10) as c:
            return c.generate("Hi", max_tokens=100, stop=["ça"])

    res = await asyncio.to_thread(work)
    assert res.text == "Hello wörld, " and res.finish_reason == "stop"


async def test_client_cli_streams_to_stdout(stack, capsys):
    parser = argparse.ArgumentParser()
    client_cli.add_arguments(parser)
    args = parser.parse_args(["Hi", "--chat", "--max-tokens", "100", "--gateway", stack.grpc_address, "--stats"])
    assert await client_cli._run(args) == 0
    out = capsys.readouterr()
    assert out.out == REPLY + "\n"
    assert "[stop]" in out.err
    args = parser.parse_args(["", "--gateway", stack.grpc_address])
    assert await client_cli._run(args) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


async def test_metrics_endpoint_counts_requests(stack):
    import httpx

    async with GatewayClient(stack.grpc_address, timeout_s=10) as c:
        await c.generate("Hi", max_tokens=2)
    async with httpx.AsyncClient() as http:
        r = await http.get(stack.http_base + "/metrics")
    assert r.status_code == 200
    assert 'slai_gateway_requests_total{outcome="ok",tier="paying"} 1.0' in r.text
