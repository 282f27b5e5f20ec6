"""In-process service stacks for tests: executors (FakeRunner) + scheduler on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import grpc

from contract.plan import BatchPlan, StepResult
from executor_svc.fake_runner import FakeRunner
from executor_svc.server import serve as serve_executor
from scheduler_svc import submit_codec
from scheduler_svc.config import ServiceConfig
from scheduler_svc.server import serve as serve_scheduler
from wire.pb.slai.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from wire.service_auth import call_metadata


class RecordingRunner(FakeRunner):
    """A FakeRunner that keeps every plan it executed (thread-safe enough for one stream)."""

    def __init__(self, **kw) -> None:
        kw.setdefault("num_blocks", 4096)
        kw.setdefault("check_blocks", True)
        super().__init__(**kw)
        self.plans: list[BatchPlan] = []
        self.released: list[str] = []
        self._lock = threading.Lock()

    def execute(self, plan: BatchPlan) -> StepResult:
        result = super().execute(plan)
        with self._lock:
            if plan.step_id:  # skip the warm-up plan
                self.plans.append(plan)
        return result

    def release(self, req_ids) -> None:
        ids = list(req_ids)
        self.released.extend(ids)
        super().release(ids)

    def finished_ids(self) -> set[str]:
        return {rid for p in self.plans for rid in p.finished_ids}


@dataclass
class Stack:
    executors: list = field(default_factory=list)  # (ServiceServer, servicer, runner)
    scheduler: object = None
    dispatcher: object = None
    channel: grpc.aio.Channel | None = None
    stub: scheduler_pb2_grpc.SchedulerServiceStub | None = None
    auth: tuple | None = None  # ``metadata=`` proving a caller knows the stack's service token (None: no token)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.scheduler is not None:
            await self.scheduler.stop(0)
        if self.dispatcher is not None:
            await self.dispatcher.close()
        for srv, _, _ in self.executors:
            await srv.stop(0)


async def start_stack(runners: list, clock=None, wait_all: bool = True, metrics=None, executor_metrics=None,
                      service_token: str = "", **config) -> Stack:
    """Executors around ``runners`` and a scheduler over them; with ``service_token`` all of them require it."""
    stack = Stack(auth=call_metadata(service_token))
    addrs = []
    for r in runners:
        srv, servicer = await serve_executor(r, "127.0.0.1:0", metrics=executor_metrics, service_token=service_token)
        stack.executors.append((srv, servicer, r))
        addrs.append(f"127.0.0.1:{srv.port}")
    config.setdefault("reconnect_initial_s", 0.05)
    config.setdefault("reconnect_max_s", 0.2)
    cfg = ServiceConfig(executors=tuple(addrs), service_token=service_token, **config)
    kw = {"clock": clock} if clock is not None else {}
    stack.scheduler, stack.dispatcher = await serve_scheduler(cfg, "127.0.0.1:0", metrics=metrics, **kw)
    await stack.dispatcher.wait_ready(10.0, all_executors=wait_all)
    stack.channel = grpc.aio.insecure_channel(f"127.0.0.1:{stack.scheduler.port}")
    stack.stub = scheduler_pb2_grpc.SchedulerServiceStub(stack.channel)
    return stack


def submit_msg(req_id: str, prompt_len: int = 8, max_tokens: int = 4, tier: int = common_pb2.TIER_FREE,
               ignore_eos: bool = True, **kw) -> scheduler_pb2.SubmitRequest:
    return scheduler_pb2.SubmitRequest(
        request_id=req_id, prompt_token_ids=list(range(3, 3 + prompt_len)), max_tokens=max_tokens, tier=tier,
        sampling=common_pb2.SamplingParams(ignore_eos=ignore_eos), **kw)


async def collect(stub, msg) -> list[scheduler_pb2.TokenEvent]:
    return [ev async for ev in stub.Submit(msg)]


def tokens_of(events) -> list[int]:
    return [t for ev in events for t in ev.token_ids]


async def wait_for(pred, timeout_s: float = 30.0, interval_s: float = 0.01) -> None:
    """Poll ``pred`` until it holds; the timeout only guards against a hang."""
    async def loop():
        while not pred():
            await asyncio.sleep(interval_s)
    await asyncio.wait_for(loop(), timeout_s)


def stats(dispatcher):
    return submit_codec.stats_from_pb(submit_codec.stats_to_pb("x", dispatcher.executor_stats(), *dispatcher.queued()))


class VirtualClock:
    """A clock that only moves when the runner says a step took time (deterministic runs)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class VirtualTimeRunner(RecordingRunner):
    """Advances a VirtualClock by ``cost(plan)`` per step instead of sleeping.

    Like the simulator, a plan with no slices (only ids to release) takes no time.
    """

    def __init__(self, clock: VirtualClock, cost, **kw) -> None:
        super().__init__(cost=cost, sleep=False, **kw)
        self.clock = clock

    def execute(self, plan):
        result = super().execute(plan)
        if plan.step_id and not plan.is_empty:
            self.clock.now = self.clock.now + self.cost(plan)
        return result
