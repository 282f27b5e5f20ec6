"""Pools through real processes: 2 gateways x 2 pools x 2 fake executors (``slai-serve up --pools 2``).

One pool's scheduler is killed (SIGKILL) while every request streams; the gateways take that pool
out of rotation and continue its requests on the other pool with the tokens already streamed as
prompt, so each request still ends with exactly its ``max_tokens`` tokens (docs/gateway.md, "Pools").
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest

from contract.model_files import default_model_dir
from slai_serve.launch import LocalStack

pytestmark = pytest.mark.slow

HAVE_SERVICES = all(importlib.util.find_spec(m) is not None
                    for m in ("scheduler_svc.server", "executor_svc.server"))
MODEL_DIR = default_model_dir()
NUM_REQUESTS = 24
MAX_TOKENS = 120


@pytest.mark.skipif(not HAVE_SERVICES, reason="scheduler/executor services not in this build")
@pytest.mark.skipif(not (MODEL_DIR / "tokenizer.json").is_file(), reason="no tokenizer for the gateway")
def test_two_gateways_two_pools_survive_a_scheduler_kill():
    from gateway.client import GatewayClient

    stack = LocalStack(fake=True, num_pools=2, num_executors=2, num_gateways=2, gateway_grpc_port=0, http_port=-1,
                       scheduler_port=0, executor_port=0, metrics_port=-1, log_dir="", drain_timeout_s=2.0,
                       startup_timeout_s=180.0, model_dir=str(MODEL_DIR),
                       executor_args=["--fake-cost", "paper"])  # steps take tens of ms: requests run for seconds

    async def go() -> list:
        streamed = [0] * NUM_REQUESTS
        killed = asyncio.Event()

        async def one(i: int, client) -> tuple[str, list[int]]:
            ids, reason = [], None
            async for piece in client.stream(prompt=f"request {i}:" + " the" * (4 + i), max_tokens=MAX_TOKENS,
                                             ignore_eos=True):
                ids.extend(piece.token_ids)
                streamed[i] = len(ids)
                reason = piece.finish_reason or reason
            return reason, ids

        async def killer() -> None:
            # kill pool 1's scheduler once every request has tokens (so some are mid-stream on it)
            while min(streamed) < 5:
                await asyncio.sleep(0.02)
            victim = next(p for p in stack.procs if p.name == "pool1-scheduler")
            victim.popen.kill()
            killed.set()

        async with GatewayClient(stack.gateway_addresses[0], timeout_s=120) as a, \
                GatewayClient(stack.gateway_addresses[1], timeout_s=120) as b:
            kill = asyncio.ensure_future(killer())
            results = await asyncio.gather(*(one(i, a if i % 2 else b) for i in range(NUM_REQUESTS)))
            await asyncio.wait_for(kill, 5)
        assert killed.is_set()
        return results

    with stack:
        results = asyncio.run(go())
        codes = {p.name: p.popen.poll() for p in stack.procs}
        logs = "".join((Path(stack.log_dir) / f"{name}.log").read_text() for name in ("gateway", "gateway-1"))
    assert codes["pool1-scheduler"] is not None  # it really died under load
    assert "continuing on another pool" in logs  # requests really moved mid-stream
    for i, (reason, ids) in enumerate(results):
        assert reason == "length", (i, reason)
        assert len(ids) == MAX_TOKENS, (i, len(ids))
