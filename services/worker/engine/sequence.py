"""One request inside the engine: its tokens, progress, blocks and unsent output."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from services.worker.engine.block_manager import BlockTables
from shared.protocol import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds blocks and is scheduled every step
    FINISHED = "finished"


@dataclass
class RequestTimes:
    """When the engine took a request, first scheduled it, read its first token and ended it.

    time.monotonic() seconds (one clock for every process on a host); None until it happens.
    """

    arrived: float = field(default_factory=time.monotonic)
    scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None

    def latencies_ms(self) -> dict[str, float]:
        """queue (arrival to first step), prefill (first step to first token read), ttft, decode, e2e."""
        spans = {"queue": (self.arrived, self.scheduled), "prefill": (self.scheduled, self.first_token),
                 "ttft": (self.arrived, self.first_token), "decode": (self.first_token, self.finished),
                 "e2e": (self.arrived, self.finished)}
        return {name: 1000 * (end - start) for name, (start, end) in spans.items() if start is not None and end is not None}


@dataclass
class RequestOutput:
    """The new tokens of one request since its last output (docs/ARCHITECTURE.md).

    logprobs: one per token when the request asked for logprobs, else empty.
    top_logprobs: per token [[token_id, logprob], ...] best first, when asked.
    finish_reason: None while running; "stop", "length", "abort" or "error".
    """

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[list]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    times: RequestTimes | None = None  # on the finishing output only

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)  # identity: queues remove a sequence by who it is, not by its fields
class Sequence:
    """A request's state; token_ids grows by one per decode step (prompt then output)."""

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    num_prompt_tokens: int
    generator: torch.Generator | None = None
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose KV is in the cache
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache at first admission
    admitted: bool = False
    blocks: BlockTables = field(default_factory=BlockTables)
    finish_reason: str | None = None
    error: str | None = None
    times: RequestTimes = field(default_factory=RequestTimes)
    # produced but not yet handed out by Engine.step
    pending_tokens: list[int] = field(default_factory=list)
    pending_logprobs: list[float] = field(default_factory=list)
    pending_top: list[list[list]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    def take_output(self) -> RequestOutput:
        """Everything produced since the last output, and the finish reason if done."""
        out = RequestOutput(
            request_id=self.request_id,
            token_ids=self.pending_tokens,
            logprobs=self.pending_logprobs,
            top_logprobs=self.pending_top,
            finish_reason=self.finish_reason,
            prompt_tokens=self.num_prompt_tokens,
            cached_tokens=self.cached_tokens,
            error=self.error,
            times=self.times if self.finish_reason is not None else None,
        )
        self.pending_tokens, self.pending_logprobs, self.pending_top = [], [], []
        return out
