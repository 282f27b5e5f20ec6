"""``slai-serve up`` on loopback exposes nothing beyond it: every listening socket of the three
processes, the scheduler's and executor's /metrics side ports included, is on the stack's host."""

from __future__ import annotations

import ipaddress

import pytest


def _listening(pid: int) -> set[tuple[str, int]]:
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process(pid)
    conns = proc.net_connections(kind="inet") if hasattr(proc, "net_connections") else proc.connections(kind="inet")
    out = set()
    for c in conns:
        if c.status == psutil.CONN_LISTEN:
            mapped = getattr(ipaddress.ip_address(c.laddr.ip), "ipv4_mapped", None)  # ::ffff:127.0.0.1
            out.add((str(mapped) if mapped else c.laddr.ip, c.laddr.port))
    return out


def test_every_port_of_the_stack_listens_on_its_host_only(traced_stack):
    st = traced_stack.stack
    assert st.host == "127.0.0.1"
    by_name = {p.name: _listening(p.popen.pid) for p in st.procs}
    for name, socks in by_name.items():
        assert socks and {ip for ip, _ in socks} == {st.host}, (name, socks)
    assert (st.host, st.metrics_port) in by_name["scheduler"]  # /metrics side ports follow --host
    assert (st.host, st.metrics_port + 1) in by_name["executor-0"]
    assert (st.host, st.scheduler_port) in by_name["scheduler"]
    assert {(st.host, st.gateway_grpc_port), (st.host, st.http_port)} <= by_name["gateway"]
