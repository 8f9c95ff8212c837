"""Container health checks for every rose role: exit 0 when healthy, 1 when not.

    python -m services.healthcheck --role gateway|formatter|scheduler|worker|auto

What each role's check proves (settings come from the same ROSE_* variables the
service reads, so the probe talks to the address the service bound):

- gateway:   GET http://127.0.0.1:<port>/health answers 200 (`--ready`: /ready).
- formatter: a ZeroMQ DEALER sends a protocol `Ping` to `formatter_bind` and gets a
             `Pong` back within `--timeout`: the formatter's event loop is serving.
- scheduler: the same against `scheduler_frontend` (the ROUTER formatters use).
             With `--ready`, the Pong must also say `ready` (at least one live worker).
- worker:    a worker binds nothing, so: a `rose worker` process is running in this
             container (not a zombie) and this network namespace holds an ESTABLISHED
             TCP connection to `scheduler_backend` (the worker's DEALER is connected).
             `--liveness` also passes when the scheduler backend refuses connections
             (the scheduler is down: restarting the worker would not help), so only a
             worker that stays unconnected to a reachable scheduler fails it. It does
             not prove the engine loop makes progress; the scheduler drops a worker
             whose heartbeats stop.
- auto:      the role of the `rose <subcommand>` process running here (`run` -> gateway).

A bind address of 0.0.0.0, * or :: is probed on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import time
import urllib.error
import urllib.request

from shared.config import Settings

ROLES = ("gateway", "formatter", "scheduler", "worker")
_ANY_HOSTS = {"0.0.0.0", "*", "::", "[::]", ""}
_TCP_ESTABLISHED = "01"


class Unhealthy(Exception):
    """The check ran and the service is not healthy; the message says why."""


# ---------------------------------------------------------------- addresses
def probe_endpoint(endpoint: str) -> str:
    """A ZeroMQ tcp:// endpoint to connect to, from a bind or connect address."""
    host, port = split_endpoint(endpoint)
    if host in _ANY_HOSTS:
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"tcp://{host}:{port}"


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """tcp://host:port -> (host, port); the host without IPv6 brackets."""
    if not endpoint.startswith("tcp://"):
        raise Unhealthy(f"not a tcp:// endpoint: {endpoint!r}")
    rest = endpoint[len("tcp://"):]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise Unhealthy(f"no port in endpoint {endpoint!r}")
    return host.strip("[]"), int(port)


# ---------------------------------------------------------------- ZeroMQ roles
def ping(endpoint: str, timeout: float):
    """Send one Ping over a fresh DEALER; the Pong, or Unhealthy after `timeout` s."""
    import zmq

    from shared.protocol import FrameError, Ping, Pong, decode, encode
    from shared.zmq_security import CurveKeyError, secure_client

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        try:
            secure_client(sock, Settings.from_env())  # with CURVE on, the probe needs the client keys too
        except CurveKeyError as exc:
            raise Unhealthy(str(exc)) from None
        sock.connect(probe_endpoint(endpoint))
        sent_at = time.time()
        sock.send(encode(Ping(sent_at=sent_at)))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000) + 1, zmq.POLLIN):
                break
            frames = sock.recv_multipart()
            try:
                message = decode(frames[-1])
            except FrameError:
                continue  # not for us; keep waiting for the Pong
            if isinstance(message, Pong):
                return message
        raise Unhealthy(f"no Pong from {endpoint} within {timeout:g}s")
    finally:
        sock.close(0)


def check_zmq_role(endpoint: str, timeout: float, require_ready: bool) -> str:
    pong = ping(endpoint, timeout)
    if require_ready and not pong.ready:
        raise Unhealthy(f"{endpoint} answers but is not ready (workers={pong.workers})")
    return f"Pong from {endpoint}: ready={pong.ready} workers={pong.workers} models={pong.models}"


# ---------------------------------------------------------------- gateway
def check_gateway(settings: Settings, timeout: float, require_ready: bool) -> str:
    host = "127.0.0.1" if settings.host in _ANY_HOSTS else settings.host
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{settings.port}/{'ready' if require_ready else 'health'}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return f"{url}: {response.status}"
    except urllib.error.HTTPError as exc:
        raise Unhealthy(f"{url}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise Unhealthy(f"{url}: {getattr(exc, 'reason', exc)}") from None


# ---------------------------------------------------------------- worker
def rose_processes(proc: str = "/proc") -> dict[int, str]:
    """pid -> rose subcommand of every live `rose <subcommand>` process here."""
    found = {}
    for entry in os.listdir(proc):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(os.path.join(proc, entry, "cmdline"), "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            with open(os.path.join(proc, entry, "stat")) as f:
                state = f.read().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue  # gone while we looked
        if state in ("Z", "X"):
            continue
        command = subcommand_of(argv)
        if command:
            found[int(entry)] = command
    return found


def subcommand_of(argv: list[str]) -> str | None:
    """The rose subcommand in a command line (`rose worker`, `python -m services.cli worker`)."""
    from services.cli import COMMANDS

    for i, arg in enumerate(argv):
        if os.path.basename(arg) == "rose" or arg == "services.cli":
            rest = [a for a in argv[i + 1:] if not a.startswith("-")]
            if rest and rest[0] in COMMANDS:
                return rest[0]
    return None


def established_to(host: str, port: int, proc: str = "/proc") -> bool:
    """Whether this network namespace has an ESTABLISHED TCP connection to host:port."""
    try:
        wanted = {ipaddress.ip_address(info[4][0].split("%")[0])
                  for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except socket.gaierror as exc:
        raise Unhealthy(f"cannot resolve {host}: {exc}") from None
    for name in ("tcp", "tcp6"):
        try:
            with open(os.path.join(proc, "net", name)) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) < 4 or fields[3] != _TCP_ESTABLISHED:
                continue
            address, port_hex = fields[2].split(":")
            if int(port_hex, 16) == port and _proc_net_address(address) in wanted:
                return True
    return False


def _proc_net_address(hex_address: str) -> ipaddress._BaseAddress:
    """/proc/net/tcp{,6} address (32-bit words in host byte order) -> ip_address."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)) if sys.byteorder == "little" else raw
    address = ipaddress.ip_address(words)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def check_worker(settings: Settings, liveness: bool, proc: str = "/proc") -> str:
    workers = [pid for pid, command in rose_processes(proc).items() if command == "worker"]
    if not workers:
        raise Unhealthy("no `rose worker` process is running")
    host, port = split_endpoint(settings.scheduler_backend)
    if established_to(host, port, proc):
        return f"rose worker (pid {workers[0]}) connected to {host}:{port}"
    if liveness and not accepts_tcp(host, port):
        # the scheduler is away: not the worker's fault, restarting it would not help
        return f"rose worker running (pid {workers[0]}); scheduler backend {host}:{port} unreachable"
    raise Unhealthy(f"worker not connected to the scheduler backend {host}:{port}")


def accepts_tcp(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a TCP connection to host:port can be opened now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------- entry point
def detect_role() -> str:
    commands = set(rose_processes().values())
    for role in ROLES:
        if role in commands:
            return role
    if "run" in commands:
        return "gateway"  # the local mesh: its front door answers for it
    raise Unhealthy("no rose service process found to check")


def run_check(role: str, settings: Settings, timeout: float, require_ready: bool, liveness: bool) -> str:
    if role == "auto":
        role = detect_role()
    if role == "gateway":
        return check_gateway(settings, timeout, require_ready)
    if role == "formatter":
        return check_zmq_role(settings.formatter_bind, timeout, require_ready)
    if role == "scheduler":
        return check_zmq_role(settings.scheduler_frontend, timeout, require_ready)
    if role == "worker":
        return check_worker(settings, liveness)
    raise Unhealthy(f"unknown role {role!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.healthcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=ROLES + ("auto",), default="auto")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for an answer")
    parser.add_argument("--ready", action="store_true", help="check readiness, not only liveness")
    parser.add_argument("--liveness", action="store_true",
                        help="worker: also healthy while the scheduler itself is unreachable")
    parser.add_argument("--endpoint", default="", help="formatter/scheduler: probe this endpoint instead")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.from_env()
    if args.endpoint:
        settings = Settings.from_env(formatter_bind=args.endpoint, scheduler_frontend=args.endpoint)
    try:
        print(f"healthy: {run_check(args.role, settings, args.timeout, args.ready, args.liveness)}")
        return 0
    except Unhealthy as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
