"""Gateway transport limits under abuse: a big body, half-open connections, a burst of rejections.

    python -m benchmarks.gateway_transport big-body --mb 10 [--gateway-arg=--max-body-bytes=104857600]
    python -m benchmarks.gateway_transport half-open --connections 1000 --wait 45
    python -m benchmarks.gateway_transport burst --requests 1500 --slots 8 [--pace-s 1.0]

Three processes on loopback, as in ``benchmarks.gateway_relay``: a paced fake
scheduler, the real ``slai-serve gateway`` (HTTP on), and this client, which
uses raw sockets where a real client would be too polite. The numbers in
docs/gateway.md ("Transport limits") come from it. Prints one JSON line.

* ``big-body``: a streamed completion runs (one token per ``--step-ms``) and
  ``/health`` is polled while one client posts a ``--mb`` MB prompt; reports the
  big request's answer, the stream's largest gap and the slowest ``/health``
  during it, and the gateway's RSS before and after.
* ``half-open``: ``--connections`` sockets that send nothing, a partial header
  line, or headers and a partial body; reports how many the gateway closed
  within ``--wait`` seconds and when the last one closed.
* ``burst``: ``--slots`` streams take every admission slot, then ``--requests``
  pre-connected sockets send a completion request at once (or spread over
  ``--pace-s`` seconds); reports time from send to 429 and the gateway's CPU per
  rejected request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import select
import socket
import subprocess
import sys
import time

from benchmarks.gateway_relay import _cpu_s, stop_processes


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024


def _request(body: dict, path: str = "/v1/completions") -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\n\r\n").encode() + data


async def _get(port: int, path: str) -> float:
    """Seconds for one GET on a new connection."""
    t = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
    await reader.read()
    writer.close()
    return time.monotonic() - t


async def _read_answer(reader: asyncio.StreamReader) -> str:
    """Status line and the start of the body of one response."""
    status = (await reader.readline()).decode().strip()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return f"{status} {(await reader.readexactly(length))[:160].decode(errors='replace')}"


async def big_body(port: int, pid: int, mb: float) -> dict:
    await _get(port, "/health")
    rss0 = _rss_mb(pid)
    big = _request({"prompt": "the " * int(mb * (1 << 20) / 4), "max_tokens": 3})
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_request({"prompt": "Hi", "max_tokens": 4000, "stream": True, "ignore_eos": True}))
    times: list[float] = []
    stop = asyncio.Event()

    async def stream() -> None:
        while not stop.is_set() and (line := await reader.readline()):
            if line.startswith(b"data: {"):
                times.append(time.monotonic())

    async def poll(out: list[float]) -> None:
        while not stop.is_set():
            out.append(await _get(port, "/health"))
            await asyncio.sleep(0.05)

    st = asyncio.ensure_future(stream())
    await asyncio.sleep(1.0)
    usual = sorted(b - a for a, b in zip(times, times[1:]))[len(times) // 2] if len(times) > 2 else 0.0
    health: list[float] = []
    pt = asyncio.ensure_future(poll(health))
    t0 = time.monotonic()
    r2, w2 = await asyncio.open_connection("127.0.0.1", port)
    w2.write(big)  # the client then waits for the answer; the gateway may answer before it has read it all
    try:
        answer = await _read_answer(r2)
    except ConnectionError as exc:
        answer = repr(exc)
    big_s = time.monotonic() - t0
    w2.close()
    await asyncio.sleep(1.0)
    t1 = time.monotonic()
    stop.set()
    writer.close()
    await asyncio.gather(st, pt, return_exceptions=True)
    del big
    await asyncio.sleep(1.0)
    gaps = [b - a for a, b in zip(times, times[1:]) if b >= t0 and a <= t1]
    return {"answer": answer, "answer_s": round(big_s, 3), "usual_gap_ms": round(usual * 1e3, 1),
            "max_gap_during_s": round(max(gaps, default=0.0), 3), "health_max_s": round(max(health, default=0.0), 3),
            "rss_before_mb": round(rss0), "rss_after_mb": round(_rss_mb(pid))}


async def half_open(port: int, n: int, wait_s: float) -> dict:
    conns = []
    for i in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if i % 3 == 1:
            writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
        elif i % 3 == 2:
            writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"pro")
        conns.append((reader, writer))
    t0 = time.monotonic()
    closed: dict[int, float] = {}

    async def watch(i: int, reader: asyncio.StreamReader) -> None:
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        closed[i] = time.monotonic() - t0

    tasks = [asyncio.ensure_future(watch(i, r)) for i, (r, _) in enumerate(conns)]
    served = round(await _get(port, "/health"), 3)
    await asyncio.wait(tasks, timeout=wait_s)
    for t in tasks:
        t.cancel()
    by_kind = {k: sorted(t for i, t in closed.items() if i % 3 == j) for j, k in
               enumerate(("silent", "partial_headers", "partial_body"))}
    return {"connections": n, "health_meanwhile_s": served, "closed": len(closed), "still_open": n - len(closed),
            "wait_s": wait_s, **{f"last_close_{k}_s": round(v[-1], 2) if v else None for k, v in by_kind.items()}}


def burst(port: int, pid: int, n: int, slots: int, pace_s: float) -> dict:
    req = _request({"prompt": "hello there, " * 20, "max_tokens": 4000, "stream": True, "ignore_eos": True})
    holders = []
    for _ in range(slots):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(req)
        s.recv(100)
        holders.append(s)
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    time.sleep(1.0)
    ep = select.epoll()
    for s in socks:
        s.setblocking(False)
        ep.register(s.fileno(), select.EPOLLIN)
    by_fd = {s.fileno(): s for s in socks}
    sent_at: dict[int, float] = {}
    done: dict[int, tuple[str, float]] = {}
    cpu0 = _cpu_s(pid)
    t0 = time.monotonic()
    i = 0
    while len(done) < n and time.monotonic() - t0 < 60:
        while i < n and time.monotonic() - t0 >= i * pace_s / n:
            socks[i].send(req)
            sent_at[socks[i].fileno()] = time.monotonic()
            i += 1
        for fd, _ in ep.poll(0.001 if i < n else 1.0):
            data = by_fd[fd].recv(65536)
            done[fd] = (data[9:12].decode() if data else "closed", time.monotonic() - sent_at[fd])
            ep.unregister(fd)
    cpu = _cpu_s(pid) - cpu0
    for s in socks + holders:
        s.close()
    rejected = sorted(t for status, t in done.values() if status == "429")
    statuses: dict[str, int] = {}
    for status, _ in done.values():
        statuses[status] = statuses.get(status, 0) + 1

    def q(f: float) -> float | None:
        return round(rejected[min(len(rejected) - 1, int(f * len(rejected)))] * 1e3, 1) if rejected else None

    return {"requests": n, "slots": slots, "pace_s": pace_s, "statuses": statuses, "first_429_ms": q(0),
            "median_429_ms": q(0.5), "p99_429_ms": q(0.99), "gateway_cpu_us_per_request": round(cpu / n * 1e6)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gateway_transport", description=__doc__.splitlines()[0])
    p.add_argument("scenario", choices=("big-body", "half-open", "burst"))
    p.add_argument("--mb", type=float, default=10.0, help="big-body: prompt size")
    p.add_argument("--connections", type=int, default=1000, help="half-open: sockets")
    p.add_argument("--wait", type=float, default=45.0, help="half-open: seconds to watch")
    p.add_argument("--requests", type=int, default=1500, help="burst: requests")
    p.add_argument("--slots", type=int, default=8, help="burst: --max-concurrent-requests, all taken first")
    p.add_argument("--pace-s", type=float, default=0.0, help="burst: spread the requests over this long")
    p.add_argument("--step-ms", type=float, default=10.0, help="fake scheduler step")
    p.add_argument("--model-dir", default="")
    p.add_argument("--gateway-arg", action="append", default=[], help="extra gateway flag (repeatable)")
    args = p.parse_args(argv)

    from slai_serve.launch import default_model_dir, free_port, wait_healthy

    model_dir = args.model_dir or str(default_model_dir())
    sp, gp, hp = free_port(), free_port(), free_port()
    extra = list(args.gateway_arg)
    if args.scenario == "burst":
        extra += ["--max-concurrent-requests", str(args.slots)]
    py = sys.executable
    sched = subprocess.Popen([py, "-m", "benchmarks.gateway_relay", "--fake-scheduler-port", str(sp), "--step-ms",
                              str(args.step_ms if args.scenario != "burst" else 50.0), "--model-dir", model_dir])
    gw = subprocess.Popen([py, "-m", "slai_serve.cli", "gateway", "--scheduler", f"127.0.0.1:{sp}", "--host", "127.0.0.1",
                           "--grpc-port", str(gp), "--http-port", str(hp), "--model-dir", model_dir,
                           "--log-level", "WARNING", *extra])
    try:
        wait_healthy(f"127.0.0.1:{sp}", timeout_s=30, proc=sched)
        wait_healthy(f"127.0.0.1:{gp}", "slai.v1.GatewayService", timeout_s=30, proc=gw)
        if args.scenario == "big-body":
            res = asyncio.run(big_body(hp, gw.pid, args.mb))
        elif args.scenario == "half-open":
            res = asyncio.run(half_open(hp, args.connections, args.wait))
        else:
            res = burst(hp, gw.pid, args.requests, args.slots, args.pace_s)
        print(json.dumps({"scenario": args.scenario, "gateway_args": extra, **res}))
    finally:
        stop_processes(gw, sched)
    return 0


if __name__ == "__main__":
    sys.exit(main())
