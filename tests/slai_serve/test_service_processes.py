"""``slai-serve executor --fake`` and ``slai-serve scheduler`` as real processes: unix sockets, a service
token from a file and from the environment, listen hosts, and the refusal to listen beyond loopback unguarded."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.scheduler_svc.helpers import submit_msg, tokens_of
from wire.pb.slai.v1 import scheduler_pb2, scheduler_pb2_grpc
from wire.service_auth import SERVICE_TOKEN_ENV, SERVICE_TOKEN_FILE_ENV, call_metadata

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "cli-test-service-token-0123456789"


def spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``slai-serve ARGS`` without any service token of this shell's; ``env`` adds variables."""
    base = {k: v for k, v in os.environ.items() if k not in (SERVICE_TOKEN_ENV, SERVICE_TOKEN_FILE_ENV)}
    return subprocess.Popen([sys.executable, "-m", "slai_serve.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**base, "PYTHONUNBUFFERED": "1", "SLAI_METRICS_PORT": "0", **(env or {})})


def stop(*procs: subprocess.Popen | None, check: bool = True) -> list[str]:
    """SIGTERM each, wait; returns their outputs (with ``check``, each must have exited 0)."""
    outs = []
    for p in procs:
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        if p is not None:
            try:
                out, _ = p.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
            assert p.returncode == 0 or not check, out
            outs.append(out)
    return outs


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
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    # the executor reads the token from a file, the scheduler from its environment
    ex = spawn("executor", "--fake", "--kv-blocks", "512", "--uds", str(ex_sock), "--service-token-file",
               str(token_file))
    sch = None
    try:
        await wait_serving(f"unix:{ex_sock}")
        sch = spawn("scheduler", "--policy", "slai", "--executors", f"unix:{ex_sock}", "--uds", str(sch_sock),
                    "--set", "token_budget=256", "--max-queued-requests", "100", env={SERVICE_TOKEN_ENV: TOKEN})
        await wait_serving(f"unix:{sch_sock}")  # SERVING: its executor stream carried the token
        async with grpc.aio.insecure_channel(f"unix:{sch_sock}") as ch:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                _ = [ev async for ev in stub.Submit(submit_msg("anon", 20, 7))]
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            auth = call_metadata(TOKEN)
            events = [ev async for ev in stub.Submit(submit_msg("cli", 20, 7), metadata=auth)]
            assert len(tokens_of(events)) == 7 and events[-1].usage.completion_tokens == 7
            stats = await stub.Stats(scheduler_pb2.StatsRequest(), metadata=auth)
            assert stats.policy == "slai" and stats.executors[0].num_blocks == 512
    finally:
        stop(sch, ex)


def test_scheduler_rejects_a_negative_pipeline_lead_with_the_flag_name():
    p = spawn("scheduler", "--executors", "127.0.0.1:1", "--port", "0", "--pipeline-lead-ms", "-1")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 2
    assert "--pipeline-lead-ms must be >= 0, got -1" in out


@pytest.mark.parametrize("service", ["scheduler", "executor"])
def test_refuses_to_listen_beyond_loopback_without_a_token(service):
    args = ["--executors", "127.0.0.1:1"] if service == "scheduler" else ["--fake"]
    p = spawn(service, *args, "--host", "0.0.0.0", "--port", "0")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 2, out
    assert f"--host 0.0.0.0 exposes the {service}" in out and SERVICE_TOKEN_ENV in out and "--insecure-no-auth" in out


def _can_bind(host: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


def _plain_ip(ip: str) -> str:
    """gRPC may listen on an IPv6 socket for an IPv4 host: ``::ffff:127.0.0.2`` is 127.0.0.2."""
    mapped = getattr(ipaddress.ip_address(ip), "ipv4_mapped", None)
    return str(mapped) if mapped else ip


def _listening(proc: subprocess.Popen, count: int, timeout_s: float = 60.0) -> set[tuple[str, int]]:
    """The (ip, port) pairs ``proc`` listens on, once there are ``count`` of them."""
    psutil = pytest.importorskip("psutil")
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, proc.communicate()[0]
        p = psutil.Process(proc.pid)
        conns = p.net_connections(kind="inet") if hasattr(p, "net_connections") else p.connections(kind="inet")
        got = {(_plain_ip(c.laddr.ip), c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
        if len(got) >= count:
            return got
        assert time.monotonic() < deadline, f"listening on {got}, expected {count} sockets"
        time.sleep(0.1)


@pytest.mark.skipif(not all(_can_bind(h) for h in ("127.0.0.2", "127.0.0.3")), reason="no 127.0.0.0/8 loopback")
def test_grpc_and_metrics_listen_on_the_configured_hosts():
    # /metrics follows --host unless --metrics-host says otherwise; loopback hosts, so no token is needed
    ex = spawn("executor", "--fake", "--kv-blocks", "64", "--warmup-tokens", "16", "--host", "127.0.0.2",
               "--port", "0")
    sch = spawn("scheduler", "--executors", "127.0.0.1:1", "--host", "127.0.0.2", "--port", "0",
                "--metrics-host", "127.0.0.3")
    try:
        assert {ip for ip, _ in _listening(ex, 2)} == {"127.0.0.2"}  # gRPC and /metrics
        assert sorted(ip for ip, _ in _listening(sch, 2)) == ["127.0.0.2", "127.0.0.3"]
    finally:
        stop(sch, ex, check=False)  # a SIGTERM may land before the signal handlers are installed
