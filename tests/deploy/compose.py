"""docker-compose.yml as data: Compose's variable interpolation, profiles and the
mapping of its services onto local processes (for the tests in this folder)."""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMPOSE_FILE = os.path.join(REPO, "docker-compose.yml")

# Compose's interpolation: $$, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR:+alt}, $VAR
_VARIABLE = re.compile(
    r"\$(?:\$|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value, env: dict[str, str]):
    """The value with ${...} replaced as `docker compose` does before it validates."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("braced") or m.group("named")
        op, arg, current = m.group("op"), m.group("arg"), env.get(name)
        if op == ":-":
            return current if current else arg
        if op == "-":
            return arg if current is None else current
        if op in (":?", "?"):
            if current is None or (op == ":?" and not current):
                raise ValueError(f"required variable {name}: {arg}")
            return current
        if op in (":+", "+"):
            return arg if (current if op == ":+" else current is not None) else ""
        return current or ""

    return _VARIABLE.sub(substitute, value)


def load(env: dict[str, str] | None = None) -> dict:
    """The compose file after YAML merge keys and interpolation with `env` (default: none set)."""
    with open(COMPOSE_FILE) as f:
        return interpolate(yaml.safe_load(f), env or {})


def services_in(compose: dict, profiles: set[str]) -> dict[str, dict]:
    """The services `docker compose --profile P ... up` starts."""
    return {
        name: svc
        for name, svc in compose["services"].items()
        if not svc.get("profiles") or set(svc["profiles"]) & profiles
    }


def environment(service: dict) -> dict[str, str]:
    """A service's `environment:` as a dict of strings (map or KEY=VALUE list form)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def replicas(service: dict) -> int:
    return int((service.get("deploy") or {}).get("replicas", 1))


def url_host_port(url: str) -> tuple[str, int] | None:
    """(host, port) of tcp://host:port or redis://host:port/db; None for other values."""
    if "://" not in url:
        return None
    parts = urlsplit(url)
    if parts.port is None or parts.hostname is None:
        return None
    return parts.hostname, parts.port


# Which settings a role binds (listens on) and which it connects to (shared/config.py).
BINDS = {
    "gateway": ("port",),
    "formatter": ("formatter_bind",),
    "scheduler": ("scheduler_frontend", "scheduler_backend"),
}
CONNECTS = {
    "gateway": ("formatter_urls", "redis_url"),
    "formatter": ("scheduler_frontend",),
    "scheduler": ("redis_url",),
    "worker": ("scheduler_backend",),
}
REDIS_PORT = 6379  # the redis image's default; the compose command does not change it


def role(service: dict) -> str | None:
    """The rose subcommand a service runs (None for non-rose services such as redis)."""
    command = service.get("command")
    if service.get("image", "").startswith("redis"):
        return None
    return command[0] if isinstance(command, list) and command else None


def listen_ports(service: dict) -> set[int]:
    """TCP ports a compose service listens on inside its container."""
    from shared.config import Settings

    r = role(service)
    if r is None:
        return {REDIS_PORT} if service.get("image", "").startswith("redis") else set()
    settings = Settings.from_env(environment(service))
    ports = set()
    for name in BINDS.get(r, ()):
        value = getattr(settings, name)
        ports.add(value if isinstance(value, int) else url_host_port(value)[1])
    return ports
