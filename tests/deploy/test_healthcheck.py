"""services.healthcheck against real sockets: a ZeroMQ ROUTER speaking shared.protocol,
a real HTTP server, a real `rose worker` command line and a real TCP connection."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time

import pytest
import zmq

from services import healthcheck
from services.launcher import free_port
from shared.protocol import Ping, Pong, decode, encode

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class PongRouter:
    """A ROUTER bound like a formatter/scheduler; answers each Ping per `mode`."""

    def __init__(self, mode: str = "pong", ready: bool = True):
        self.mode, self.ready = mode, ready
        self.port = free_port()
        self.pings: list[Ping] = []
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self._thread.start()
        assert self._bound.wait(5)
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)

    def _serve(self):
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(f"tcp://127.0.0.1:{self.port}")
        self._bound.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(50):
                    continue
                identity, frame = sock.recv_multipart()
                message = decode(frame)
                assert isinstance(message, Ping)
                self.pings.append(message)
                if self.mode == "silent":
                    continue
                if self.mode == "garbage-first":
                    sock.send_multipart([identity, b"\x93not a frame"])
                pong = Pong(sent_at=message.sent_at, ready=self.ready, models=["gpt-oss-tiny"], workers=int(self.ready))
                sock.send_multipart([identity, encode(pong)])
        finally:
            sock.close(0)


@pytest.mark.parametrize("role,variable", [("formatter", "ROSE_FORMATTER_BIND"), ("scheduler", "ROSE_SCHEDULER_FRONTEND")])
def test_zmq_role_healthy_when_pong_comes_back(monkeypatch, capsys, role, variable):
    with PongRouter() as router:
        # the service's own bind address (all interfaces) is probed on loopback
        monkeypatch.setenv(variable, f"tcp://0.0.0.0:{router.port}")
        assert healthcheck.main(["--role", role, "--timeout", "3"]) == 0
    assert len(router.pings) == 1 and router.pings[0].sent_at > 0
    assert "ready=True" in capsys.readouterr().out


def test_silent_router_is_unhealthy_after_timeout(monkeypatch, capsys):
    with PongRouter(mode="silent") as router:
        monkeypatch.setenv("ROSE_FORMATTER_BIND", f"tcp://*:{router.port}")
        started = time.monotonic()
        assert healthcheck.main(["--role", "formatter", "--timeout", "0.5"]) == 1
        elapsed = time.monotonic() - started
    assert len(router.pings) == 1, "the Ping reached the router"
    assert 0.4 < elapsed < 3
    assert "no Pong" in capsys.readouterr().err


def test_nothing_bound_is_unhealthy(monkeypatch):
    monkeypatch.setenv("ROSE_SCHEDULER_FRONTEND", f"tcp://127.0.0.1:{free_port()}")
    assert healthcheck.main(["--role", "scheduler", "--timeout", "0.3"]) == 1


def test_undecodable_frame_is_skipped_until_the_pong(monkeypatch):
    with PongRouter(mode="garbage-first") as router:
        monkeypatch.setenv("ROSE_FORMATTER_BIND", f"tcp://127.0.0.1:{router.port}")
        assert healthcheck.main(["--role", "formatter"]) == 0


def test_ready_flag_requires_pong_ready(monkeypatch):
    with PongRouter(ready=False) as router:
        monkeypatch.setenv("ROSE_SCHEDULER_FRONTEND", f"tcp://127.0.0.1:{router.port}")
        assert healthcheck.main(["--role", "scheduler"]) == 0
        assert healthcheck.main(["--role", "scheduler", "--ready"]) == 1


def test_cli_as_a_probe_runs_it(tmp_path):
    """The exact command the images, compose and the chart use."""
    with PongRouter() as router:
        env = {**os.environ, "ROSE_FORMATTER_BIND": f"tcp://0.0.0.0:{router.port}"}
        ok = subprocess.run([sys.executable, "-m", "services.healthcheck", "--role", "formatter"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("healthy: Pong from")
    env["ROSE_FORMATTER_BIND"] = f"tcp://127.0.0.1:{free_port()}"
    bad = subprocess.run([sys.executable, "-m", "services.healthcheck", "--role", "formatter", "--timeout", "0.3"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.startswith("unhealthy:")


# ---------------------------------------------------------------- gateway
class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response({"/health": 200, "/ready": 503}.get(self.path, 404))
        self.end_headers()

    def log_message(self, *args):
        pass


def test_gateway_health_and_ready(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("ROSE_HOST", "0.0.0.0")
        monkeypatch.setenv("ROSE_PORT", str(server.server_address[1]))
        assert healthcheck.main(["--role", "gateway"]) == 0
        assert healthcheck.main(["--role", "gateway", "--ready"]) == 1  # /ready answers 503
    finally:
        server.shutdown()
        server.server_close()
    assert healthcheck.main(["--role", "gateway", "--timeout", "0.5"]) == 1  # nothing listens now


# ---------------------------------------------------------------- worker
@pytest.fixture
def fake_worker():
    """A live process whose command line is `... rose worker --device cpu`."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "rose", "worker", "--device", "cpu"])
    # until the child has exec'd, /proc shows the parent's command line (CI once read it that early)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            if b"worker" in f.read():
                break
        time.sleep(0.01)
    yield proc
    proc.kill()
    proc.wait()


def test_subcommand_of_command_lines():
    assert healthcheck.subcommand_of(["/usr/local/bin/python", "/usr/local/bin/rose", "worker"]) == "worker"
    assert healthcheck.subcommand_of(["tini", "--", "rose", "gateway", "--log-level", "debug"]) == "gateway"
    assert healthcheck.subcommand_of(["python", "-m", "services.cli", "formatter"]) == "formatter"
    assert healthcheck.subcommand_of(["python", "-m", "services.cli", "frobnicate"]) is None
    assert healthcheck.subcommand_of(["bash", "-c", "sleep 1"]) is None


def test_worker_process_found_in_real_proc(fake_worker):
    assert healthcheck.rose_processes().get(fake_worker.pid) == "worker"


def test_worker_ready_only_while_connected(monkeypatch, fake_worker):
    port = free_port()
    monkeypatch.setenv("ROSE_SCHEDULER_BACKEND", f"tcp://127.0.0.1:{port}")
    assert healthcheck.main(["--role", "worker"]) == 1  # no scheduler: not connected
    assert healthcheck.main(["--role", "worker", "--liveness"]) == 0  # alive; the scheduler is the one away

    ctx = zmq.Context.instance()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for sock in (router, dealer):
        sock.setsockopt(zmq.LINGER, 0)
    try:
        router.bind(f"tcp://127.0.0.1:{port}")
        dealer.connect(f"tcp://127.0.0.1:{port}")  # what the worker's DEALER does
        deadline = time.monotonic() + 5
        while not healthcheck.established_to("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert healthcheck.main(["--role", "worker"]) == 0
        assert healthcheck.main(["--role", "worker", "--liveness"]) == 0
        dealer.close(0)
        deadline = time.monotonic() + 5
        while healthcheck.established_to("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.05)
        # the scheduler accepts connections but the worker holds none: wedged, restart it
        assert healthcheck.main(["--role", "worker", "--liveness"]) == 1
    finally:
        dealer.close(0)
        router.close(0)


def _fake_proc(root, processes: dict[int, tuple[list[str], str]]):
    for pid, (argv, state) in processes.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        (root / str(pid) / "stat").write_text(f"{pid} (py thon) {state} 1 1 1 0 -1\n")
    (root / "net").mkdir()
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    (root / "net" / "tcp").write_text(
        header
        # 127.0.0.1:40000 -> 127.0.0.1:5610 ESTABLISHED (01); -> :5611 in SYN_SENT (02)
        + "   0: 0100007F:9C40 0100007F:15EA 01 00000000:00000000 00:00000000 00000000  1000 0 1 1\n"
        + "   1: 0100007F:9C41 0100007F:15EB 02 00000000:00000000 00:00000000 00000000  1000 0 2 1\n")


def test_worker_check_reads_proc(tmp_path):
    root = tmp_path / "proc"
    _fake_proc(root, {
        1: (["tini", "--", "rose", "worker"], "S"),
        7: (["python", "-m", "services.cli", "worker"], "Z"),  # a zombie does not count
        9: (["bash"], "S"),
    })
    settings = healthcheck.Settings(scheduler_backend="tcp://127.0.0.1:5610")
    assert "connected" in healthcheck.check_worker(settings, liveness=False, proc=str(root))
    with pytest.raises(healthcheck.Unhealthy, match="not connected"):
        healthcheck.check_worker(healthcheck.Settings(scheduler_backend="tcp://127.0.0.1:5611"), False, str(root))

    empty = tmp_path / "proc2"
    _fake_proc(empty, {7: (["rose", "worker"], "Z"), 9: (["bash"], "S")})
    with pytest.raises(healthcheck.Unhealthy, match="no `rose worker`"):
        healthcheck.check_worker(settings, liveness=True, proc=str(empty))
    with pytest.raises(healthcheck.Unhealthy, match="no `rose worker`"):
        healthcheck.check_worker(settings, liveness=False, proc=str(empty))


def test_proc_net_addresses():
    assert str(healthcheck._proc_net_address("0100007F")) == "127.0.0.1"
    assert str(healthcheck._proc_net_address("00000000000000000000000001000000")) == "::1"
    assert str(healthcheck._proc_net_address("0000000000000000FFFF00000100007F")) == "127.0.0.1"


def test_probe_endpoint_maps_wildcards():
    assert healthcheck.probe_endpoint("tcp://*:5601") == "tcp://127.0.0.1:5601"
    assert healthcheck.probe_endpoint("tcp://0.0.0.0:5600") == "tcp://127.0.0.1:5600"
    assert healthcheck.probe_endpoint("tcp://[::1]:5600") == "tcp://[::1]:5600"
    assert healthcheck.probe_endpoint("tcp://formatter-0.formatter:5601") == "tcp://formatter-0.formatter:5601"
    with pytest.raises(healthcheck.Unhealthy):
        healthcheck.probe_endpoint("ipc:///tmp/x")
