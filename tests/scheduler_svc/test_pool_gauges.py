"""The endpoint picker's gauges (vllm:* names) on a live scheduler's /metrics match the pool's real state.

Two executors hold their steps on a gate, so the pool's state stands still while /metrics is
scraped over HTTP and compared with what the scheduler itself reports (its Stats view).
"""

from __future__ import annotations

import asyncio
import threading
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from telemetry import names as N
from telemetry.metrics import SchedulerMetrics, start_metrics_server
from tests.scheduler_svc.helpers import (
    RecordingRunner,
    collect,
    start_stack,
    submit_msg,
    wait_for,
)

GAUGES = (N.M_VLLM_NUM_REQUESTS_WAITING, N.M_VLLM_NUM_REQUESTS_RUNNING, N.M_VLLM_KV_CACHE_USAGE)


class GatedRunner(RecordingRunner):
    """Holds every real step until ``gate`` opens; ``held`` says a step is waiting on it."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.gate = threading.Event()
        self.held = threading.Event()

    def execute(self, plan):
        if plan.step_id and not self.gate.is_set():
            self.held.set()
            self.gate.wait(30)
        return super().execute(plan)


def scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}{N.METRICS_PATH}", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name in GAUGES:
                assert sample.labels == {}, sample  # one series per pool
                out[sample.name] = sample.value
    return out


async def test_vllm_gauges_follow_the_pools_state_at_each_scrape():
    runners = [GatedRunner(num_blocks=12), GatedRunner(num_blocks=12)]  # 12 blocks x 16 tokens each
    metrics = SchedulerMetrics()
    st = await start_stack(runners, metrics=metrics, pipeline=False)
    server, port = start_metrics_server(0, metrics.registry)
    try:
        assert scrape(port) == {g: 0.0 for g in GAUGES}  # up and idle
        # 10 requests of 60 prompt tokens (4 blocks each): 3 fit an executor's 12 blocks, the rest wait
        tasks = [asyncio.create_task(collect(st.stub, submit_msg(f"r{i}", prompt_len=60, max_tokens=3)))
                 for i in range(10)]
        await wait_for(lambda: all(r.held.is_set() for r in runners) and len(st.dispatcher.streams) == 10)
        views = st.dispatcher.executor_stats()
        running = sum(v.num_running for v in views)
        waiting = sum(v.num_waiting for v in views)
        used = sum(v.kv_used_fraction * v.num_blocks for v in views)
        got = scrape(port)
        assert got[N.M_VLLM_NUM_REQUESTS_RUNNING] == running > 0
        assert got[N.M_VLLM_NUM_REQUESTS_WAITING] == waiting > 0
        assert running + waiting == 10
        assert abs(got[N.M_VLLM_KV_CACHE_USAGE] - used / 24) < 1e-9
        assert 0 < got[N.M_VLLM_KV_CACHE_USAGE] <= 1
        for r in runners:
            r.gate.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert all(len(events) >= 1 for events in results)
        # finished: the next scrape reads an empty pool at once (no step needed to refresh it)
        await wait_for(lambda: not st.dispatcher.streams)
        assert scrape(port) == {g: 0.0 for g in GAUGES}
    finally:
        for r in runners:
            r.gate.set()
        server.shutdown()
        await st.close()


async def test_an_executor_that_is_down_counts_neither_load_nor_blocks():
    runners = [RecordingRunner(num_blocks=10), GatedRunner(num_blocks=30)]
    metrics = SchedulerMetrics()
    st = await start_stack(runners, metrics=metrics, pipeline=False)
    server, port = start_metrics_server(0, metrics.registry)
    try:
        await st.executors[0][0].stop(0)  # the 10-block executor goes away
        await wait_for(lambda: st.dispatcher.drivers[0].core is None)
        task = asyncio.create_task(collect(st.stub, submit_msg("r", prompt_len=40, max_tokens=2)))  # 3 blocks
        await wait_for(lambda: runners[1].held.is_set())
        got = scrape(port)
        assert got[N.M_VLLM_NUM_REQUESTS_RUNNING] == 1 and got[N.M_VLLM_NUM_REQUESTS_WAITING] == 0
        assert abs(got[N.M_VLLM_KV_CACHE_USAGE] - 3 / 30) < 1e-9  # of the 30 blocks that are up, not of 40
        runners[1].gate.set()
        events = await asyncio.wait_for(task, 30)
        assert events[-1].usage.completion_tokens == 2
    finally:
        runners[1].gate.set()
        server.shutdown()
        await st.close()
