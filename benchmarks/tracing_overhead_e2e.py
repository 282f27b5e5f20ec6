"""Tracing overhead through the real stack: the same workload with tracing off and on (not a test).

    python -m benchmarks.tracing_overhead_e2e [--num-requests 64] [--qps 8] [--rounds 2] [--json]

Starts gateway, scheduler and a fake executor (``--fake-cost paper``: each step sleeps the paper's
step time, >= 23.4 ms) as processes with ``slai_serve.launch.LocalStack``, once per mode and round, in the
order off, on, off, on, ... Tracing "on" exports every span of every service over OTLP/gRPC to a
receiver in this process (default BatchSpanProcessor settings, every step traced with its links);
"off" sets ``OTEL_SDK_DISABLED=true``. Prometheus metrics stay on in both modes.

The workload is fixed by ``--seed``: Poisson arrivals at ``--qps``, prompts of 16..256 tokens, 16..64
output tokens, ``ignore_eos``; a short warm-up runs first. Reported per mode (pooled over rounds):

* the scheduler's per-step overhead from its Stats RPC, over the workload's steps only (difference of
  cumulative sums before/after): ``decision`` (inside ``core.schedule``), ``executor wait`` (the whole
  iteration minus the executor's own ``total_ns``: decision, plan encoding, RPC, ``core.update``, event
  fan-out and the step's tracing hooks) and ``rpc overhead`` (send -> receive minus ``total_ns``);
* the mean step (iteration) time, and the scheduler's and executor's CPU time per step (from /proc,
  includes the exporter thread, which is off the critical path);
* the client's TTFT p50 / p90 (first chunk received minus send time).

Ratios are on / off; "of a step" is (on - off) / mean step time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from contract.model_files import default_model_dir
from slai_serve.launch import LocalStack

_TICK = os.sysconf("SC_CLK_TCK")


class CountingReceiver:
    """An OTLP/gRPC trace receiver that only counts spans (this process, a gRPC thread pool)."""

    def __init__(self) -> None:
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        rx = self
        self.num_spans = 0
        self._lock = threading.Lock()

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802
                n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
                with rx._lock:
                    rx.num_spans += n
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.server(ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self._server)
        self.endpoint = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def stop(self) -> None:
        self._server.stop(None)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def scheduler_sums(address: str, service_token: str = "") -> dict[str, float]:
    """Cumulative per-step sums from the scheduler's Stats RPC (means x steps, one executor)."""
    import grpc

    from wire.pb.slai.v1 import scheduler_pb2, scheduler_pb2_grpc
    from wire.service_auth import call_metadata

    with grpc.insecure_channel(address) as ch:
        st = scheduler_pb2_grpc.SchedulerServiceStub(ch).Stats(scheduler_pb2.StatsRequest(), timeout=5.0,
                                                               metadata=call_metadata(service_token))
    (e,) = st.executors
    n = e.num_steps
    return {"steps": n, "decision_s": e.mean_decision_s * n, "wait_s": e.mean_executor_wait_s * n,
            "rpc_overhead_s": e.mean_rpc_overhead_s * n, "mean_batch_s": e.mean_batch_s}


def make_workload(n: int, qps: float, seed: int) -> list[tuple[float, int, int]]:
    """(arrival_s, prompt_tokens, output_tokens) per request."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append((t, rng.randint(16, 256), rng.randint(16, 64)))
        t += rng.expovariate(qps)
    return out


async def replay(address: str, workload: list, builder: Any) -> list[float]:
    """Send every request at its arrival time; returns the client-measured TTFTs (seconds)."""
    import grpc

    from gateway.client import build_request
    from wire.pb.slai.v1 import gateway_pb2_grpc

    ttfts: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        t0 = time.perf_counter() + 0.1

        async def one(arrival: float, p_len: int, o_len: int) -> None:
            req = build_request(builder.prompt(p_len), max_tokens=o_len, ignore_eos=True)
            await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
            sent = time.perf_counter()
            first = None
            async for chunk in stub.Generate(req, timeout=120):
                if first is None and chunk.token_ids:
                    first = time.perf_counter()
            ttfts.append(first - sent)

        await asyncio.gather(*(one(*w) for w in workload))
    return ttfts


def run_once(tracing: bool, args: argparse.Namespace, workload: list, builder: Any) -> dict[str, Any]:
    rx = CountingReceiver() if tracing else None
    if tracing:
        env = {"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
               "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{rx.endpoint}", "OTEL_TRACES_SAMPLER": "parentbased_always_on",
               "SLAI_TRACE_STEP_EVERY": str(args.trace_step_every)}
    else:
        env = {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "none"}
    stack = LocalStack(fake=True, gateway_grpc_port=0, http_port=0, scheduler_port=0, executor_port=0,
                       metrics_port=0, log_dir=tempfile.mkdtemp(prefix="slai-trace-bench-"), drain_timeout_s=2.0,
                       startup_timeout_s=120.0, model_dir=args.model_dir, env=env,
                       executor_args=["--fake-cost", args.fake_cost, "--warmup-tokens", "64"])
    try:
        with stack:
            pids = {p.name: p.popen.pid for p in stack.procs}
            asyncio.run(replay(stack.gateway_address, make_workload(8, 20.0, args.seed + 1), builder))  # warm-up
            before = scheduler_sums(stack.scheduler_address, stack.service_token)
            cpu0 = {k: cpu_s(p) for k, p in pids.items()}
            w0 = time.perf_counter()
            ttfts = asyncio.run(replay(stack.gateway_address, workload, builder))
            wall = time.perf_counter() - w0
            after = scheduler_sums(stack.scheduler_address, stack.service_token)
            cpu1 = {k: cpu_s(p) for k, p in pids.items()}
    finally:
        if rx is not None:
            time.sleep(0.2)
            rx.stop()
    steps = after["steps"] - before["steps"]
    per_step = {k: (after[k] - before[k]) / steps for k in ("decision_s", "wait_s", "rpc_overhead_s")}
    return {"tracing": tracing, "steps": steps, "wall_s": wall, "ttfts": ttfts, **per_step,
            "mean_batch_s": after["mean_batch_s"],
            "cpu_scheduler_per_step_s": (cpu1["scheduler"] - cpu0["scheduler"]) / steps,
            "cpu_executor_per_step_s": (cpu1["executor-0"] - cpu0["executor-0"]) / steps,
            "cpu_gateway_per_request_s": (cpu1["gateway"] - cpu0["gateway"]) / len(workload),
            "spans_received": rx.num_spans if rx is not None else 0}


def pooled(runs: list[dict]) -> dict[str, float]:
    steps = sum(r["steps"] for r in runs)
    out = {k: sum(r[k] * r["steps"] for r in runs) / steps
           for k in ("decision_s", "wait_s", "rpc_overhead_s", "cpu_scheduler_per_step_s", "cpu_executor_per_step_s")}
    out["mean_batch_s"] = statistics.fmean(r["mean_batch_s"] for r in runs)
    out["cpu_gateway_per_request_s"] = statistics.fmean(r["cpu_gateway_per_request_s"] for r in runs)
    ttfts = sorted(t for r in runs for t in r["ttfts"])
    out["ttft_p50_s"] = statistics.median(ttfts)
    out["ttft_p90_s"] = ttfts[int(0.9 * (len(ttfts) - 1))]
    out["steps"] = steps
    out["spans_received"] = sum(r["spans_received"] for r in runs)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--qps", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=2, help="off/on pairs (each starts fresh stacks)")
    ap.add_argument("--trace-step-every", type=int, default=1, help="tracing on: trace one step in N "
                                                                       "(SLAI_TRACE_STEP_EVERY)")
    ap.add_argument("--fake-cost", default="paper", help="executor step-time model ('paper' or a JSON file)")
    ap.add_argument("--model-dir", default="", help="gateway tokenizer folder (default: the converted SmolLM2)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    args.model_dir = args.model_dir or str(default_model_dir())

    from slai_serve.bench_serve import PromptBuilder

    builder = PromptBuilder.from_model_dir(args.model_dir)
    workload = make_workload(args.num_requests, args.qps, args.seed)
    runs: dict[bool, list] = {False: [], True: []}
    for i in range(args.rounds):
        for tracing in (False, True):
            r = run_once(tracing, args, workload, builder)
            runs[tracing].append(r)
            if not args.json:
                print(f"round {i + 1} tracing {'on ' if tracing else 'off'}: {r['steps']} steps, "
                      f"TTFT p50 {1e3 * statistics.median(r['ttfts']):.1f} ms, executor wait "
                      f"{1e6 * r['wait_s']:.0f} µs/step, decision {1e6 * r['decision_s']:.0f} µs/step",
                      file=sys.stderr)
    off, on = pooled(runs[False]), pooled(runs[True])
    step_s = off["mean_batch_s"]
    rows = [("decision (core.schedule)", "decision_s", 1e6, "µs/step"),
            ("executor wait (iteration - executor)", "wait_s", 1e6, "µs/step"),
            ("rpc overhead (rpc - executor)", "rpc_overhead_s", 1e6, "µs/step"),
            ("scheduler CPU", "cpu_scheduler_per_step_s", 1e6, "µs/step"),
            ("executor CPU", "cpu_executor_per_step_s", 1e6, "µs/step"),
            ("gateway CPU", "cpu_gateway_per_request_s", 1e3, "ms/request"),
            ("TTFT p50 (client)", "ttft_p50_s", 1e3, "ms"),
            ("TTFT p90 (client)", "ttft_p90_s", 1e3, "ms")]
    result = {"workload": {"num_requests": args.num_requests, "qps": args.qps, "seed": args.seed,
                           "rounds": args.rounds, "fake_cost": args.fake_cost,
                           "trace_step_every": args.trace_step_every},
              "mean_step_s": step_s, "off": off, "on": on,
              "ratio": {key: on[key] / off[key] if off[key] else float("nan") for _, key, _, _ in rows},
              "share_of_step": {key: (on[key] - off[key]) / step_s for _, key, _, unit in rows if unit == "µs/step"}}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{args.num_requests} requests at {args.qps:g} QPS, {args.rounds} round(s), fake executor "
          f"'{args.fake_cost}', trace step every {args.trace_step_every}; mean step {1e3 * step_s:.1f} ms; "
          f"{off['steps']} / {on['steps']} steps off / on; {on['spans_received']} spans received")
    print(f"{'':38} {'off':>9} {'on':>9} {'on/off':>7} {'(on-off)/step':>14}")
    for label, key, scale, unit in rows:
        share = result["share_of_step"].get(key)
        print(f"{label:38} {scale * off[key]:>9.1f} {scale * on[key]:>9.1f} {result['ratio'][key]:>7.3f} "
              f"{'' if share is None else f'{100 * share:>13.2f}%'}  {unit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
