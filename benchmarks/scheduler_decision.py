"""Benchmark: scheduler decision time, memory at scale, and scheduler<->executor RPC overhead.

    python -m benchmarks.scheduler_decision                 # everything, prints a JSON report
    python -m benchmarks.scheduler_decision --only decision --steps 3000

Three measurements (not a test: numbers depend on the machine):

1. **decision**: ``core.schedule(now)`` per step with 32 / 128 / 256 running
   decodes and 10,000 queued requests behind them (the sequence cap holds them
   back), pure core, no RPC. Also ``core.update``.
2. **memory**: tracemalloc bytes for 10,000 queued + 256 running requests built
   the way the service builds them (SubmitRequest -> codec -> Request with
   packed token ids, plus the per-request stream object and queue).
3. **streams**: RSS of a scheduler *process* (``slai-serve scheduler``) holding
   ``--streams`` open Submit streams: what gRPC costs per request on top of (2).
5. **e2e**: three processes (FakeRunner executor sleeping the paper cost model's
   step time, the scheduler, a client consuming 128 Submit streams): the
   scheduler's own Stats (decision, RPC overhead, the executor's reported wait
   for each plan vs step time), in lockstep (``--no-pipeline``) and planning ahead.
4. **rpc**: the real driver + executor client against a FakeRunner executor in
   a *separate process* (no sleep, so the step is pure overhead), 128 running
   decodes, lockstep: per step, scheduler-seen round trip minus executor ``total_ns``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from contract.tiers import Tier
from scheduler_svc.core import SchedulerConfig, StepResult
from scheduler_svc.core.policies.registry import POLICIES
from scheduler_svc.core.request import Request
from scheduler_svc.core.scheduler import SchedulerCore
from wire.service_auth import SERVICE_TOKEN_ENV, SERVICE_TOKEN_FILE_ENV, call_metadata, read_service_token

ROOT = Path(__file__).resolve().parents[1]
# the service processes require a service token, as under `slai-serve up`, so the numbers include its check
_TOKEN = read_service_token() or secrets.token_urlsafe(32)
_ENV = {**{k: v for k, v in os.environ.items() if k != SERVICE_TOKEN_FILE_ENV},
        SERVICE_TOKEN_ENV: _TOKEN, "SLAI_METRICS_PORT": "-1"}  # no /metrics servers (ports may be taken)
_AUTH = call_metadata(_TOKEN)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def _summary_us(xs: list[float]) -> dict[str, float]:
    return {"median_us": round(1e6 * statistics.median(xs), 1), "p99_us": round(1e6 * _pct(xs, 99), 1),
            "mean_us": round(1e6 * statistics.fmean(xs), 1)}


def _core(policy: str, num_running: int, num_blocks: int = 200_000) -> SchedulerCore:
    cls, variant, _ = POLICIES[policy]
    cfg = SchedulerConfig().replace(**variant).replace(max_num_seqs=num_running, max_decodes=num_running,
                                                       max_model_len=1 << 20)
    return SchedulerCore(cls(cfg), num_blocks=num_blocks, config=cfg)


def bench_decision(policy: str, num_running: int, num_queued: int, steps: int, step_s: float = 0.03) -> dict:
    """Steady state: ``num_running`` decoding requests, ``num_queued`` waiting behind the sequence cap."""
    core = _core(policy, num_running)
    now = 0.0
    for i in range(num_running):
        tier = Tier.PAYING if i % 20 == 0 else Tier.FREE
        core.add(Request(f"run{i}", 64 + i % 200, 100_000, now, tier=tier, tbt_slo_s=0.1 if tier == 0 else 0.5),
                 now)
    # admit them all (prefill), so every one is decoding
    while any(r.is_prefill for r in core.requests.values()):
        plan = core.schedule(now)
        ids = plan.sampling_ids()
        now += step_s
        core.update(plan, StepResult(step_id=plan.step_id, req_ids=ids, token_ids=(7,) * len(ids)), now)
    for i in range(num_queued):
        core.add(Request(f"q{i}", 16 + (i * 37) % 2000, 200, now, tier=Tier.FREE, tbt_slo_s=0.5), now)
    sched, upd, sizes = [], [], []
    perf = time.perf_counter
    for _ in range(steps):
        t0 = perf()
        plan = core.schedule(now)
        t1 = perf()
        ids = plan.sampling_ids()
        result = StepResult(step_id=plan.step_id, req_ids=ids, token_ids=(7,) * len(ids))
        now += step_s
        t2 = perf()
        core.update(plan, result, now)
        t3 = perf()
        sched.append(t1 - t0)
        upd.append(t3 - t2)
        sizes.append(plan.num_seqs)
    return {"policy": policy, "running": core.num_running, "queued": core.num_waiting,
            "mean_seqs_per_step": round(statistics.fmean(sizes), 1), "schedule": _summary_us(sched),
            "update": _summary_us(upd)}


def bench_memory(num_queued: int = 10_000, num_running: int = 256, prompt_len: int = 512) -> dict:
    """Bytes held by the scheduler for queued + running requests, built like the service builds them."""
    from scheduler_svc import submit_codec
    from scheduler_svc.dispatcher import RequestStream
    from wire.pb.slai.v1 import common_pb2, scheduler_pb2

    msgs = [scheduler_pb2.SubmitRequest(request_id=f"req-{i:06d}", prompt_token_ids=range(1000, 1000 + prompt_len),
                                        max_tokens=256, tier=common_pb2.TIER_FREE,
                                        sampling=common_pb2.SamplingParams(ignore_eos=True))
            for i in range(num_queued + num_running)]

    async def build():
        core = _core("slai", num_running)
        streams = {}
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for m in msgs:
            req = submit_codec.request_from_submit_pb(m, 0.0)
            streams[req.req_id] = RequestStream(req)
            core.add(req, 0.0)
        # admit and prefill the first num_running
        now = 0.0
        for _ in range(2 * num_running * prompt_len // core.config.token_budget + 10):
            plan = core.schedule(now)
            ids = plan.sampling_ids()
            now += 0.03
            core.update(plan, StepResult(step_id=plan.step_id, req_ids=ids, token_ids=(7,) * len(ids)), now)
            if core.num_running == num_running and not any(r.is_prefill for r in core.running.values()):
                break
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        return used, core.num_running, core.num_waiting

    used, running, waiting = asyncio.run(build())
    return {"queued": waiting, "running": running, "prompt_len": prompt_len, "mb": round(used / 2**20, 1),
            "bytes_per_request": round(used / (running + waiting)),
            "bytes_per_request_excl_prompt": round(used / (running + waiting) - 4 * prompt_len)}


async def _bench_rpc(address: str, num_running: int, steps: int) -> dict:
    from scheduler_svc import submit_codec
    from scheduler_svc.config import ServiceConfig
    from scheduler_svc.dispatcher import Dispatcher
    from wire.pb.slai.v1 import common_pb2, scheduler_pb2

    cfg = ServiceConfig(executors=(address,), pipeline=False,  # lockstep: a step here is pure round trip
                        overrides=(f"max_num_seqs={num_running}", f"max_decodes={num_running}"), service_token=_TOKEN)
    d = Dispatcher(cfg)
    d.start()
    await d.wait_ready(30)
    streams = []
    for i in range(num_running):
        msg = scheduler_pb2.SubmitRequest(request_id=f"r{i}", prompt_token_ids=range(1, 33), max_tokens=8000,
                                          sampling=common_pb2.SamplingParams(ignore_eos=True))
        streams.append(d.submit(submit_codec.request_from_submit_pb(msg, d.clock())))

    async def drain(s):  # a consumer per stream, as the servicer would be
        while True:
            ev = await s.get()
            if isinstance(ev, BaseException) or ev.finish_reason is not None:
                return

    consumers = [asyncio.ensure_future(drain(s)) for s in streams]
    driver = d.drivers[0]
    while driver.stats.num_steps < 50:  # warm-up (prefills)
        await asyncio.sleep(0.01)
    driver.stats.reset()
    while driver.stats.num_steps < steps:
        await asyncio.sleep(0.05)
    st = driver.stats
    decision, overhead = list(st.decision_ring), list(st.overhead_ring)
    out = {"running": driver.core.num_running, "steps": st.num_steps,
           "step_us_mean": round(1e6 * st.sum_rpc_s / st.num_steps, 1),
           "decision": _summary_us(decision), "rpc_overhead": _summary_us(overhead),
           "executor_total_us_mean": round(1e6 * st.sum_executor_total_s / st.num_steps, 1),
           "executor_wait_us_mean": round(1e6 * st.mean_executor_wait_s, 1),
           "steps_planned_ahead": st.num_planned_ahead}
    for s in streams:
        d.abort(s.req_id)
    await asyncio.gather(*consumers)
    await d.close()
    return out


def bench_rpc(num_running: int, steps: int, transport: str = "uds") -> dict:
    tmp = tempfile.mkdtemp(prefix="slai-bench-")
    sock = os.path.join(tmp, "ex.sock")
    args = ["--uds", sock] if transport == "uds" else ["--port", "50999", "--host", "127.0.0.1"]
    address = f"unix:{sock}" if transport == "uds" else "127.0.0.1:50999"
    proc = subprocess.Popen([sys.executable, "-m", "slai_serve.cli", "executor", "--fake", "--kv-blocks", "100000",
                             "--log-level", "WARNING", *args], cwd=ROOT, env=_ENV)
    try:
        out = asyncio.run(_bench_rpc(address, num_running, steps))
    finally:
        proc.terminate()
        proc.wait(10)
    out["transport"] = transport
    return out


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _open_streams(address: str, num: int, prompt_len: int, sched_pid: int) -> dict:
    import grpc

    from wire.pb.slai.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
    base = _rss_mb(sched_pid)
    async with grpc.aio.insecure_channel(address) as ch:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
        calls = []
        for i in range(num):
            calls.append(stub.Submit(scheduler_pb2.SubmitRequest(
                request_id=f"s{i}", prompt_token_ids=range(1000, 1000 + prompt_len), max_tokens=7000,
                sampling=common_pb2.SamplingParams(ignore_eos=True)), metadata=_AUTH))
            if i % 500 == 499:
                await asyncio.sleep(0)
        deadline = time.monotonic() + 90
        while True:  # until every request is queued or running
            stats = await stub.Stats(scheduler_pb2.StatsRequest(), metadata=_AUTH)
            e = stats.executors[0]
            if e.num_waiting + e.num_running >= num - 20:  # a few may have finished
                break
            if time.monotonic() > deadline:
                failed = [c for c in calls if c.done()]
                codes = {}
                for c in failed:
                    codes[str(await c.code())] = (await c.details())[:200]
                raise TimeoutError(f"{len(failed)} calls ended: {codes}; "
                                   f"only {e.num_waiting + e.num_running} of {num} streams admitted")
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        out = {"streams": num, "prompt_len": prompt_len, "running": e.num_running, "queued": e.num_waiting,
               "scheduler_rss_mb_before": round(base, 1), "scheduler_rss_mb_loaded": round(_rss_mb(sched_pid), 1)}
        out["scheduler_rss_mb_delta"] = round(out["scheduler_rss_mb_loaded"] - base, 1)
        for c in calls:
            c.cancel()
    return out


def bench_streams(num: int = 1000, prompt_len: int = 512) -> dict:
    """RSS of a scheduler *process* holding ``num`` open Submit streams (256 running, the rest queued)."""
    tmp = tempfile.mkdtemp(prefix="slai-bench-")
    ex_sock, sch_sock = os.path.join(tmp, "ex.sock"), os.path.join(tmp, "sch.sock")
    ex = subprocess.Popen([sys.executable, "-m", "slai_serve.cli", "executor", "--fake", "--kv-blocks", "400000",
                           "--fake-cost", "paper", "--log-level", "WARNING", "--uds", ex_sock], cwd=ROOT, env=_ENV)
    sch = subprocess.Popen([sys.executable, "-m", "slai_serve.cli", "scheduler", "--executors", f"unix:{ex_sock}",
                            "--uds", sch_sock, "--set", "max_num_seqs=256", "--set", "max_decodes=256",
                            "--max-queued-requests", str(num + 1), "--max-queued-tokens", str(10**9),
                            "--log-level", "WARNING"], cwd=ROOT, env=_ENV)
    try:
        time.sleep(3.0)
        return asyncio.run(_open_streams(f"unix:{sch_sock}", num, prompt_len, sch.pid))
    finally:
        for p in (sch, ex):
            p.terminate()
            p.wait(10)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def _e2e_client(address: str, num: int, seconds: float, pids: dict[str, int]) -> dict:
    import grpc

    from wire.pb.slai.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
    async with grpc.aio.insecure_channel(address) as ch:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
        counts = [0] * num

        async def consume(i: int) -> None:
            call = stub.Submit(scheduler_pb2.SubmitRequest(
                request_id=f"e{i}", prompt_token_ids=range(1000, 1064), max_tokens=7000,
                sampling=common_pb2.SamplingParams(ignore_eos=True)), metadata=_AUTH)
            try:
                async for ev in call:
                    counts[i] += len(ev.token_ids)
            except (grpc.aio.AioRpcError, asyncio.CancelledError):
                pass

        tasks = [asyncio.ensure_future(consume(i)) for i in range(num)]
        await asyncio.sleep(2.0)  # prefills done
        cpu0 = {k: _cpu_s(p) for k, p in pids.items()}
        await asyncio.sleep(seconds)
        cpu = {f"{k}_cpu_pct": round(100 * (_cpu_s(p) - cpu0[k]) / seconds) for k, p in pids.items()}
        e = (await stub.Stats(scheduler_pb2.StatsRequest(), metadata=_AUTH)).executors[0]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    steps = e.num_steps
    return {"streams": num, "running": e.num_running, "steps": steps,
            "tokens_per_s": round(sum(counts) / seconds), "mean_batch_ms": round(1e3 * e.mean_batch_s, 2),
            "mean_decision_us": round(1e6 * e.mean_decision_s, 1),
            "mean_rpc_overhead_us": round(1e6 * e.mean_rpc_overhead_s, 1),
            "mean_executor_wait_us": round(1e6 * e.mean_executor_wait_s, 1),
            "executor_wait_pct_of_step": round(100 * e.mean_executor_wait_s / e.mean_batch_s, 2),
            "steps_planned_ahead_pct": round(100 * e.num_steps_planned_ahead / max(1, steps), 1), **cpu}


def bench_e2e(num: int = 128, seconds: float = 15.0, cost: str = "paper", pipeline: bool = True) -> dict:
    """Three processes: FakeRunner executor sleeping the cost model's step time, the scheduler, and a
    client holding ``num`` Submit streams that consume every token (control-plane overhead under load)."""
    tmp = tempfile.mkdtemp(prefix="slai-bench-")
    ex_sock, sch_sock = os.path.join(tmp, "ex.sock"), os.path.join(tmp, "sch.sock")
    ex = subprocess.Popen([sys.executable, "-m", "slai_serve.cli", "executor", "--fake", "--kv-blocks", "100000",
                           "--fake-cost", cost, "--log-level", "WARNING", "--uds", ex_sock], cwd=ROOT, env=_ENV)
    sch = subprocess.Popen([sys.executable, "-m", "slai_serve.cli", "scheduler", "--executors", f"unix:{ex_sock}",
                            "--uds", sch_sock, "--set", f"max_num_seqs={num}", "--set", f"max_decodes={num}",
                            *([] if pipeline else ["--no-pipeline"]), "--log-level", "WARNING"], cwd=ROOT, env=_ENV)
    try:
        time.sleep(3.0)
        out = asyncio.run(_e2e_client(f"unix:{sch_sock}", num, seconds, {"scheduler": sch.pid, "executor": ex.pid}))
        out["pipeline"] = pipeline
        return out
    finally:
        for p in (sch, ex):
            p.terminate()
            p.wait(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("decision", "memory", "rpc", "streams", "e2e"), default=None)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--policy", default="slai")
    p.add_argument("--queued", type=int, default=10_000)
    p.add_argument("--streams", type=int, default=1000, help="open Submit streams for the RSS measurement")
    args = p.parse_args(argv)
    report: dict = {}
    if args.only in (None, "decision"):
        report["decision"] = [bench_decision(args.policy, n, args.queued, args.steps) for n in (32, 128, 256)]
    if args.only in (None, "memory"):
        report["memory"] = bench_memory(args.queued, 256)
    if args.only in (None, "rpc"):
        report["rpc"] = [bench_rpc(128, args.steps, t) for t in ("uds", "tcp")]
    if args.only in (None, "streams"):
        report["streams"] = bench_streams(args.streams)
    if args.only in (None, "e2e"):
        report["e2e"] = [bench_e2e(128, pipeline=p) for p in (False, True)]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
