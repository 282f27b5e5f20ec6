"""Routing rules, and the drivers' incremental work count that least-work routing reads."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass

import pytest

from contract.executor_info import ExecutorInfo
from contract.sampling import SamplingParams
from executor_svc.fake_runner import FakeRunner
from scheduler_svc.config import ServiceConfig
from scheduler_svc.core.request import Request
from scheduler_svc.core.router import Router
from scheduler_svc.step_loop import ExecutorDriver


@dataclass
class D:
    index: int
    work: int
    num_requests: int = 0


def test_least_work_picks_fewest_outstanding_tokens():
    r = Router("least-work")
    ds = [D(0, 500), D(1, 20), D(2, 20, num_requests=3), D(3, 900)]
    assert r.pick(ds).index == 1
    assert r.pick([]) is None


def test_round_robin_rotates():
    r = Router("round-robin")
    ds = [D(0, 0), D(1, 0), D(2, 0)]
    assert [r.pick(ds).index for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_power_of_two_takes_the_lighter_of_two_samples():
    r = Router("power-of-two", seed=1)
    ds = [D(i, w) for i, w in enumerate((10, 1000, 1000, 1000))]
    picks = [r.pick(ds).index for _ in range(200)]
    assert picks.count(0) > 60  # chosen whenever sampled (half the time)
    assert Router("power-of-two").pick(ds[:2]).index == 0


def test_unknown_routing():
    with pytest.raises(ValueError, match="routing"):
        Router("random")
    with pytest.raises(ValueError, match="routing"):
        ServiceConfig(routing="random")


class LocalClient:
    """The executor client's interface over an in-process FakeRunner (no gRPC)."""

    address = "local"
    stream_closed = False  # an in-process runner's "stream" never ends by itself
    on_closed = None

    def __init__(self, runner: FakeRunner) -> None:
        self.runner = runner
        self.queued = collections.deque()

    async def connect(self, cap, max_batch_tokens):
        info = self.runner.info()
        return ExecutorInfo(block_size=info.block_size, num_blocks=info.num_blocks, ready=True)

    async def step(self, plan, traceparent=""):
        await self.send(plan)
        return await self.receive(plan)

    async def send(self, plan, traceparent=""):
        self.queued.append(plan)

    async def receive(self, plan):
        await asyncio.sleep(0)
        assert self.queued.popleft() is plan
        return self.runner.execute(plan)

    async def close(self):
        pass


class Sink:
    def __init__(self) -> None:
        self.driver = None
        self.mismatches = []
        self.finished = set()

    def on_ready(self, driver):
        self.driver = driver

    def on_lost(self, driver, requests, reason):
        raise AssertionError(reason)

    def on_events(self, driver, events):
        if driver.work != driver.core.outstanding_tokens():
            self.mismatches.append((driver.work, driver.core.outstanding_tokens()))
        self.finished |= {ev.req_id for ev in events if ev.finish_reason}


async def test_incremental_work_matches_core_outstanding_tokens():
    """Including recompute preemptions (a small KV pool) and aborts."""
    sink = Sink()
    cfg = ServiceConfig(policy="slai", executors=("local",), overrides=("token_budget=128",))
    driver = ExecutorDriver(0, LocalClient(FakeRunner(num_blocks=40)), cfg, sink)
    driver.start()
    while sink.driver is None:
        await asyncio.sleep(0)
    reqs = [Request(f"r{i}", 30 + 17 * i, 20 + i, 0.0, prompt_token_ids=tuple(range(30 + 17 * i)),
                    sampling=SamplingParams(ignore_eos=True)) for i in range(12)]
    for r in reqs:
        driver.submit(r)
    assert driver.work == driver.core.outstanding_tokens() == sum(r.num_prompt_tokens + r.max_tokens for r in reqs)
    for _ in range(5):
        await asyncio.sleep(0)
    assert driver.abort("r11") is not None  # (mid-step: the count is exact again after the step)
    for _ in range(10_000):
        if not driver.core.requests and not driver.core.num_in_flight:
            break
        await asyncio.sleep(0)
    assert not driver.core.requests and driver.work == 0
    assert driver.core.num_preemptions > 0
    assert not sink.mismatches
    assert sink.finished == {r.req_id for r in reqs} - {"r11"}
    await driver.close()
