"""ExecutorService over gRPC with a FakeRunner: Info, Warmup, health, the Step stream, Release."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from contract.plan import BatchPlan, CachedRequestSlice, NewRequestSlice
from executor_svc.fake_runner import FakeRunner, fake_token
from executor_svc.server import SERVICE_NAME, serve
from wire import executor_codec
from wire.pb.slai.v1 import executor_pb2, executor_pb2_grpc


@pytest.fixture
async def executor():
    servers = []

    async def make(runner=None, warmup=False, **kw):
        runner = runner or FakeRunner(num_blocks=64, check_blocks=True)
        srv, servicer = await serve(runner, "127.0.0.1:0", warmup=warmup, **kw)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}")
        servers.append((srv, channel))
        return (executor_pb2_grpc.ExecutorServiceStub(channel), health_pb2_grpc.HealthStub(channel), servicer,
                runner)

    yield make
    for srv, channel in servers:
        await channel.close()
        await srv.stop(0)


def new_plan(step_id: int, rid: str, n: int, blocks=(0,)) -> BatchPlan:
    return BatchPlan(step_id=step_id, new=(NewRequestSlice(
        req_id=rid, token_ids=tuple(range(1, n + 1)), num_tokens=n, block_ids=tuple(blocks), num_new_tokens=n,
        sample=True),))


def decode_plan(step_id: int, rid: str, computed: int, finished=()) -> BatchPlan:
    return BatchPlan(step_id=step_id, cached=(CachedRequestSlice(
        req_id=rid, num_computed_tokens=computed, num_new_tokens=1, is_decode=True, sample=True),),
        finished_ids=tuple(finished))


async def test_health_turns_serving_only_after_warmup(executor):
    stub, health, servicer, _ = await executor()
    for name in ("", SERVICE_NAME):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
    info = await stub.Info(executor_pb2.InfoRequest())
    assert not info.ready and info.num_blocks == 64 and info.block_size == 16 and info.model == "fake"
    info = await stub.Warmup(executor_codec.warmup_to_pb(max_num_blocks=10, max_batch_tokens=512))
    assert info.ready and info.num_blocks == 10  # capped
    resp = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    assert (await stub.Info(executor_pb2.InfoRequest())).num_blocks == 10
    info = await stub.Warmup(executor_codec.warmup_to_pb(max_num_blocks=None, max_batch_tokens=16))
    assert info.num_blocks == 64  # no cap: everything the runner has


async def test_step_stream_runs_plans_and_survives_a_rejected_one(executor):
    stub, _, servicer, runner = await executor(warmup=True)
    call = stub.Step()
    await call.write(executor_codec.plan_to_pb(new_plan(1, "a", 5)))
    r1 = await call.read()
    assert not r1.error and r1.step_id == 1 and list(r1.request_ids) == ["a"]
    assert list(r1.token_ids) == [fake_token("a", 5, runner.vocab_size)]
    assert r1.total_ns > 0 and r1.total_ns >= r1.forward_ns
    # a decode for an unknown request: rejected, nothing run
    await call.write(executor_codec.plan_to_pb(decode_plan(2, "ghost", 3)))
    r2 = await call.read()
    assert r2.step_id == 2 and "plan rejected" in r2.error and "ghost" in r2.error and not r2.request_ids
    # a block id beyond the (capped) pool: rejected too
    await call.write(executor_codec.plan_to_pb(new_plan(3, "b", 5, blocks=(64,))))
    r3 = await call.read()
    assert "block id 64" in r3.error
    # the stream is still up and "a" is intact
    await call.write(executor_codec.plan_to_pb(decode_plan(4, "a", 5)))
    r4 = await call.read()
    assert not r4.error and list(r4.token_ids) == [fake_token("a", 6, runner.vocab_size)]
    assert servicer.state.num_rejected == 2
    # finished ids are released before the plan runs
    await call.write(executor_codec.plan_to_pb(BatchPlan(step_id=5, finished_ids=("a",))))
    r5 = await call.read()
    assert not r5.error and not r5.request_ids
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF


async def test_release_all(executor):
    stub, _, servicer, runner = await executor(warmup=True)
    call = stub.Step()
    for i, rid in enumerate(("x", "y")):
        await call.write(executor_codec.plan_to_pb(new_plan(i + 1, rid, 4, blocks=(i,))))
        assert not (await call.read()).error
    resp = await stub.Release(executor_pb2.ReleaseRequest(request_ids=["x", "nope"]))
    assert resp.num_released == 1
    resp = await stub.Release(executor_pb2.ReleaseRequest(all=True))
    assert resp.num_released == 1
    # "y" is gone: a decode for it is rejected
    await call.write(executor_codec.plan_to_pb(decode_plan(3, "y", 4)))
    assert "y" in (await call.read()).error
    call.cancel()


async def test_bad_sampling_in_a_plan_is_rejected_not_fatal(executor):
    stub, _, _, _ = await executor(warmup=True)
    call = stub.Step()
    msg = executor_codec.plan_to_pb(new_plan(1, "a", 3))
    msg.new[0].sampling.top_p = 2.0
    await call.write(msg)
    assert "top_p" in (await call.read()).error
    await call.write(executor_codec.plan_to_pb(new_plan(2, "a", 3)))
    assert not (await call.read()).error
    call.cancel()
