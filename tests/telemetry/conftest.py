"""Fixtures for the observability tests: tracing is always shut down after a test; ``traced_stack`` runs the
three services as processes exporting to an in-process OTLP receiver."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from telemetry import names as N
from telemetry import tracing
from tests.telemetry.otlp_receiver import OtlpReceiver

OTEL_ENV = ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES",
            "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "SLAI_METRICS_PORT")


@pytest.fixture(autouse=True)
def clean_tracing(monkeypatch):
    for name in OTEL_ENV:
        monkeypatch.delenv(name, raising=False)
    tracing.shutdown_tracing()
    yield
    tracing.shutdown_tracing()


@pytest.fixture
def memory_exporter() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    tracing.init_tracing("slai-test", exporter=exporter)
    return exporter


def spans_named(exporter: InMemorySpanExporter, name: str) -> list:
    return [s for s in exporter.get_finished_spans() if s.name == name]


# ---------------------------------------------------------------- the real stack, exporting to an OTLP receiver
@dataclass
class TracedStack:
    """A running ``LocalStack`` (fake executor) whose three services export spans to ``receiver``."""

    stack: Any  # slai_serve.launch.LocalStack
    receiver: OtlpReceiver
    keys: dict[str, str]  # tier -> API key

    @property
    def metrics_urls(self) -> dict[str, str]:
        st = self.stack
        return {"gateway": f"{st.http_base}{N.METRICS_PATH}",
                "scheduler": f"http://{st.host}:{st.metrics_port}{N.METRICS_PATH}",
                "executor": f"http://{st.host}:{st.metrics_port + 1}{N.METRICS_PATH}"}

    def wait_for_spans(self, predicate: Callable[[list], bool], timeout_s: float = 10.0) -> list:
        """Poll the receiver until ``predicate(spans)`` holds; returns the (service, Span) list."""
        deadline = time.monotonic() + timeout_s
        while True:
            got = self.receiver.spans()
            if predicate(got) or time.monotonic() > deadline:
                return got
            time.sleep(0.05)


# Per-tier TBT SLOs the stack runs with: the paying one is far below the paper cost model's 23.4 ms step floor, so
# every paying TBT sample misses its deadline (deterministic SLO metrics); the free one is never missed. "Far":
# tokens are stamped when the scheduler handles a result, and with planning ahead (the default) a result
# handled a few ms late is followed by the next one sooner than a full step.
# NOTE: paying below any step (every gap misses), free far above one (a miss needs a stall of seconds,
# so a loaded CI machine does not turn the attainment checks into a timing test)
PAYING_TBT_S, FREE_TBT_S = 0.005, 2.0
STACK_KEYS = {"paying": "k-pay", "free": "k-free"}


@pytest.fixture(scope="session")
def traced_stack(tmp_path_factory) -> Iterator[TracedStack]:
    """gateway + scheduler + fake executor (paper step times) as subprocesses, tracing to an in-process receiver.

    Shared by the end-to-end trace and metrics-scrape tests (one start, ≈ 3 s).
    """
    from contract.model_files import default_model_dir
    from slai_serve.launch import LocalStack

    model_dir = default_model_dir()
    if not (model_dir / "tokenizer.json").is_file():
        pytest.skip("no tokenizer for the gateway (python -m executor_svc.models)")
    tmp = tmp_path_factory.mktemp("traced-stack")
    keys = tmp / "keys.yaml"
    keys.write_text("keys:\n" + "".join(f"  {k}: {tier}\n" for tier, k in STACK_KEYS.items()))
    with OtlpReceiver() as rx:
        env = {"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
               "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{rx.endpoint}", "OTEL_TRACES_SAMPLER": "parentbased_always_on",
               "OTEL_RESOURCE_ATTRIBUTES": "", "OTEL_BSP_SCHEDULE_DELAY": "100", N.TRACE_STEP_EVERY_ENV: "1"}
        stack = LocalStack(fake=True, gateway_grpc_port=0, http_port=0, scheduler_port=0, executor_port=0,
                           metrics_port=0, log_dir=str(tmp / "logs"), drain_timeout_s=2.0, startup_timeout_s=60.0,
                           model_dir=str(model_dir), api_keys=str(keys), env=env,
                           executor_args=["--fake-cost", "paper", "--warmup-tokens", "16"],
                           gateway_args=["--paying-tbt", str(PAYING_TBT_S), "--free-tbt", str(FREE_TBT_S)])
        with stack:
            yield TracedStack(stack, rx, dict(STACK_KEYS))
