"""Optional CURVE on the internal ZeroMQ links: encryption, and which clients may connect.

Off by default (the links are loopback or a private network). Key files are
ZeroMQ certificates (`rose curve-keys <folder>` writes a pair for servers and one
for clients):

    ROSE_CURVE_SERVER_KEY          server.key_secret   formatter and scheduler (binding sides)
    ROSE_CURVE_SERVER_PUBLIC_KEY   server.key          gateway, formatter, worker (connecting sides)
    ROSE_CURVE_CLIENT_KEY          client.key_secret   gateway, formatter, worker
    ROSE_CURVE_AUTHORIZED_KEYS     folder of client *.key files the servers accept

A server socket with CURVE on accepts only CURVE clients that know its public key;
with an authorized-keys folder, only those whose public key is in it (checked by a
ZAP handler thread on the service's ZeroMQ context). A peer without the right keys
never completes the handshake, so nothing it sends reaches the service.
"""

from __future__ import annotations

import os

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


class CurveKeyError(ValueError):
    """A CURVE key file or folder that cannot be used (the message names the setting)."""


def curve_enabled(settings) -> bool:
    return bool(settings.curve_server_key or settings.curve_server_public_key or settings.curve_client_key)


def _load(path: str, setting: str, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"ROSE_{setting.upper()}={path!r}: {exc}") from None
    if secret and secret_key is None:
        raise CurveKeyError(f"ROSE_{setting.upper()}={path!r} holds no secret key (use the .key_secret file)")
    return public, secret_key


# One ZAP handler per ZeroMQ context (it serves every server socket of that context).
_authenticators: dict[int, ThreadAuthenticator] = {}


def secure_server(sock: zmq.Socket, settings) -> None:
    """Make a socket about to bind a CURVE server (no-op with CURVE off); CurveKeyError on bad keys."""
    if not curve_enabled(settings):
        return
    if not settings.curve_server_key:
        raise CurveKeyError("CURVE is on for the clients but ROSE_CURVE_SERVER_KEY (the server's secret key) is not set")
    public, secret = _load(settings.curve_server_key, "curve_server_key", secret=True)
    if settings.curve_authorized_keys:
        _start_authenticator(sock.context, settings.curve_authorized_keys)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def secure_client(sock: zmq.Socket, settings) -> None:
    """Make a socket about to connect a CURVE client (no-op with CURVE off); CurveKeyError on bad keys."""
    if not curve_enabled(settings):
        return
    server_file = settings.curve_server_public_key or settings.curve_server_key
    if not server_file:
        raise CurveKeyError("CURVE is on but neither ROSE_CURVE_SERVER_PUBLIC_KEY nor ROSE_CURVE_SERVER_KEY is set")
    if not settings.curve_client_key:
        raise CurveKeyError("CURVE is on but ROSE_CURVE_CLIENT_KEY (this side's secret key) is not set")
    server_public, _ = _load(server_file, "curve_server_public_key", secret=False)
    public, secret = _load(settings.curve_client_key, "curve_client_key", secret=True)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public


def _start_authenticator(context: zmq.Context, folder: str) -> None:
    if not os.path.isdir(folder):
        raise CurveKeyError(f"ROSE_CURVE_AUTHORIZED_KEYS={folder!r} is not a folder")
    key = context.underlying  # the address of the libzmq context: the same for shadows
    if key in _authenticators:
        return
    # A zmq.asyncio context's sockets are not for threads: the handler gets a plain
    # context over the same underlying one (ZAP is per underlying context).
    auth = ThreadAuthenticator(zmq.Context.shadow(context.underlying))
    auth.start()
    auth.configure_curve(domain="*", location=folder)
    _authenticators[key] = auth


def write_key_pairs(folder: str) -> dict[str, str]:
    """A server and a client key pair under folder (authorized/ holds the client's public key); their paths."""
    authorized = os.path.join(folder, "authorized")
    os.makedirs(authorized, exist_ok=True)
    server_public, server_secret = zmq.auth.create_certificates(folder, "server")
    client_public, client_secret = zmq.auth.create_certificates(folder, "client")
    with open(client_public) as src, open(os.path.join(authorized, "client.key"), "w") as dst:
        dst.write(src.read())
    return {
        "ROSE_CURVE_SERVER_KEY": server_secret,
        "ROSE_CURVE_SERVER_PUBLIC_KEY": server_public,
        "ROSE_CURVE_CLIENT_KEY": client_secret,
        "ROSE_CURVE_AUTHORIZED_KEYS": authorized,
    }
