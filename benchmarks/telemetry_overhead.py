"""Per-step cost of the telemetry hooks, tracing off vs on, as a share of a 30 ms step.

Standalone (not a test)::

    python -m benchmarks.telemetry_overhead [--steps 2000] [--batch 128] [--step-ms 30]

It drives a real SchedulerCore with ``--batch`` decoding requests (one token per
request per step, fake results, no sleeping) and times only the hooks a service
calls per step:

* scheduler: ``step_span`` + ``StepSpan.end`` + ``RequestSpans.on_step`` (tracing),
  ``SchedulerMetrics.record_step`` + one ``record_token_event`` per token (metrics);
* executor: ``executor_step_span`` (tracing), ``ExecutorMetrics.record_step`` (metrics).

Modes: tracing off (nothing configured); on with an in-memory exporter
(SimpleSpanProcessor: export cost paid inline); on with the real OTLP/gRPC
exporter (BatchSpanProcessor) to a receiver in a child process, with every
step traced and 128 links, 32 links, or one step in 10 traced. "cpu/step" is
this process's CPU time per step including the exporter's background thread,
measured after a final flush; "trace hooks"/"metrics" are wall time inside the hooks.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

from scheduler_svc.core import Request, StepResult, Tier, make_core
from telemetry import step_tracing, tracing
from telemetry.metrics import ExecutorMetrics, SchedulerMetrics


def _receiver(conn) -> None:  # child process: an OTLP/gRPC receiver that counts spans
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    class Rx(trace_service_pb2_grpc.TraceServiceServicer):
        num_spans = 0

        def Export(self, request, context):  # noqa: N802
            Rx.num_spans += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Rx(), server)
    conn.send(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    conn.recv()  # "stop"
    conn.send(Rx.num_spans)
    server.stop(None)


def _setup(batch: int) -> tuple:
    core = make_core(num_blocks=100_000, record_events=tracing.is_tracing_enabled())
    spans = step_tracing.RequestSpans()
    tiers = {}
    for i in range(batch):
        tier = Tier.PAYING if i % 2 else Tier.FREE
        req = Request(f"r{i}", 64, 8000, 0.0, tier=tier, tbt_slo_s=0.1 if tier == Tier.PAYING else 0.5)
        tiers[req.req_id] = (tier, req.tbt_slo_s)
        spans.start(req.req_id, None, tier=tier, max_tokens=req.max_tokens, prompt_tokens=64)
        core.add(req, 0.0)
    return core, spans, tiers


MODES = {  # name: (exporter, step_every, max_step_links)
    "off": (None, 1, 128),
    "memory": ("memory", 1, 128),
    "otlp": ("otlp", 1, 128),
    "otlp/32links": ("otlp", 1, 32),
    "otlp/every10": ("otlp", 10, 128),
}


def run(mode: str, steps: int, batch: int, endpoint: str = "") -> dict[str, float]:
    exporter, every, links = MODES[mode]
    if exporter is None:
        tracing.init_tracing("bench")  # nothing configured: stays off
    elif exporter == "memory":
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        tracing.init_tracing("bench", exporter=InMemorySpanExporter(), step_every=every, max_step_links=links)
    else:
        tracing.init_tracing("bench", endpoint=endpoint, step_every=every, max_step_links=links)
    core, spans, tiers = _setup(batch)
    smetrics, xmetrics = SchedulerMetrics(), ExecutorMetrics()
    now, dt = 0.0, 0.03
    trace_ns = metrics_ns = 0
    clock = time.perf_counter_ns
    cpu0 = time.process_time()
    for i in range(steps + 50):
        if i == 50:  # warm-up done: every request decodes
            trace_ns = metrics_ns = 0
            cpu0 = time.process_time()
        plan = core.schedule(now)
        ids = plan.sampling_ids()
        result = StepResult(step_id=plan.step_id, req_ids=ids, token_ids=(7,) * len(ids), prepare_ns=1_000_000,
                            forward_ns=27_000_000, sample_ns=1_000_000, total_ns=29_000_000)
        t0 = clock()
        step = step_tracing.step_span(plan, spans, executor="e0")
        tp = step.traceparent
        step_tracing.executor_step_span(tp, result, num_seqs=plan.num_seqs)  # executor side
        step.end(result)
        t1 = clock()
        xmetrics.record_step(result, plan.num_seqs)  # executor side
        smetrics.record_step("e0", plan.stats, 0.03, result.forward_ns, core.mean_batch_s)
        t2 = clock()
        now += dt
        events = core.update(plan, result, now)
        t3 = clock()
        spans.on_step(core.drain_events(), events)
        t4 = clock()
        for ev in events:
            tier, slo = tiers[ev.req_id]
            smetrics.record_token_event(tier, ev.ttft_s, ev.tbt_s, slo)
        t5 = clock()
        trace_ns += (t1 - t0) + (t4 - t3)
        metrics_ns += (t2 - t1) + (t5 - t4)
    tracing.shutdown_tracing()  # flush: the exporter's work is inside the CPU time below
    cpu = time.process_time() - cpu0
    return {"trace_us": trace_ns / steps / 1e3, "metrics_us": metrics_ns / steps / 1e3, "cpu_us": cpu / steps * 1e6}


def noop_hook_ns(n: int = 200_000) -> float:
    """Cost of one no-op step hook (step_span + end) with tracing off."""
    tracing.shutdown_tracing()
    core, spans, _ = _setup(4)
    plan = core.schedule(0.0)
    t0 = time.perf_counter_ns()
    for _ in range(n):
        step_tracing.step_span(plan, spans.contexts).end(None)
    return (time.perf_counter_ns() - t0) / n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=128, help="decoding requests per step (= links per step span)")
    ap.add_argument("--step-ms", type=float, default=30.0, help="the step time to compare against")
    args = ap.parse_args(argv)

    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=_receiver, args=(child,), daemon=True)
    proc.start()
    endpoint = f"127.0.0.1:{parent.recv()}"
    print(f"no-op step hook (tracing off): {noop_hook_ns():.0f} ns")
    print(f"batch {args.batch}, {args.steps} steps; % of a {args.step_ms:g} ms step")
    print(f"{'mode':<13} {'trace hooks':>11} {'metrics':>9} {'cpu/step':>9} {'cpu - off':>10}   "
          f"as % of the step: {'hooks':>6} {'metrics':>7} {'cpu - off':>9}")
    step_us = args.step_ms * 1e3
    off = None
    for mode in MODES:
        r = run(mode, args.steps, args.batch, endpoint)
        off = off or r
        extra = r["cpu_us"] - off["cpu_us"]
        print(f"{mode:<13} {r['trace_us']:>8.1f} µs {r['metrics_us']:>6.1f} µs {r['cpu_us']:>6.0f} µs "
              f"{extra:>7.0f} µs   {'':>17} {100 * r['trace_us'] / step_us:>5.2f}% {100 * r['metrics_us'] / step_us:>6.2f}% "
              f"{100 * extra / step_us:>8.2f}%")
    parent.send("stop")
    print(f"spans received by the OTLP receiver: {parent.recv()}")
    proc.join(5)
    print("cpu/step: this process's CPU per step, incl. the core's own schedule/update and the exporter thread")


if __name__ == "__main__":
    main()
