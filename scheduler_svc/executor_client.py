"""One executor as the scheduler sees it: a channel, Info/Warmup, and one bidi Step stream.

``step(plan)`` writes one ``StepRequest`` and reads its ``StepResponse`` (ping-pong
on a persistent stream: about 0.3 ms on loopback, docs/scheduler.md); ``send`` and
``receive`` split it so a second plan can be queued while the first runs. Any
stream error, a timeout or a rejected plan raises ``ExecutorLost`` so the driver
can take its requests back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Callable

import grpc

from contract.executor_info import ExecutorInfo
from wire import executor_codec
from wire.grpc_server import message_size_options
from wire.pb.slai.v1 import executor_pb2, executor_pb2_grpc
from wire.service_auth import call_metadata

if TYPE_CHECKING:  # plan values for annotations; their protobuf form is wire.executor_codec's job
    from contract.plan import BatchPlan, StepResult

log = logging.getLogger(__name__)


class ExecutorLost(ConnectionError):
    """The executor's step stream failed, timed out, or rejected a plan."""


class ExecutorClient:
    def __init__(self, address: str, step_timeout_s: float = 30.0, connect_timeout_s: float = 10.0,
                 warmup_timeout_s: float = 300.0, service_token: str = "") -> None:
        self.address = address
        self._metadata = call_metadata(service_token)  # every call proves the scheduler is the scheduler
        self.step_timeout_s = step_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.warmup_timeout_s = warmup_timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._stub: executor_pb2_grpc.ExecutorServiceStub | None = None
        self._call = None  # the open Step stream
        self.on_closed: Callable[[], None] | None = None  # called when the Step stream ends (e.g. the executor died)

    async def connect(self, max_num_blocks: int | None, max_batch_tokens: int) -> ExecutorInfo:
        """Open a channel, check Info, drop stale state, warm up; returns the KV geometry."""
        await self.close()
        self._channel = grpc.aio.insecure_channel(self.address, options=message_size_options())
        self._stub = executor_pb2_grpc.ExecutorServiceStub(self._channel)
        try:
            meta = self._metadata
            await self._stub.Info(executor_pb2.InfoRequest(), timeout=self.connect_timeout_s, wait_for_ready=False,
                                  metadata=meta)
            # NOTE: a reconnecting scheduler starts with empty cores, so whatever the
            # executor still holds from the previous stream is stale.
            await self._stub.Release(executor_pb2.ReleaseRequest(all=True), timeout=self.connect_timeout_s,
                                     metadata=meta)
            info = executor_codec.info_from_pb(await self._stub.Warmup(
                executor_codec.warmup_to_pb(max_num_blocks, max_batch_tokens), timeout=self.warmup_timeout_s, metadata=meta))
            self._call = self._stub.Step(metadata=meta)
            # NOTE: an idle driver reads nothing from the stream, so it learns of a dead executor only
            # through this callback (otherwise not until the next plan fails, which could fail a request
            # that a restarted executor could run).
            self._call.add_done_callback(self._stream_ended)
        except grpc.aio.AioRpcError as exc:
            await self.close()
            raise ExecutorLost(f"executor {self.address}: {exc.code().name}: {exc.details()}") from None
        return info

    def _stream_ended(self, call) -> None:
        if call is self._call and self.on_closed is not None:
            self.on_closed()

    @property
    def stream_closed(self) -> bool:
        """No open Step stream (never connected, closed, or ended by the executor or the network)."""
        return self._call is None or self._call.done()

    async def step(self, plan: BatchPlan, traceparent: str = "") -> StepResult:
        """Send one plan and wait for its result."""
        await self.send(plan, traceparent)
        return await self.receive(plan)

    async def send(self, plan: BatchPlan, traceparent: str = "") -> None:
        """Queue ``plan`` on the stream; results come back in the order plans were sent."""
        call = self._call
        if call is None:
            raise ExecutorLost(f"executor {self.address}: no step stream")
        msg = executor_codec.plan_to_pb(plan, traceparent)
        with self._lost_on_error(plan):
            async with asyncio.timeout(self.step_timeout_s):
                await call.write(msg)

    async def receive(self, plan: BatchPlan) -> StepResult:
        """Wait for the result of ``plan``, the oldest plan sent and not yet answered."""
        call = self._call
        if call is None:
            raise ExecutorLost(f"executor {self.address}: no step stream")
        with self._lost_on_error(plan):
            async with asyncio.timeout(self.step_timeout_s):
                resp = await call.read()
        if resp is grpc.aio.EOF:
            raise ExecutorLost(f"executor {self.address}: step stream closed")
        if resp.error:
            raise ExecutorLost(f"executor {self.address} rejected step {plan.step_id}: {resp.error}")
        if resp.step_id != plan.step_id:
            raise ExecutorLost(f"executor {self.address}: answer for step {resp.step_id}, expected {plan.step_id}")
        return executor_codec.result_from_pb(resp)

    @contextlib.contextmanager
    def _lost_on_error(self, plan: BatchPlan):
        """Every way a stream can fail becomes ``ExecutorLost``."""
        try:
            yield
        except TimeoutError:
            raise ExecutorLost(f"executor {self.address}: step {plan.step_id} timed out after "
                               f"{self.step_timeout_s:.1f} s") from None
        except grpc.aio.AioRpcError as exc:
            raise ExecutorLost(f"executor {self.address}: {exc.code().name}: {exc.details()}") from None
        except (grpc.aio.UsageError, grpc.aio.InternalError, RuntimeError) as exc:  # stream already closed
            raise ExecutorLost(f"executor {self.address}: {type(exc).__name__}: {exc}") from None

    async def close(self) -> None:
        call, channel = self._call, self._channel
        self._call = self._channel = self._stub = None
        if call is not None:
            call.cancel()
        if channel is not None:
            await channel.close(grace=None)
