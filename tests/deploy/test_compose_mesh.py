"""`docker compose --profile cpu up`, without Docker: every service of the cpu profile
started as a plain process with the compose file's own command and environment
(service hostnames mapped to 127.0.0.1, each container port to a free local port, one
process per replica), in depends_on order, each waited for with the compose file's own
healthcheck command. Then one chat completion through the gateway."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from urllib.parse import urlsplit, urlunsplit

import pytest

from services.launcher import ensure_redis_server, free_port, redis_answers

from .compose import REPO, environment, listen_ports, load, replicas, role, services_in

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# What the image's ENV sets (Dockerfile); compose services inherit it.
IMAGE_ENV = {"ROSE_HOME": "/var/lib/rose", "ROSE_HOST": "0.0.0.0"}
START_TIMEOUT_S = 180


def start_order(services: dict[str, dict]) -> list[str]:
    """Services in depends_on order (compose starts dependencies first)."""
    order: list[str] = []

    def visit(name: str, seen: tuple[str, ...] = ()):
        assert name not in seen, f"depends_on cycle through {name}"
        for dep in services[name].get("depends_on") or {}:
            visit(dep, seen + (name,))
        if name not in order:
            order.append(name)

    for name in services:
        visit(name)
    return order


class LocalCompose:
    """The compose services as local processes; ports[(service, container_port)][replica] = local port."""

    def __init__(self, services: dict[str, dict], home: str, log_dir: str):
        self.services, self.home, self.log_dir = services, home, log_dir
        self.ports = {
            (name, port): [free_port() for _ in range(replicas(svc))]
            for name, svc in services.items()
            for port in listen_ports(svc)
        }
        self.processes: list[tuple[str, subprocess.Popen]] = []

    # ------------------------------------------------------------ address mapping
    def map_value(self, service: str, replica: int, value: str) -> str:
        """A compose env value with service hostnames and bind addresses made local."""
        if "://" not in value:
            return value
        mapped = []
        for url in value.split(","):
            parts = urlsplit(url.strip())
            host, port = parts.hostname, parts.port
            if host in ("0.0.0.0", "*"):  # a bind inside this service's container
                targets = [self.ports[(service, port)][replica]]
            elif host in self.services:  # another service: every replica's address
                targets = self.ports[(host, port)]
            else:
                mapped.append(url)
                continue
            mapped += [urlunsplit((parts.scheme, f"127.0.0.1:{p}", parts.path, parts.query, parts.fragment)) for p in targets]
        return ",".join(mapped)

    def env_of(self, service: str, replica: int) -> dict[str, str]:
        env = {**IMAGE_ENV, **environment(self.services[service])}
        env = {k: self.map_value(service, replica, v) for k, v in env.items()}
        env["ROSE_HOME"] = self.home  # the image made vocabulary and tiny model there (`rose setup`)
        if env.get("ROSE_HOST") == "0.0.0.0":
            env["ROSE_HOST"] = "127.0.0.1"  # do not listen beyond loopback on a test machine
        if "ROSE_PORT" in env:
            env["ROSE_PORT"] = str(self.ports[(service, int(env["ROSE_PORT"]))][replica])
        base = {k: v for k, v in os.environ.items() if not k.startswith("ROSE_")}
        return {**base, **env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": REPO}

    # ------------------------------------------------------------ processes
    def start(self, name: str) -> None:
        svc = self.services[name]
        for replica in range(replicas(svc)):
            label = f"{name}-{replica}"
            if role(svc) is None:  # redis: the compose command on a local port
                (port,) = [p[replica] for (s, _), p in self.ports.items() if s == name]
                argv = [ensure_redis_server(), *svc["command"][1:], "--port", str(port), "--bind", "127.0.0.1"]
                env = dict(os.environ)
            else:  # ENTRYPOINT tini -- rose, CMD from compose
                argv = [sys.executable, "-m", "services.cli", *svc["command"]]
                env = self.env_of(name, replica)
            log = open(os.path.join(self.log_dir, f"{label}.log"), "wb")
            self.processes.append((label, subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                           stdin=subprocess.DEVNULL, start_new_session=True)))
            log.close()

    def healthy(self, name: str, replica: int) -> bool:
        """The compose healthcheck of one replica (redis: PING on its local port)."""
        svc = self.services[name]
        if role(svc) is None:
            (port,) = [p[replica] for (s, _), p in self.ports.items() if s == name]
            return redis_answers("127.0.0.1", port)
        test = svc["healthcheck"]["test"]
        assert test[:2] == ["CMD", "python"]
        result = subprocess.run([sys.executable, *test[2:]], cwd=REPO, env=self.env_of(name, replica),
                                capture_output=True, timeout=60)
        return result.returncode == 0

    def wait_healthy(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for replica in range(replicas(self.services[name])):
            while not self.healthy(name, replica):
                self.check_alive()
                assert time.monotonic() < deadline, f"{name}-{replica} not healthy within {timeout:.0f}s\n{self.logs()}"
                time.sleep(0.5)

    def check_alive(self) -> None:
        dead = [(label, p.returncode) for label, p in self.processes if p.poll() is not None]
        assert not dead, f"exited: {dead}\n{self.logs()}"

    def logs(self, lines: int = 25) -> str:
        out = []
        for label, _ in self.processes:
            with open(os.path.join(self.log_dir, f"{label}.log"), errors="replace") as f:
                out.append(f"--- {label}\n" + "".join(f.readlines()[-lines:]))
        return "\n".join(out)

    def stop(self) -> dict[str, int | None]:
        for _, p in reversed(self.processes):
            if p.poll() is None:
                p.terminate()
        codes = {}
        for label, p in reversed(self.processes):
            try:
                codes[label] = p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[label] = p.wait()
        return codes


def test_order_follows_depends_on():
    services = services_in(load(), {"cpu"})
    order = start_order(services)
    assert order[0] == "redis" and order.index("scheduler") < order.index("formatter") < order.index("gateway")
    assert order.index("scheduler") < order.index("worker-cpu")


def test_cpu_profile_serves_a_chat_completion(tmp_path, rose_home, vocab_dir, tiny_checkpoint):
    # The fixtures made <rose_home>/vocab and <rose_home>/models/gpt-oss-tiny, as `rose setup` does in the image.
    assert tiny_checkpoint == os.path.join(rose_home, "models", "gpt-oss-tiny")
    services = services_in(load(), {"cpu"})
    mesh = LocalCompose(services, rose_home, str(tmp_path))
    try:
        for name in start_order(services):
            mesh.start(name)
            mesh.wait_healthy(name, START_TIMEOUT_S)
        (gateway_port,) = mesh.ports[("gateway", 8000)]
        base = f"http://127.0.0.1:{gateway_port}"
        # healthy is not ready: /ready waits for a worker to register with the scheduler
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            mesh.check_alive()
            try:
                with urllib.request.urlopen(f"{base}/ready", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"gateway never ready\n{mesh.logs()}"
            time.sleep(0.5)

        with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as r:
            models = [m["id"] for m in json.load(r)["data"]]
        assert models == ["gpt-oss-tiny"]
        body = {"model": "gpt-oss-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}
        request = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            assert r.status == 200
            completion = json.load(r)
        choice = completion["choices"][0]
        assert completion["object"] == "chat.completion" and completion["model"] == "gpt-oss-tiny"
        assert choice["message"]["role"] == "assistant"
        assert choice["finish_reason"] in ("stop", "length")
        assert 1 <= completion["usage"]["completion_tokens"] <= 8
        assert completion["usage"]["prompt_tokens"] > 0

        # both formatter replicas answered their healthcheck; the worker is connected
        assert all(mesh.healthy("formatter", i) for i in range(2))
        assert mesh.healthy("worker-cpu", 0)
        mesh.check_alive()
    finally:
        codes = mesh.stop()
    # SIGTERM (docker compose stop) ends every service well inside stop_grace_period: no SIGKILL
    assert all(code in (0, -signal.SIGTERM) for code in codes.values()), codes
