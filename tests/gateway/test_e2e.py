"""End to end through real processes: gateway -> scheduler -> executor (``slai-serve up`` machinery).

* the embedded SmolLM2 on CPU answers a greedy chat question, over gRPC and over
  HTTP with the official openai client;
* 32 concurrent streams with ignore_eos get exactly max_tokens tokens (fake executor), through a
  stack whose scheduler and executor require the service token `up` generated.

Skips cleanly when the scheduler/executor services or the converted model are missing.
"""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from contract.model_files import default_model_dir
from slai_serve.launch import LocalStack

pytestmark = pytest.mark.slow

HAVE_SERVICES = all(importlib.util.find_spec(m) is not None
                    for m in ("scheduler_svc.server", "scheduler_svc.__main__", "executor_svc.server",
                              "executor_svc.__main__"))
MODEL_DIR = default_model_dir()
HAVE_MODEL = (MODEL_DIR / "tokenizer.json").is_file() and (MODEL_DIR / "model.safetensors").is_file()
QUESTION = "What is the capital of France?"


def _stack(**kw) -> LocalStack:
    return LocalStack(gateway_grpc_port=0, http_port=0, scheduler_port=0, executor_port=0, metrics_port=-1,
                      log_dir="", drain_timeout_s=2.0, startup_timeout_s=180.0, model_dir=str(MODEL_DIR), **kw)


@pytest.mark.skipif(not HAVE_SERVICES, reason="scheduler/executor services not in this build")
@pytest.mark.skipif(not HAVE_MODEL, reason="SmolLM2 not converted (python -m executor_svc.models)")
def test_smollm2_answers_paris_over_grpc_and_openai_http():
    import openai

    from gateway.client import SyncGatewayClient

    with _stack(executor_args=["--warmup-tokens", "32"]) as st:
        with SyncGatewayClient(st.gateway_address, timeout_s=120) as client:
            pieces = list(client.stream(messages=[("user", QUESTION)], max_tokens=24, temperature=0.0))
        text = "".join(p.text for p in pieces)
        assert "Paris" in text, text
        assert pieces[-1].finish_reason in ("stop", "length")
        assert len(pieces) > 2  # streamed token by token

        oai = openai.OpenAI(base_url=st.http_base + "/v1", api_key="unused", max_retries=0, timeout=120)
        resp = oai.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=24,
                                           messages=[{"role": "user", "content": QUESTION}])
        assert "Paris" in resp.choices[0].message.content
        assert resp.choices[0].message.content.strip() == text.strip()  # greedy: same answer both ways
        stream = oai.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=24,
                                             messages=[{"role": "user", "content": QUESTION}], stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert streamed == resp.choices[0].message.content


KEYS_YAML = "keys:\n  k-pay: paying\n  k-free: free\n"


@pytest.fixture(scope="module")
def fake_stack(tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(KEYS_YAML)
    with _stack(fake=True, api_keys=str(keys)) as st:
        st.keys_file = str(keys)
        yield st


@pytest.mark.skipif(not HAVE_SERVICES, reason="scheduler/executor services not in this build")
@pytest.mark.skipif(not (MODEL_DIR / "tokenizer.json").is_file(), reason="no tokenizer for the gateway")
def test_32_concurrent_streams_exact_token_counts_fake_executor(fake_stack):
    from gateway.client import GatewayClient

    async def go(address: str) -> list:
        async with GatewayClient(address, api_key="k-free", timeout_s=60) as client:
            return await asyncio.gather(*(client.generate(f"request {i}:" + " the" * (5 + i), max_tokens=16 + i,
                                                          ignore_eos=True) for i in range(32)))

    results = asyncio.run(go(fake_stack.gateway_address))
    for i, r in enumerate(results):
        assert r.finish_reason == "length", (i, r.finish_reason)
        assert len(r.token_ids) == r.completion_tokens == 16 + i


def _bench_serve(fake_stack, monkeypatch, *transport: str) -> dict:
    """``bench-serve --json`` against the fake stack with both tiers keyed; returns its JSON."""
    import argparse
    import contextlib
    import io
    import json

    from slai_serve import bench_serve as loadgen
    from wire.service_auth import SERVICE_TOKEN_ENV, SERVICE_TOKEN_FILE_ENV

    monkeypatch.delenv(SERVICE_TOKEN_FILE_ENV, raising=False)
    monkeypatch.setenv(SERVICE_TOKEN_ENV, fake_stack.service_token)  # --scheduler's Stats needs the stack's token
    parser = argparse.ArgumentParser()
    loadgen.add_arguments(parser)
    args = parser.parse_args([*transport, "--qps", "40", "--num-requests", "24",
                              "--api-keys", fake_stack.keys_file, "--paying-prob", "0.5", "--max-prompt-len", "64",
                              "--max-output-len", "12", "--scheduler", fake_stack.scheduler_address,
                              "--model-dir", str(MODEL_DIR), "--json"])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert loadgen.run(args) == 0
    return json.loads(buf.getvalue())


@pytest.mark.skipif(not HAVE_SERVICES, reason="scheduler/executor services not in this build")
@pytest.mark.skipif(not (MODEL_DIR / "tokenizer.json").is_file(), reason="no tokenizer for the gateway")
def test_bench_serve_reports_sim_keys(fake_stack, monkeypatch):
    from simulator.metrics import MetricsCollector

    out = _bench_serve(fake_stack, monkeypatch, "--gateway", fake_stack.gateway_address)
    expected = set(MetricsCollector().summary()) | {"qps", "effective_qps", "meets_slo", "slo_margin", "policy"}
    assert expected <= set(out), expected - set(out)
    assert out["num_finished"] == 24 and out["num_errors"] == 0 and out["num_unfinished"] == 0
    assert out["num_requests_by_tier"]["paying"] + out["num_requests_by_tier"]["free"] == 24
    assert out["tiers_keyed"] == ["free", "paying"] and out["policy"] == "slai"
    assert out["ttft_p50_s"] > 0 and out["throughput_tokens_per_s"] > 0


@pytest.mark.skipif(not HAVE_SERVICES, reason="scheduler/executor services not in this build")
@pytest.mark.skipif(not (MODEL_DIR / "tokenizer.json").is_file(), reason="no tokenizer for the gateway")
def test_bench_serve_over_openai_http_counts_the_same_tokens(fake_stack, monkeypatch, tmp_path):
    """The HTTP replay (what drives vLLM too) sees every token, per tier, as the gRPC replay does."""
    records = tmp_path / "records.jsonl"
    out = _bench_serve(fake_stack, monkeypatch, "--http", fake_stack.http_base, "--records-out", str(records))
    assert out["num_finished"] == 24 and out["num_errors"] == 0 and out["num_unfinished"] == 0
    assert out["num_requests_by_tier"]["paying"] + out["num_requests_by_tier"]["free"] == 24
    assert out["gateway"] == fake_stack.http_base and out["policy"] == "slai"
    import json

    recs = [json.loads(line) for line in records.read_text().splitlines()]
    assert all(r["num_tokens"] == r["output_len"] and r["finish_reason"] == "length" for r in recs), recs


@pytest.mark.skipif(not HAVE_SERVICES, reason="scheduler/executor services not in this build")
@pytest.mark.skipif(not (MODEL_DIR / "tokenizer.json").is_file(), reason="no tokenizer for the gateway")
def test_up_stops_cleanly_on_sigterm(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "slai_serve.cli", "up", "--fake", "--grpc-port", "0", "--http-port", "0",
                             "--scheduler-port", "0", "--executor-port", "0", "--metrics-port", "-1",
                             "--drain-timeout", "2", "--log-dir", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    lines = []
    t0 = time.monotonic()
    for line in proc.stdout:
        lines.append(line)
        if "Ctrl-C" in line or time.monotonic() - t0 > 60:
            break
    assert any("gateway_grpc" in line for line in lines), lines
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, rest
    assert "stopped: gateway=0, scheduler=0, executor-0=0" in rest


@pytest.mark.skipif(not HAVE_SERVICES, reason="scheduler/executor services not in this build")
@pytest.mark.skipif(not (MODEL_DIR / "tokenizer.json").is_file(), reason="no tokenizer for the gateway")
def test_stack_services_refuse_callers_without_its_token(fake_stack):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from wire.pb.slai.v1 import common_pb2, executor_pb2, executor_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
    from wire.service_auth import call_metadata

    token = fake_stack.service_token
    assert len(token) >= 32 and token not in repr(fake_stack)
    for p in fake_stack.procs:  # handed over in the environment, never on the command line
        assert not any(token in a for a in p.popen.args)
    with grpc.insecure_channel(fake_stack.scheduler_address) as ch:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
        sneaky = scheduler_pb2.SubmitRequest(request_id="sneaky", prompt_token_ids=[5, 6, 7], max_tokens=2,
                                             tier=common_pb2.TIER_PAYING, tbt_slo_s=0.001)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Submit(sneaky, timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "service token" in err.value.details()
        assert stub.Stats(scheduler_pb2.StatsRequest(), timeout=10, metadata=call_metadata(token)).policy == "slai"
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(fake_stack.endpoints()["executor_0"]) as ch:
        stub = executor_pb2_grpc.ExecutorServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Info(executor_pb2.InfoRequest(), timeout=10, metadata=call_metadata("x" * 32))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Info(executor_pb2.InfoRequest(), timeout=10, metadata=call_metadata(token)).block_size > 0
