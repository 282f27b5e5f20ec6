"""``slai-serve up`` supervises its children: the stack survives a dead executor, scheduler or gateway.

Real processes (``LocalStack`` with fake executors, each step sleeping the paper's cost model, about
23 ms) plus the supervision pass that ``up`` runs, on a thread here:

* SIGKILL an executor under load: every stream still gets exactly its tokens (failover), the executor
  is restarted and the scheduler sends it work again;
* SIGKILL the scheduler: in-flight and new requests get UNAVAILABLE at once, the gateway's health and
  ``/health`` turn NOT_SERVING / 503; once restarted, readiness comes back and requests succeed;
* SIGTERM the gateway with streams longer than its drain timeout: SSE ends with an error event and
  ``[DONE]``, gRPC with UNAVAILABLE saying the gateway is shutting down;
* a crash loop makes ``slai-serve up`` exit 1 naming the child and its exit codes.

Every wait is for a condition, with a generous timeout that only guards against a hang.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scheduler_svc import submit_codec
from slai_serve.launch import CrashLoop, LocalStack, Proc, default_model_dir, describe_exit
from wire.pb.slai.v1 import scheduler_pb2, scheduler_pb2_grpc
from wire.service_auth import call_metadata

MODEL_DIR = default_model_dir()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (MODEL_DIR / "tokenizer.json").is_file(), reason="no tokenizer for the gateway")]

HANG_GUARD_S = 60.0
GATEWAY_SERVICE = "slai.v1.GatewayService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Supervisor(threading.Thread):
    """Runs ``stack.supervise()`` every 0.1 s, as ``up`` does; ``paused`` holds restarts back."""

    def __init__(self, stack: LocalStack) -> None:
        super().__init__(daemon=True)
        self.stack = stack
        self.events: list[str] = []
        self.errors: list[BaseException] = []
        self.paused = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            if self.paused.is_set():
                continue
            try:
                self.events.extend(self.stack.supervise())
            except BaseException as exc:  # noqa: BLE001 - reported by the tests
                self.errors.append(exc)
                return


@pytest.fixture(scope="module")
def supervised():
    stack = LocalStack(fake=True, num_executors=2, gateway_grpc_port=0, http_port=0, scheduler_port=0,
                       executor_port=0, metrics_port=-1, log_dir="", drain_timeout_s=1.0, startup_timeout_s=120.0,
                       model_dir=str(MODEL_DIR), executor_args=["--fake-cost", "paper"],
                       gateway_args=["--health-interval", "0.2"], restart_backoff_s=0.2, restart_backoff_max_s=1.0,
                       crash_loop_restarts=10)
    with stack:
        sup = Supervisor(stack)
        sup.start()
        try:
            yield stack, sup
        finally:
            sup.done.set()
            sup.join(5)


def proc(stack: LocalStack, name: str) -> Proc:
    return next(p for p in stack.procs if p.name == name)


async def wait_until(pred, timeout_s: float = HANG_GUARD_S, interval_s: float = 0.1) -> None:
    """Poll an async predicate until it holds; exceptions count as "not yet"."""
    async def loop():
        while True:
            try:
                if await pred():
                    return
            except (grpc.RpcError, httpx.HTTPError):
                pass
            await asyncio.sleep(interval_s)
    await asyncio.wait_for(loop(), timeout_s)


async def scheduler_stats(stack: LocalStack) -> dict:
    async with grpc.aio.insecure_channel(stack.scheduler_address) as ch:
        resp = await scheduler_pb2_grpc.SchedulerServiceStub(ch).Stats(
            scheduler_pb2.StatsRequest(), timeout=5, metadata=call_metadata(stack.service_token))
    return submit_codec.stats_from_pb(resp)


async def gateway_health(stack: LocalStack) -> set[int]:
    async with grpc.aio.insecure_channel(stack.gateway_address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return {(await stub.Check(health_pb2.HealthCheckRequest(service=s), timeout=5)).status
                for s in ("", GATEWAY_SERVICE)}


async def wait_stack_ready(stack: LocalStack, sup: Supervisor) -> None:
    async def ready() -> bool:
        ex = (await scheduler_stats(stack))["executors"]
        return all(e["healthy"] for e in ex) and await gateway_health(stack) == {SERVING}
    await wait_until(ready)
    assert not sup.errors, sup.errors


async def stream_tokens(client, prompt: str, max_tokens: int, started: asyncio.Event | None = None):
    """(number of tokens streamed, the final delta)."""
    n, last = 0, None
    async for d in client.stream(prompt, max_tokens=max_tokens, ignore_eos=True):
        n += len(d.token_ids)
        last = d
        if started is not None and n:
            started.set()
    return n, last


async def test_killed_executor_restarts_and_rejoins_with_no_request_lost(supervised):
    from gateway.client import GatewayClient

    stack, sup = supervised
    await wait_stack_ready(stack, sup)
    victim = proc(stack, "executor-0")
    old_pid = victim.popen.pid
    async with GatewayClient(stack.gateway_address, timeout_s=HANG_GUARD_S) as client:
        lengths = [60 + i for i in range(24)]
        started = [asyncio.Event() for _ in lengths]
        tasks = [asyncio.ensure_future(stream_tokens(client, f"request {i}:" + " the" * (4 + i), m, started[i]))
                 for i, m in enumerate(lengths)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), HANG_GUARD_S)
        before = (await scheduler_stats(stack))["executors"]
        assert before[0]["num_running"] > 0 and before[1]["num_running"] > 0, before  # both mid-flight
        os.kill(old_pid, signal.SIGKILL)

        results = await asyncio.wait_for(asyncio.gather(*tasks), HANG_GUARD_S)
        for m, (n, last) in zip(lengths, results):
            assert n == m and last.finish_reason == "length" and last.completion_tokens == m

        # restarted on the same address; the scheduler reconnects and uses it again
        await wait_stack_ready(stack, sup)
        assert victim.popen.pid != old_pid
        assert any(e.startswith("executor-0 exited with code -9 (SIGKILL)") for e in sup.events), sup.events
        steps_before = (await scheduler_stats(stack))["executors"][0]["num_steps"]
        results = await asyncio.wait_for(asyncio.gather(
            *(stream_tokens(client, f"after {i}", 8) for i in range(8))), HANG_GUARD_S)
        assert all(n == 8 for n, _ in results)
        assert (await scheduler_stats(stack))["executors"][0]["num_steps"] > steps_before


async def test_killed_scheduler_fails_fast_flips_readiness_and_comes_back(supervised):
    from gateway.client import GatewayClient

    stack, sup = supervised
    await wait_stack_ready(stack, sup)
    victim = proc(stack, "scheduler")
    async with GatewayClient(stack.gateway_address, timeout_s=HANG_GUARD_S) as client, \
            httpx.AsyncClient(timeout=HANG_GUARD_S) as http:
        started = asyncio.Event()
        in_flight = asyncio.ensure_future(stream_tokens(client, "long", 2000, started))
        await asyncio.wait_for(started.wait(), HANG_GUARD_S)
        sup.paused.set()  # hold the restart back so the down state can be observed
        try:
            os.kill(victim.popen.pid, signal.SIGKILL)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(in_flight, HANG_GUARD_S)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(stream_tokens(client, "new", 4), HANG_GUARD_S)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "scheduler" in err.value.details()
            r = await http.post(stack.http_base + "/v1/completions", json={"prompt": "hi", "max_tokens": 4})
            assert r.status_code == 503 and "scheduler unavailable" in r.json()["error"]["message"]

            async def not_ready() -> bool:
                return await gateway_health(stack) == {NOT_SERVING}
            await wait_until(not_ready)
            r = await http.get(stack.http_base + "/health")
            assert r.status_code == 503 and r.json()["status"] == "unavailable"
            assert stack.scheduler_address in r.json()["reason"]
        finally:
            sup.paused.clear()

        await wait_stack_ready(stack, sup)  # restarted; executors reconnected; the gateway is ready again
        assert any(e.startswith("scheduler restarted") for e in sup.events), sup.events
        assert (await http.get(stack.http_base + "/health")).status_code == 200
        n, last = await asyncio.wait_for(stream_tokens(client, "back", 5), HANG_GUARD_S)
        assert n == 5 and last.finish_reason == "length"


async def test_sigterm_to_gateway_ends_streams_past_the_drain_timeout_with_a_message(supervised):
    from gateway.client import GatewayClient

    stack, sup = supervised
    await wait_stack_ready(stack, sup)
    victim = proc(stack, "gateway")
    sse_lines: list[str] = []
    sse_started = asyncio.Event()

    async def sse(http) -> int:
        body = {"prompt": "hi", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        async with http.stream("POST", stack.http_base + "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line:
                    sse_lines.append(line)
                    sse_started.set()
            return r.status_code

    async with GatewayClient(stack.gateway_address, timeout_s=HANG_GUARD_S) as client, \
            httpx.AsyncClient(timeout=HANG_GUARD_S) as http:
        started = asyncio.Event()
        grpc_task = asyncio.ensure_future(stream_tokens(client, "long", 2000, started))
        sse_task = asyncio.ensure_future(sse(http))
        await asyncio.wait_for(asyncio.gather(started.wait(), sse_started.wait()), HANG_GUARD_S)
        victim.popen.send_signal(signal.SIGTERM)  # drain timeout 1 s; the streams need ~45 s more

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(grpc_task, HANG_GUARD_S)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "gateway is shutting down" in err.value.details()
        assert await asyncio.wait_for(sse_task, HANG_GUARD_S) == 200
        assert sse_lines[-1] == "data: [DONE]", sse_lines[-3:]
        error = json.loads(sse_lines[-2].removeprefix("data: "))["error"]
        assert "gateway is shutting down" in error["message"]
    await wait_stack_ready(stack, sup)  # the supervisor restarted it
    assert any(e.startswith("gateway exited with code 0") for e in sup.events), sup.events


def test_crash_loop_stops_up_naming_the_child(tmp_path):
    cmd = [sys.executable, "-m", "slai_serve.cli", "up", "--fake", "--grpc-port", "0", "--http-port", "0",
           "--scheduler-port", "0", "--executor-port", "0", "--metrics-port", "-1", "--drain-timeout", "1",
           "--model-dir", str(MODEL_DIR), "--log-dir", str(tmp_path), "--restart-backoff", "0.1",
           "--crash-loop-restarts", "1", "--crash-loop-window", "60"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    for stream in (proc.stdout, proc.stderr):
        threading.Thread(target=lambda s=stream: [lines.put(line) for line in s], daemon=True).start()
    seen: list[str] = []

    def next_line(containing: str) -> str:
        while True:
            line = lines.get(timeout=HANG_GUARD_S)
            seen.append(line)
            if containing in line:
                return line

    try:
        pids = dict(kv.split("=") for kv in next_line("pids:").split(":", 1)[1].strip().split(", "))
        os.kill(int(pids["executor-0"]), signal.SIGKILL)
        restarted = next_line("executor-0 restarted (pid ")
        os.kill(int(restarted.split("(pid ")[1].split(",")[0]), signal.SIGKILL)
        crash = next_line("crash-looping")
        assert proc.wait(HANG_GUARD_S) == 1
        next_line("stopped:")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "executor-0 is crash-looping" in crash and "-9 (SIGKILL), -9 (SIGKILL)" in crash, seen


class FakePopen:
    """What ``supervise`` needs of a child process."""

    def __init__(self, code: int | None = None, pid: int = 1) -> None:
        self.code, self.pid = code, pid

    def poll(self) -> int | None:
        return self.code


def test_supervise_backoff_doubles_resets_after_the_window_and_detects_a_crash_loop(monkeypatch):
    stack = LocalStack(fake=True, restart_backoff_s=0.5, restart_backoff_max_s=3.0, crash_loop_restarts=4,
                       crash_loop_window_s=60.0)
    child = Proc("executor-0", ["executor"], "127.0.0.1:1", popen=FakePopen())
    stack.procs.append(child)
    spawned = []
    monkeypatch.setattr(stack, "_spawn", lambda p: (spawned.append(p.name), setattr(p, "popen", FakePopen())))

    def die_and_restart(now: float, code: int = 1) -> float:
        child.popen.code = code
        (event,) = stack.supervise(now)
        assert event.startswith(f"executor-0 exited with code {describe_exit(code)}; restarting in ")
        delay = child.restart_at - now
        assert stack.supervise(child.restart_at - 0.01) == []  # not yet
        assert stack.supervise(child.restart_at) == [f"executor-0 restarted (pid 1, restart {child.num_restarts})"]
        return delay

    assert stack.supervise(0.0) == []  # alive: nothing to do
    assert [die_and_restart(t) for t in (10.0, 20.0, 30.0)] == [0.5, 1.0, 2.0]
    assert die_and_restart(40.0) == 3.0  # capped
    assert die_and_restart(200.0, code=-9) == 0.5  # the earlier deaths left the window: backoff starts over
    assert describe_exit(-9) == "-9 (SIGKILL)" and describe_exit(3) == "3"
    assert spawned == ["executor-0"] * 5
    for t in (201.0, 202.0, 203.0):
        die_and_restart(t)
    child.popen.code = 2
    with pytest.raises(CrashLoop) as err:
        stack.supervise(204.0)  # a fifth death within 60 s: more than 4 restarts
    assert err.value.name == "executor-0" and err.value.codes == [-9, 1, 1, 1, 2]
    assert "exit codes -9 (SIGKILL), 1, 1, 1, 2" in str(err.value)


@pytest.mark.parametrize("kw, flag", [({"restart_backoff_s": 0}, "--restart-backoff"),
                                      ({"restart_backoff_max_s": 0.1}, "--restart-backoff-max"),
                                      ({"crash_loop_restarts": -1}, "--crash-loop-restarts"),
                                      ({"crash_loop_window_s": 0}, "--crash-loop-window")])
def test_bad_supervision_settings_name_the_flag(kw, flag):
    with pytest.raises(ValueError, match=f"^{flag}:"):
        LocalStack(**kw)
