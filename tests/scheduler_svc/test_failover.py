"""Executor failure: requests move to a healthy executor with no token lost or repeated."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from executor_svc.fake_runner import fake_token
from executor_svc.server import serve as serve_executor
from tests.scheduler_svc.helpers import (
    RecordingRunner,
    collect,
    stats,
    submit_msg,
    tokens_of,
    wait_for,
)
from wire.pb.slai.v1 import common_pb2


def expected_tokens(rid: str, prompt: int, n: int) -> list[int]:
    return [fake_token(rid, prompt + k, 32000) for k in range(n)]


async def test_killed_executor_loses_no_request(stack):
    runners = [RecordingRunner(cost=lambda plan: 0.003) for _ in range(2)]
    st = await stack(runners)
    specs = {f"r{i}": (16 + i, 40) for i in range(10)}
    tasks = {rid: asyncio.ensure_future(collect(st.stub, submit_msg(rid, p, m))) for rid, (p, m) in specs.items()}
    # both executors are decoding
    await wait_for(lambda: all(sum(c.is_decode for p in r.plans for c in p.cached) >= 20 for r in runners), 10)
    on_dead = {rid for rid, s in st.dispatcher.streams.items() if s.driver.index == 0}
    assert on_dead
    await st.executors[0][0].stop(0)  # kill executor 0 mid-stream
    results = await asyncio.wait_for(asyncio.gather(*tasks.values()), 20)
    for (rid, (p, m)), events in zip(specs.items(), results):
        assert tokens_of(events) == expected_tokens(rid, p, m), rid  # nothing lost, nothing twice
        last = events[-1]
        assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (p, m)
    assert st.dispatcher.num_failovers >= len(on_dead)
    ex = stats(st.dispatcher)["executors"]
    assert not ex[0]["healthy"] and ex[1]["healthy"] and ex[1]["num_running"] == 0
    # new work goes to the survivor
    assert len(tokens_of(await collect(st.stub, submit_msg("after", 8, 3)))) == 3


async def test_no_executor_left_is_unavailable_and_nothing_hangs(stack):
    st = await stack([RecordingRunner(cost=lambda plan: 0.003)])
    call = st.stub.Submit(submit_msg("doomed", 8, 2000))
    await call.read()
    await st.executors[0][0].stop(0)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(collect_rest(call), 10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no healthy executor" in info.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(collect(st.stub, submit_msg("late", 8, 2)), 10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not st.dispatcher.streams


async def test_executor_comes_back(stack):
    st = await stack([RecordingRunner(cost=lambda plan: 0.002)])
    srv = st.executors[0][0]
    port = srv.port
    call = st.stub.Submit(submit_msg("doomed", 8, 2000))
    await call.read()
    await srv.stop(0)
    with pytest.raises(grpc.aio.AioRpcError):
        await asyncio.wait_for(collect_rest(call), 10)
    # a new executor process on the same address: the driver reconnects and rebuilds its core
    runner = RecordingRunner()
    srv2, servicer = await serve_executor(runner, f"127.0.0.1:{port}")
    st.executors.append((srv2, servicer, runner))
    await st.dispatcher.wait_ready(10, all_executors=True)
    events = await asyncio.wait_for(collect(st.stub, submit_msg("back", 8, 5)), 10)
    assert tokens_of(events) == expected_tokens("back", 8, 5)
    assert runner.plans and stats(st.dispatcher)["executors"][0]["healthy"]


class StuckRunner(RecordingRunner):
    """Blocks in its first decode step until ``gate`` is set (a hung executor)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.gate = threading.Event()
        self.stuck = False

    def execute(self, plan):
        if not self.stuck and any(c.is_decode for c in plan.cached):
            self.stuck = True
            self.gate.wait(10)
        return super().execute(plan)


async def test_step_timeout_moves_requests(stack):
    stuck = StuckRunner(cost=lambda plan: 0.001)
    st = await stack([stuck, RecordingRunner(cost=lambda plan: 0.001)], step_timeout_s=0.3, connect_timeout_s=0.3,
                     routing="round-robin")
    try:
        specs = {f"t{i}": (8, 12) for i in range(4)}
        results = await asyncio.wait_for(asyncio.gather(
            *[collect(st.stub, submit_msg(rid, p, m)) for rid, (p, m) in specs.items()]), 15)
        for (rid, (p, m)), events in zip(specs.items(), results):
            assert tokens_of(events) == expected_tokens(rid, p, m)
        assert stuck.stuck and st.dispatcher.num_failovers >= 1
    finally:
        stuck.gate.set()


async def collect_rest(call):
    out = []
    while (ev := await call.read()) is not grpc.aio.EOF:
        out.append(ev)
    return out


async def test_idle_executor_death_is_noticed_and_a_restarted_one_is_used_again(stack):
    """With nothing to run the driver reads nothing from the stream: it must still notice the executor
    died (Stats, health) and reconnect once it is back, so the next request is not sent to a dead stream."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    st = await stack([RecordingRunner()])
    srv = st.executors[0][0]
    port = srv.port
    health = health_pb2_grpc.HealthStub(st.channel)

    async def scheduler_status() -> int:
        return (await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)).status

    assert len(tokens_of(await collect(st.stub, submit_msg("before", 8, 3)))) == 3
    await srv.stop(0)  # idle: no step in flight
    await wait_for(lambda: not st.dispatcher.drivers[0].healthy, 30)
    assert not stats(st.dispatcher)["executors"][0]["healthy"]
    assert await scheduler_status() == health_pb2.HealthCheckResponse.NOT_SERVING
    runner = RecordingRunner()
    srv2, servicer = await serve_executor(runner, f"127.0.0.1:{port}")
    st.executors.append((srv2, servicer, runner))
    await st.dispatcher.wait_ready(30, all_executors=True)
    assert await scheduler_status() == health_pb2.HealthCheckResponse.SERVING
    events = await asyncio.wait_for(collect(st.stub, submit_msg("after", 8, 5)), 30)
    assert tokens_of(events) == expected_tokens("after", 8, 5) and runner.plans
