"""A key's tier TTFT objective (key file ``tiers.<tier>.ttft_slo_s``) reaches the scheduler core's request:
gateway (gRPC) -> SubmitRequest -> scheduler service (submit_codec) -> the core the policy schedules from."""

from __future__ import annotations

import grpc

from contract.tiers import Tier
from gateway.auth import parse_key_data
from tests.scheduler_svc.helpers import RecordingRunner
from tests.scheduler_svc.helpers import start_stack as start_scheduler
from wire.pb.slai.v1 import gateway_pb2, gateway_pb2_grpc

from .conftest import start_stack

KEYS = {"keys": {"k-pay": "paying", "k-free": "free"},
        "tiers": {"paying": {"tbt_slo_s": 0.1, "ttft_slo_s": 0.75}, "free": {"tbt_slo_s": 0.4}}}


async def test_a_keys_ttft_objective_arrives_in_the_core_request(tiny_model_dir):
    sched = await start_scheduler([RecordingRunner()])
    core = sched.dispatcher.drivers[0].core
    seen = []
    add = core.add

    def recording_add(req, now):
        seen.append(req)
        return add(req, now)

    core.add = recording_add
    st, _ = await start_stack(tiny_model_dir, keys=parse_key_data(KEYS),
                              scheduler_address=f"127.0.0.1:{sched.scheduler.port}")
    try:
        async with grpc.aio.insecure_channel(st.grpc_address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            for key in ("k-pay", "k-free"):
                chunks = [c async for c in stub.Generate(gateway_pb2.GenerateRequest(prompt="Hello", max_tokens=3),
                                                         metadata=(("authorization", f"Bearer {key}"),), timeout=10)]
                assert chunks[-1].finish_reason != 0
        pay, free = seen
        assert pay.tier == Tier.PAYING and abs(pay.ttft_slo_s - 0.75) < 1e-6 and abs(pay.tbt_slo_s - 0.1) < 1e-6
        assert free.tier == Tier.FREE and free.ttft_slo_s is None  # no objective: none invented on the way
        assert abs(free.tbt_slo_s - 0.4) < 1e-6
    finally:
        await st.running.stop(0.2)
        await sched.close()
