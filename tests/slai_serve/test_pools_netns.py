"""Pools across hosts, emulated with network namespaces: each pool and the gateway in its own namespace.

Topology (needs root and ``ip netns``; skipped with the reason otherwise): a bridge in this namespace,
one veth pair per namespace. Pool *k*'s namespace runs its two fake executors on its own loopback and
its scheduler on its bridge address; the gateway's namespace reaches both pools by address. Mid-load,
pool 1's namespace is torn down: its link is deleted first (the host vanishes: no FIN, no RST, so
only keepalive notices), then its processes and the namespace. Every request still ends with exactly
its ``max_tokens`` tokens, continued on pool 0 (docs/gateway.md, "Pools").
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from contract.model_files import default_model_dir
from slai_serve.health import wait_healthy

pytestmark = pytest.mark.slow

MODEL_DIR = default_model_dir()
ROOT = Path(__file__).resolve().parents[2]
TOKEN = "netns-test-service-token-0123456789"
NUM_REQUESTS = 16
MAX_TOKENS = 120


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _namespaces_unavailable() -> str:
    """Why namespaces cannot be used here ("" when they can)."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"slprobe{os.getpid() % 100000}"
    res = _ip("netns", "add", probe, check=False)
    if res.returncode != 0:
        return f"`ip netns add` failed: {res.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return ""


class Topology:
    """A bridge and one namespace per name, each with a veth into the bridge and one address."""

    def __init__(self) -> None:
        sfx = os.getpid() % 10000
        self.net = f"10.213.{sfx % 250}"
        self.bridge = f"slbr{sfx}"
        self.sfx = sfx
        self.namespaces: dict[str, str] = {}  # role -> namespace
        self.addresses: dict[str, str] = {}  # role -> address
        self.links: dict[str, str] = {}  # role -> the veth end in this namespace
        self.procs: dict[str, list[subprocess.Popen]] = {}

    def up(self, roles: list[str]) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.net}.254/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, role in enumerate(roles):
            ns, host_end, ns_end = f"sl{role}{self.sfx}", f"slv{self.sfx}{i}", f"slv{self.sfx}{i}n"
            _ip("netns", "add", ns)
            self.namespaces[role] = ns
            _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            _ip("link", "set", ns_end, "netns", ns)
            _ip("link", "set", host_end, "master", self.bridge)
            _ip("link", "set", host_end, "up")
            self.links[role] = host_end
            addr = f"{self.net}.{10 + i}"
            self.addresses[role] = addr
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ns_end)
            _ip("-n", ns, "link", "set", ns_end, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def spawn(self, role: str, argv: list[str], log: Path) -> subprocess.Popen:
        env = {**os.environ, "SLAI_SERVICE_TOKEN": TOKEN, "SLAI_METRICS_PORT": "-1", "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": str(ROOT)}
        env.pop("SLAI_SERVICE_TOKEN_FILE", None)
        with open(log, "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.namespaces[role], sys.executable, "-m",
                                     "slai_serve.cli", *argv], env=env, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=str(ROOT))
        self.procs.setdefault(role, []).append(proc)
        return proc

    def tear_down(self, role: str) -> None:
        """The host vanishes: its link first (no FIN reaches anyone), then its processes and namespace."""
        _ip("link", "del", self.links.pop(role), check=False)
        for proc in self.procs.pop(role, []):
            proc.kill()
            proc.wait(10)
        _ip("netns", "del", self.namespaces.pop(role), check=False)

    def close(self) -> None:
        for role in list(self.namespaces):
            for proc in self.procs.get(role, []):
                proc.terminate()
            for proc in self.procs.pop(role, []):
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            self.tear_down(role)
        _ip("link", "del", self.bridge, check=False)


@pytest.fixture
def topology():
    why = _namespaces_unavailable()
    if why:
        pytest.skip(f"cannot emulate hosts with network namespaces: {why}")
    topo = Topology()
    try:
        topo.up(["p0", "p1", "gw"])
    except subprocess.CalledProcessError as exc:
        topo.close()
        pytest.skip(f"cannot build the namespace network: {exc.stderr.strip()}")
    yield topo
    topo.close()


@pytest.mark.skipif(importlib.util.find_spec("scheduler_svc.server") is None, reason="no scheduler service")
@pytest.mark.skipif(not (MODEL_DIR / "tokenizer.json").is_file(), reason="no tokenizer for the gateway")
def test_gateway_survives_a_pool_host_vanishing(topology, tmp_path):
    from gateway.client import GatewayClient

    topo = topology
    for pool in ("p0", "p1"):
        for i in range(2):
            topo.spawn(pool, ["executor", "--fake", "--fake-cost", "paper", "--host", "127.0.0.1", "--port",
                              str(50071 + i)], tmp_path / f"{pool}-executor-{i}.log")
        topo.spawn(pool, ["scheduler", "--executors", "127.0.0.1:50071,127.0.0.1:50072",
                          "--host", topo.addresses[pool], "--port", "50061", "--log-level", "WARNING"],
                   tmp_path / f"{pool}-scheduler.log")
    for pool in ("p0", "p1"):  # both pools serve before the gateway's first check (both in rotation)
        wait_healthy(f"{topo.addresses[pool]}:50061", timeout_s=120)
    pools = ",".join(f"{topo.addresses[p]}:50061" for p in ("p0", "p1"))
    gw_addr = f"{topo.addresses['gw']}:50051"
    gw = topo.spawn("gw", ["gateway", "--pools", pools, "--pool-routing", "round-robin", "--host",
                           topo.addresses["gw"], "--grpc-port", "50051", "--http-port", "-1", "--model-dir",
                           str(MODEL_DIR)], tmp_path / "gateway.log")
    wait_healthy(gw_addr, "slai.v1.GatewayService", timeout_s=120, proc=gw)

    async def go() -> list:
        streamed = [0] * NUM_REQUESTS

        async def one(i: int, client) -> tuple[str, int]:
            n, reason = 0, None
            async for piece in client.stream(prompt=f"request {i}:" + " the" * (3 + i), max_tokens=MAX_TOKENS,
                                             ignore_eos=True):
                n += len(piece.token_ids)
                streamed[i] = n
                reason = piece.finish_reason or reason
            return reason, n

        async def vanish() -> None:
            while min(streamed) < 5:
                await asyncio.sleep(0.02)
            await asyncio.to_thread(topo.tear_down, "p1")

        async with GatewayClient(gw_addr, api_key=None, timeout_s=120) as client:
            kill = asyncio.ensure_future(vanish())
            results = await asyncio.gather(*(one(i, client) for i in range(NUM_REQUESTS)))
            await asyncio.wait_for(kill, 30)
        return results

    results = asyncio.run(go())
    assert "p1" not in topo.namespaces  # pool 1 really went away under load
    for i, (reason, n) in enumerate(results):
        assert (reason, n) == ("length", MAX_TOKENS), i
    assert "continuing on another pool" in (tmp_path / "gateway.log").read_text()
