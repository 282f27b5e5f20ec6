"""Fixtures for the observability tests: tracing is always shut down after a test."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from common import telemetry

OTEL_ENV = ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES",
            "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "SLAI_METRICS_PORT")


@pytest.fixture(autouse=True)
def clean_tracing(monkeypatch):
    for name in OTEL_ENV:
        monkeypatch.delenv(name, raising=False)
    telemetry.shutdown_tracing()
    yield
    telemetry.shutdown_tracing()


@pytest.fixture
def memory_exporter() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    telemetry.init_tracing("slai-test", exporter=exporter)
    return exporter


def spans_named(exporter: InMemorySpanExporter, name: str) -> list:
    return [s for s in exporter.get_finished_spans() if s.name == name]
