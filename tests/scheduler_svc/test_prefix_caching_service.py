"""Prefix caching through the live scheduler: hit counters in Stats and /metrics, failover with shared blocks."""

from __future__ import annotations

import asyncio

import pytest

from executor_svc.fake_runner import fake_token
from telemetry.metrics import SchedulerMetrics, render
from tests.scheduler_svc.helpers import (
    RecordingRunner,
    collect,
    stats,
    submit_msg,
    tokens_of,
    wait_for,
)


def cached_slices(runner: RecordingRunner) -> list[int]:
    return [s.num_computed_tokens for p in runner.plans for s in p.new if s.num_computed_tokens]


async def test_hits_are_counted_in_stats_and_metrics(stack):
    metrics = SchedulerMetrics()
    runner = RecordingRunner()
    st = await stack([runner], metrics=metrics)
    assert len(tokens_of(await collect(st.stub, submit_msg("a", 64, 3)))) == 3
    assert len(tokens_of(await collect(st.stub, submit_msg("b", 70, 3)))) == 3  # a's 64 tokens, then its own
    assert cached_slices(runner) == [64]
    (ex,) = stats(st.dispatcher)["executors"]
    assert (ex["prefix_cache_queries"], ex["prefix_cache_hits"]) == (64 + 70, 64)
    assert ex["prefix_cache_hit_rate"] == pytest.approx(64 / 134)
    text = render(metrics.registry)[0].decode()
    assert f'slai_prefix_cache_hits_total{{executor="{ex["address"]}"}} 64.0' in text
    assert f'slai_prefix_cache_queries_total{{executor="{ex["address"]}"}} 134.0' in text


async def test_caching_off_sends_whole_prompts(stack):
    runner = RecordingRunner()
    st = await stack([runner], overrides=("enable_prefix_caching=false",))
    for rid in ("a", "b"):
        await collect(st.stub, submit_msg(rid, 64, 2))
    assert not cached_slices(runner)
    assert stats(st.dispatcher)["executors"][0]["prefix_cache_queries"] == 0


async def test_executor_dies_holding_shared_blocks_and_requests_finish_elsewhere(stack):
    runners = [RecordingRunner(cost=lambda plan: 0.003) for _ in range(2)]
    st = await stack(runners)
    specs = {f"r{i}": (50 + i, 200) for i in range(8)}  # common 50-token prefix: three shared full blocks
    tasks = {}
    for rid, (p, m) in specs.items():  # one by one, so later ones find the prefix cached
        tasks[rid] = asyncio.ensure_future(collect(st.stub, submit_msg(rid, p, m)))
        await wait_for(lambda r=rid: any(r in {s.req_id for s in p.new} for x in runners for p in x.plans), 10)
    await wait_for(lambda: all(cached_slices(r) for r in runners), 10)
    await st.executors[0][0].stop(0)  # executor 0 dies holding blocks shared by several requests
    results = await asyncio.wait_for(asyncio.gather(*tasks.values()), 30)
    for (rid, (p, m)), events in zip(specs.items(), results):
        assert tokens_of(events) == [fake_token(rid, p + k, 32000) for k in range(m)], rid
    survivor = stats(st.dispatcher)["executors"][1]
    assert survivor["healthy"] and survivor["prefix_cache_hits"] > 0 and survivor["num_running"] == 0
    assert st.dispatcher.num_failovers > 0
    core = st.dispatcher.drivers[1].core
    core.prefix_cache.check_invariants()
    assert core.allocator.num_used_blocks == 0
