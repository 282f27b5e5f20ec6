"""How many executors one scheduler process drives: its CPU at N executors x R running requests.

    python -m benchmarks.scheduler_fanout --executors 8 --running 128 --step-ms 25 [--seconds 20] [--rpc session]

Three processes on loopback: ``--executors`` fake executors (FakeRunner, each step sleeps ``--step-ms``)
in one process, the real ``slai-serve scheduler`` over them, and this load client, which keeps
``--running`` requests per executor alive (a finished request is replaced at once) over one
``Session`` stream (``--rpc session``, what a gateway does) or one ``Submit`` stream per request
(``--rpc submit``, the old path). Reports the scheduler's CPU (cores), steps/s per executor,
token events/s and scheduler CPU per token event, Session messages per step, and the CPU of the
executors' process and of this client (on a small machine they, not the scheduler, can be what
keeps the steps from reaching ``--step-ms``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time


async def _host_executors(ports: list[int], step_s: float, token: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from executor_svc.fake_runner import FakeRunner
    from executor_svc.server import serve

    # every executor's step runs in a thread (asyncio.to_thread): one thread per executor
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(len(ports) + 4))
    servers = [await serve(FakeRunner(num_blocks=200_000, cost=lambda plan: step_s), f"127.0.0.1:{p}",
                           service_token=token) for p in ports]
    await servers[0][0].server.wait_for_termination()


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _load(address: str, token: str, total: int, max_tokens: int, seconds: float, rpc: str,
                sched_pid: int, exec_pid: int) -> dict:
    import grpc

    from wire.pb.slai.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
    from wire.service_auth import call_metadata

    md = call_metadata(token)
    counter = iter(range(10**9))
    tokens = [0]
    messages = [0]

    def request() -> scheduler_pb2.SubmitRequest:
        return scheduler_pb2.SubmitRequest(request_id=f"r{next(counter)}", prompt_token_ids=list(range(3, 19)),
                                           max_tokens=max_tokens, tier=common_pb2.TIER_FREE,
                                           sampling=common_pb2.SamplingParams(ignore_eos=True))

    async with grpc.aio.insecure_channel(address) as ch:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
        stop = asyncio.Event()
        if rpc == "session":
            outbox: asyncio.Queue = asyncio.Queue()

            async def requests():
                while True:
                    yield await outbox.get()

            def submit() -> None:
                outbox.put_nowait(scheduler_pb2.GatewayMessage(submit=scheduler_pb2.SessionSubmit(request=request())))

            for _ in range(total):
                submit()
            call = stub.Session(requests(), metadata=md)

            async def read() -> None:
                async for msg in call:
                    messages[0] += 1
                    for ev in msg.events:
                        tokens[0] += len(ev.token_ids)
                        if ev.finish_reason:
                            submit()
                    for err in msg.errors:
                        raise RuntimeError(err.message)
            runner = asyncio.ensure_future(read())
        else:
            async def one() -> None:
                while not stop.is_set():
                    async for ev in stub.Submit(request(), metadata=md):
                        tokens[0] += len(ev.token_ids)
            runner = asyncio.gather(*(one() for _ in range(total)))

        await asyncio.sleep(min(5.0, seconds / 2))  # warm up: every request admitted, steps at full size
        stats0 = await stub.Stats(scheduler_pb2.StatsRequest(), metadata=md)
        cpu0, tok0, msg0, t0 = _cpu_s(sched_pid), tokens[0], messages[0], time.monotonic()
        other0 = (_cpu_s(exec_pid), time.process_time())
        await asyncio.sleep(seconds)
        cpu1, tok1, msg1, t1 = _cpu_s(sched_pid), tokens[0], messages[0], time.monotonic()
        other1 = (_cpu_s(exec_pid), time.process_time())
        stats1 = await stub.Stats(scheduler_pb2.StatsRequest(), metadata=md)
        stop.set()
        runner.cancel()
    wall = t1 - t0
    steps = sum(e.num_steps for e in stats1.executors) - sum(e.num_steps for e in stats0.executors)
    running = [e.num_running for e in stats1.executors]
    return {"rpc": rpc, "executors": len(stats1.executors), "running_per_executor_at_end": running,
            "wall_s": round(wall, 2), "scheduler_cpu_cores": round((cpu1 - cpu0) / wall, 3),
            "token_events_per_s": round((tok1 - tok0) / wall), "steps_per_s_per_executor":
            round(steps / wall / max(len(stats1.executors), 1), 2),
            "executors_process_cpu_cores": round((other1[0] - other0[0]) / wall, 3),
            "load_client_cpu_cores": round((other1[1] - other0[1]) / wall, 3),
            "scheduler_cpu_us_per_token_event": round((cpu1 - cpu0) / max(tok1 - tok0, 1) * 1e6, 2),
            "session_messages_per_step": round((msg1 - msg0) / max(steps, 1), 3) if rpc == "session" else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scheduler_fanout", description=__doc__.splitlines()[0])
    p.add_argument("--executors", type=int, default=8)
    p.add_argument("--running", type=int, default=128, help="running requests per executor")
    p.add_argument("--step-ms", type=float, default=25.0)
    p.add_argument("--max-tokens", type=int, default=400, help="output tokens per request")
    p.add_argument("--seconds", type=float, default=20.0, help="measured window (after a warm-up)")
    p.add_argument("--rpc", choices=("session", "submit"), default="session")
    p.add_argument("--host-executors", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    token = os.environ.get("SLAI_SERVICE_TOKEN") or "benchmark-service-token-0123456789"
    if args.host_executors:
        asyncio.run(_host_executors([int(x) for x in args.host_executors.split(",")], args.step_ms / 1e3, token))
        return 0

    from benchmarks.gateway_relay import stop_processes
    from slai_serve.launch import free_port, free_port_block, wait_healthy

    first = free_port_block(n=args.executors)
    ports = [first + i for i in range(args.executors)]
    sp = free_port()
    env = {**os.environ, "SLAI_SERVICE_TOKEN": token, "SLAI_METRICS_PORT": "-1"}
    py = sys.executable
    execs = subprocess.Popen([py, "-m", "benchmarks.scheduler_fanout", "--host-executors",
                              ",".join(map(str, ports)), "--step-ms", str(args.step_ms)], env=env)
    sched = None
    try:
        for port in ports:
            wait_healthy(f"127.0.0.1:{port}", timeout_s=60, proc=execs)
        sched = subprocess.Popen([py, "-m", "slai_serve.cli", "scheduler", "--executors",
                                  ",".join(f"127.0.0.1:{q}" for q in ports), "--port", str(sp),
                                  "--max-queued-requests", str(10 * args.executors * args.running),
                                  "--set", f"max_num_seqs={args.running}", "--log-level", "WARNING"], env=env)
        wait_healthy(f"127.0.0.1:{sp}", timeout_s=60, proc=sched)
        res = asyncio.run(_load(f"127.0.0.1:{sp}", token, args.executors * args.running, args.max_tokens,
                                args.seconds, args.rpc, sched.pid, execs.pid))
        res.update(step_ms=args.step_ms, running=args.running, host_cpus=os.cpu_count())
        print(json.dumps(res, sort_keys=True))
    finally:
        stop_processes(*(x for x in (sched, execs) if x is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
