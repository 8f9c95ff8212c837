"""The Helm chart, checked everywhere from its sources: every .Values key a template
names exists, every component has replicas, resources and probes, every ROSE_*
variable is a real setting, every probe and command is a real CLI invocation."""

from __future__ import annotations

import os
import re

import pytest
import yaml

from services import healthcheck
from services.cli import COMMANDS
from shared.config import Settings

from .chart import CHART, COMPONENTS, leaf_paths, load_values, lookup, merge_values, templates, values_references

SETTING_BY_ENV = {Settings.env_var(name): name for name in Settings.__dataclass_fields__}
ROSE_COMPONENTS = ("gateway", "formatter", "scheduler", "worker")
TEMPLATE_OF = {c: f"{c}.yaml" for c in COMPONENTS}


@pytest.fixture(scope="module")
def values() -> dict:
    return load_values()


@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
    return templates()


def test_chart_metadata():
    with open(os.path.join(CHART, "Chart.yaml")) as f:
        chart = yaml.safe_load(f)
    assert chart["apiVersion"] == "v2" and chart["name"] == "rose" and chart["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    assert chart["appVersion"]


def test_every_values_reference_is_defined(values, sources):
    missing = []
    for name, source in sources.items():
        for path in values_references(source):
            try:
                lookup(values, path)
            except KeyError as exc:
                missing.append(f"{name}: .Values.{'.'.join(path)} (no {exc.args[0]} in values.yaml)")
    assert not missing, "\n".join(missing)


def test_reference_check_has_teeth(values):
    refs = values_references("{{ .Values.gateway.replicas }} {{ $.Values.worker.modle.path | quote }}")
    assert refs == {("gateway", "replicas"), ("worker", "modle", "path")}
    with pytest.raises(KeyError, match="worker.modle"):
        lookup(values, ("worker", "modle", "path"))


def test_every_value_is_used(values, sources):
    """No dead settings: each leaf of values.yaml is named by a template (itself or a parent map)."""
    used = set().union(*(values_references(s) for s in sources.values()))
    unused = [p for p in leaf_paths(values) if not any(p[: len(u)] == u for u in used)]
    assert not unused, f"values.yaml keys no template reads: {['.'.join(p) for p in unused]}"


@pytest.mark.parametrize("component", COMPONENTS)
def test_component_has_replicas_resources_probes(values, sources, component):
    v = values[component]
    assert isinstance(v["replicas"], int) and v["replicas"] >= 1
    for kind in ("requests", "limits"):
        assert v["resources"][kind].get("memory"), f"{component}: resources.{kind}.memory"
    assert v["resources"]["requests"].get("cpu"), f"{component}: resources.requests.cpu"
    source = sources[TEMPLATE_OF[component]]
    assert f"replicas: {{{{ .Values.{component}.replicas }}}}" in source
    assert f"toYaml .Values.{component}.resources | nindent" in source
    for probe in ("readinessProbe", "livenessProbe"):
        assert f"{probe}:" in source, f"{component}: no {probe}"
        assert f"toYaml .Values.{component}.{probe} | nindent" in source
        assert v[probe]["periodSeconds"] > 0 and v[probe]["failureThreshold"] >= 1


@pytest.mark.parametrize("component", ROSE_COMPONENTS)
def test_graceful_termination(values, sources, component):
    """Streams drain on SIGTERM: the grace period outlasts a whole request."""
    v = values[component]
    assert v["terminationGracePeriodSeconds"] > Settings().request_timeout
    assert f"terminationGracePeriodSeconds: {{{{ .Values.{component}.terminationGracePeriodSeconds }}}}" in sources[TEMPLATE_OF[component]]
    if component in ("gateway", "formatter"):
        assert "preStop:" in sources[TEMPLATE_OF[component]] and v["preStopSleepSeconds"] > 0


def _probe_commands(source: str) -> list[list[str]]:
    return [yaml.safe_load(m.group(1)) for m in re.finditer(r"command: (\[\"python\", \"-m\", \"services\.healthcheck\".*\])", source)]


@pytest.mark.parametrize("component", ROSE_COMPONENTS)
def test_probes_and_args_are_real_commands(sources, component):
    source = sources[TEMPLATE_OF[component]]
    (args,) = re.findall(r'args: \["([a-z-]+)"\]', source)
    assert args == component and args in COMMANDS
    commands = _probe_commands(source)
    if component == "gateway":
        assert "path: /ready" in source and "path: /health" in source
        return
    assert len(commands) >= 2
    for command in commands:
        parsed = healthcheck.build_parser().parse_args(command[3:])
        assert parsed.role == component


def test_env_names_are_settings_the_component_reads(values, sources):
    for component in ROSE_COMPONENTS:
        names = set(re.findall(r"- name: (ROSE_[A-Z_]+)", sources[TEMPLATE_OF[component]]))
        names |= set(values[component]["env"])
        for name in names:
            assert name in SETTING_BY_ENV, f"{component}: {name} is not a setting"
            roles = Settings.__dataclass_fields__[SETTING_BY_ENV[name]].metadata["roles"]
            assert "all" in roles or component in roles, f"{component} sets {name}, read only by {roles}"
    for name in values["config"]:
        assert name in SETTING_BY_ENV, f"config: {name} is not a setting"
        assert Settings.__dataclass_fields__[SETTING_BY_ENV[name]].metadata["roles"] == ("all",), f"config: {name} is per-role"
    Settings.from_env({k: str(v) for k, v in values["config"].items()})  # the values parse


def test_workers_ask_for_gpus(values, sources):
    worker = values["worker"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert any(t["key"] == "nvidia.com/gpu" for t in worker["tolerations"])
    source = sources["worker.yaml"]
    for key in ("nodeSelector", "tolerations", "affinity"):
        assert f"with .Values.worker.{key}" in source
    assert worker["env"]["ROSE_DEVICE"] == "cuda"
    assert "ROSE_WORKER_ID" in source and "fieldPath: metadata.name" in source


def test_autoscaling_disruption_budgets_monitoring(sources):
    hpa = sources["hpa.yaml"]
    for component in ("gateway", "formatter"):
        assert f"if .Values.{component}.autoscaling.enabled" in hpa
        assert f"if not .Values.{component}.autoscaling.enabled" in sources[TEMPLATE_OF[component]]
    pdb = sources["pdb.yaml"]
    for component in ROSE_COMPONENTS:
        assert f'"component" "{component}"' in pdb
    assert "kind: ServiceMonitor" in sources["servicemonitor.yaml"]


def test_secrets_and_redis_wiring(values, sources):
    assert values["apiKeys"]["keys"] == [] and not values["apiKeys"]["create"], "no keys shipped in the chart"
    assert "ROSE_API_KEYS_FILE" in sources["gateway.yaml"]
    assert values["redis"]["enabled"] is False and values["redis"]["url"] == ""
    helpers = sources["_helpers.tpl"]
    assert "required " in helpers and "secretKeyRef" in helpers
    for component in ("gateway", "scheduler"):
        assert 'include "rose.redisEnv"' in sources[TEMPLATE_OF[component]]


def test_cpu_values_file_only_overrides_known_keys(values):
    cpu = load_values("values-cpu.yaml")
    unknown = []
    for path in leaf_paths(cpu):
        try:
            lookup(values, path)
        except KeyError as exc:
            if path[-1] != "nvidia.com/gpu":
                unknown.append(str(exc))
    assert not unknown
    merged = merge_values(values, cpu)
    assert "nvidia.com/gpu" not in merged["worker"]["resources"]["limits"]
    assert "volume" not in merged["worker"]["model"] and merged["redis"]["enabled"] is True
    assert merged["worker"]["env"]["ROSE_DEVICE"] == "cpu"


def test_compose_and_chart_agree_on_ports(values):
    from .compose import environment, load

    services = load()["services"]
    assert f"tcp://0.0.0.0:{values['formatter']['port']}" == environment(services["formatter"])["ROSE_FORMATTER_BIND"]
    assert str(values["gateway"]["port"]) == environment(services["gateway"])["ROSE_PORT"]
    scheduler = environment(services["scheduler"])
    assert scheduler["ROSE_SCHEDULER_FRONTEND"].endswith(f":{values['scheduler']['frontendPort']}")
    assert scheduler["ROSE_SCHEDULER_BACKEND"].endswith(f":{values['scheduler']['backendPort']}")


# ---------------------------------------------------------------- values.schema.json (helm checks it on install)
def _schema_validator():
    import json

    import jsonschema

    with open(os.path.join(CHART, "values.schema.json")) as f:
        schema = json.load(f)
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_values_files_match_the_schema(values):
    from .test_render import VALUE_SETS

    validator = _schema_validator()
    validator.validate(values)
    for name, override in VALUE_SETS.items():
        validator.validate(merge_values(values, override))


def test_schema_names_every_setting_and_only_settings():
    validator = _schema_validator()
    assert set(validator.schema["definitions"]["roseEnvName"]["enum"]) == set(SETTING_BY_ENV)


@pytest.mark.parametrize("override", [
    {"gatway": {"replicas": 2}},  # a typo at the top
    {"gateway": {"replicas": "two"}},
    {"scheduler": {"replicas": 2}},  # one scheduler only
    {"config": {"ROSE_LOGLEVEL": "debug"}},  # not a setting
    {"worker": {"env": {"CUDA_VISIBLE_DEVICES": "0"}}},
    {"formatter": {"readinessProbe": {"periodSeconds": 0}}},
    {"redis": {"url": "localhost:6379"}},
    {"image": {"pullPolicy": "Sometimes"}},
])
def test_schema_rejects_bad_values(values, override):
    import jsonschema

    with pytest.raises(jsonschema.ValidationError):
        _schema_validator().validate(merge_values(values, override))
