"""``slai-serve executor --fake`` and ``slai-serve scheduler`` as real processes on unix sockets."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from wire.pb.slai.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.services.helpers import submit_msg, tokens_of

ROOT = Path(__file__).resolve().parents[2]


def spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "slai_serve.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", "SLAI_METRICS_PORT": "0"})


async def wait_serving(address: str, timeout_s: float = 20.0) -> None:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            assert loop.time() < deadline, f"{address} never became SERVING"
            await asyncio.sleep(0.1)


async def test_executor_and_scheduler_processes(tmp_path):
    ex_sock, sch_sock = tmp_path / "ex.sock", tmp_path / "sch.sock"
    ex = spawn("executor", "--fake", "--kv-blocks", "512", "--uds", str(ex_sock))
    sch = None
    try:
        await wait_serving(f"unix:{ex_sock}")
        sch = spawn("scheduler", "--policy", "slai", "--executors", f"unix:{ex_sock}", "--uds", str(sch_sock),
                    "--set", "token_budget=256", "--max-queued-requests", "100")
        await wait_serving(f"unix:{sch_sock}")
        async with grpc.aio.insecure_channel(f"unix:{sch_sock}") as ch:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
            events = [ev async for ev in stub.Submit(submit_msg("cli", 20, 7))]
            assert len(tokens_of(events)) == 7 and events[-1].usage.completion_tokens == 7
            stats = await stub.Stats(scheduler_pb2.StatsRequest())
            assert stats.policy == "slai" and stats.executors[0].num_blocks == 512
    finally:
        for p in (sch, ex):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (sch, ex):
            if p is not None:
                try:
                    out, _ = p.communicate(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    out, _ = p.communicate()
                assert p.returncode == 0, out


def test_scheduler_rejects_a_negative_pipeline_lead_with_the_flag_name():
    p = spawn("scheduler", "--executors", "127.0.0.1:1", "--port", "0", "--pipeline-lead-ms", "-1")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 2
    assert "--pipeline-lead-ms must be >= 0, got -1" in out
