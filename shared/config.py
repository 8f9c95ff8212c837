"""Configuration for every rose service, in one place.

Each setting is a dataclass field with an environment variable (`ROSE_<NAME>`) and a
CLI flag (`--<name>`) derived from its name. Defaults serve the embedded local run:
everything on 127.0.0.1, the tiny checkpoint under `.rose/`, the CPU `torch` backend.
Precedence: CLI flag > environment variable > default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field


def _setting(default, help: str, roles: tuple[str, ...] = ("all",)):
    return field(default=default, metadata={"help": help, "roles": roles})


@dataclass
class Settings:
    # --- files ---
    home: str = _setting(".rose", "state folder: models, vocabulary, logs")
    model: str = _setting("", "checkpoint folder (HF gpt-oss layout); default <home>/models/gpt-oss-tiny")
    model_name: str = _setting("", "model id served on /v1/models; default the checkpoint folder's name")
    tiktoken_encodings_base: str = _setting("", "folder holding o200k_base.tiktoken; default <home>/vocab")

    # --- gateway ---
    host: str = _setting("127.0.0.1", "gateway HTTP bind address", ("gateway",))
    port: int = _setting(8000, "gateway HTTP port", ("gateway",))
    formatter_urls: str = _setting("tcp://127.0.0.1:5601", "comma-separated formatter endpoints the gateway connects to", ("gateway",))
    api_keys: str = _setting("", "comma-separated API keys (empty: no auth)", ("gateway",))
    api_keys_file: str = _setting("", "file of API keys, one per line, or sha256:<hex> hashes", ("gateway",))
    rate_limit_rpm: int = _setting(0, "requests per minute per API key (0: unlimited); kept in Redis", ("gateway",))
    rate_limit_tpm: int = _setting(0, "tokens per minute per API key (0: unlimited); kept in Redis", ("gateway",))
    open_health: bool = _setting(True, "serve /health, /ready and /metrics without a key", ("gateway",))
    max_body_bytes: int = _setting(4 * 1024 * 1024, "largest request body (413 above)", ("gateway",))
    request_timeout: float = _setting(600.0, "seconds a request may run before it is aborted", ("gateway",))
    max_inflight: int = _setting(0, "most requests one gateway generates at once; more get 429 at once, without a trip down the mesh (0: no limit here, the scheduler's queue decides)", ("gateway",))
    max_messages: int = _setting(2048, "most messages in one chat request (400 above)", ("gateway",))
    max_n: int = _setting(128, "largest n (choices per prompt) a request may ask for (400 above)", ("gateway",))
    max_stop_strings: int = _setting(16, "most stop strings in one request (400 above)", ("gateway",))
    max_stop_string_chars: int = _setting(1024, "longest stop string, in characters (400 above)", ("gateway",))
    max_tools: int = _setting(128, "most tools in one chat request (400 above)", ("gateway",))
    max_tools_bytes: int = _setting(256 * 1024, "largest JSON size of a request's tool definitions (400 above)", ("gateway",))
    max_tokens_limit: int = _setting(0, "largest max_tokens a request may ask for; 0: only the context bounds it", ("gateway",))

    # --- formatter ---
    formatter_bind: str = _setting("tcp://127.0.0.1:5601", "formatter's ZeroMQ bind address", ("formatter",))

    # --- scheduler ---
    scheduler_frontend: str = _setting("tcp://127.0.0.1:5600", "scheduler endpoint for formatters (bind on the scheduler, connect elsewhere)", ("scheduler", "formatter"))
    scheduler_backend: str = _setting("tcp://127.0.0.1:5610", "scheduler endpoint for workers (bind on the scheduler, connect on workers)", ("scheduler", "worker"))
    redis_url: str = _setting("redis://127.0.0.1:6379/0", "Redis holding the prefix-cache index and rate limits", ("scheduler", "gateway"))
    max_queue: int = _setting(256, "requests waiting for a worker before new ones get 429", ("scheduler",))
    heartbeat_interval: float = _setting(0.5, "seconds between heartbeats")
    heartbeat_timeout: float = _setting(3.0, "seconds without a heartbeat before a peer is taken as dead")
    curve_server_key: str = _setting("", "CURVE: secret key file (zmq cert) of the binding sides (formatter, scheduler); set to encrypt every internal link", ("formatter", "scheduler"))
    curve_server_public_key: str = _setting("", "CURVE: the servers' public key file, for the connecting sides; default the public half of curve_server_key", ("gateway", "formatter", "worker"))
    curve_client_key: str = _setting("", "CURVE: secret key file of the connecting sides (gateway, formatter, worker)", ("gateway", "formatter", "worker"))
    curve_authorized_keys: str = _setting("", "CURVE: folder of client public key files the servers accept (empty: any client that knows the server key)", ("formatter", "scheduler"))
    drain_timeout: float = _setting(30.0, "seconds a service given SIGTERM lets in-flight requests finish before it exits")

    # --- worker / engine ---
    worker_id: str = _setting("", "worker name; default <hostname>-<pid>", ("worker",))
    backend: str = _setting("torch", "forward-pass backend: torch (reference, CPU or GPU) or cuda", ("worker",))
    device: str = _setting("cpu", "torch device for the worker", ("worker",))
    dtype: str = _setting("float32", "activation and KV dtype: float32 or bfloat16", ("worker",))
    block_size: int = _setting(16, "tokens per KV-cache block", ("worker",))
    num_kv_blocks: int = _setting(0, "KV blocks per attention group; 0 sizes from max_model_len x max_num_seqs", ("worker",))
    max_num_seqs: int = _setting(64, "most sequences in one batch", ("worker",))
    max_num_batched_tokens: int = _setting(2048, "token budget per engine step (chunked prefill)", ("worker",))
    max_model_len: int = _setting(0, "context length; 0 takes the checkpoint's", ("worker",))
    engine_overlap: str = _setting("auto", "launch each engine step before reading the last one's tokens: auto "
                                           "(on a CUDA device), on or off", ("worker",))

    # --- telemetry ---
    otel_exporter: str = _setting("none", "trace exporter: none, console or otlp (uses OTEL_EXPORTER_OTLP_ENDPOINT)")
    log_level: str = _setting("info", "log level")

    # ------------------------------------------------------------------
    @property
    def model_path(self) -> str:
        return self.model or os.path.join(self.home, "models", "gpt-oss-tiny")

    @property
    def served_model_name(self) -> str:
        return self.model_name or os.path.basename(os.path.normpath(self.model_path))

    @property
    def vocab_dir(self) -> str:
        return self.tiktoken_encodings_base or os.path.join(self.home, "vocab")

    @classmethod
    def env_var(cls, name: str) -> str:
        return "ROSE_" + name.upper()

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> "Settings":
        """Settings from ROSE_* variables, then keyword overrides."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(cls.env_var(f.name))
            if raw is not None:
                values[f.name] = _parse(f.type, raw, f.name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, role: str) -> None:
        """Add a --flag for every setting the role reads (default None: env wins)."""
        for f in dataclasses.fields(cls):
            roles = f.metadata["roles"]
            if "all" not in roles and role not in roles and role != "run":
                continue
            flag = "--" + f.name.replace("_", "-")
            kind = _type_of(f.type)
            if kind is bool:
                parser.add_argument(flag, type=_parse_bool, default=None, help=f.metadata["help"])
            else:
                parser.add_argument(flag, type=kind, default=None, help=f.metadata["help"])

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Settings":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls.from_env(**{k: v for k, v in vars(args).items() if k in names})

    def to_env(self) -> dict[str, str]:
        """ROSE_* variables that reproduce these settings in a child process."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[self.env_var(f.name)] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        return out


def _type_of(annotation) -> type:
    return {"str": str, "int": int, "float": float, "bool": bool}[str(annotation)]


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {raw!r}")


def _parse(annotation, raw: str, name: str):
    kind = _type_of(annotation)
    try:
        return _parse_bool(raw) if kind is bool else kind(raw)
    except ValueError as exc:
        raise ValueError(f"{Settings.env_var(name)}={raw!r}: {exc}") from None
