"""Static checks of deploy/ observability files against telemetry/names.py (CI cannot run the containers)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from telemetry import names as N

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
METRIC_NAMES = {getattr(N, k) for k in dir(N) if k.startswith("M_")}
SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def _base(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_prometheus_scrapes_the_default_ports():
    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"][0] for job in cfg["scrape_configs"]}
    assert targets["slai-gateway"].endswith(f":{N.GATEWAY_HTTP_PORT}")
    assert targets["slai-scheduler"].endswith(f":{N.SCHEDULER_METRICS_PORT}")
    assert targets["slai-executor"].endswith(f":{N.EXECUTOR_METRICS_PORT}")
    assert all(job.get("metrics_path", "/metrics") == N.METRICS_PATH for job in cfg["scrape_configs"])


def test_dashboard_queries_use_known_metrics():
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "slai.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    used = {_base(m) for e in exprs for m in re.findall(r"\bslai_[a-z0-9_]+", e)}
    assert used <= METRIC_NAMES, used - METRIC_NAMES
    for must in (N.M_TIME_TO_FIRST_TOKEN, N.M_INTER_TOKEN_LATENCY, N.M_TBT_SLO_ATTAINMENT, N.M_KV_CACHE_USAGE,
                 N.M_NUM_REQUESTS_WAITING, N.M_STEP_DURATION, N.M_CRITICAL_DECODES, N.M_NONCRITICAL_DECODES,
                 N.M_SLAI_OFFSET, N.M_BATCH_TIME_ESTIMATE, N.M_NUM_PREEMPTIONS):
        assert must in used, must
    ds_uids = {t["datasource"]["uid"] for p in dash["panels"] for t in p.get("targets", [])}
    provisioned = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yml").read_text())
    assert ds_uids <= {d["uid"] for d in provisioned["datasources"]}
    providers = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yml").read_text())
    assert providers["providers"][0]["options"]["path"]


def test_collector_receives_otlp_and_exports_to_jaeger_and_debug():
    cfg = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    pipeline = cfg["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"]
    assert set(pipeline["exporters"]) == {"otlp/jaeger", "debug"}
    assert cfg["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    for name in pipeline["processors"] + pipeline["exporters"]:
        assert name in cfg["processors"] or name in cfg["exporters"]
