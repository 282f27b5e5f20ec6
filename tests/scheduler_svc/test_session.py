"""The Session stream: many requests of one gateway on one bidi stream, events batched per step."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from executor_svc.fake_runner import fake_token
from tests.scheduler_svc.helpers import (
    RecordingRunner,
    submit_msg,
    wait_for,
)
from wire.pb.slai.v1 import common_pb2, scheduler_pb2


class Session:
    """A test gateway: sends on a queue, collects every message the scheduler sends back."""

    def __init__(self, stub, metadata=None) -> None:
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.messages: list[scheduler_pb2.SchedulerMessage] = []
        self.events: dict[str, list] = {}
        self.errors: dict[str, scheduler_pb2.RequestError] = {}
        self.call = stub.Session(self._requests(), metadata=metadata)
        self.reader = asyncio.ensure_future(self._read())

    async def _requests(self):
        while (msg := await self.outbox.get()) is not None:
            yield msg

    async def _read(self) -> None:
        async for msg in self.call:
            self.messages.append(msg)
            for ev in msg.events:
                self.events.setdefault(ev.request_id, []).append(ev)
            for err in msg.errors:
                self.errors[err.request_id] = err

    def submit(self, msg, **trace) -> None:
        self.outbox.put_nowait(scheduler_pb2.GatewayMessage(submit=scheduler_pb2.SessionSubmit(
            request=msg, trace_context=trace)))

    def abort(self, rid: str) -> None:
        self.outbox.put_nowait(scheduler_pb2.GatewayMessage(abort=scheduler_pb2.AbortRequest(request_id=rid)))

    def done(self, rid: str) -> bool:
        evs = self.events.get(rid, ())
        return rid in self.errors or bool(evs and evs[-1].finish_reason)

    def tokens(self, rid: str) -> list[int]:
        return [t for ev in self.events.get(rid, ()) for t in ev.token_ids]


async def test_many_requests_on_one_stream_get_exactly_their_tokens_batched_per_step(stack):
    st = await stack([RecordingRunner(cost=lambda plan: 0.002)])
    s = Session(st.stub)
    specs = {f"s{i}": (5 + i, 20 + i) for i in range(16)}
    for rid, (p, m) in specs.items():
        s.submit(submit_msg(rid, p, m))
    await wait_for(lambda: all(s.done(rid) for rid in specs), 20)
    for rid, (p, m) in specs.items():
        assert s.tokens(rid) == [fake_token(rid, p + k, 32000) for k in range(m)], rid
        last = s.events[rid][-1]
        assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (p, m)
        assert last.timings.e2e_s >= last.timings.ttft_s > 0
    # one message per step carries the events of every running request, not one message per token
    assert max(len(m.events) for m in s.messages) >= 8
    num_events = sum(len(m.events) for m in s.messages)
    assert len(s.messages) < num_events / 4
    assert s.messages[-1].load.num_healthy_executors == 1
    s.outbox.put_nowait(None)  # the gateway closes its side: the stream ends (nothing is live)
    await asyncio.wait_for(s.reader, 10)


async def test_rejections_and_bad_input_are_per_request_errors(stack):
    slow = RecordingRunner(cost=lambda plan: 0.002)
    st = await stack([slow], max_queued_requests=2, overrides=("max_num_seqs=1",))
    s = Session(st.stub)
    s.submit(submit_msg("long", 8, 8000))
    await wait_for(lambda: s.tokens("long"))
    s.submit(submit_msg("w0", 8, 2))
    s.submit(submit_msg("w1", 8, 2))
    await wait_for(lambda: st.dispatcher.queued()[0] == 2)
    s.submit(submit_msg("over", 8, 2))
    s.submit(submit_msg("bad", 8, 0))
    await wait_for(lambda: "over" in s.errors and "bad" in s.errors)
    over = s.errors["over"]
    assert over.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "max_queued_requests" in over.message
    assert over.retry_after_s > 0
    bad = s.errors["bad"]
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "max_tokens" in bad.message
    s.abort("long")  # the others go on
    await wait_for(lambda: s.done("long") and s.done("w0") and s.done("w1"))
    assert s.events["long"][-1].finish_reason == common_pb2.FINISH_REASON_ABORT
    assert len(s.tokens("w0")) == len(s.tokens("w1")) == 2


async def test_abort_and_a_dropped_session_free_the_requests(stack):
    runner = RecordingRunner(cost=lambda plan: 0.001)
    st = await stack([runner])
    s = Session(st.stub)
    s.submit(submit_msg("a", 40, 8000))
    s.submit(submit_msg("b", 40, 8000))
    await wait_for(lambda: s.tokens("a") and s.tokens("b"))
    s.abort("a")
    await wait_for(lambda: "a" in runner.finished_ids())
    assert s.events["a"][-1].finish_reason == common_pb2.FINISH_REASON_ABORT
    other = Session(st.stub)
    other.abort("b")  # a session aborts only its own requests
    s.call.cancel()  # the gateway went away
    await wait_for(lambda: "b" in runner.finished_ids())
    await wait_for(lambda: not st.dispatcher.streams)
    other.call.cancel()


async def test_requests_survive_an_executor_failure_on_a_session(stack):
    runners = [RecordingRunner(cost=lambda plan: 0.003) for _ in range(2)]
    st = await stack(runners)
    s = Session(st.stub)
    specs = {f"r{i}": (16 + i, 40) for i in range(8)}
    for rid, (p, m) in specs.items():
        s.submit(submit_msg(rid, p, m))
    await wait_for(lambda: all(len(s.tokens(rid)) >= 5 for rid in specs), 10)
    await st.executors[0][0].stop(0)
    await wait_for(lambda: all(s.done(rid) for rid in specs), 20)
    for rid, (p, m) in specs.items():
        assert s.tokens(rid) == [fake_token(rid, p + k, 32000) for k in range(m)], rid
    assert st.dispatcher.num_failovers >= 1


async def test_a_message_that_does_not_parse_ends_the_session_with_invalid_argument(stack):
    # Session reads its stream in a task of its own; the status must still reach the gateway
    # (it once raced the handler and the call only ended at its deadline) and the live request is freed.
    runner = RecordingRunner(cost=lambda plan: 0.001)
    st = await stack([runner])
    raw = st.channel.stream_stream("/slai.v1.SchedulerService/Session", request_serializer=lambda b: b,
                                   response_deserializer=scheduler_pb2.SchedulerMessage.FromString)
    outbox: asyncio.Queue = asyncio.Queue()

    async def requests():
        while (b := await outbox.get()) is not None:
            yield b

    call = raw(requests(), metadata=st.auth, timeout=30)
    outbox.put_nowait(scheduler_pb2.GatewayMessage(submit=scheduler_pb2.SessionSubmit(
        request=submit_msg("live", 40, 8000))).SerializeToString())
    tokens = []

    async def read():
        async for msg in call:
            tokens.extend(t for ev in msg.events for t in ev.token_ids)

    reader = asyncio.ensure_future(read())
    await wait_for(lambda: tokens)
    outbox.put_nowait(b"\xff\xff\xff")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await reader
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("request: malformed protobuf") and "GatewayMessage" in err.value.details()
    await wait_for(lambda: "live" in runner.finished_ids())
    await wait_for(lambda: not st.dispatcher.streams)
