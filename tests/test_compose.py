"""docker-compose.yml matches the code (checked statically: CI machines have no container engine).

Each project service's command is parsed by the real ``slai-serve`` subcommand
parser; ports, addresses, health checks, OTEL env, Dockerfile targets and
mounted config files are cross-checked.
"""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest
import yaml

from slai_serve.cli import SUBCOMMANDS
from telemetry import names

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PROJECT = {name: svc for name, svc in SERVICES.items() if "build" in svc}
EXPECTED_OTEL_NAME = {"gateway": names.SERVICE_GATEWAY, "scheduler": names.SERVICE_SCHEDULER,
                      "executor": names.SERVICE_EXECUTOR, "executor-cpu": names.SERVICE_EXECUTOR}


def parse_command(svc: dict) -> tuple[str, argparse.Namespace]:
    cmd = svc["command"]
    assert isinstance(cmd, list), "use the exec form (a list) for commands"
    sub = cmd[0]
    assert sub in SUBCOMMANDS, f"unknown slai-serve subcommand {sub!r}"
    module = importlib.import_module(SUBCOMMANDS[sub][0])
    parser = argparse.ArgumentParser(prog=f"slai-serve {sub}", exit_on_error=False)
    module.add_arguments(parser)
    return sub, parser.parse_args(cmd[1:])


def test_expected_services_exist():
    for name in ("gateway", "scheduler", "executor", "executor-cpu", "otel-collector", "jaeger", "prometheus",
                 "grafana"):
        assert name in SERVICES, name
    assert set(PROJECT) == {"gateway", "scheduler", "executor", "executor-cpu"}


@pytest.mark.parametrize("name", sorted(PROJECT))
def test_commands_parse_with_the_code(name):
    sub, args = parse_command(PROJECT[name])
    assert sub == {"executor-cpu": "executor"}.get(name, name)
    assert args.host == "0.0.0.0"  # the code defaults to loopback; containers must say 0.0.0.0


@pytest.mark.parametrize("name", sorted(PROJECT))
def test_services_share_a_required_service_token(name):
    from wire.service_auth import SERVICE_TOKEN_ENV

    svc = PROJECT[name]
    # compose refuses to start without the variable (no default, no placeholder that would work)
    assert re.fullmatch(r"\$\{" + SERVICE_TOKEN_ENV + r":\?[^}]+\}", svc["environment"][SERVICE_TOKEN_ENV])
    _, args = parse_command(svc)
    assert not getattr(args, "insecure_no_auth", False) and args.service_token_file is None
    assert "SLAI_SERVICE_TOKEN" not in " ".join(svc["command"])  # never on the command line


def test_only_the_gateway_is_published():
    for name, svc in PROJECT.items():
        assert ("ports" in svc) == (name == "gateway"), name


def test_metrics_listen_where_prometheus_scrapes():
    for name in ("scheduler", "executor", "executor-cpu"):
        _, args = parse_command(SERVICES[name])
        assert (args.metrics_host or args.host) == "0.0.0.0", name  # /metrics follows --host


@pytest.mark.parametrize("name", sorted(PROJECT))
def test_images_use_the_slai_serve_entrypoint_and_existing_targets(name):
    build = PROJECT[name]["build"]
    dockerfile = ROOT / build.get("dockerfile", "Dockerfile")
    text = dockerfile.read_text()
    targets = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, flags=re.M | re.I))
    assert build["target"] in targets
    assert 'ENTRYPOINT ["slai-serve"]' in text


def _port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def test_ports_and_addresses_line_up():
    _, gw = parse_command(SERVICES["gateway"])
    _, sched = parse_command(SERVICES["scheduler"])
    # gateway -> scheduler
    host, port = gw.scheduler.rsplit(":", 1)
    assert host == "scheduler" and int(port) == sched.port
    # scheduler -> executor (both variants answer to the alias "executor")
    executors = [a.strip() for a in sched.executors.split(",")]
    for name in ("executor", "executor-cpu"):
        _, ex = parse_command(SERVICES[name])
        aliases = SERVICES[name]["networks"]["default"]["aliases"]
        assert any(a == f"{alias}:{ex.port}" for a in executors for alias in aliases), name
        assert str(ex.port) in SERVICES[name]["expose"]
    # gateway publishes its gRPC and HTTP ports
    published = {p.split(":")[-1] for p in SERVICES["gateway"]["ports"]}
    assert {str(gw.grpc_port), str(gw.http_port)} <= published
    assert str(sched.port) in SERVICES["scheduler"]["expose"]


def test_healthchecks_probe_the_serving_port():
    for name, svc in PROJECT.items():
        _, args = parse_command(svc)
        port = args.grpc_port if name == "gateway" else args.port
        test = svc["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", "slai_serve.health"], name
        assert _port_of(test[4]) == port, name
    from slai_serve.health import health_main
    assert callable(health_main)


def test_depends_on_waits_for_health():
    assert SERVICES["gateway"]["depends_on"]["scheduler"]["condition"] == "service_healthy"
    deps = SERVICES["scheduler"]["depends_on"]
    for name in ("executor", "executor-cpu"):
        assert deps[name]["condition"] == "service_healthy"
        assert deps[name]["required"] is False  # only one executor profile is active


def test_executor_variants_gpu_and_cpu():
    gpu = SERVICES["executor"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["profiles"] == ["gpu"] and SERVICES["executor-cpu"]["profiles"] == ["cpu"]
    _, cpu = parse_command(SERVICES["executor-cpu"])
    assert cpu.device == "cpu" and not cpu.fake
    assert "deploy" not in SERVICES["executor-cpu"]


def test_otel_env_is_sane():
    collector = yaml.safe_load((ROOT / "deploy" / "otel-collector.yaml").read_text())
    grpc_endpoint = collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    for name, svc in PROJECT.items():
        env = svc["environment"]
        assert env["OTEL_SERVICE_NAME"] == EXPECTED_OTEL_NAME[name]
        endpoint = env["OTEL_EXPORTER_OTLP_ENDPOINT"]
        assert endpoint.startswith("http://otel-collector:")
        assert _port_of(endpoint) == _port_of(grpc_endpoint)
        assert "service.namespace=slai-serve" in env["OTEL_RESOURCE_ATTRIBUTES"]
        assert all(isinstance(v, str) for v in env.values()), f"{name}: quote env values"


def test_prometheus_targets_match_metrics_ports():
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    _, gw = parse_command(SERVICES["gateway"])
    assert f"gateway:{gw.http_port}" in targets  # /metrics on the HTTP port
    assert f"scheduler:{SERVICES['scheduler']['environment']['SLAI_METRICS_PORT']}" in targets
    for name in ("executor", "executor-cpu"):
        assert f"executor:{SERVICES[name]['environment']['SLAI_METRICS_PORT']}" in targets


def test_mounted_files_exist_and_model_volume_is_shared():
    for svc in SERVICES.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), src
    _, gw = parse_command(SERVICES["gateway"])
    model_cache = SERVICES["executor-cpu"]["environment"]["SLAI_MODEL_CACHE"]
    assert gw.model_dir == model_cache
    assert any(v.startswith("models:/models") for v in SERVICES["gateway"]["volumes"])
    assert any(v.startswith("models:/models") for v in SERVICES["executor-cpu"]["volumes"])
