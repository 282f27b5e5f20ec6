"""Pools: route each request to one of several schedulers, and fail over between them.

A pool is one scheduler and the executors it drives (docs/gateway.md, "Pools"). The gateway
keeps one :class:`~gateway.scheduler_client.SchedulerClient` (one Session stream) per pool and
picks a pool per request:

* ``jsw`` (default): join-shortest-work, the pool with the least outstanding work: the tokens
  its scheduler last published on the Session stream (``PoolLoad``), plus what this gateway
  sent it since (so a burst does not all land on one pool before the next update);
* ``p2c``: the less loaded of two pools drawn at random (less herding across many gateways);
* ``round-robin``.

A pool whose Session breaks (or that rejects a request with UNAVAILABLE) leaves the rotation
until its health check says SERVING again. Its requests continue on another pool as fresh
requests whose prompt is the original prompt + the tokens already streamed and whose
``max_tokens`` is what is left, exactly as the scheduler moves requests between executors
(``scheduler_svc/dispatcher.py``): the client sees one stream with every token once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import random
import socket
import time
from collections.abc import Callable

from gateway.config import POOL_ROUTING_RULES
from gateway.scheduler_client import (
    SchedulerClient,
    as_client_view,
    continuation_request,
    length_final_event,
)
from gateway.scheduler_errors import is_final
from gateway.scheduler_session import CallCancelled
from wire.grpc_server import AdmissionRejected

# NOTE: type hints only; the scheduler's messages are built and rewritten in gateway/scheduler_client.py
from wire.pb.slai.v1 import scheduler_pb2

log = logging.getLogger(__name__)

ROUTING_RULES = POOL_ROUTING_RULES
DNS_REFRESH_S = 30.0  # how often a --pools DNS name is resolved again


def resolve_pools(spec: str) -> tuple[str, ...]:
    """``--pools``: comma-separated ``host:port`` addresses; a single name that resolves to several
    addresses (e.g. a Kubernetes headless Service) is one pool per address (IPv4 when it has any).
    A name that does not resolve now stays as it is (gRPC resolves it on connect)."""
    entries = tuple(e.strip() for e in spec.split(",") if e.strip())
    if not entries:
        raise ValueError("--pools: give at least one scheduler address (host:port)")
    for e in entries:
        if not e.startswith("unix:") and (":" not in e or not e.rsplit(":", 1)[1].isdigit()):
            raise ValueError(f"--pools: {e!r} is not host:port")
    if dns_name(spec) is None:
        return entries
    addrs = resolve_addresses(entries[0])
    return addrs if len(addrs) > 1 else entries


def dns_name(spec: str) -> str | None:
    """``spec`` when it is one ``name:port`` whose host is a DNS name (not an address), else None."""
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    if len(entries) != 1 or entries[0].startswith("unix:") or ":" not in entries[0]:
        return None
    host = entries[0].rsplit(":", 1)[0].strip("[]")
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        return entries[0]


def resolve_addresses(name_port: str) -> tuple[str, ...]:
    """Every address ``name:port`` resolves to now, as ``host:port`` (IPv4 when there are any; () if none)."""
    host, port = name_port.rsplit(":", 1)
    try:
        infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except OSError:
        return ()
    v4 = sorted({i[4][0] for i in infos if i[0] == socket.AF_INET})
    v6 = sorted({i[4][0] for i in infos if i[0] == socket.AF_INET6})
    return tuple(f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in (v4 or v6))


async def follow_dns(pools: PoolSet, name_port: str, make_client: Callable[[str], SchedulerClient],
                     interval_s: float = DNS_REFRESH_S) -> None:
    """Re-resolve ``name_port`` every ``interval_s`` and let ``pools`` follow it (pools scaled up or
    down behind a headless Service). A failed or empty resolution changes nothing."""
    while True:
        await asyncio.sleep(interval_s)
        addrs = await asyncio.to_thread(resolve_addresses, name_port)
        if addrs:
            pools.update(addrs, make_client)


class Pool:
    """One scheduler as the gateway sees it: its client, whether it is in rotation, its load."""

    def __init__(self, client: SchedulerClient) -> None:
        self.client = client
        self.address = client.address
        self.healthy = True  # until a check or a broken session says otherwise
        self.reason = ""
        self.sent_since_load = 0  # tokens this gateway sent since the pool last published its load
        client.session.on_load = self._on_load

    def _on_load(self, load: scheduler_pb2.PoolLoad) -> None:
        self.sent_since_load = 0

    @property
    def work(self) -> int:
        """Outstanding tokens: the pool's last published load plus what was sent since."""
        load = self.client.session.load
        return (load.outstanding_tokens if load is not None else 0) + self.sent_since_load

    def fail(self, reason: str) -> None:
        if self.healthy:
            log.warning("pool %s leaves rotation: %s", self.address, reason)
        self.healthy, self.reason = False, reason


class PoolSet:
    """The gateway's pools and its routing rule."""

    def __init__(self, clients: list[SchedulerClient], routing: str = "jsw", seed: int | None = None) -> None:
        if routing not in ROUTING_RULES:
            raise ValueError(f"pool routing must be one of {', '.join(ROUTING_RULES)}, got {routing!r}")
        if not clients:
            raise ValueError("at least one pool")
        self.pools = [Pool(c) for c in clients]
        self.routing = routing
        self._rng = random.Random(seed)
        self._rr = itertools.count()
        self.num_failovers = 0
        self._retiring: set[asyncio.Task] = set()
        self._retired: list[Pool] = []  # left the list; closed once idle (or at close())
        self._follower: asyncio.Task | None = None

    @property
    def first(self) -> SchedulerClient:
        return self.pools[0].client

    def pick(self, exclude: set[str] = frozenset()) -> Pool | None:
        """A pool in rotation by the routing rule (None: none left). Pools out of rotation are
        used only when every pool is (a stale health flag must not turn a request away)."""
        cands = [p for p in self.pools if p.healthy and p.address not in exclude]
        if not cands:
            cands = [p for p in self.pools if p.address not in exclude]
        if not cands:
            return None
        if len(cands) == 1:
            return cands[0]
        if self.routing == "round-robin":
            return cands[next(self._rr) % len(cands)]
        if self.routing == "p2c":
            a, b = self._rng.sample(cands, 2)
            return a if a.work <= b.work else b
        return min(cands, key=lambda p: p.work)

    def update(self, addresses, make_client: Callable[[str], SchedulerClient]) -> None:
        """Follow a new address list: new pools join the rotation; pools no longer listed leave it (their
        requests in flight finish there, then their channel closes). Never drops every pool."""
        want = list(dict.fromkeys(addresses))
        if not want:
            return
        have = {p.address for p in self.pools}
        gone = [p for p in self.pools if p.address not in want]
        for address in want:
            if address not in have:
                log.info("pool %s joins", address)
                self.pools.append(Pool(make_client(address)))
        if gone:
            self.pools = [p for p in self.pools if p.address in want]
            for p in gone:
                log.info("pool %s leaves (no longer listed)", p.address)
                self._retired.append(p)
                self._retiring.add(asyncio.get_running_loop().create_task(self._retire(p)))

    async def _retire(self, pool: Pool, poll_s: float = 1.0, max_wait_s: float = 600.0) -> None:
        """Close a pool's channel once its requests in flight are done."""
        try:
            waited = 0.0
            while pool.client.session.num_calls and waited < max_wait_s:
                await asyncio.sleep(poll_s)
                waited += poll_s
            await pool.client.close()
        finally:
            self._retiring.discard(asyncio.current_task())

    def submit(self, msg: scheduler_pb2.SubmitRequest, sink, trace_metadata=()) -> PoolCall:
        """Route a request to a pool; its events (then the exception that ends it, if any) go to ``sink``."""
        return PoolCall(self, msg, tuple(trace_metadata or ()), sink)

    async def health(self, timeout_s: float = 1.0) -> tuple[bool, str]:
        """Check every pool; a SERVING one (re)joins the rotation. ``(True, "")`` if any serves."""
        results = await asyncio.gather(*(p.client.health(timeout_s) for p in self.pools))
        reasons = []
        for p, (ok, why) in zip(self.pools, results, strict=True):
            if ok and not p.healthy:
                log.info("pool %s is serving; back in rotation", p.address)
            p.healthy, p.reason = ok, why
            if not ok:
                reasons.append(why)
        if any(ok for ok, _ in results):
            return True, ""
        return False, "; ".join(reasons)

    def follow(self, name_port: str, make_client: Callable[[str], SchedulerClient],
               interval_s: float = DNS_REFRESH_S) -> None:
        """Keep following a DNS name's addresses (``follow_dns``) until :meth:`close`."""
        self._follower = asyncio.get_running_loop().create_task(follow_dns(self, name_port, make_client, interval_s))

    async def close(self) -> None:
        for task in [self._follower, *self._retiring]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for p in [*self.pools, *self._retired]:
            await p.client.close()


class PoolCall:
    """One request routed to a pool, continued on another if its pool fails. Its ``TokenEvent``
    messages (in the client's terms across pools), then the exception that ends it if it fails, go
    to ``sink`` as they arrive (as for ``SessionCall``); :meth:`cancel` aborts it."""

    def __init__(self, pools: PoolSet, msg: scheduler_pb2.SubmitRequest, trace_metadata: tuple, sink) -> None:
        self._pools = pools
        self._msg = msg
        self._trace = trace_metadata
        self._sink = sink
        self._streamed: list[int] = []  # tokens the client has been given, over every pool
        self._tried: set[str] = set()
        self._inner = None
        self.pool: Pool | None = None
        self.cancelled = False
        self.num_failovers = 0
        self._t0 = time.monotonic()
        self._last_token_at: float | None = None
        self._first_ttft = 0.0
        self._max_gap = 0.0
        self._start(msg)

    def _start(self, msg: scheduler_pb2.SubmitRequest) -> None:
        pool = self._pools.pick(self._tried)
        if pool is None:
            raise ConnectionError("scheduler unavailable: no pool left to run this request")
        self.pool = pool
        self._tried.add(pool.address)
        pool.sent_since_load += len(msg.prompt_token_ids) + msg.max_tokens
        self._inner = pool.client.submit(msg, self._on_item, self._trace)

    def cancel(self) -> None:
        self.cancelled = True
        if self._inner is not None:
            self._inner.cancel()

    def _on_item(self, item) -> None:
        """The sink of the current pool's ``SessionCall``: an event, or the exception that ends it there."""
        if not isinstance(item, BaseException):
            self._sink(self._observe(item))
            return
        try:
            if isinstance(item, CallCancelled):
                pass
            elif isinstance(item, AdmissionRejected):
                if not self._streamed and self._next_pool("rejected"):
                    return
            elif isinstance(item, ConnectionError) and not self.cancelled:
                self.pool.fail(str(item))
                done = self._continue(str(item))
                if done is None:
                    return  # continues on another pool
                item = done
        except ConnectionError as exc:  # no pool left
            item = exc
        self._sink(item)

    def _next_pool(self, why: str) -> bool:
        """Before any token: submit the same request to another pool; False if none is left."""
        if self._pools.pick(self._tried) is None:
            return False
        log.info("request %s: pool %s %s it; trying another pool", self._msg.request_id, self.pool.address, why)
        self._start(self._msg)
        return True

    def _continue(self, why: str) -> scheduler_pb2.TokenEvent | None:
        """The request's pool failed: continue it elsewhere (prompt + streamed tokens, the rest of
        max_tokens). Returns a final event when nothing was left to generate; raises ConnectionError
        when no pool is left."""
        rid, n = self._msg.request_id, len(self._streamed)
        if self._msg.max_tokens <= n:  # every token arrived, only the final event was lost
            return self._observe(length_final_event(rid))
        if self._pools.pick(self._tried) is None:
            raise ConnectionError(f"{why}; no other pool is left ({n} tokens were delivered)")
        msg = continuation_request(self._msg, self._streamed)
        log.warning("request %s: pool %s failed (%s); continuing on another pool after %d tokens",
                    rid, self.pool.address, why, n)
        self.num_failovers += 1
        self._pools.num_failovers += 1
        self._start(msg)
        return None

    def _observe(self, ev: scheduler_pb2.TokenEvent) -> scheduler_pb2.TokenEvent:
        """Record ``ev``; after a failover, rewrite it into the client's terms (one request, one clock)."""
        now = time.monotonic()
        prev = self._last_token_at
        if ev.token_ids:
            if prev is not None:
                self._max_gap = max(self._max_gap, now - prev)
            self._last_token_at = now
        if not self.num_failovers:
            if ev.ttft_s > 0:
                self._first_ttft = ev.ttft_s
            self._streamed.extend(ev.token_ids)
            return ev
        first_of_pool = ev.ttft_s > 0 and bool(self._streamed)
        self._streamed.extend(ev.token_ids)
        return as_client_view(ev, first_of_pool=first_of_pool, gap_s=now - prev if prev is not None else 0.0,
                              final=is_final(ev), prompt_tokens=len(self._msg.prompt_token_ids),
                              completion_tokens=len(self._streamed), ttft_s=self._first_ttft, e2e_s=now - self._t0,
                              max_tbt_s=self._max_gap)
