"""deploy/kubernetes matches the Kubernetes schemas and the code (checked offline: CI has no cluster).

Every kustomization is rendered with ``kubectl kustomize``; every object is validated against the
Kubernetes OpenAPI schemas bundled in ``kubernetes-validate`` (strict: unknown fields are errors);
the InferencePool, a custom resource, against the structure of its v1 CRD (checked by hand below).
Each container's arguments are parsed by the real ``slai-serve`` subcommand parser (as
tests/test_compose.py does for compose), and its ports, probes, environment, volumes and images
are cross-checked with what that parser and the services read.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from contract.model_files import MODEL_CACHE_ENV
from gateway.auth import parse_key_data
from telemetry import names
from tests.test_compose import parse_command
from wire import service_auth
from wire.pb.slai.v1 import gateway_pb2

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("base", "overlays/cpu", "overlays/gpu")
ALL = (*OVERLAYS, "inference-extension")
# oldest with every field used here GA (gRPC probes: 1.27), and a recent one
K8S_VERSIONS = ("1.29.0", "1.33.0")
GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name
# environment variables the code reads, per subcommand (anything else is a typo or dead configuration)
READS_ENV = {
    "executor": {service_auth.SERVICE_TOKEN_ENV, service_auth.SERVICE_TOKEN_FILE_ENV, names.METRICS_PORT_ENV,
                 MODEL_CACHE_ENV},
    "scheduler": {service_auth.SERVICE_TOKEN_ENV, service_auth.SERVICE_TOKEN_FILE_ENV, names.METRICS_PORT_ENV},
    "gateway": {service_auth.SERVICE_TOKEN_ENV, service_auth.SERVICE_TOKEN_FILE_ENV, MODEL_CACHE_ENV},
}
DOCKERFILE_TARGETS = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE | re.IGNORECASE))

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None,
                                   reason="kubectl is not installed: cannot render the kustomizations")


@functools.cache
def render(name: str) -> tuple[dict, ...]:
    out = subprocess.run(["kubectl", "kustomize", str(KUBE / name)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def one(objs, kind: str, name: str) -> dict:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def workloads(objs) -> list[dict]:
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]


def slai_containers(pod_spec: dict):
    """(container, subcommand, parsed args) for every container running a slai-serve subcommand."""
    for c in pod_spec["containers"]:
        sub, args = parse_command({"command": c["args"]})
        yield c, sub, args


def serving_port(sub: str, args) -> int:
    return args.grpc_port if sub == "gateway" else args.port


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def port_named(c: dict, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    assert name in ports, f"{c['name']}: no port named {name!r} ({sorted(ports)})"
    return ports[name]


def unhashed(name: str) -> str:
    """A generated Secret's name without kustomize's content-hash suffix."""
    return re.sub(r"-[a-z0-9]{10}$", "", name)


def image_target(image: str) -> str:
    repo, _, _tag = image.partition(":")
    assert repo.startswith("slai-serve/"), image
    return repo.removeprefix("slai-serve/")


# ------------------------------------------------------------------ rendering and schemas
@needs_kubectl
@pytest.mark.parametrize("name", ALL)
def test_every_kustomization_renders(name):
    objs = render(name)
    assert objs
    assert all(o["metadata"].get("namespace") == "slai-serve" for o in objs if o["kind"] != "Namespace")


@needs_kubectl
@pytest.mark.parametrize("name", OVERLAYS)
def test_every_object_matches_the_kubernetes_schema(name):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (the dev extra) is not installed")
    for obj in render(name):
        for version in K8S_VERSIONS:
            kv.validate(obj, version, strict=True)  # raises naming the field


def test_the_schema_check_rejects_a_broken_object():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (the dev extra) is not installed")
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
           "spec": {"ports": [{"port": "http"}], "clusterIp": "None"}}  # a string port, a misspelt field
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSIONS[-1], strict=True)


@needs_kubectl
@pytest.mark.parametrize("name", OVERLAYS)
def test_expected_objects(name):
    objs = render(name)
    kinds = sorted((o["kind"], unhashed(o["metadata"]["name"])) for o in objs)
    assert kinds == sorted([
        ("Namespace", "slai-serve"), ("Secret", "slai-api-keys"), ("Secret", "slai-service-token"),
        ("Service", "slai-pool"), ("StatefulSet", "slai-pool"), ("Deployment", "slai-gateway"),
        ("Service", "slai-gateway"), ("HorizontalPodAutoscaler", "slai-gateway")])


# ------------------------------------------------------------------ containers against the code
@needs_kubectl
@pytest.mark.parametrize("name", OVERLAYS)
def test_commands_parse_and_listen_beyond_loopback(name):
    for w in workloads(render(name)):
        spec = w["spec"]["template"]["spec"]
        for c, sub, args in slai_containers(spec):
            assert "command" not in c, "keep the image's slai-serve entrypoint; pass the subcommand in args"
            assert sub == c["name"], (c["name"], sub)
            assert args.host == "0.0.0.0", c["name"]  # probes and callers come from outside the container
            assert getattr(args, "metrics_host", None) is None  # /metrics follows --host
            assert not getattr(args, "insecure_no_auth", False) and args.service_token_file is None
            assert image_target(c["image"]) in DOCKERFILE_TARGETS
            assert image_target(c["image"]).startswith(sub), (c["name"], c["image"])
            assert c.get("imagePullPolicy") == "IfNotPresent"  # images loaded into kind/minikube are used


@needs_kubectl
@pytest.mark.parametrize("name", OVERLAYS)
def test_ports_and_probes_match_the_serving_ports(name):
    for w in workloads(render(name)):
        for c, sub, args in slai_containers(w["spec"]["template"]["spec"]):
            port = serving_port(sub, args)
            assert port_named(c, {"executor": "executor", "scheduler": "scheduler", "gateway": "grpc"}[sub]) == port
            if sub == "gateway":
                assert port_named(c, "http") == args.http_port
            for kind in ("startupProbe", "readinessProbe"):
                probe = c[kind]["grpc"]  # grpc.health.v1, which needs no service token
                assert probe["port"] == port, (c["name"], kind)
                assert probe.get("service", "") == (GATEWAY_SERVICE if sub == "gateway" else ""), c["name"]
            assert c["livenessProbe"]["tcpSocket"]["port"] == port, c["name"]
            if sub != "gateway":  # the gateway serves /metrics on its HTTP port
                metrics = int(env_of(c)[names.METRICS_PORT_ENV]["value"])
                assert port_named(c, {"executor": "exec-metrics", "scheduler": "sched-metrics"}[sub]) == metrics


@needs_kubectl
@pytest.mark.parametrize("name", OVERLAYS)
def test_environment_is_what_the_code_reads_and_the_token_is_a_secret(name):
    objs = render(name)
    secrets = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Secret"}
    for w in workloads(objs):
        for c, sub, _ in slai_containers(w["spec"]["template"]["spec"]):
            env = env_of(c)
            unknown = set(env) - READS_ENV[sub] - {k for k in env if k.startswith("OTEL_")}
            assert not unknown, f"{c['name']}: {sorted(unknown)} are read by nothing"
            ref = env[service_auth.SERVICE_TOKEN_ENV]["valueFrom"]["secretKeyRef"]
            assert ref["key"] in secrets[ref["name"]]["data"], ref
            assert all(service_auth.SERVICE_TOKEN_ENV not in a for a in c["args"])  # never in argv (ps shows it)


@needs_kubectl
def test_the_base_secrets_are_safe_placeholders():
    import base64

    secrets = {unhashed(o["metadata"]["name"]): o["data"] for o in render("base") if o["kind"] == "Secret"}
    token = base64.b64decode(secrets["slai-service-token"]["token"]).decode()
    # a pool started without replacing it refuses to run (and says why), instead of trusting a published token
    with pytest.raises(ValueError, match=service_auth.SERVICE_TOKEN_ENV):
        service_auth.read_service_token(environ={service_auth.SERVICE_TOKEN_ENV: token})
    store = parse_key_data(yaml.safe_load(base64.b64decode(secrets["slai-api-keys"]["keys.yaml"])))
    assert store.enabled and not store.keys and not store.allow_anonymous  # nobody is let in by default


@needs_kubectl
def test_a_local_overlay_replaces_the_secrets_as_docs_deploy_md_shows(tmp_path):
    import base64
    import os

    token = "k8s-test-token-0123456789abcdef"
    (tmp_path / "service-token").write_text(token + "\n")
    (tmp_path / "keys.yaml").write_text("keys: {sk-demo-paying: paying, sk-demo-free: free}\n")
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(KUBE / "overlays" / "cpu", tmp_path)],  # kustomize refuses absolute paths
        "secretGenerator": [
            {"name": "slai-service-token", "behavior": "replace", "files": ["token=service-token"]},
            {"name": "slai-api-keys", "behavior": "replace", "files": ["keys.yaml"]}]}))
    out = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    objs = [d for d in yaml.safe_load_all(out.stdout) if d]
    secrets = {o["metadata"]["name"]: o["data"] for o in objs if o["kind"] == "Secret"}
    assert "slai-api-keys" in secrets  # keeps its name: edits reach running gateways in place
    for w in workloads(objs):
        for c, _, _ in slai_containers(w["spec"]["template"]["spec"]):
            ref = env_of(c)[service_auth.SERVICE_TOKEN_ENV]["valueFrom"]["secretKeyRef"]
            raw = base64.b64decode(secrets[ref["name"]][ref["key"]]).decode()
            assert service_auth.read_service_token(environ={service_auth.SERVICE_TOKEN_ENV: raw}) == token
    store = parse_key_data(yaml.safe_load(base64.b64decode(secrets["slai-api-keys"]["keys.yaml"])))
    assert store.resolve("Bearer sk-demo-paying").tier.name == "PAYING"


@needs_kubectl
@pytest.mark.parametrize("name", OVERLAYS)
def test_pool_pod_wiring(name):
    objs = render(name)
    sts = one(objs, "StatefulSet", "slai-pool")
    spec = sts["spec"]["template"]["spec"]
    parsed = {c["name"]: (c, sub, args) for c, sub, args in slai_containers(spec)}
    executors = [(c, a) for c, s, a in parsed.values() if s == "executor"]
    _, _, sched = parsed["scheduler"]
    _, _, gw = parsed["gateway"]
    # the scheduler drives exactly the pod's executors, over loopback
    assert sorted(a.strip() for a in sched.executors.split(",")) == sorted(f"127.0.0.1:{a.port}" for _, a in executors)
    # the pool-local gateway talks to its own scheduler
    assert gw.scheduler == f"127.0.0.1:{sched.port}"
    # the pool's headless Service: every pool by name, the scheduler's port, the ports the pods name
    svc = one(objs, "Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    pod_ports = {p["name"]: p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
    for p in svc["spec"]["ports"]:
        assert pod_ports[p["targetPort"]] == p["port"], p
    assert sched.port in {p["port"] for p in svc["spec"]["ports"]}
    # Prometheus scrapes the scheduler's /metrics (the pool's metrics and the endpoint picker's gauges)
    ann = sts["spec"]["template"]["metadata"]["annotations"]
    c_sched = parsed["scheduler"][0]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == names.METRICS_PATH
    assert int(ann["prometheus.io/port"]) == int(env_of(c_sched)[names.METRICS_PORT_ENV]["value"])
    # grace: longer than every container's own drain
    grace = spec["terminationGracePeriodSeconds"]
    assert all(grace > getattr(a, "grace_s", getattr(a, "drain_timeout", 0)) for _, _, a in parsed.values())


@needs_kubectl
@pytest.mark.parametrize("name", OVERLAYS)
def test_gateway_deployment_reaches_a_pool_by_its_dns_name(name):
    objs = render(name)
    dep = one(objs, "Deployment", "slai-gateway")
    (c, _, gw), = slai_containers(dep["spec"]["template"]["spec"])
    sts = one(objs, "StatefulSet", "slai-pool")
    _, _, sched = next(x for x in slai_containers(sts["spec"]["template"]["spec"]) if x[1] == "scheduler")
    # the pools' headless Service: one DNS name that resolves to every ready pool (gateway --pools)
    assert gw.pools == f"{sts['spec']['serviceName']}:{sched.port}"
    svc_pools = one(objs, "Service", sts["spec"]["serviceName"])
    assert svc_pools["spec"]["clusterIP"] == "None"
    svc = one(objs, "Service", "slai-gateway")
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert {p["port"] for p in svc["spec"]["ports"]} == {gw.grpc_port, gw.http_port}
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert int(ann["prometheus.io/port"]) == gw.http_port  # /metrics on the HTTP port
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > gw.drain_timeout
    hpa = one(objs, "HorizontalPodAutoscaler", "slai-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "slai-gateway"}
    assert hpa["spec"]["minReplicas"] >= 2  # a gateway restart never takes the front door down
    assert "cpu" in c["resources"]["requests"]  # CPU utilization is relative to the request


def volume_at(c: dict, volumes: dict, path: str) -> tuple[dict, dict]:
    """The mount of ``c`` holding ``path``, and its volume."""
    mounts = [m for m in c.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(mounts) == 1, f"{c['name']}: {path} is on no volume"
    assert "subPath" not in mounts[0], "a subPath mount never sees a Secret's updates"
    return mounts[0], volumes[mounts[0]["name"]]


@needs_kubectl
@pytest.mark.parametrize("name", OVERLAYS)
def test_models_and_key_files_are_where_the_flags_point(name):
    objs = render(name)
    secrets = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Secret"}
    for w in workloads(objs):
        spec = w["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        volumes.update({t["metadata"]["name"]: t for t in w["spec"].get("volumeClaimTemplates", [])})

        model_dirs = set()
        for init in spec.get("initContainers", []):
            # the embedded model's one-time conversion, by the executor image's module
            assert init["command"] == ["python", "-m", "executor_svc.models"], init["command"]
            assert image_target(init["image"]).startswith("executor-")
            source = Path(importlib.util.find_spec("executor_svc.models").origin).read_text()
            assert "def main(" in source and 'if __name__ == "__main__":' in source
            model_dirs.add(env_of(init)[MODEL_CACHE_ENV]["value"])
            volume_at(init, volumes, env_of(init)[MODEL_CACHE_ENV]["value"] + "/config.json")
        for c, sub, args in slai_containers(spec):
            if sub == "executor":
                assert args.model == "default" and env_of(c)[MODEL_CACHE_ENV]["value"] in model_dirs
            if sub == "gateway":
                assert args.model_dir in model_dirs  # the tokenizer the init container wrote
                volume_at(c, volumes, args.model_dir + "/tokenizer.json")
                mount, vol = volume_at(c, volumes, args.api_keys)
                assert mount.get("readOnly") is True
                secret = secrets[vol["secret"]["secretName"]]
                assert Path(args.api_keys).name in secret["data"]


@needs_kubectl
def test_overlays_pick_the_device():
    def executor(name: str):
        sts = one(render(name), "StatefulSet", "slai-pool")
        c, _, args = next(x for x in slai_containers(sts["spec"]["template"]["spec"]) if x[1] == "executor")
        return sts["spec"]["template"]["spec"], c, args

    spec, c, args = executor("base")
    assert args.device is None  # the image decides (cuda when it has one)
    spec, c, args = executor("overlays/cpu")
    assert args.device == "cpu" and image_target(c["image"]) == "executor-cpu"
    assert "nvidia.com/gpu" not in str(c["resources"])
    spec, c, args = executor("overlays/gpu")
    assert args.device == "cuda" and image_target(c["image"]) == "executor-gpu"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert all(image_target(i["image"]) == "executor-gpu" for i in spec["initContainers"])
    gw_init = one(render("overlays/gpu"), "Deployment", "slai-gateway")["spec"]["template"]["spec"]["initContainers"]
    assert all(image_target(i["image"]) == "executor-cpu" for i in gw_init)  # gateways stay on CPU nodes


# ------------------------------------------------------------------ the InferencePool (a custom resource)
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
NAME_SEGMENT = re.compile(r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$")


def check_inference_pool_v1(obj: dict) -> None:
    """The structure of inference.networking.k8s.io/v1 InferencePool (Gateway API Inference Extension
    v1 CRD, checked by hand): spec.selector.matchLabels, spec.targetPorts[].number,
    spec.endpointPickerRef{group,kind,name,port.number,failureMode}, spec.appProtocol."""
    assert obj["apiVersion"] == "inference.networking.k8s.io/v1" and obj["kind"] == "InferencePool"
    assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}
    spec = obj["spec"]
    assert set(spec) <= {"selector", "targetPorts", "endpointPickerRef", "appProtocol"}, sorted(spec)
    assert {"selector", "targetPorts"} <= set(spec)
    assert set(spec["selector"]) == {"matchLabels"}
    labels = spec["selector"]["matchLabels"]
    assert 1 <= len(labels) <= 64
    assert all(isinstance(v, str) and len(v) <= 63 and LABEL_VALUE.match(v) for v in labels.values())
    ports = spec["targetPorts"]
    assert 1 <= len(ports) <= 8 and len({p["number"] for p in ports}) == len(ports)
    assert all(set(p) == {"number"} and isinstance(p["number"], int) and 1 <= p["number"] <= 65535 for p in ports)
    assert spec.get("appProtocol", "http") in ("http", "kubernetes.io/h2c")
    ref = spec["endpointPickerRef"]
    assert set(ref) <= {"group", "kind", "name", "port", "failureMode"} and ref["name"]
    assert NAME_SEGMENT.match(ref.get("kind", "Service"))
    if ref.get("kind", "Service") == "Service":
        assert set(ref["port"]) == {"number"} and 1 <= ref["port"]["number"] <= 65535
    assert ref.get("failureMode", "FailClose") in ("FailOpen", "FailClose")


@needs_kubectl
def test_inference_pool_selects_the_pools_openai_endpoint():
    (pool,) = render("inference-extension")
    check_inference_pool_v1(pool)
    for name in OVERLAYS:
        sts = one(render(name), "StatefulSet", "slai-pool")
        pod_labels = sts["spec"]["template"]["metadata"]["labels"]
        assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        # and nothing else: the gateway Deployment's pods are not model servers
        dep = one(render(name), "Deployment", "slai-gateway")
        assert not pool["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"][
            "labels"].items()
        (_, _, gw), = [x for x in slai_containers(sts["spec"]["template"]["spec"]) if x[1] == "gateway"]
        assert [p["number"] for p in pool["spec"]["targetPorts"]] == [gw.http_port]  # OpenAI HTTP


def test_the_inference_pool_check_catches_mistakes():
    good = {"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool", "metadata": {"name": "p"},
            "spec": {"selector": {"matchLabels": {"app": "x"}}, "targetPorts": [{"number": 8000}],
                     "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}}}
    check_inference_pool_v1(good)
    for broken in ({"targetPortNumber": 8000}, {"targetPorts": []}, {"selector": {"app": "x"}},
                   {"endpointPickerRef": {"name": "epp"}}, {"extensionRef": {"name": "epp"}}):
        bad = {**good, "spec": {**good["spec"], **broken}}
        with pytest.raises((AssertionError, KeyError)):
            check_inference_pool_v1(bad)
