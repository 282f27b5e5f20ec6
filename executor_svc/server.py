"""ExecutorService: runs exactly the plans it is sent and reports timings; it decides
nothing (the scheduler owns KV placement) and reads no clock for the scheduler (durations only).

* ``Info``: model, device, dtype, KV geometry.
* ``Warmup``: caps ``num_blocks`` (the scheduler then only places KV in blocks
  ``[0, cap)``: the memory stays allocated, placement is the scheduler's) and runs
  a full-size warm-up step. Health turns SERVING only after a warm-up.
* ``Step``: one long-lived bidi stream. Each ``StepRequest`` is decoded, run in the
  stream's worker thread (torch releases the GIL, so the event loop keeps serving) and
  answered with the runner's timings; ``total_ns`` spans taking the plan up to
  its result being ready, ``idle_ns`` the runner's wait for this plan since its
  previous step ended (a scheduler that plans ahead keeps it near zero). Plans
  are decoded as they arrive and run in order, back to back. A rejected plan
  (``PlanError`` / ``ValueError``) is answered with ``error`` set and nothing
  run; the stream stays up.
* ``Release``: drop per-request state outside a step (a scheduler reconnecting
  sends ``all=true``).

The servicer is thin: every protobuf conversion is in ``wire.executor_codec``.
Telemetry (optional): ``ExecutorMetrics`` per step, and an ``executor.step``
span as the child of the scheduler's step span when the plan carries a
``traceparent`` (both no-ops when off).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator

import grpc

from contract.plan import BatchPlan, NewRequestSlice
from telemetry import step_tracing
from wire import executor_codec
from wire.grpc_server import ServiceServer, start_server
from wire.pb.slai.v1 import executor_pb2, executor_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = executor_pb2.DESCRIPTOR.services_by_name["ExecutorService"].full_name
WARMUP_REQ_ID = "__warmup__"


@dataclass(slots=True)
class ExecutorState:
    """What the servicer tracks beyond the runner: the block cap, readiness, known ids."""

    num_blocks: int = 0  # blocks the scheduler may use (<= the runner's)
    ready: bool = False  # a warm-up has run
    num_steps: int = 0
    num_rejected: int = 0


class ExecutorServicer(executor_pb2_grpc.ExecutorServiceServicer):
    """Drives one runner (``executor_svc.runner_api.Runner``)."""

    def __init__(self, runner: Any, on_ready: Any = None, metrics: Any = None, name: str = "") -> None:
        self.runner = runner
        self.metrics = metrics  # telemetry.metrics.ExecutorMetrics or None
        self.name = name
        self.state = ExecutorState(num_blocks=runner.info().num_blocks)
        self._on_ready = on_ready  # async callback(bool): flips health
        # one runner call at a time, even with two streams open; a THREAD lock, because steps
        # run in each stream's own thread (Step) and other calls in asyncio.to_thread
        self._runner_lock = threading.Lock()
        self._known: set[str] = set()  # ids the runner holds state for (for Release(all))

    # ------------------------------------------------------------------ unary RPCs
    def _info(self):
        return replace(self.runner.info(), num_blocks=self.state.num_blocks)

    async def Info(self, request, context):
        info = await asyncio.to_thread(self._info)  # touches the runner (and its device)
        return executor_codec.info_to_pb(info, ready=self.state.ready)

    async def Warmup(self, request, context):
        cap, max_batch_tokens = executor_codec.warmup_from_pb(request)
        await self.warmup(cap, max_batch_tokens)
        return executor_codec.info_to_pb(self._info(), ready=True)

    async def Release(self, request, context):
        ids = set(self._known) if request.all else set(request.request_ids)
        num_known = len(ids & self._known)
        await asyncio.to_thread(self._locked, self.runner.release, sorted(ids))
        self._known -= ids
        return executor_pb2.ReleaseResponse(num_released=num_known)

    async def warmup(self, max_num_blocks: int | None = None, max_batch_tokens: int = 512) -> None:
        """Cap the blocks, run one full-size step and release it; then report SERVING."""
        full = self.runner.info().num_blocks
        self.state.num_blocks = min(full, max_num_blocks) if max_num_blocks else full
        if self.state.num_blocks < 1:
            raise ValueError(f"no KV blocks available (runner has {full}, cap {max_num_blocks})")
        await asyncio.to_thread(self._locked, self._warmup_step, max(1, max_batch_tokens))
        self.state.ready = True
        if self._on_ready is not None:
            await self._on_ready(True)

    def _locked(self, fn, *args):
        with self._runner_lock:
            return fn(*args)

    def _warmup_step(self, max_batch_tokens: int) -> None:
        info = self.runner.info()
        limit = self.state.num_blocks * info.block_size
        if info.max_model_len:
            limit = min(limit, info.max_model_len)
        n = max(1, min(max_batch_tokens, limit - 1))
        plan = BatchPlan(step_id=0, new=(NewRequestSlice(
            req_id=WARMUP_REQ_ID, token_ids=(0,) * n, num_tokens=n, block_ids=tuple(range(-(-n // info.block_size))),
            num_new_tokens=n, sample=True),))
        t0 = time.perf_counter()
        self.runner.execute(plan)
        self.runner.release([WARMUP_REQ_ID])
        log.info("warm-up step of %d tokens took %.1f ms", n, 1e3 * (time.perf_counter() - t0))

    # ------------------------------------------------------------------ the step stream
    async def Step(self, request_iterator: AsyncIterator[executor_pb2.StepRequest],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[executor_pb2.StepResponse]:
        # NOTE: three stages, so the runner never waits on gRPC: a reader takes plans off the
        # stream and decodes them as they arrive (a plan sent ahead is ready when the step
        # before it ends), a worker THREAD runs them back to back, and this generator writes
        # results. The worker starts the next plan as soon as a step ends, without a hop
        # through the event loop, whose turn may be late behind gRPC writes, metrics and spans
        # (docs/executor.md, 'The step stream').
        plans: queue.SimpleQueue = queue.SimpleQueue()
        results: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(item) -> None:
            try:
                loop.call_soon_threadsafe(results.put_nowait, item)
            except RuntimeError:  # the loop closed (server shutdown): nobody is waiting
                pass

        reader = asyncio.ensure_future(self._read_plans(request_iterator, plans))
        worker = threading.Thread(target=self._run_plans, args=(plans, emit), name="executor-steps", daemon=True)
        worker.start()
        try:
            while True:
                item = await results.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                msg, plan, out = item
                if plan is None:
                    self.state.num_rejected += 1
                else:
                    self._track(plan)
                    self.state.num_steps += 1
                yield out
                if plan is not None and not plan.is_empty:
                    if self.metrics is not None:
                        self.metrics.record_step(out, plan.num_seqs)
                    step_tracing.executor_step_span(msg.traceparent, out, executor=self.name, num_seqs=plan.num_seqs)
        finally:
            reader.cancel()
            plans.put(None)  # the worker ends after its current step (the reader may never have run)

    async def _read_plans(self, request_iterator, plans: queue.SimpleQueue) -> None:
        """Stage 1: decode each StepRequest as it arrives; a plan that does not decode is kept as its error.

        A request stream that fails (a message that is not a StepRequest) is passed on as the
        exception itself, for the handler task to raise: only that task may end the call."""
        try:
            async for msg in request_iterator:
                try:
                    plan = executor_codec.plan_from_pb(msg)
                    self._check_blocks(plan)
                except ValueError as exc:
                    plans.put_nowait((msg, exc))
                    continue
                plans.put_nowait((msg, plan))
        except Exception as exc:  # noqa: BLE001 - e.g. wire.grpc_server.MalformedRequest: the handler ends the call
            plans.put_nowait(exc)
        finally:
            plans.put_nowait(None)

    def _run_plans(self, plans: queue.SimpleQueue, emit) -> None:
        """Stage 2, in the stream's own thread: run plans in order and ``emit`` each result to the loop.

        ``idle_ns`` is the runner's wait since its last step ended; ``total_ns`` runs from
        taking the plan up to its result being ready (encoded)."""
        free_since = 0  # perf_counter_ns when the runner finished its last step
        try:
            while (item := plans.get()) is not None:
                if isinstance(item, Exception):  # the request stream broke: after the plans before it
                    emit(item)
                    return
                msg, plan = item
                t0 = time.perf_counter_ns()
                idle_ns = t0 - free_since if free_since else 0
                try:
                    if isinstance(plan, ValueError):
                        raise plan
                    with self._runner_lock:
                        result = self.runner.execute(plan)
                except ValueError as exc:  # PlanError is a ValueError: nothing was run
                    log.warning("step %d rejected: %s", msg.step_id, exc)
                    emit((msg, None, executor_pb2.StepResponse(step_id=msg.step_id, error=f"plan rejected: {exc}")))
                    continue
                out = executor_codec.result_to_pb(result)
                out.idle_ns = idle_ns
                free_since = time.perf_counter_ns()
                out.total_ns = free_since - t0
                emit((msg, plan, out))
            emit(None)
        except Exception as exc:  # noqa: BLE001 - a runner crash ends the stream with that error
            emit(exc)

    def _check_blocks(self, plan: BatchPlan) -> None:
        """The scheduler may only place KV below the warm-up cap."""
        cap = self.state.num_blocks
        for s in plan.new:
            if s.block_ids and max(s.block_ids) >= cap:
                raise ValueError(f"request {s.req_id!r}: block id {max(s.block_ids)} >= num_blocks {cap}")
        for c in plan.cached:
            if c.new_block_ids and max(c.new_block_ids) >= cap:
                raise ValueError(f"request {c.req_id!r}: block id {max(c.new_block_ids)} >= num_blocks {cap}")

    def _track(self, plan: BatchPlan) -> None:
        known = self._known
        for rid in plan.finished_ids:
            known.discard(rid)
        for rid in plan.preempted_ids:
            known.discard(rid)
        for s in plan.new:
            known.add(s.req_id)


async def serve(runner: Any, address: str = "127.0.0.1:0", warmup: bool = True,
                max_num_blocks: int | None = None, max_batch_tokens: int = 512, metrics: Any = None,
                service_token: str = "") -> tuple[ServiceServer, ExecutorServicer]:
    """Start an executor server around ``runner``; with ``warmup`` it is SERVING on return.

    ``service_token``: every ExecutorService RPC must carry it (wire.service_auth; "" = no check).
    """
    holder: dict[str, ServiceServer] = {}

    async def on_ready(ok: bool) -> None:
        if "srv" in holder:
            await holder["srv"].set_serving(ok)

    servicer = ExecutorServicer(runner, on_ready=on_ready, metrics=metrics, name=address)
    srv = await start_server([lambda s: executor_pb2_grpc.add_ExecutorServiceServicer_to_server(servicer, s)],
                             [SERVICE_NAME], address, serving=False, service_token=service_token)
    holder["srv"] = srv
    if warmup:
        await servicer.warmup(max_num_blocks, max_batch_tokens)
    return srv, servicer
