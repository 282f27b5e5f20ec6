"""Scrape ``/metrics`` of the real gateway, scheduler and fake executor after a few requests.

The stack (``traced_stack`` in conftest, shared with the trace test) runs the fake executor with the
paper cost model (every step >= 23.4 ms) and a paying TBT SLO of 20 ms, so every paying TBT sample
misses its deadline and no free one (0.5 s) does: the SLO metrics have known values. Counters are
cumulative over the session, so checks are ">= this test's requests" or consistency between metrics.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from telemetry import names as N
from tests.telemetry.conftest import FREE_TBT_S, PAYING_TBT_S
from wire.pb.slai.v1 import scheduler_pb2, scheduler_pb2_grpc
from wire.service_auth import call_metadata

pytestmark = pytest.mark.slow

PER_TIER = 2
MAX_TOKENS = 8
STEP_FLOOR_S = 0.0234  # the paper cost model's smallest step
PHASES = ("prepare", "forward", "sample", "total", "idle")  # executor step phases (+ its wait for the plan)


class Scrape:
    """One /metrics text as {(sample name, sorted labels): value}."""

    def __init__(self, text: str) -> None:
        self.samples: dict[tuple[str, tuple], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def get(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        assert key in self.samples, (key, sorted({n for n, _ in self.samples if n.startswith("slai_")}))
        return self.samples[key]

    def total(self, name: str, **labels: str) -> float:
        """Sum over every label set that contains ``labels`` (e.g. all tiers, all executors)."""
        want = set(labels.items())
        found = [v for (n, lab), v in self.samples.items() if n == name and want <= set(lab)]
        assert found, (name, labels)
        return sum(found)

    def labels_of(self, name: str, label: str) -> set[str]:
        return {dict(lab)[label] for n, lab in self.samples if n == name and label in dict(lab)}


def scrape(url: str) -> Scrape:
    resp = httpx.get(url, timeout=5)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return Scrape(resp.text)


async def _send(address: str, keys: dict[str, str]) -> list:
    from gateway.client import GatewayClient

    async with GatewayClient(address, api_key=keys["paying"], timeout_s=30) as paying, \
            GatewayClient(address, api_key=keys["free"], timeout_s=30) as free:
        return await asyncio.gather(*(client.generate(f"metrics request {i}:" + " the" * (4 + 7 * i),
                                                      max_tokens=MAX_TOKENS, ignore_eos=True)
                                      for i in range(PER_TIER) for client in (paying, free)))


def test_metrics_of_all_three_services_after_requests(traced_stack):
    st = traced_stack.stack
    urls = traced_stack.metrics_urls
    results = asyncio.run(_send(st.gateway_address, traced_stack.keys))
    assert [r.completion_tokens for r in results] == [MAX_TOKENS] * (2 * PER_TIER)
    n = len(results)

    # the queue gauges are refreshed by the step that releases the finished requests: wait for it
    deadline = time.monotonic() + 30.0  # guards a hang only; the loop ends when the counters settle
    while True:
        sched, ex = scrape(urls["scheduler"]), scrape(urls["executor"])
        steps_done = ex.get(N.M_BATCH_INFERENCE_DURATION + "_count", phase="forward")  # the executor's, after reply
        settled = (sched.total(N.M_NUM_REQUESTS_RUNNING) == 0 and sched.total(N.M_KV_CACHE_USAGE) == 0 and
                   steps_done == sched.total(N.M_STEPS + "_total"))
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    gw = scrape(urls["gateway"])

    # ---- scheduler: request latencies per tier (vLLM names)
    for tier in ("paying", "free"):
        assert sched.get(N.M_TIME_TO_FIRST_TOKEN + "_count", tier=tier) >= PER_TIER
        assert sched.get(N.M_E2E_REQUEST_LATENCY + "_count", tier=tier) >= PER_TIER
        assert sched.get(N.M_REQUEST_QUEUE_TIME + "_count", tier=tier) >= PER_TIER
        assert sched.get(N.M_INTER_TOKEN_LATENCY + "_count", tier=tier) >= PER_TIER * (MAX_TOKENS - 1)
        assert sched.get(N.M_GENERATION_TOKENS + "_total", tier=tier) >= PER_TIER * MAX_TOKENS
        assert sched.get(N.M_REQUEST_SUCCESS + "_total", tier=tier, finish_reason="length") >= PER_TIER
    ttft_n = sched.total(N.M_TIME_TO_FIRST_TOKEN + "_count")
    itl_n, itl_sum = sched.total(N.M_INTER_TOKEN_LATENCY + "_count"), sched.total(N.M_INTER_TOKEN_LATENCY + "_sum")
    e2e_n, e2e_sum = sched.total(N.M_E2E_REQUEST_LATENCY + "_count"), sched.total(N.M_E2E_REQUEST_LATENCY + "_sum")
    assert ttft_n >= n and e2e_n == ttft_n  # every request that got a first token finished
    assert STEP_FLOOR_S * 0.95 <= itl_sum / itl_n < 2.0  # one step per token
    assert e2e_sum / e2e_n >= (MAX_TOKENS - 1) * STEP_FLOOR_S * 0.95
    assert sched.get(N.M_TIME_TO_FIRST_TOKEN + "_bucket", tier="paying", le="+Inf") == \
        sched.get(N.M_TIME_TO_FIRST_TOKEN + "_count", tier="paying")

    # ---- per-executor queue gauges: back to idle after completion
    (executor,) = sched.labels_of(N.M_NUM_REQUESTS_RUNNING, N.L_EXECUTOR)
    assert sched.get(N.M_NUM_REQUESTS_RUNNING, executor=executor) == 0
    assert sched.get(N.M_NUM_REQUESTS_WAITING, executor=executor) == 0
    assert sched.get(N.M_KV_CACHE_USAGE, executor=executor) == 0

    # ---- per-tier TBT deadline misses and SLO attainment
    paying_samples = sched.get(N.M_INTER_TOKEN_LATENCY + "_count", tier="paying")
    free_samples = sched.get(N.M_INTER_TOKEN_LATENCY + "_count", tier="free")
    assert PAYING_TBT_S < STEP_FLOOR_S < FREE_TBT_S
    assert sched.get(N.M_TBT_DEADLINE_MISSES + "_total", tier="paying") == paying_samples  # every gap > 5 ms
    free_misses = sched.get(N.M_TBT_DEADLINE_MISSES + "_total", tier="free")
    assert free_misses <= 0.1 * free_samples  # a 2 s gap takes a badly stalled machine
    assert sched.get(N.M_TBT_SLO_ATTAINMENT_CUMULATIVE, tier="paying") == 0.0
    assert sched.get(N.M_TBT_SLO_ATTAINMENT_CUMULATIVE, tier="free") == pytest.approx(1 - free_misses / free_samples)
    assert sched.get(N.M_TBT_SLO_ATTAINMENT, tier="paying") == 0.0  # sliding window: same traffic
    assert 0.9 <= sched.get(N.M_TBT_SLO_ATTAINMENT, tier="free") <= 1.0

    # ---- SLAI's decisions: critical vs non-critical decodes, offset, batch-time estimate, preemptions
    steps = sched.get(N.M_STEPS + "_total", executor=executor)
    critical = sched.get(N.M_CRITICAL_DECODES + "_total", executor=executor)
    noncritical = sched.get(N.M_NONCRITICAL_DECODES + "_total", executor=executor)
    assert critical + noncritical == itl_n  # one decode per TBT sample (no preemption, no abort)
    assert critical > 0  # paying decodes cannot meet a 5 ms TBT: SLAI marks them critical
    assert sched.get(N.M_STEP_NUM_DECODES + "_sum", executor=executor, kind="critical") == critical
    assert sched.get(N.M_STEP_NUM_DECODES + "_count", executor=executor, kind="noncritical") == steps
    assert sched.get(N.M_PREFILL_TOKENS_SCHEDULED + "_total", executor=executor) == \
        sched.total(N.M_PROMPT_TOKENS + "_total")  # each prompt prefilled once
    offset = sched.get(N.M_SLAI_OFFSET, executor=executor)
    assert 0 <= offset < 1e6
    assert STEP_FLOOR_S * 0.95 <= sched.get(N.M_BATCH_TIME_ESTIMATE, executor=executor) < 2.0
    preemptions = sched.get(N.M_NUM_PREEMPTIONS + "_total", executor=executor)
    with grpc.insecure_channel(st.scheduler_address) as ch:
        stats = scheduler_pb2_grpc.SchedulerServiceStub(ch).Stats(scheduler_pb2.StatsRequest(), timeout=5,
                                                                  metadata=call_metadata(st.service_token))
    assert preemptions == sum(e.num_preemptions for e in stats.executors) == 0
    assert stats.executors[0].last_offset == offset

    # ---- per-executor step time, scheduler side and executor side
    assert steps >= MAX_TOKENS and sched.get(N.M_STEP_DURATION + "_count", executor=executor) == steps
    assert sched.get(N.M_STEP_DURATION + "_sum", executor=executor) / steps >= STEP_FLOOR_S * 0.95
    fwd_n = sched.get(N.M_BATCH_FORWARD_DURATION + "_count", executor=executor)
    assert fwd_n == steps and sched.get(N.M_BATCH_FORWARD_DURATION + "_sum", executor=executor) / fwd_n >= \
        STEP_FLOOR_S * 0.99
    for phase in PHASES:
        assert ex.get(N.M_BATCH_INFERENCE_DURATION + "_count", phase=phase) == steps
    ex_forward = ex.get(N.M_BATCH_INFERENCE_DURATION + "_sum", phase="forward")
    assert ex_forward / steps >= STEP_FLOOR_S * 0.99
    assert ex.get(N.M_BATCH_INFERENCE_DURATION + "_sum", phase="total") >= ex_forward
    assert ex.get(N.M_EXECUTOR_BATCH_SIZE + "_count") == steps
    assert ex.get(N.M_EXECUTOR_BATCH_SIZE + "_sum") >= critical + noncritical  # sequences >= decodes

    # ---- gateway: requests by tier and outcome, nothing in flight
    for tier in ("paying", "free"):
        assert gw.get(N.M_GATEWAY_REQUESTS + "_total", tier=tier, outcome="ok") >= PER_TIER
    assert gw.get(N.M_GATEWAY_IN_FLIGHT) == 0

