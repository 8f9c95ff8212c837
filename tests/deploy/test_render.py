"""The chart rendered (by `helm template` where a helm binary exists, and everywhere by
tests/deploy/gotemplate.py), every object validated with kubernetes-validate against a
pinned Kubernetes version, and the rendered objects checked to fit together."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from urllib.parse import urlsplit

import pytest
import yaml

from services import healthcheck
from services.cli import COMMANDS
from shared.config import Settings

from .chart import CHART, KUBERNETES_VERSION, load_values, merge_values, render, render_notes
from .gotemplate import Renderer, TemplateError

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")

SETTING_ENVS = {Settings.env_var(name) for name in Settings.__dataclass_fields__}
KEY_HASH = "sha256:" + "ab" * 32

VALUE_SETS = {
    "external-redis": {"redis": {"url": "redis://redis.internal:6379/0"}},
    "cpu": load_values("values-cpu.yaml"),
    "everything": {
        "fullnameOverride": "llm",
        "imagePullSecrets": [{"name": "regcred"}],
        "apiKeys": {"create": True, "keys": [KEY_HASH, "plain-key"]},
        "redis": {"existingSecret": "managed-redis", "secretKey": "url"},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "ingress": {"enabled": True, "className": "nginx", "host": "llm.example.com",
                    "tls": [{"hosts": ["llm.example.com"], "secretName": "llm-tls"}]},
        "config": {"ROSE_REQUEST_TIMEOUT": "300", "ROSE_OTEL_EXPORTER": "otlp"},
        "extraEnv": [{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel-collector:4318"}],
        "gateway": {"autoscaling": {"enabled": False}, "replicas": 3, "env": {"ROSE_MAX_BODY_BYTES": "1048576"},
                    "service": {"type": "LoadBalancer", "annotations": {"example.com/lb": "internal"}},
                    "podAnnotations": {"example.com/team": "llm"}},
        "formatter": {"nodeSelector": {"pool": "cpu"}},
        "scheduler": {"env": {"ROSE_MAX_QUEUE": "1024"}},
        "worker": {"replicas": 4, "extraEnv": [{"name": "NCCL_DEBUG", "value": "WARN"},
                                               {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
                   "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                   "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                       "weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                          "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "worker"}}}}]}}},
    },
    "existing-api-keys-bundled-redis": {"apiKeys": {"existingSecret": "rose-keys", "secretKey": "keys.txt"},
                                        "redis": {"enabled": True}, "ingress": {"enabled": True}},
}


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request) -> tuple[str, dict, list[dict]]:
    values = merge_values(load_values(), VALUE_SETS[request.param])
    return request.param, values, render(values)


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def workloads(objects: list[dict]) -> list[dict]:
    return by_kind(objects, "Deployment") + by_kind(objects, "StatefulSet")


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---------------------------------------------------------------- schema
def validate_objects(objects: list[dict]) -> None:
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":  # a CRD: no schema ships with kubernetes-validate
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            assert obj["spec"]["endpoints"] and obj["spec"]["selector"]["matchLabels"]
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_every_object_validates(rendered):
    _, _, objects = rendered
    validate_objects(objects)


def test_validation_has_teeth(rendered):
    _, _, objects = rendered
    (deployment, *_) = by_kind(objects, "Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = broken["spec"]["template"]["spec"]["containers"][0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_objects([broken])


# ---------------------------------------------------------------- fit
def test_expected_objects(rendered):
    name, values, objects = rendered
    kinds = sorted(o["kind"] for o in objects)
    assert kinds.count("Deployment") == 4 and kinds.count("PodDisruptionBudget") == 4
    assert kinds.count("StatefulSet") == (1 if values["redis"]["enabled"] else 0)
    assert kinds.count("HorizontalPodAutoscaler") == sum(values[c]["autoscaling"]["enabled"] for c in ("gateway", "formatter"))
    assert kinds.count("ServiceMonitor") == int(values["serviceMonitor"]["enabled"])
    assert kinds.count("Ingress") == int(values["ingress"]["enabled"])
    (test_pod,) = by_kind(objects, "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert len({(o["kind"], o["metadata"]["name"]) for o in objects}) == len(objects), "duplicate object names"


def test_workloads_are_complete(rendered):
    _, values, objects = rendered
    configmaps = {o["metadata"]["name"] for o in by_kind(objects, "ConfigMap")}
    secrets = {o["metadata"]["name"] for o in by_kind(objects, "Secret")} | {values["apiKeys"]["existingSecret"], values["redis"]["existingSecret"]}
    for workload in workloads(objects):
        pod = workload["spec"]["template"]
        assert matches(workload["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
        component = pod["metadata"]["labels"]["app.kubernetes.io/component"]
        if workload["kind"] == "Deployment" and not values.get(component, {}).get("autoscaling", {}).get("enabled"):
            assert workload["spec"]["replicas"] == values[component]["replicas"]
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        for container in pod["spec"]["containers"]:
            assert container["readinessProbe"] and container["livenessProbe"], f"{component}: probes"
            assert container["resources"]["requests"] and container["resources"]["limits"], f"{component}: resources"
            ports = {p["name"] for p in container.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                port = (container[probe].get("httpGet") or container[probe].get("tcpSocket") or {}).get("port")
                assert port is None or port in ports
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in configmaps
            extra = values["extraEnv"] + values.get(component, {}).get("extraEnv", [])
            for env in container.get("env", []):
                if component != "redis" and env not in extra:
                    assert env["name"] in SETTING_ENVS, f"{component}: {env['name']}"
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                assert ref is None or ref["name"] in secrets or env in extra
            if component != "redis":
                assert container["args"][0] in COMMANDS
        for volume in pod["spec"].get("volumes", []):
            assert "secret" not in volume or volume["secret"]["secretName"] in secrets


def test_services_select_their_pods(rendered):
    _, _, objects = rendered
    for service in by_kind(objects, "Service"):
        selected = [w for w in workloads(objects) if matches(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
        assert len(selected) == 1, service["metadata"]["name"]
        port_names = {p["name"] for c in selected[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names
    for kind, target in (("PodDisruptionBudget", "selector"), ("ServiceMonitor", "selector")):
        for obj in by_kind(objects, kind):
            labels = obj["spec"][target]["matchLabels"]
            assert any(matches(labels, w["spec"]["template"]["metadata"]["labels"]) for w in workloads(objects))
    deployments = {d["metadata"]["name"]: d for d in by_kind(objects, "Deployment")}
    for hpa in by_kind(objects, "HorizontalPodAutoscaler"):
        target = deployments[hpa["spec"]["scaleTargetRef"]["name"]]
        assert "replicas" not in target["spec"], "the HPA owns replicas"


def _env(objects, component) -> dict[str, dict]:
    (workload,) = [w for w in workloads(objects) if w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    return {e["name"]: e for e in workload["spec"]["template"]["spec"]["containers"][0].get("env", [])}


def test_components_reach_each_other(rendered):
    _, values, objects = rendered
    services = {s["metadata"]["name"]: s for s in by_kind(objects, "Service")}

    def target(url: str) -> dict:
        parts = urlsplit(url)
        service = services[parts.hostname]
        assert parts.port in [p["port"] for p in service["spec"]["ports"]], url
        return service

    formatter_service = target(_env(objects, "gateway")["ROSE_FORMATTER_URLS"]["value"])
    assert formatter_service["spec"]["clusterIP"] == "None", "headless: one address per formatter pod"
    target(_env(objects, "formatter")["ROSE_SCHEDULER_FRONTEND"]["value"])
    target(_env(objects, "worker")["ROSE_SCHEDULER_BACKEND"]["value"])
    for component in ("gateway", "scheduler"):
        redis = _env(objects, component)["ROSE_REDIS_URL"]
        if values["redis"]["enabled"]:
            target(redis["value"])
        elif values["redis"]["existingSecret"]:
            assert redis["valueFrom"]["secretKeyRef"] == {"name": "managed-redis", "key": "url"}
        else:
            assert redis["value"] == values["redis"]["url"]


def test_ingress_and_helm_test_reach_the_gateway(rendered):
    _, values, objects = rendered
    (gateway,) = [s for s in by_kind(objects, "Service") if s["metadata"]["name"].endswith("-gateway")]
    port_names = {p["name"] for p in gateway["spec"]["ports"]}
    for ingress in by_kind(objects, "Ingress"):
        (rule,) = ingress["spec"]["rules"]
        assert rule.get("host", "") == values["ingress"]["host"]
        (path,) = rule["http"]["paths"]
        assert path["backend"]["service"] == {"name": gateway["metadata"]["name"], "port": {"name": "http"}}
        assert path["backend"]["service"]["port"]["name"] in port_names
        assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    (test_pod,) = by_kind(objects, "Pod")
    (container,) = test_pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["ROSE_HOST"] == gateway["metadata"]["name"]
    assert int(env["ROSE_PORT"]) == gateway["spec"]["ports"][0]["port"]
    assert container["command"][:3] == ["python", "-m", "services.healthcheck"]
    parsed = healthcheck.build_parser().parse_args(container["command"][3:])
    assert parsed.role == "gateway" and parsed.ready


def test_gpu_workers_and_cpu_workers(rendered):
    name, values, objects = rendered
    (worker,) = [d for d in by_kind(objects, "Deployment") if d["metadata"]["name"].endswith("-worker")]
    pod = worker["spec"]["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    env = _env(objects, "worker")
    assert env["ROSE_WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    if name == "cpu":
        assert "nvidia.com/gpu" not in limits and "tolerations" not in pod and "ROSE_MODEL" not in env
        assert env["ROSE_DEVICE"]["value"] == "cpu"
    else:
        assert limits["nvidia.com/gpu"] == 1
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert env["ROSE_MODEL"]["value"] == "/models/gpt-oss-20b"
        assert {"name": "models", "mountPath": "/models", "readOnly": True} in pod["containers"][0]["volumeMounts"]
        assert worker["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    assert pod["containers"][0]["startupProbe"]["failureThreshold"] * pod["containers"][0]["startupProbe"]["periodSeconds"] >= 600


def test_api_keys_and_config(rendered):
    name, values, objects = rendered
    env = _env(objects, "gateway")
    (deployment,) = [d for d in by_kind(objects, "Deployment") if d["metadata"]["name"].endswith("-gateway")]
    if name == "everything":
        (secret,) = by_kind(objects, "Secret")
        assert secret["stringData"]["keys"].split() == [KEY_HASH, "plain-key"]
        assert env["ROSE_API_KEYS_FILE"]["value"] == "/etc/rose/api-keys/keys"
        (configmap,) = by_kind(objects, "ConfigMap")
        assert configmap["data"]["ROSE_REQUEST_TIMEOUT"] == "300"
        assert deployment["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
        assert env["ROSE_MAX_BODY_BYTES"]["value"] == "1048576"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://otel-collector:4318"
        worker_env = _env(objects, "worker")
        assert worker_env["OTEL_EXPORTER_OTLP_ENDPOINT"] and worker_env["NCCL_DEBUG"]["value"] == "WARN"
        assert worker_env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf"
    elif name == "existing-api-keys-bundled-redis":
        assert not by_kind(objects, "Secret")
        assert env["ROSE_API_KEYS_FILE"]["value"] == "/etc/rose/api-keys/keys.txt"
    else:
        assert "ROSE_API_KEYS_FILE" not in env and not by_kind(objects, "Secret")


def test_config_change_rolls_pods():
    base = merge_values(load_values(), VALUE_SETS["external-redis"])
    changed = merge_values(base, {"config": {"ROSE_LOG_LEVEL": "debug"}})

    def checksums(values):
        return {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
                for d in by_kind(render(values), "Deployment")}

    before, after = checksums(base), checksums(changed)
    assert len(set(before.values())) == 1
    assert all(before[n] != after[n] for n in before)


def test_external_redis_url_is_required():
    with pytest.raises(TemplateError, match="set redis.url"):
        render(load_values())


def test_notes_warn_without_api_keys():
    assert "no API keys are configured" in render_notes(merge_values(load_values(), VALUE_SETS["external-redis"]))
    assert "no API keys" not in render_notes(merge_values(load_values(), VALUE_SETS["everything"]))


def test_renderer_refuses_what_it_does_not_know():
    with pytest.raises(TemplateError, match="not supported"):
        Renderer({"t": "{{ lookup \"v1\" \"Secret\" \"ns\" \"x\" }}"}).render("t", {})
    with pytest.raises(TemplateError, match="missing"):
        Renderer({"t": "{{ if .a }}x"})
    with pytest.raises(TemplateError, match="nil pointer"):
        Renderer({"t": "{{ .Values.a.b }}"}).render("t", {"Values": {}})
    out = Renderer({"t": "a\n  {{- if .x }} yes {{- else }} no {{- end }}\n{{ .n | quote }}{{/* c */}}"}).render("t", {"x": 0, "n": 5.0})
    assert out == "a no\n\"5\""


# ---------------------------------------------------------------- real helm
def _helm_objects(values_overrides: dict) -> list[dict]:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(values_overrides, f)
        f.flush()
        lint = subprocess.run(["helm", "lint", CHART, "-f", f.name], capture_output=True, text=True, timeout=120)
        assert lint.returncode == 0, lint.stdout + lint.stderr
        out = subprocess.run(["helm", "template", "rose", CHART, "-f", f.name, "--kube-version", KUBERNETES_VERSION],
                             capture_output=True, text=True, timeout=120, check=True).stdout
    return [o for o in yaml.safe_load_all(out) if o]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_template_renders_the_same_valid_objects(name):
    if shutil.which("helm") is None:
        pytest.skip("helm binary not on PATH (it is not installable here); tests/deploy/gotemplate.py renders the chart instead")
    objects = _helm_objects(VALUE_SETS[name])
    validate_objects(objects)

    def key(o):
        return (o["kind"], o["metadata"]["name"])

    ours = {key(o): o for o in render(merge_values(load_values(), VALUE_SETS[name]))}
    assert {key(o): o for o in objects} == ours
