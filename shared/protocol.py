"""The wire protocol between rose's services: versioned msgpack frames.

A frame is the msgpack encoding of `[PROTOCOL_VERSION, "<MessageType>", {fields}]`.
Every message type is a dataclass below, defined once and shared by both ends;
`decode` checks the version, the type name and every field's type, and raises
`FrameError` for anything else, which receivers log and drop.

Links (all ZeroMQ, see docs/ARCHITECTURE.md):
  gateway  --DEALER--> formatter ROUTER   GenerateRequest, Abort, Ping  /  Delta, Pong
  formatter --DEALER--> scheduler ROUTER  Submit, Abort, Ping           /  TokenEvent, Pong
  worker   --DEALER--> scheduler ROUTER   Register, Heartbeat, TokenEvent, KvEvent  /  Submit, Abort, Resync
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import msgpack

PROTOCOL_VERSION = 1


class FrameError(ValueError):
    """A frame that is not a valid message of this protocol version."""


@dataclass
class SamplingParams:
    """How a request samples; the engine's and the wire's one definition."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the chosen token's; n: also the top n


# ---------------------------------------------------------------- gateway <-> formatter
@dataclass
class GenerateRequest:
    """An OpenAI request the gateway validated; the formatter renders it."""

    request_id: str
    endpoint: str  # "chat" or "completion"
    body: dict[str, Any]  # the validated request body (pydantic model_dump)
    trace: dict[str, str] = field(default_factory=dict)  # W3C trace context carrier


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class Delta:
    """One streamed piece of one choice of a request, already parsed into channels."""

    request_id: str
    index: int = 0  # choice index (n > 1)
    content: str = ""
    reasoning_content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # OpenAI logprobs content entries
    finish_reason: str | None = None  # stop, length, tool_calls, abort, error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    status: int = 0  # HTTP status for an error (400, 429, 503, ...)


# ---------------------------------------------------------------- formatter <-> scheduler <-> worker
@dataclass
class Submit:
    """Token ids to generate from; formatter -> scheduler -> worker."""

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    trace: dict[str, str] = field(default_factory=dict)


@dataclass
class Abort:
    request_id: str
    reason: str = "abort"


@dataclass
class TokenEvent:
    """New tokens of one request; worker -> scheduler -> formatter."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # one per token when asked for
    top_logprobs: list[list[list[Any]]] = field(default_factory=list)  # per token [[id, logprob], ...]
    finish_reason: str | None = None  # stop, length, abort, error
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    status: int = 0
    worker_id: str = ""


@dataclass
class Register:
    worker_id: str
    model: str
    max_model_len: int
    block_size: int
    total_blocks: int
    max_num_seqs: int


@dataclass
class Heartbeat:
    worker_id: str
    running: int = 0
    waiting: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    # cumulative engine counters, for metrics and tests
    prefill_tokens: int = 0  # prompt tokens computed (not served from the prefix cache)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    finished: int = 0  # requests finished, any reason
    aborted: int = 0  # requests aborted (Abort from the scheduler, or cancelled here)
    draining: bool = False  # SIGTERM'd: finishing what runs, takes no new request


@dataclass
class KvEvent:
    """Prefix blocks a worker stored or evicted, by chained block hash."""

    worker_id: str
    stored: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    cleared: bool = False  # the worker dropped its whole cache (restart)


@dataclass
class Resync:
    """scheduler -> worker: send Register, then a KvEvent(cleared=True) with every cached block.

    Sent when the scheduler does not know the worker (it restarted) or after Redis
    came back (the index may be empty).
    """

    reason: str = ""


@dataclass
class Ping:
    sent_at: float = 0.0


@dataclass
class Pong:
    """Answer to Ping; also says whether the answering side can serve.

    scheduler -> formatter: ready when at least one worker is live; models are the
    live workers' models. formatter -> gateway: the same, as the formatter last heard.
    """

    sent_at: float = 0.0
    ready: bool = False
    models: list[str] = field(default_factory=list)
    workers: int = 0
    max_model_len: int = 0  # the longest context among live workers; 0: unknown


MESSAGE_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (GenerateRequest, Delta, Submit, Abort, TokenEvent, Register, Heartbeat, KvEvent, Resync, Ping, Pong)
}


# ---------------------------------------------------------------- encoding
def encode(message) -> bytes:
    """One message -> one frame."""
    cls = type(message)
    if MESSAGE_TYPES.get(cls.__name__) is not cls:
        raise TypeError(f"not a protocol message: {cls.__name__}")
    return msgpack.packb([PROTOCOL_VERSION, cls.__name__, _as_map(message)], use_bin_type=True)


def _as_map(message) -> dict:
    """A message's fields as a map, nested messages as maps (lists and maps are packed as they are)."""
    out = {}
    for name, kind in _field_kinds(type(message)):
        value = getattr(message, name)
        if kind == _MESSAGE:
            value = _as_map(value)
        elif kind == _MESSAGES and value:
            value = [_as_map(v) for v in value]
        out[name] = value
    return out


_PLAIN, _MESSAGE, _MESSAGES = 0, 1, 2


@functools.cache
def _field_kinds(cls) -> tuple[tuple[str, int], ...]:
    """(field name, _PLAIN / _MESSAGE / _MESSAGES: a list of messages) of a message class, in order."""
    hints = typing.get_type_hints(cls)
    kinds = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = typing.get_args(hint)
        if dataclasses.is_dataclass(hint):
            kinds.append((f.name, _MESSAGE))
        elif typing.get_origin(hint) is list and args and dataclasses.is_dataclass(args[0]):
            kinds.append((f.name, _MESSAGES))
        else:
            kinds.append((f.name, _PLAIN))
    return tuple(kinds)


def decode(frame: bytes):
    """One frame -> one message; FrameError if it is not valid."""
    try:
        obj = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise FrameError(f"not msgpack: {exc}") from None
    if not (isinstance(obj, list) and len(obj) == 3):
        raise FrameError("frame is not [version, type, payload]")
    version, name, payload = obj
    if version != PROTOCOL_VERSION:
        raise FrameError(f"protocol version {version!r}, expected {PROTOCOL_VERSION}")
    cls = MESSAGE_TYPES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise FrameError(f"unknown message type {name!r}")
    try:
        return _builder(cls)(payload)
    except _Invalid as exc:
        raise FrameError(f"{name}{exc.path}: {exc.reason}") from None


class _Invalid(Exception):
    """A value that does not match its field; path grows outwards (".params.top_k")."""

    def __init__(self, reason: str, path: str = ""):
        self.reason, self.path = reason, path


def _within(path: str, check, value):
    try:
        return check(value)
    except _Invalid as exc:
        exc.path = path + exc.path
        raise


@functools.cache
def _builder(cls):
    """A function payload -> cls instance that checks every field (built once per class:
    reading type hints per frame cost ~186 us a TokenEvent)."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    checks = {f.name: _checker(hints[f.name]) for f in fields}
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    known = frozenset(checks)

    def build(payload):
        if not isinstance(payload, dict):
            raise _Invalid("expected a map")
        if not known.issuperset(payload):
            raise _Invalid(f"unknown fields {sorted(map(str, set(payload) - known))}")
        for name in required:
            if name not in payload:
                raise _Invalid("missing", f".{name}")
        values = {}
        for name, value in payload.items():
            try:
                values[name] = checks[name](value)
            except _Invalid as exc:
                exc.path = f".{name}{exc.path}"
                raise
        return cls(**values)

    return build


def _checker(hint):
    """A function value -> value (ints widened where floats are declared) or _Invalid."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [_checker(o) for o in typing.get_args(hint) if o is not type(None)]
        optional = type(None) in typing.get_args(hint)

        def check_union(value):
            if value is None and optional:
                return None
            for option in options:
                try:
                    return option(value)
                except _Invalid:
                    pass
            raise _Invalid(f"{type(value).__name__} does not match {hint}")

        return check_union
    if dataclasses.is_dataclass(hint):
        return _builder(hint)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        if item is int:  # token ids: the hot path, checked without a call per item
            def check_int_list(value):
                if not isinstance(value, list):
                    raise _Invalid("expected a list")
                if not all(type(v) is int for v in value):  # then find where, for the message
                    i = next(i for i, v in enumerate(value) if type(v) is not int)
                    raise _Invalid("expected an integer", f"[{i}]")
                return value

            return check_int_list
        check_item = _checker(item)

        def check_list(value):
            if not isinstance(value, list):
                raise _Invalid("expected a list")
            return [_within(f"[{i}]", check_item, v) for i, v in enumerate(value)]

        return check_list
    if origin is dict:
        def check_map(value):
            if not isinstance(value, dict):
                raise _Invalid("expected a map")
            return value

        return check_map
    if hint is Any:
        return lambda value: value
    if hint is float:
        def check_float(value):
            if type(value) is float:
                return value
            if type(value) is int:
                return float(value)
            raise _Invalid("expected a number")

        return check_float
    if hint is int:
        def check_int(value):
            if type(value) is int:
                return value
            raise _Invalid("expected an integer")

        return check_int
    if hint in (str, bool):
        def check_exact(value):
            if type(value) is hint:
                return value
            raise _Invalid(f"expected {hint.__name__}")

        return check_exact
    raise TypeError(f"unsupported field type {hint}")
