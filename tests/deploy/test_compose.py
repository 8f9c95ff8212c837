"""docker-compose.yml: valid Compose (the compose_spec parser, since `docker compose
config` needs an engine), real `rose` commands, real settings, consistent wiring."""

from __future__ import annotations

import json

import pytest

from services import healthcheck
from services.cli import COMMANDS, build_parser
from shared.config import Settings

from .compose import BINDS, CONNECTS, environment, listen_ports, load, replicas, role, services_in, url_host_port

compose_spec = pytest.importorskip("compose_spec", reason="compose-spec is in the test extra: pip install -e .[test]")

ROLE_SERVICES = ("gateway", "formatter", "scheduler", "worker-cpu", "worker-gpu")
SETTING_BY_ENV = {Settings.env_var(name): name for name in Settings.__dataclass_fields__}


@pytest.fixture(scope="module")
def compose() -> dict:
    return load()


@pytest.mark.parametrize("env", [{}, {"ROSE_API_KEYS": "k1,k2", "MODELS_DIR": "/srv/models", "GPU_MODEL": "gpt-oss-120b"}])
def test_file_is_valid_compose(env):
    parsed = compose_spec.PyCompose.from_json(json.dumps(load(env)))
    parsed.validate()  # every network/volume/secret a service names is defined
    assert set(parsed.service_names()) == {"redis", *ROLE_SERVICES}


def test_validator_rejects_a_broken_file(compose):
    """The validator used above does reject what `docker compose config` would."""
    broken = json.loads(json.dumps(compose))
    broken["services"]["gateway"]["healthcheck"]["interval"] = "soon"
    with pytest.raises(ValueError):
        compose_spec.PyCompose.from_json(json.dumps(broken))
    broken = json.loads(json.dumps(compose))
    broken["services"]["formatter"]["replicaz"] = 2
    with pytest.raises(ValueError):
        compose_spec.PyCompose.from_json(json.dumps(broken))


def _parse_rose(argv: list[str]):
    """argv through the real `rose` parser; SystemExit (argparse) if it is not accepted."""
    chosen = next((a for a in argv if not a.startswith("-")), None)
    return build_parser(chosen).parse_args(argv)


@pytest.mark.parametrize("name", ROLE_SERVICES)
def test_command_is_a_rose_subcommand(compose, name):
    service = compose["services"][name]
    assert "entrypoint" not in service, "the image's ENTRYPOINT (tini -- rose) runs the command"
    argv = service["command"]
    assert argv[0] in COMMANDS
    args = _parse_rose(argv)
    assert args.command == argv[0]


def test_parser_check_has_teeth():
    with pytest.raises(SystemExit):
        _parse_rose(["formatter", "--no-such-flag", "1"])
    with pytest.raises(SystemExit):
        _parse_rose(["frontend"])


@pytest.mark.parametrize("name", ROLE_SERVICES)
def test_environment_is_settings_the_role_reads(compose, name):
    service = compose["services"][name]
    env = environment(service)
    assert env, f"{name} sets no environment"
    r = role(service)
    for key, value in env.items():
        assert key in SETTING_BY_ENV, f"{name}: {key} is not a setting in shared/config.py"
        roles = Settings.__dataclass_fields__[SETTING_BY_ENV[key]].metadata["roles"]
        assert "all" in roles or r in roles, f"{name} ({r}) sets {key}, which only {roles} read"
    Settings.from_env(env)  # every value parses as its setting's type


def test_binds_listen_on_all_interfaces(compose):
    for name, service in compose["services"].items():
        r = role(service)
        if r is None:
            continue
        settings = Settings.from_env(environment(service))
        for field in BINDS.get(r, ()):
            if field == "port":
                assert settings.host == "0.0.0.0", f"{name}: gateway must listen beyond loopback"
                continue
            host, _ = url_host_port(getattr(settings, field))
            assert host in ("0.0.0.0", "*"), f"{name}: {field} binds {host}, unreachable from other containers"


def test_every_connection_reaches_a_listening_service(compose):
    for name, service in compose["services"].items():
        r = role(service)
        if r is None:
            continue
        env = environment(service)
        settings = Settings.from_env(env)
        for field in CONNECTS.get(r, ()):
            assert Settings.env_var(field) in env, f"{name}: {Settings.env_var(field)} left at its localhost default"
            for url in getattr(settings, field).split(","):
                host, port = url_host_port(url.strip())
                assert host in compose["services"], f"{name}: {field} names {host}, not a service"
                assert port in listen_ports(compose["services"][host]), f"{name}: {host} does not listen on {port}"


def test_health_restart_and_dependencies(compose):
    for name, service in compose["services"].items():
        assert service.get("restart") in ("unless-stopped", "always", "on-failure"), name
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD"
        if role(service) is not None:
            assert test[1:4] == ["python", "-m", "services.healthcheck"]
            args = healthcheck.build_parser().parse_args(test[4:])
            expected = role(service) if role(service) in healthcheck.ROLES else None
            assert args.role == expected, f"{name} probes role {args.role}"
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in compose["services"], f"{name} depends on unknown {dep}"
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in compose["services"][dep]


def test_profiles(compose):
    cpu = services_in(compose, {"cpu"})
    gpu = services_in(compose, {"gpu"})
    assert set(cpu) == {"redis", "scheduler", "formatter", "gateway", "worker-cpu"}
    assert set(gpu) == {"redis", "scheduler", "formatter", "gateway", "worker-gpu"}
    for started in (cpu, gpu):
        for name, service in started.items():
            assert set(service.get("depends_on") or {}) <= set(started), f"{name} depends on a service not started"
    assert replicas(compose["services"]["formatter"]) == 2

    assert environment(cpu["worker-cpu"])["ROSE_DEVICE"] == "cpu"
    assert "ROSE_MODEL" not in environment(cpu["worker-cpu"]), "the CPU profile serves the image's tiny model"
    worker_gpu = gpu["worker-gpu"]
    (device,) = worker_gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert environment(worker_gpu)["ROSE_DEVICE"] == "cuda"
    assert worker_gpu["build"]["dockerfile"] == "Dockerfile.gpu"


def test_no_secret_values_in_the_file(compose):
    gateway = environment(compose["services"]["gateway"])
    assert gateway["ROSE_API_KEYS"] == "", "keys come from the operator's environment, not the file"
    assert environment(load({"ROSE_API_KEYS": "abc"})["services"]["gateway"])["ROSE_API_KEYS"] == "abc"


def test_interpolation_matches_compose_rules():
    from .compose import interpolate

    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} $SET $$SET", env) == "x d  d x $SET"
    assert interpolate("${SET:+alt}|${EMPTY:+alt}|${EMPTY+alt}", env) == "alt||alt"
    with pytest.raises(ValueError):
        interpolate("${UNSET:?must be set}", env)
