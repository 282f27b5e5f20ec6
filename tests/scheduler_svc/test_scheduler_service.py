"""SchedulerService end to end, in process: executors run FakeRunner over real gRPC streams."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest

from executor_svc.fake_runner import fake_token
from scheduler_svc.core.config import CPU_MIN_PREFILL_CHUNK
from tests.scheduler_svc.helpers import (
    RecordingRunner,
    VirtualClock,
    VirtualTimeRunner,
    collect,
    stats,
    submit_msg,
    tokens_of,
    wait_for,
)
from wire.pb.slai.v1 import common_pb2, scheduler_pb2


async def test_concurrent_streams_get_exactly_their_tokens(stack):
    st = await stack()
    specs = {f"req-{i}": (5 + 7 * i, 1 + 3 * i) for i in range(8)}  # id -> (prompt, max_tokens)
    results = await asyncio.gather(*[collect(st.stub, submit_msg(rid, p, m)) for rid, (p, m) in specs.items()])
    for (rid, (p, m)), events in zip(specs.items(), results):
        toks = tokens_of(events)
        assert toks == [fake_token(rid, p + k, 32000) for k in range(m)]  # position = sequence index
        assert all(ev.request_id == rid for ev in events)
        last = events[-1]
        assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert all(ev.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for ev in events[:-1])
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (p, m)
        assert last.timings.ttft_s > 0 and last.timings.e2e_s >= last.timings.ttft_s
        assert last.timings.queue_s >= 0
        assert events[0].ttft_s > 0
    s = stats(st.dispatcher)["executors"][0]
    assert s["num_running"] == 0 and s["kv_used_fraction"] == 0.0 and s["healthy"]
    assert s["num_steps"] > 0 and s["mean_batch_s"] > 0 and s["mean_decision_s"] > 0


async def test_stop_token_finishes_with_stop(stack):
    st = await stack()
    rid = "stopper"
    stop_tok = fake_token(rid, 8 + 2, 32000)  # the third output token
    msg = submit_msg(rid, 8, 10, ignore_eos=False)
    msg.sampling.stop_token_ids.append(stop_tok)
    events = await collect(st.stub, msg)
    assert len(tokens_of(events)) == 3 and tokens_of(events)[-1] == stop_tok
    assert events[-1].finish_reason == common_pb2.FINISH_REASON_STOP


async def test_stats_rpc(stack):
    st = await stack(policy="sarathi-fcfs")
    await collect(st.stub, submit_msg("a", 8, 3))
    resp = await st.stub.Stats(scheduler_pb2.StatsRequest())
    assert resp.policy == "sarathi-fcfs" and len(resp.executors) == 1
    e = resp.executors[0]
    assert e.healthy and e.num_blocks == 4096 and e.num_steps >= 3 and e.num_running == 0
    assert e.mean_rpc_overhead_s > 0 and e.mean_executor_wait_s > 0
    assert resp.num_tbt_samples == 2  # 3 tokens: two gaps on the scheduler's clock
    assert 0 < resp.tbt_p50_s <= resp.tbt_p99_s


async def test_stats_tbt_quantiles_are_the_gaps_between_step_results(stack):
    """On a virtual clock with 50 ms steps every gap is one step: Stats' quantiles within their 0.5%."""
    clock = VirtualClock()
    st = await stack([VirtualTimeRunner(clock, lambda plan: 0.05, num_blocks=4096)], clock=clock,
                     policy="sarathi-fcfs", pipeline=False)
    await asyncio.gather(*[collect(st.stub, submit_msg(f"r{i}", 8, 11)) for i in range(4)])
    resp = await st.stub.Stats(scheduler_pb2.StatsRequest())
    assert resp.num_tbt_samples == 4 * 10
    assert resp.tbt_p50_s == pytest.approx(0.05, rel=0.005) and resp.tbt_p99_s == pytest.approx(0.05, rel=0.005)


async def test_bad_input_is_invalid_argument_and_names_the_field(stack):
    st = await stack()
    good = asyncio.ensure_future(collect(st.stub, submit_msg("good", 8, 20)))
    bad = {
        "prompt_token_ids": submit_msg("b1", 0, 4),
        "max_tokens": submit_msg("b2", 8, 0),
        "sampling.top_p": submit_msg("b3", 8, 4),
        "sampling.temperature": submit_msg("b4", 8, 4),
        "tier": submit_msg("b5", 8, 4, tier=7),
        "request_id": submit_msg("", 8, 4),
    }
    bad["sampling.top_p"].sampling.top_p = 1.5
    bad["sampling.temperature"].sampling.temperature = -1.0
    for field_name, msg in bad.items():
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(st.stub, msg)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field_name
        assert field_name.split(".")[-1] in info.value.details(), (field_name, info.value.details())
    # a duplicate id is rejected while the first is live, and the first is unaffected
    await wait_for(lambda: "good" in st.dispatcher.streams)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(st.stub, submit_msg("good", 8, 4))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "already in use" in info.value.details()
    events = await good
    assert len(tokens_of(events)) == 20 and events[-1].usage.completion_tokens == 20


async def test_full_queue_is_resource_exhausted(stack):
    slow = RecordingRunner(cost=lambda plan: 0.002)
    st = await stack([slow], max_queued_requests=2, overrides=("max_num_seqs=1",))
    first = st.stub.Submit(submit_msg("long", 8, 8000))
    await first.read()  # running: holds the only sequence slot
    waiting = [st.stub.Submit(submit_msg(f"w{i}", 8, 2)) for i in range(2)]
    await wait_for(lambda: st.dispatcher.queued()[0] == 2)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(st.stub, submit_msg("over", 8, 2))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_queued_requests" in info.value.details()
    assert dict(info.value.trailing_metadata()).get("retry-after-s")
    first.cancel()
    for call in waiting:  # the queued ones still complete
        events = [ev async for ev in call]
        assert events[-1].usage.completion_tokens == 2


async def test_queued_token_bound(stack):
    st = await stack(max_queued_tokens=100)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(st.stub, submit_msg("big", 101, 2))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queued_tokens" in info.value.details()
    assert len(tokens_of(await collect(st.stub, submit_msg("ok", 100, 2)))) == 2


async def test_abort_rpc_frees_blocks_and_tells_the_executor(stack):
    runner = RecordingRunner(cost=lambda plan: 0.001)
    st = await stack([runner])
    call = st.stub.Submit(submit_msg("victim", 40, 8000))
    await call.read()
    s = stats(st.dispatcher)["executors"][0]
    assert s["num_running"] == 1 and s["kv_used_fraction"] > 0
    assert (await st.stub.Abort(scheduler_pb2.AbortRequest(request_id="victim"))).found
    rest = await read_all(call)
    assert rest[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
    assert rest[-1].usage.prompt_tokens == 40 and rest[-1].usage.completion_tokens >= 1
    await wait_for(lambda: "victim" in runner.finished_ids())
    s = stats(st.dispatcher)["executors"][0]
    assert s["num_running"] == 0 and s["kv_used_fraction"] == 0.0
    assert not (await st.stub.Abort(scheduler_pb2.AbortRequest(request_id="victim"))).found


async def test_client_cancellation_aborts(stack):
    runner = RecordingRunner(cost=lambda plan: 0.001)
    st = await stack([runner])
    call = st.stub.Submit(submit_msg("gone", 40, 8000))
    await call.read()
    call.cancel()
    await wait_for(lambda: "gone" in runner.finished_ids())
    s = stats(st.dispatcher)["executors"][0]
    assert s["num_running"] == 0 and s["kv_used_fraction"] == 0.0 and not st.dispatcher.streams


async def test_tier_defaults_and_explicit_slo(stack):
    st = await stack(overrides=("max_num_seqs=1",))
    d = st.dispatcher
    blocker = st.stub.Submit(submit_msg("blocker", 8, 8000))
    await blocker.read()
    calls = [st.stub.Submit(submit_msg("p", 8, 1, tier=common_pb2.TIER_PAYING)),
             st.stub.Submit(submit_msg("f", 8, 1, tier=common_pb2.TIER_FREE)),
             st.stub.Submit(submit_msg("u", 8, 1, tier=common_pb2.TIER_UNSPECIFIED)),
             st.stub.Submit(submit_msg("x", 8, 1, tbt_slo_s=0.25))]
    await wait_for(lambda: all(r in d.streams for r in "pfux"))
    got = {r: (d.streams[r].req.tier.name, d.streams[r].req.tbt_slo_s) for r in "pfux"}
    assert got["p"] == ("PAYING", pytest.approx(0.1)) and got["f"] == ("FREE", 0.5)
    assert got["u"] == ("FREE", 0.5) and got["x"][1] == pytest.approx(0.25)
    blocker.cancel()
    for c in calls:
        assert (await collect_call(c))[-1].usage.completion_tokens == 1


async def collect_call(call):
    return [ev async for ev in call]


async def read_all(call):
    """Read a stream to its end with the read() API (it cannot be mixed with iteration)."""
    out = []
    while (ev := await call.read()) is not grpc.aio.EOF:
        out.append(ev)
    return out


async def test_too_long_request_is_ignored(stack):
    st = await stack()
    events = await collect(st.stub, submit_msg("huge", 8000, 500))  # 8500 > max_model_len 8192
    assert len(events) == 1 and events[0].finish_reason == common_pb2.FINISH_REASON_IGNORED
    assert (events[0].usage.prompt_tokens, events[0].usage.completion_tokens) == (8000, 0)


async def test_abort_of_a_queued_request(stack):
    runner = RecordingRunner(cost=lambda plan: 0.001)
    st = await stack([runner], overrides=("max_num_seqs=1",))
    blocker = st.stub.Submit(submit_msg("blocker", 8, 8000))
    await blocker.read()
    queued = st.stub.Submit(submit_msg("queued", 8, 5))
    await wait_for(lambda: st.dispatcher.queued()[0] == 1)
    assert (await st.stub.Abort(scheduler_pb2.AbortRequest(request_id="queued"))).found
    events = await read_all(queued)
    assert events[-1].finish_reason == common_pb2.FINISH_REASON_ABORT and not tokens_of(events)
    assert st.dispatcher.queued() == (0, 0)
    assert "queued" not in {s.req_id for p in runner.plans for s in p.new}  # never reached the executor
    blocker.cancel()


async def test_planning_ahead_hides_the_gap_and_changes_no_token(stack):
    """With 4 ms steps, each plan is decided while the step before it runs: the executor
    finds it queued. Every stream, including those that end on a stop token found only
    after their next decode was planned, gets exactly the tokens of a lockstep run."""
    specs = {f"p{i}": (6 + 5 * i, 12 + i, 3 + 2 * i if i % 2 else None) for i in range(6)}  # prompt, max, stop at

    def msg(rid):
        p, m, stop = specs[rid]
        out = submit_msg(rid, p, m, ignore_eos=False)
        if stop is not None:
            out.sampling.stop_token_ids.append(fake_token(rid, p + stop, 32000))
        return out

    seen, ahead, steps, lead = {}, {}, {}, {}
    for pipeline in (False, True):
        st = await stack([RecordingRunner(cost=lambda plan: 0.004)], pipeline=pipeline)
        results = await asyncio.gather(*[collect(st.stub, msg(rid)) for rid in specs])
        seen[pipeline] = {rid: (tokens_of(evs), evs[-1].finish_reason) for rid, evs in zip(specs, results)}
        s = stats(st.dispatcher)["executors"][0]
        ahead[pipeline], steps[pipeline] = s["num_steps_planned_ahead"], s["num_steps"]
        lead[pipeline] = s["mean_plan_ahead_lead_s"]
        assert s["num_running"] == 0 and s["kv_used_fraction"] == 0.0
    assert seen[True] == seen[False]
    for rid, (p, m, stop) in specs.items():
        toks, reason = seen[True][rid]
        assert len(toks) == (m if stop is None else stop + 1)
        assert reason == (common_pb2.FINISH_REASON_LENGTH if stop is None else common_pb2.FINISH_REASON_STOP)
    assert ahead[False] == 0
    assert ahead[True] >= steps[True] // 4  # most steps, in practice; a quarter leaves room for a loaded CI box
    # the decision instant, measured: before the running step's result, by no more than a step and a bit
    assert lead[False] == 0.0 and 0.0 < lead[True] < 1.0


class CpuModelRunner(RecordingRunner):
    """A FakeRunner that reports a model on a CPU, as ModelRunner does there."""

    def info(self):
        return dataclasses.replace(super().info(), model="smollm2-135m-instruct")


async def test_small_steps_are_on_by_default_for_a_model_on_a_cpu_only(stack):
    # min_prefill_chunk = -1 (auto): slai-adaptive may size steps below token_budget where a model runs on a
    # CPU (docs/scheduler.md, "Small steps on a CPU"); not for a fake runner emulating a GPU, nor when set
    cases = ((CpuModelRunner(), (), CPU_MIN_PREFILL_CHUNK), (RecordingRunner(), (), 0),
             (CpuModelRunner(), ("min_prefill_chunk=0",), 0), (RecordingRunner(), ("min_prefill_chunk=32",), 32))
    for runner, overrides, expected in cases:
        st = await stack([runner], policy="slai-adaptive", overrides=overrides)
        assert st.dispatcher.drivers[0].core.config.min_prefill_chunk == expected, (runner, overrides)
