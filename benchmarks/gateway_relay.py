"""Gateway streaming capacity: how many tokens/s one gateway process relays, and what it adds to TBT.

    python -m benchmarks.gateway_relay --streams 256 --tokens 200 [--step-ms 12] [--model-dir DIR]
        [--gateway-arg=--flag ...] [--profile-gateway FILE]

Three processes on loopback: a paced fake scheduler (like the real scheduler's Session stream:
every step, one token for every live request, batched into one message), the real ``slai-serve
gateway``, and this client with ``--streams`` concurrent gRPC ``Generate`` streams. ``--streams``
streams at ``--step-ms`` offer ``streams / step`` tokens/s (256 streams at 12 ms: 21,333 tokens/s).
With ``--step-ms 0`` the fake scheduler steps as fast as it can (raw capacity).

Reports tokens/s delivered, CPU time per token of each process (gateway, fake scheduler, client:
on a small machine the three share the cores, so the client's own cost matters), the client's
TBT percentiles (one gap per chunk), the fake scheduler's own P50/P99 gap between a request's
consecutive tokens, and ``added_p99_tbt_ms``: the client's P99 TBT minus the scheduler's P99 gap,
what the relay adds to the tail. ``tokens_per_chunk`` above 1 means the gateway coalesced tokens
for streams whose client (or the gateway itself) fell behind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np


class _Gaps:
    """The fake scheduler's own emission record: the gap between a request's consecutive tokens as the
    scheduler sent them (what the relay's TBT is compared with)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self, *_) -> None:
        self.gaps: list[tuple[float, int]] = []  # (gap since the previous step, requests that had a token then)
        self.tokens = 0

    def summary(self) -> dict:
        if not self.gaps:
            return {"sched_tokens": self.tokens}
        g = np.repeat([x for x, _ in self.gaps], [n for _, n in self.gaps])
        if not len(g):
            g = np.zeros(1)
        return {"sched_tokens": self.tokens, "sched_gap_p50_ms": float(np.percentile(g, 50) * 1e3),
                "sched_gap_p99_ms": float(np.percentile(g, 99) * 1e3)}


async def _fake_scheduler(port: int, step_ms: float, vocab_ids: list[int], gaps: _Gaps | None = None) -> None:
    from wire.grpc_server import start_server
    from wire.pb.slai.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

    gaps = gaps or _Gaps()

    class Paced(scheduler_pb2_grpc.SchedulerServiceServicer):
        """Like the real scheduler's Session: every step, one token for every live request of the
        gateway, all in one message (with ``--step-ms 0``: steps back to back). Steps are paced on
        absolute deadlines, so a step that runs late does not push every later one back."""

        async def Session(self, request_iterator, context):
            live: dict[str, list] = {}  # id -> [request, tokens sent, arrival]
            wake = asyncio.Event()
            loop = asyncio.get_running_loop()

            async def read() -> None:
                async for msg in request_iterator:
                    if msg.WhichOneof("kind") == "submit":
                        live[msg.submit.request.request_id] = [msg.submit.request, 0, time.monotonic()]
                        wake.set()
                    else:
                        live.pop(msg.abort.request_id, None)

            reader = asyncio.ensure_future(read())
            period = step_ms / 1e3
            deadline = None
            last_step = None
            try:
                while True:
                    if not live:
                        wake.clear()
                        await wake.wait()
                        deadline, last_step = None, None
                    now = loop.time()
                    deadline = now + period if deadline is None else max(deadline + period, now - period)
                    await asyncio.sleep(max(deadline - loop.time(), 0.0))
                    now = time.monotonic()
                    out = scheduler_pb2.SchedulerMessage()
                    continuing = 0
                    for rid, st in list(live.items()):
                        req, i, t0 = st
                        continuing += i > 0
                        ev = out.events.add(request_id=rid, token_ids=[vocab_ids[i % len(vocab_ids)]], time_s=now,
                                            ttft_s=now - t0 if i == 0 else 0)
                        st[1] = i + 1
                        if i + 1 == req.max_tokens:
                            ev.finish_reason = common_pb2.FINISH_REASON_LENGTH
                            ev.usage.prompt_tokens = len(req.prompt_token_ids)
                            ev.usage.completion_tokens = req.max_tokens
                            del live[rid]
                    gaps.tokens += len(out.events)
                    if last_step is not None and continuing:
                        gaps.gaps.append((now - last_step, continuing))
                    last_step = now
                    yield out
            finally:
                reader.cancel()

        async def Abort(self, request, context):
            return scheduler_pb2.AbortResponse(found=False)

    srv = await start_server([lambda s: scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(Paced(), s)],
                             ["slai.v1.SchedulerService"], f"127.0.0.1:{port}")
    await srv.server.wait_for_termination()


async def _bare_gateway(port: int, step_ms: float, pieces: list[tuple[int, str]], gaps: _Gaps) -> None:
    """``--bare``: not the gateway but a grpc.aio ``GatewayService`` that only streams prebuilt chunks on
    the same pacing (one token per stream per step): what grpc.aio alone costs per token."""
    from wire.grpc_server import start_server
    from wire.pb.slai.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    waiters: list[asyncio.Future] = []
    chunks = [gateway_pb2.GenerateChunk(text=t, token_ids=[i]) for i, t in pieces]

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        period, deadline, last = step_ms / 1e3, loop.time(), None
        while True:
            deadline = max(deadline + period, loop.time() - period)
            await asyncio.sleep(max(deadline - loop.time(), 0.0))
            now = time.monotonic()
            ready, waiters[:] = list(waiters), []
            if ready:
                gaps.tokens += len(ready)
                if last is not None:
                    gaps.gaps.append((now - last, len(ready)))
                last = now
            else:
                last = None
            for f in ready:
                if not f.done():
                    f.set_result(None)

    class Bare(gateway_pb2_grpc.GatewayServiceServicer):
        async def Generate(self, request, context):
            loop = asyncio.get_running_loop()
            n = request.max_tokens
            for i in range(n):
                f = loop.create_future()
                waiters.append(f)
                await f
                chunk = chunks[i % len(chunks)]
                if i + 1 == n:
                    chunk = gateway_pb2.GenerateChunk(text=chunk.text, token_ids=chunk.token_ids,
                                                      finish_reason=common_pb2.FINISH_REASON_LENGTH)
                    chunk.usage.completion_tokens = n
                yield chunk

    srv = await start_server([lambda s: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(Bare(), s)],
                             ["slai.v1.GatewayService"], f"127.0.0.1:{port}")
    task = asyncio.ensure_future(ticker())
    try:
        await srv.server.wait_for_termination()
    finally:
        task.cancel()


async def _client(address: str, streams: int, tokens: int) -> dict:
    import grpc

    from gateway.client import build_request
    from wire.pb.slai.v1 import gateway_pb2_grpc

    gaps: list[float] = []
    counts: list[int] = []
    chunks = 0
    async with grpc.aio.insecure_channel(address) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)

        async def one(i: int) -> None:
            nonlocal chunks
            last = None
            n = 0
            async for chunk in stub.Generate(build_request(f"stream {i}", max_tokens=tokens, ignore_eos=True)):
                if not chunk.token_ids:
                    continue
                now = time.monotonic()
                if last is not None:
                    gaps.append(now - last)  # NOTE: one gap per chunk, even when it carries several tokens
                last = now
                n += len(chunk.token_ids)
                chunks += 1
            counts.append(n)

        t0 = time.monotonic()
        cpu0 = time.process_time()
        await asyncio.gather(*(one(i) for i in range(streams)))
        wall = time.monotonic() - t0
        cpu = time.process_time() - cpu0
    total = sum(counts)
    g = np.array(gaps) if gaps else np.zeros(1)
    return {"streams": streams, "tokens_per_stream": tokens, "total_tokens": total,
            "exact_counts": all(c == tokens for c in counts), "wall_s": wall, "tokens_per_s": total / wall,
            "tokens_per_chunk": total / max(chunks, 1),
            "client_tbt_p50_ms": float(np.percentile(g, 50) * 1e3), "client_tbt_p99_ms": float(np.percentile(g, 99) * 1e3),
            "client_cpu_s": cpu, "client_cpu_us_per_token": cpu / max(total, 1) * 1e6}


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_processes(*procs: subprocess.Popen) -> None:
    """SIGTERM each, then wait up to 10 s each before SIGKILL."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _run_fake_scheduler(port: int, step_ms: float, model_dir: str, stats_file: str, bare: bool = False) -> None:
    """The fake scheduler process (``bare``: the bare gateway instead): SIGUSR1 starts its emission
    record afresh, SIGTERM writes it to ``stats_file`` (JSON) and exits."""
    from gateway.tokenizer import ModelTokenizer

    tok = ModelTokenizer.from_dir(model_dir)
    ids = tok.encode(" The quick brown fox jumps over the lazy dog. Ça va très bien, merci! 😀",
                     add_special_tokens=False)
    gaps = _Gaps()

    def dump(*_) -> None:
        if stats_file:
            with open(stats_file, "w") as fh:
                json.dump(gaps.summary(), fh)
        os._exit(0)

    signal.signal(signal.SIGUSR1, gaps.reset)
    signal.signal(signal.SIGTERM, dump)
    if bare:
        asyncio.run(_bare_gateway(port, step_ms, [(i, tok.decode([i])) for i in ids], gaps))
    else:
        asyncio.run(_fake_scheduler(port, step_ms, ids, gaps))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gateway_relay", description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=128)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--step-ms", type=float, default=25.0, help="fake scheduler step; 0 = as fast as possible")
    p.add_argument("--model-dir", default="")
    p.add_argument("--gateway-arg", action="append", default=[], help="extra gateway flag (repeatable)")
    p.add_argument("--profile-gateway", default="", metavar="FILE",
                   help="run the gateway under cProfile and write its profile here (slows it down)")
    p.add_argument("--bare", action="store_true",
                   help="instead of the gateway and the fake scheduler: a bare grpc.aio server that streams "
                        "prebuilt chunks on the same pacing (the transport's own cost per token)")
    p.add_argument("--fake-scheduler-port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--bare-port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--stats-file", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.fake_scheduler_port or args.bare_port:
        _run_fake_scheduler(args.fake_scheduler_port or args.bare_port, args.step_ms, args.model_dir,
                            args.stats_file, bare=bool(args.bare_port))
        return 0

    from contract.model_files import default_model_dir
    from slai_serve.launch import free_port, wait_healthy

    model_dir = args.model_dir or str(default_model_dir())
    sp, gp = free_port(), free_port()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        stats_file = os.path.join(tmp, "sched.json")
        if args.bare:  # one process: the bare server paces itself and keeps the emission record
            sched = None
            gw = subprocess.Popen([py, "-m", "benchmarks.gateway_relay", "--bare-port", str(gp), "--step-ms",
                                   str(args.step_ms), "--model-dir", model_dir, "--stats-file", stats_file])
        else:
            sched = subprocess.Popen([py, "-m", "benchmarks.gateway_relay", "--fake-scheduler-port", str(sp),
                                      "--step-ms", str(args.step_ms), "--model-dir", model_dir,
                                      "--stats-file", stats_file])
            prof = ["-m", "cProfile", "-o", args.profile_gateway] if args.profile_gateway else []
            gw = subprocess.Popen([py, *prof, "-m", "slai_serve.cli", "gateway", "--scheduler", f"127.0.0.1:{sp}",
                                   "--host", "127.0.0.1", "--grpc-port", str(gp), "--http-port", "-1",
                                   "--model-dir", model_dir, "--log-level", "WARNING", *args.gateway_arg])
        recorder = sched or gw
        try:
            if sched is not None:
                wait_healthy(f"127.0.0.1:{sp}", timeout_s=30, proc=sched)
            wait_healthy(f"127.0.0.1:{gp}", "slai.v1.GatewayService", timeout_s=30, proc=gw)
            asyncio.run(_client(f"127.0.0.1:{gp}", 4, 8))  # warm up
            time.sleep(0.2)
            recorder.send_signal(signal.SIGUSR1)  # the emission record starts with the measured run
            time.sleep(0.2)
            cpu0, scpu0 = _cpu_s(gw.pid), _cpu_s(sched.pid) if sched is not None else 0.0
            res = asyncio.run(_client(f"127.0.0.1:{gp}", args.streams, args.tokens))
            res["gateway_cpu_s"] = _cpu_s(gw.pid) - cpu0
            res["sched_cpu_s"] = _cpu_s(sched.pid) - scpu0 if sched is not None else 0.0
        finally:
            stop_processes(*(p for p in (gw, sched) if p is not None))
        if os.path.exists(stats_file):
            with open(stats_file) as fh:
                res.update(json.load(fh))
    res["bare"] = args.bare
    n = max(res["total_tokens"], 1)
    res["gateway_cpu_us_per_token"] = res["gateway_cpu_s"] / n * 1e6
    res["sched_cpu_us_per_token"] = res["sched_cpu_s"] / n * 1e6
    res["step_ms"] = args.step_ms
    if "sched_gap_p99_ms" in res:
        # what the relay adds to the tail: the client's P99 gap minus the scheduler's own P99 emission gap
        res["added_p99_tbt_ms"] = res["client_tbt_p99_ms"] - res["sched_gap_p99_ms"]
    res["loadavg_1m"] = os.getloadavg()[0]
    print(json.dumps(res, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
