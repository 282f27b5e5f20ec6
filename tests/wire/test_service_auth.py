"""The service token: scheduler and executors refuse callers without it; health and reflection stay open.

In-process servers on 127.0.0.1:0 (tests/scheduler_svc/helpers.py); the token's sources and the
refusal to listen beyond loopback without one are unit-tested on ``wire.service_auth``.
"""

from __future__ import annotations

import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from contract.plan import BatchPlan
from executor_svc.server import serve as serve_executor
from scheduler_svc.executor_client import ExecutorClient, ExecutorLost
from tests.scheduler_svc.helpers import RecordingRunner, start_stack, submit_msg, tokens_of
from wire import executor_codec, service_auth
from wire.pb.slai.v1 import common_pb2, executor_pb2, executor_pb2_grpc, scheduler_pb2
from wire.service_auth import call_metadata, check_exposure, is_loopback_host, read_service_token

TOKEN = "test-service-token-0123456789abcdef"
WRONG = "not-the-service-token-0123456789ab"


async def _code_of(coro) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await coro
    return err.value.code(), err.value.details()


async def _submit_all(stub, msg, metadata=None) -> list:
    return [ev async for ev in stub.Submit(msg, metadata=metadata, timeout=30)]


async def test_scheduler_refuses_rpcs_without_the_token_and_serves_with_it():
    runner = RecordingRunner()
    stack = await start_stack([runner], service_token=TOKEN)  # ready: the scheduler's own stream got through
    try:
        # the attack the token stops: anyone reaching the port choosing the paying tier and a 1 ms TBT
        sneaky = submit_msg("sneaky", tier=common_pb2.TIER_PAYING, tbt_slo_s=0.001)
        code, details = await _code_of(_submit_all(stack.stub, sneaky))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "missing service token" in details and service_auth.METADATA_KEY in details
        code, details = await _code_of(_submit_all(stack.stub, sneaky, call_metadata(WRONG)))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "invalid service token" in details
        code, _ = await _code_of(_submit_all(stack.stub, sneaky, ((service_auth.METADATA_KEY, TOKEN[:-1]),)))
        assert code == grpc.StatusCode.UNAUTHENTICATED  # a prefix is not the token
        for call in (stack.stub.Stats(scheduler_pb2.StatsRequest(), timeout=10),
                     stack.stub.Abort(scheduler_pb2.AbortRequest(request_id="x"), timeout=10)):
            assert (await _code_of(call))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert stack.dispatcher.queued() == (0, 0) and not stack.dispatcher.streams  # nothing got in

        events = await _submit_all(stack.stub, submit_msg("ok", 8, 5), stack.auth)
        assert len(tokens_of(events)) == 5 and events[-1].usage.completion_tokens == 5
        assert {s.req_id for p in runner.plans for s in p.new} == {"ok"}
        stats = await stack.stub.Stats(scheduler_pb2.StatsRequest(), metadata=stack.auth, timeout=10)
        assert stats.executors[0].num_steps > 0

        # probes carry no secret: health and reflection stay open
        health = await health_pb2_grpc.HealthStub(stack.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(stack.channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name async for r in refl for s in r.list_services_response.service}
        assert "slai.v1.SchedulerService" in names
    finally:
        await stack.close()


async def test_executor_refuses_rpcs_without_the_token():
    srv, _ = await serve_executor(RecordingRunner(), "127.0.0.1:0", service_token=TOKEN)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = executor_pb2_grpc.ExecutorServiceStub(ch)
            code, details = await _code_of(stub.Info(executor_pb2.InfoRequest(), timeout=10))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "missing service token" in details
            code, _ = await _code_of(stub.Release(executor_pb2.ReleaseRequest(all=True), timeout=10,
                                                  metadata=call_metadata(WRONG)))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            # the bidi step stream: refused before any plan runs
            step = stub.Step(timeout=10)
            await step.write(executor_codec.plan_to_pb(BatchPlan(step_id=1)))
            code, details = await _code_of(step.read())
            assert code == grpc.StatusCode.UNAUTHENTICATED and "service token" in details

            info = await stub.Info(executor_pb2.InfoRequest(), metadata=call_metadata(TOKEN), timeout=10)
            assert info.ready and info.num_blocks > 0
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING

        good = ExecutorClient(f"127.0.0.1:{srv.port}", connect_timeout_s=10, service_token=TOKEN)
        try:
            assert (await good.connect(None, 64)).num_blocks > 0  # Info, Release, Warmup, Step stream
        finally:
            await good.close()
        for token in ("", WRONG):  # a scheduler without the executor's token never gets to plan on it
            client = ExecutorClient(f"127.0.0.1:{srv.port}", connect_timeout_s=10, service_token=token)
            with pytest.raises(ExecutorLost, match="UNAUTHENTICATED"):
                await client.connect(None, 64)
    finally:
        await srv.stop(0)


async def test_no_token_means_no_check():
    stack = await start_stack([RecordingRunner()])
    try:
        assert stack.auth is None
        events = await _submit_all(stack.stub, submit_msg("open", 8, 3))
        assert len(tokens_of(events)) == 3
    finally:
        await stack.close()


# ---------------------------------------------------------------- where the token comes from
def test_token_sources_and_precedence(tmp_path):
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")  # a trailing newline (echo > file) is not part of the token
    env = {service_auth.SERVICE_TOKEN_ENV: WRONG}
    assert read_service_token(environ={}) == ""
    assert read_service_token(environ={service_auth.SERVICE_TOKEN_ENV: "  "}) == ""
    assert read_service_token(environ=env) == WRONG
    assert read_service_token(environ={**env, service_auth.SERVICE_TOKEN_FILE_ENV: str(f)}) == TOKEN
    assert read_service_token(f, environ={service_auth.SERVICE_TOKEN_FILE_ENV: "/nonexistent"}) == TOKEN


@pytest.mark.parametrize("token, message", [("short", "at least 16 characters"),
                                            ("has a space in it, 1234567890", "printable ASCII without spaces"),
                                            ("nön-ascii-token-0123456789", "printable ASCII")])
def test_malformed_tokens_are_refused_naming_the_source(token, message, tmp_path):
    with pytest.raises(ValueError, match=message) as err:
        read_service_token(environ={service_auth.SERVICE_TOKEN_ENV: token})
    assert service_auth.SERVICE_TOKEN_ENV in str(err.value)
    f = tmp_path / "token"
    f.write_text(token)
    with pytest.raises(ValueError, match=message) as err:
        read_service_token(f, environ={})
    assert str(f) in str(err.value)


def test_missing_token_file_is_named():
    with pytest.raises(ValueError, match="service token file '/nonexistent/token'"):
        read_service_token("/nonexistent/token", environ={})


# ---------------------------------------------------------------- listening beyond loopback
@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True),
                                            ("::1", True), ("[::1]", True), ("0.0.0.0", False), ("::", False),
                                            ("10.1.2.3", False), ("scheduler", False)])
def test_is_loopback_host(host, loopback):
    assert is_loopback_host(host) is loopback


def test_exposure_without_a_token_needs_insecure_no_auth(caplog):
    check_exposure("scheduler", "127.0.0.1", "", False)  # loopback: fine
    check_exposure("scheduler", None, "", False)  # unix socket: its file permissions guard it
    check_exposure("scheduler", "0.0.0.0", TOKEN, False)  # a token: fine anywhere
    with pytest.raises(ValueError, match="--host 0.0.0.0 exposes the scheduler") as err:
        check_exposure("scheduler", "0.0.0.0", "", False)
    assert service_auth.SERVICE_TOKEN_ENV in str(err.value) and "--insecure-no-auth" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="wire.service_auth"):
        check_exposure("executor", "0.0.0.0", "", True)
    assert any(r.levelno == logging.WARNING and "WITHOUT AUTHENTICATION" in r.getMessage() for r in caplog.records)
