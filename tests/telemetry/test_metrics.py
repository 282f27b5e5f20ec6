"""Prometheus metrics: per-service registries, expected names, sensible values, /metrics serving."""

from __future__ import annotations

import urllib.request

import pytest

from scheduler_svc.core import PlanStats, StepResult, Tier
from telemetry import names as N
from telemetry.metrics import (
    ExecutorMetrics,
    GatewayMetrics,
    SchedulerMetrics,
    SloWindow,
    add_metrics_route,
    metrics_port,
    render,
    start_metrics_server,
)

STATS = PlanStats(num_prefill_tokens=256, num_decodes=10, num_critical_decodes=3, num_noncritical_decodes=7,
                  num_preempted=1, kv_used_fraction=0.42, offset=5.0, num_waiting=4, num_running=10)


def scheduler_metrics_after_traffic() -> SchedulerMetrics:
    m = SchedulerMetrics()
    m.record_token_event(Tier.PAYING, 0.2, None, 0.1)  # first token: TTFT only
    for gap in (0.05, 0.08, 0.12, 0.09):  # one of four paying gaps misses the 0.1 s SLO
        m.record_token_event(Tier.PAYING, None, gap, 0.1)
    m.record_token_event("free", None, 0.4, 0.5)
    m.record_finish(Tier.PAYING, 0.6, 0.01, prompt_tokens=32, completion_tokens=5, finish_reason="length")
    m.record_step("e0", STATS, step_s=0.031, forward_ns=25_000_000, mean_batch_s=0.03)
    m.record_step("e0", STATS, step_s=0.029, forward_ns=24_000_000, mean_batch_s=0.03)
    m.record_step("e1", PlanStats(num_waiting=1))  # empty plan: gauges only
    return m


def test_scheduler_metrics_values():
    m = scheduler_metrics_after_traffic()
    v = m.registry.get_sample_value
    assert v("slai_time_to_first_token_seconds_count", {"tier": "paying"}) == 1
    assert v("slai_inter_token_latency_seconds_count", {"tier": "paying"}) == 4
    assert v("slai_inter_token_latency_seconds_bucket", {"tier": "paying", "le": "0.1"}) == 3
    assert v("slai_tbt_deadline_misses_total", {"tier": "paying"}) == 1
    assert v("slai_tbt_slo_attainment", {"tier": "paying"}) == pytest.approx(0.75)
    assert v("slai_tbt_slo_attainment_cumulative", {"tier": "paying"}) == pytest.approx(0.75)
    assert v("slai_tbt_slo_attainment", {"tier": "free"}) == 1.0
    assert v("slai_e2e_request_latency_seconds_sum", {"tier": "paying"}) == pytest.approx(0.6)
    assert v("slai_request_queue_time_seconds_count", {"tier": "paying"}) == 1
    assert v("slai_generation_tokens_total", {"tier": "paying"}) == 5
    assert v("slai_request_success_total", {"tier": "paying", "finish_reason": "length"}) == 1
    assert v("slai_num_requests_running", {"executor": "e0"}) == 10
    assert v("slai_num_requests_waiting", {"executor": "e1"}) == 1
    assert v("slai_kv_cache_usage_perc", {"executor": "e0"}) == pytest.approx(0.42)
    assert v("slai_num_preemptions_total", {"executor": "e0"}) == 2
    assert v("slai_steps_total", {"executor": "e0"}) == 2
    assert v("slai_steps_total", {"executor": "e1"}) == 0
    assert v("slai_critical_decodes_total", {"executor": "e0"}) == 6
    assert v("slai_noncritical_decodes_total", {"executor": "e0"}) == 14
    assert v("slai_step_num_decodes_sum", {"executor": "e0", "kind": "critical"}) == 6
    assert v("slai_offset", {"executor": "e0"}) == 5.0
    assert v("slai_batch_time_estimate_seconds", {"executor": "e0"}) == pytest.approx(0.03)
    assert v("slai_step_duration_seconds_sum", {"executor": "e0"}) == pytest.approx(0.06)
    assert v("slai_batch_forward_duration_seconds_sum", {"executor": "e0"}) == pytest.approx(0.049)


def test_every_scheduler_metric_name_is_rendered():
    text = render(scheduler_metrics_after_traffic().registry)[0].decode()
    scheduler_names = [getattr(N, k) for k in dir(N) if k.startswith("M_") and k not in (
        "M_BATCH_INFERENCE_DURATION", "M_EXECUTOR_BATCH_SIZE", "M_GATEWAY_REQUESTS", "M_GATEWAY_IN_FLIGHT")]
    for name in scheduler_names:
        assert f"\n{name}" in text, name
    for name in ("slai_num_preemptions_total", "slai_tbt_deadline_misses_total",
                 "slai_time_to_first_token_seconds_bucket", "slai_inter_token_latency_seconds_count"):
        assert name in text


def test_registries_are_per_service():
    a, b = SchedulerMetrics(), SchedulerMetrics()  # would raise "Duplicated timeseries" on a shared registry
    a.record_token_event("paying", None, 0.05, 0.1)
    assert b.registry.get_sample_value("slai_inter_token_latency_seconds_count", {"tier": "paying"}) == 0
    assert a.registry.get_sample_value("slai_inter_token_latency_seconds_count", {"tier": "paying"}) == 1
    ExecutorMetrics(), ExecutorMetrics(), GatewayMetrics(), GatewayMetrics()


def test_slo_window_forgets_old_samples():
    now = [100.0]
    w = SloWindow(window_s=10, clock=lambda: now[0])
    assert w.attainment(0, 0) == 1.0  # no samples yet
    now[0] = 105.0
    assert w.attainment(4, 2) == 0.5  # 2 of 4 since start (within the window)
    now[0] = 111.0
    assert w.attainment(8, 6) == 0.75  # base: the snapshot at t=100 (newest one >= 10 s old)
    now[0] = 116.0
    assert w.attainment(10, 8) == pytest.approx(6 / 6)  # base: t=105 (4, 2)
    now[0] = 200.0
    assert w.attainment(10, 8) == 1.0  # nothing new in the window


def test_executor_and_gateway_metrics():
    ex = ExecutorMetrics()
    ex.record_step(StepResult(prepare_ns=1_000_000, forward_ns=20_000_000, sample_ns=500_000, total_ns=22_000_000,
                              idle_ns=300_000), num_seqs=12)
    v = ex.registry.get_sample_value
    assert v("slai_batch_inference_duration_seconds_sum", {"phase": "forward"}) == pytest.approx(0.02)
    assert v("slai_batch_inference_duration_seconds_sum", {"phase": "idle"}) == pytest.approx(0.0003)
    assert v("slai_batch_inference_duration_seconds_count", {"phase": "total"}) == 1
    assert v("slai_executor_batch_size_sum") == 12
    gw = GatewayMetrics()
    gw.in_flight.inc()
    gw.record_request(Tier.FREE, "rejected")
    assert gw.registry.get_sample_value("slai_gateway_requests_total", {"tier": "free", "outcome": "rejected"}) == 1
    assert gw.registry.get_sample_value("slai_gateway_in_flight_requests") == 1


def test_metrics_server_on_a_side_port():
    m = scheduler_metrics_after_traffic()
    server, port = start_metrics_server(0, m.registry, addr="127.0.0.1")
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert 'slai_tbt_slo_attainment{tier="paying"} 0.75' in body
    assert start_metrics_server(-1, m.registry) is None


def test_metrics_port_from_env(monkeypatch):
    assert metrics_port(N.SCHEDULER_METRICS_PORT) == 9101
    monkeypatch.setenv(N.METRICS_PORT_ENV, "-1")
    assert metrics_port(N.EXECUTOR_METRICS_PORT) == -1
    monkeypatch.setenv(N.METRICS_PORT_ENV, "x")
    with pytest.raises(ValueError):
        metrics_port(9102)


def test_gateway_route():
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    app = fastapi.FastAPI()
    gw = GatewayMetrics()
    gw.record_request("paying")
    add_metrics_route(app, gw.registry)
    resp = TestClient(app).get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    assert 'slai_gateway_requests_total{outcome="ok",tier="paying"} 1.0' in resp.text
