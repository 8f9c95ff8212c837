"""`rose run`: the whole mesh on one machine, as child processes.

Starts (in this order) a private redis-server when no Redis is configured, the
scheduler, the workers, the formatters and the gateway, each as
`python -m services.cli <role>` with its settings passed as ROSE_* variables, waits
for the gateway's /ready, prints the URL and serves until Ctrl-C or SIGTERM. A child
that dies is reported with the tail of its log; the mesh stops when it can no
longer serve (gateway, scheduler or Redis gone, or no worker or formatter left).

`Mesh` is the same thing as a Python API; the end-to-end tests and the mesh
benchmark start their meshes with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from shared.config import Settings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOP_GRACE_S = 5.0


class MeshError(RuntimeError):
    """The mesh could not start (the message names the child and its log tail)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=1, help="model workers to start (default 1)")
    parser.add_argument("--formatters", type=int, default=2, help="formatters to start (default 2)")
    parser.add_argument("--log-dir", default=None, help="write each child's output to <log-dir>/<name>.log instead of the console")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for the gateway's /ready")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP port can be bound right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def with_port(url: str, port: int) -> str:
    """tcp://host:old or redis://host:old/db with the port replaced."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    return urlunsplit((parts.scheme, f"{host}:{port}", parts.path, parts.query, parts.fragment))


def port_of(url: str) -> int:
    port = urlsplit(url).port
    if port is None:
        raise ValueError(f"no port in {url!r}")
    return port


def with_free_ports(settings: Settings) -> Settings:
    """The settings with every listening port replaced by a free one (tests, benchmarks)."""
    return dataclasses.replace(
        settings,
        port=free_port(),
        formatter_bind=with_port(settings.formatter_bind, free_port()),
        scheduler_frontend=with_port(settings.scheduler_frontend, free_port()),
        scheduler_backend=with_port(settings.scheduler_backend, free_port()),
    )


def absolute_paths(settings: Settings) -> Settings:
    """Children run from the repository root, so relative folders are resolved here."""
    return dataclasses.replace(
        settings,
        home=os.path.abspath(settings.home),
        model=os.path.abspath(settings.model) if settings.model else "",
        tiktoken_encodings_base=os.path.abspath(settings.tiktoken_encodings_base) if settings.tiktoken_encodings_base else "",
        api_keys_file=os.path.abspath(settings.api_keys_file) if settings.api_keys_file else "",
        **{name: os.path.abspath(getattr(settings, name)) if getattr(settings, name) else ""
           for name in ("curve_server_key", "curve_server_public_key", "curve_client_key", "curve_authorized_keys")},
    )


@dataclass
class Child:
    """One started process of the mesh."""

    name: str  # e.g. "worker-1"
    role: str  # cli subcommand, or "redis"
    process: subprocess.Popen
    log_path: str | None
    expected_exit: bool = False  # stopped or killed on purpose

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])


def worker_threads(workers: int, cores: int | None = None) -> int:
    """torch threads per co-located worker: the cores left after two for the other services.

    torch's parallel regions wait for their slowest thread, so a worker that spreads
    over every core stalls each time the gateway, a formatter or the scheduler is
    scheduled: on 2 cores one thread streams at the in-process latency, two add
    ~30 ms per token (docs/BENCHMARKS.md, Mesh overhead).
    """
    cores = cores or os.cpu_count() or 1
    return max(1, (cores - 2) // max(1, workers))


def _die_with_parent() -> None:
    """Children get SIGTERM when the launcher dies, even by SIGKILL (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class Mesh:
    """A local rose mesh: redis (optional), scheduler, workers, formatters, gateway.

    settings: what every child reads (ports, model, heartbeats...).
    redis_url: None starts a private redis-server on a free port.
    env: extra environment for every child (OTEL_* and the like).
    log_dir: None lets children write to this process's stdout/stderr.
    """

    settings: Settings
    formatters: int = 2
    workers: int = 1
    redis_url: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    log_dir: str | None = None
    children: list[Child] = field(default_factory=list)
    _formatter_binds: list[str] | None = field(default=None, init=False, repr=False)

    @property
    def base_url(self) -> str:
        """The gateway's OpenAI base URL (…/v1)."""
        return f"{self.url}/v1"

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "") else self.settings.host
        return f"http://{host}:{self.settings.port}"

    def formatter_binds(self) -> list[str]:
        """Formatter i binds at the configured port + i, or a free port where that one is taken.

        Decided once, so a formatter restarted later binds where the gateway connects.
        """
        if self._formatter_binds is None:
            base = port_of(self.settings.formatter_bind)
            ports = [base] + [base + i if port_is_free(base + i) else free_port() for i in range(1, self.formatters)]
            self._formatter_binds = [with_port(self.settings.formatter_bind, p) for p in ports]
        return self._formatter_binds

    # ------------------------------------------------------------ start / stop
    def start(self, ready_timeout: float = 300.0) -> "Mesh":
        """Start every child, wait for /ready and every worker; MeshError (everything stopped) on failure."""
        if self.formatters < 1 or self.workers < 1:
            raise MeshError("a mesh needs at least one formatter and one worker")
        self.settings = absolute_paths(self.settings)
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
        try:
            if self.redis_url is None:
                self.redis_url = self.start_redis()
            self.settings = dataclasses.replace(self.settings, redis_url=self.redis_url)
            binds = self.formatter_binds()
            connect_urls = ",".join(b.replace("//0.0.0.0:", "//127.0.0.1:") for b in binds)
            self.settings = dataclasses.replace(self.settings, formatter_urls=connect_urls)
            self.spawn("scheduler", "scheduler", {})
            for i in range(self.workers):
                overrides = {"ROSE_WORKER_ID": self.worker_ids()[i]}
                if "OMP_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in self.env:
                    overrides["OMP_NUM_THREADS"] = str(worker_threads(self.workers))
                self.spawn(f"worker-{i}", "worker", overrides)
            for i, bind in enumerate(binds):
                self.spawn(f"formatter-{i}", "formatter", {"ROSE_FORMATTER_BIND": bind})
            self.spawn("gateway", "gateway", {})
            self.wait_ready(ready_timeout)
            self.wait_workers(ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        """Poll GET /ready until 200; MeshError if a child dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = self.crashed()
            if dead:
                raise MeshError(self.describe_crash(dead[0]))
            try:
                with urllib.request.urlopen(f"{self.url}/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise MeshError(f"the gateway at {self.url} was not ready within {timeout:.0f}s")

    def worker_ids(self) -> list[str]:
        return [f"{self.settings.worker_id or 'worker'}-{i}" for i in range(self.workers)]

    def wait_workers(self, timeout: float) -> None:
        """Wait until the scheduler has heard every worker (/ready needs only one).

        The scheduler keeps each live worker's counters in Redis (rose:worker:<id>).
        """
        import redis

        client = redis.Redis.from_url(self.redis_url, socket_timeout=2)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                dead = self.crashed()
                if dead:
                    raise MeshError(self.describe_crash(dead[0]))
                try:
                    if all(client.exists(f"rose:worker:{w}") for w in self.worker_ids()):
                        return
                except redis.RedisError:
                    pass
                time.sleep(0.1)
        finally:
            client.close()
        raise MeshError(f"not every worker of {self.worker_ids()} registered within {timeout:.0f}s")

    def stop(self) -> dict[str, int | None]:
        """Terminate every child (gateway first), kill what is left after its drain and a grace period."""
        for child in reversed(self.children):
            if child.returncode is None:
                child.expected_exit = True
                child.process.terminate()
        # Each child drains first (its requests in flight finish, up to drain_timeout).
        deadline = time.monotonic() + self.settings.drain_timeout + STOP_GRACE_S
        for child in reversed(self.children):
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        return {c.name: c.returncode for c in self.children}

    def kill(self, name: str, sig: int = signal.SIGKILL) -> Child:
        """Send a signal to one child on purpose (its exit is then not a crash)."""
        child = self.child(name)
        child.expected_exit = True
        child.process.send_signal(sig)
        child.process.wait(10)
        return child

    def child(self, name: str) -> Child:
        for c in self.children:
            if c.name == name:
                return c
        raise KeyError(f"no child named {name!r}; have {[c.name for c in self.children]}")

    def crashed(self) -> list[Child]:
        """Children that exited without being told to."""
        return [c for c in self.children if not c.expected_exit and c.returncode is not None]

    def describe_crash(self, child: Child) -> str:
        tail = child.log_tail()
        where = f" (log {child.log_path})" if child.log_path else ""
        return f"{child.name} exited with code {child.returncode}{where}" + (f":\n{tail}" if tail else "")

    def __enter__(self) -> "Mesh":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ children
    def spawn(self, name: str, role: str, overrides: dict[str, str], argv: list[str] | None = None) -> Child:
        """Start one child: `rose <role>` with this mesh's settings plus `overrides` (env), or `argv`."""
        env = dict(os.environ)
        env.update(self.settings.to_env())
        env.update(self.env)
        env.update(overrides)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        argv = argv or [sys.executable, "-m", "services.cli", role]
        log_path, out = None, None
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
            log_path = os.path.join(self.log_dir, f"{name}.log")
            out = open(log_path, "ab")
        try:
            process = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
                start_new_session=True,  # Ctrl-C reaches only the launcher, which stops children in order
                preexec_fn=_die_with_parent,
            )
        finally:
            if out is not None:
                out.close()
        child = Child(name, role, process, log_path)
        self.children.append(child)
        return child

    def start_redis(self) -> str:
        """A private, non-persistent redis-server on a free port; its URL."""
        binary = ensure_redis_server()
        port = free_port()
        child = self.spawn(
            "redis",
            "redis",
            {},
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--loglevel", "warning"],
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if child.returncode is not None:
                raise MeshError(self.describe_crash(child))
            if redis_answers("127.0.0.1", port):
                return f"redis://127.0.0.1:{port}/0"
            time.sleep(0.05)
        raise MeshError(f"redis-server on port {port} did not answer PING within 15s")


def redis_answers(host: str, port: int) -> bool:
    """True when a Redis server answers PING at host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def ensure_redis_server() -> str:
    """Path of redis-server; installs it with apt-get when missing and running as root."""
    found = shutil.which("redis-server")
    if found:
        return found
    if os.name == "posix" and os.geteuid() == 0 and shutil.which("apt-get"):
        print("rose: redis-server not found; installing it with apt-get", file=sys.stderr)
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=False)
        found = shutil.which("redis-server")
        if found:
            return found
    raise MeshError(
        "redis-server is not installed: install it (e.g. `apt-get install redis-server`) "
        "or point ROSE_REDIS_URL / --redis-url at a running Redis"
    )


# ---------------------------------------------------------------- rose run
def main(settings: Settings, args: argparse.Namespace) -> int:
    from services.setup import setup

    try:
        setup(settings)
    except (OSError, ValueError) as exc:
        print(f"rose run: setup failed: {exc}", file=sys.stderr)
        return 1
    redis_given = getattr(args, "redis_url", None) is not None or Settings.env_var("redis_url") in os.environ
    mesh = Mesh(
        settings,
        formatters=getattr(args, "formatters", 2),
        workers=getattr(args, "workers", 1),
        redis_url=settings.redis_url if redis_given else None,
        log_dir=getattr(args, "log_dir", None),
    )
    stopping = False

    def request_stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        print(f"rose: starting {mesh.workers} worker(s), {mesh.formatters} formatter(s) for {settings.model_path}", file=sys.stderr)
        mesh.start(getattr(args, "ready_timeout", 300.0))
    except MeshError as exc:
        print(f"rose run: {exc}", file=sys.stderr)
        return 1
    print(f"rose: serving {settings.served_model_name} at {mesh.base_url} (Ctrl-C stops)", flush=True)
    code = 0
    reported: set[str] = set()
    while not stopping:
        time.sleep(0.2)
        for child in mesh.crashed():
            if child.name not in reported:
                reported.add(child.name)
                print(f"rose: {mesh.describe_crash(child)}", file=sys.stderr)
        if not _can_serve(mesh):
            print("rose: the mesh can no longer serve; stopping", file=sys.stderr)
            code = 1
            break
    print("rose: stopping", file=sys.stderr)
    mesh.stop()
    return code


def _can_serve(mesh: Mesh) -> bool:
    alive = {c.name for c in mesh.children if c.returncode is None}
    needed = {"gateway", "scheduler"} | ({"redis"} if any(c.role == "redis" for c in mesh.children) else set())
    return (
        needed <= alive
        and any(n.startswith("worker-") for n in alive)
        and any(n.startswith("formatter-") for n in alive)
    )
