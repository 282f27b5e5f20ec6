"""wire.grpc_server: request bytes that do not parse are INVALID_ARGUMENT in every service.

grpc.aio alone answers UNKNOWN ("Unexpected <class DecodeError>"). Sent as raw bytes
through generic multicallables with identity serializers, the way a broken client would.
"""

from __future__ import annotations

import grpc
import pytest

from contract.plan import BatchPlan, NewRequestSlice
from executor_svc.fake_runner import FakeRunner
from executor_svc.server import serve
from wire import executor_codec
from wire.pb.slai.v1 import executor_pb2

IDENTITY = dict(request_serializer=lambda b: b, response_deserializer=lambda b: b)
GARBAGE = b"\xff\xff\xff"


@pytest.fixture
async def executor_channel():
    srv, _ = await serve(FakeRunner(num_blocks=64), "127.0.0.1:0")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        yield ch
    await srv.stop(0)


async def test_unary_request_that_does_not_parse(executor_channel):
    info = executor_channel.unary_unary("/slai.v1.ExecutorService/Info", **IDENTITY)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await info(GARBAGE, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("request: malformed protobuf") and "InfoRequest" in err.value.details()
    assert executor_pb2.InfoResponse.FromString(await info(b"", timeout=30)).num_blocks == 64  # still serves


async def test_request_stream_ends_at_the_first_message_that_does_not_parse(executor_channel):
    # The executor reads Step's request stream in a task of its own, so the status must not
    # depend on the servicer passing the error on.
    plan = BatchPlan(step_id=1, new=(NewRequestSlice(req_id="r", token_ids=(1, 2), num_tokens=2, block_ids=(0,),
                                                     num_new_tokens=2, sample=True),))
    step = executor_channel.stream_stream("/slai.v1.ExecutorService/Step", **IDENTITY)
    call = step(iter([executor_codec.plan_to_pb(plan).SerializeToString(), GARBAGE]), timeout=30)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in call:
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("request: malformed protobuf") and "StepRequest" in err.value.details()
