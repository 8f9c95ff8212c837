"""The engine: requests in, one continuous-batching step at a time, tokens out.

    engine = Engine.from_settings(settings)
    engine.add_request("r1", [200006, ...], SamplingParams(max_tokens=32))
    while engine.has_work():
        for out in engine.step(): ...

A step asks the scheduler for chunks, runs one forward pass over all of them (one
ForwardBatch over the paged KV cache), samples a token for every sequence whose
chunk reached its last token, registers newly filled blocks in the prefix cache,
and returns the new tokens of every request that produced any or finished.

On a GPU the steps overlap (vLLM's async scheduling, SGLang's overlap scheduler): a
step's draws stay on the device, each sequence gets a placeholder token, and the next
step is scheduled and launched with its inputs read from those draws before the host
reads them. Planning, sampling set-up and output handling then run while the device
computes. A request that stops on a sampled token costs the one step launched after it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from kernels.sample import fused_sampling
from services.worker.engine.block_manager import BlockManager
from services.worker.engine.errors import EngineInputError
from services.worker.engine.kv_sizing import kv_blocks_per_group
from services.worker.engine.sampler import (FusedDraw, SampledTokens, SamplingRow, check_params, choose, make_generator,
                                            needs_host, sample)
from services.worker.engine.scheduler import Chunk, Scheduler
from services.worker.engine.sequence import RequestOutput, Sequence, Status
from services.worker.model.batch import GROUPS, ForwardBatch, to_device
from shared.protocol import SamplingParams

log = logging.getLogger(__name__)


# Where a token still being drawn on the device goes in Sequence.token_ids (never a real id).
PLACEHOLDER = -1


@dataclass(eq=False)
class _Launched:
    """A step on its way: the forward pass and the draws are queued on the device.

    rows: each sampled sequence with the index of its placeholder (None: the token is
    appended when read, because it ends the request by length). tokens: the draws
    [rows] int64 on the device, which the next step's inputs may read before the host
    does; host: tokens and finite flags [2, rows], copied to the host once `ready`.
    """

    chunks: list[Chunk]
    rows: list[tuple[Sequence, int | None]] = field(default_factory=list)
    tokens: torch.Tensor | None = None
    host: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None
    sampled: SampledTokens | None = None  # rows sampled on the host (logprobs, penalties)


@dataclass
class EngineStats:
    """Counters since start (cumulative) and the current load."""

    num_running: int
    num_waiting: int
    prefill_tokens_computed: int  # prompt positions run through the model (prefix hits excluded)
    decode_tokens_computed: int  # generated positions run through the model (recompute included)
    cached_prompt_tokens: int  # prompt tokens served from the prefix cache
    generated_tokens: int
    num_preemptions: int
    requests_finished: int
    steps: int
    free_blocks: dict[str, int]  # allocatable now, evictable cached blocks included
    total_blocks: dict[str, int]
    cached_blocks: dict[str, int]  # blocks findable by prefix hash (in use or evictable)
    block_size: int
    max_model_len: int


class Engine:
    """Continuous batching over one model and its paged KV cache (not thread-safe).

    The model is any backend with `config` (GptOssConfig), `dtype`, `device`,
    `make_kv_cache(num_blocks, block_size) -> PagedKVCache` and
    `model(batch: ForwardBatch, kv: PagedKVCache) -> [num_seqs, vocab] float32`.
    num_blocks: KV blocks per attention group (an int gives every group the same).
    max_model_len 0 takes the model's max_position_embeddings. seed: the stream of
    requests without their own seed (None: nondeterministic). overlap: launch each
    step before the host reads the last one's tokens (None: on a CUDA device).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        num_blocks: dict[str, int] | int,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int = 0,
        eos_token_ids: list[int] | None = None,
        seed: int | None = None,
        overlap: bool | None = None,
    ):
        config = model.config
        self.model = model
        self.config = config
        self.vocab_size = config.vocab_size
        self.max_model_len = max_model_len or config.max_position_embeddings
        for name, value in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                            ("max_num_batched_tokens", max_num_batched_tokens), ("max_model_len", self.max_model_len)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        groups = list(dict.fromkeys(config.layer_groups))
        if isinstance(num_blocks, int):
            num_blocks = {g: num_blocks for g in groups}
        self.block_size = block_size
        self.blocks = BlockManager(groups, num_blocks, block_size, window=config.max_window)
        # the backend makes its cache: the cuda one adds the scratch blocks its CUDA graphs pad with
        self.kv = model.make_kv_cache(num_blocks, block_size)
        warm_up = getattr(model, "warm_up", None)  # the cuda backend: compiles and graph captures before any request
        if warm_up is not None:
            warm_up(self.kv, max_num_seqs, max_num_batched_tokens)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        self.eos_token_ids = set(config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.device = model.device
        # The stream of requests without a seed; seeded engines replay runs exactly.
        self.generator = torch.Generator(device=self.device)
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()
        # On a GPU, greedy and shared-stream batches draw in two Triton kernels (kernels/sample.py)
        self._fused_draw = FusedDraw(self.generator.initial_seed()) if self.device.type == "cuda" and fused_sampling() else None
        if self._fused_draw is not None:  # its kernels compile now, not in a request's first step
            self._fused_draw(torch.zeros(1, self.vocab_size, device=self.device),
                             [SamplingRow(SamplingParams(max_tokens=1), [], 0)])
        # ROSE_STEP_LOG=path: one JSON line per step launched (what it ran, what waited), for benches
        log_path = os.environ.get("ROSE_STEP_LOG")
        self._step_log = open(log_path, "a", buffering=1, encoding="utf-8") if log_path else None
        self.requests: dict[str, Sequence] = {}
        self._done: list[Sequence] = []  # finished outside step (abort): reported by the next step
        self._prefill_tokens = 0
        self._decode_tokens = 0
        self._generated = 0
        self._finished = 0
        self._steps = 0
        # overlap: launch each step before reading the last one's tokens (pays off where the device runs asynchronously)
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        self._pending: _Launched | None = None  # launched, its tokens not yet read (overlap only)
        self._in_flight: _Launched | None = None  # the launched step whose placeholders the next step reads

    # ------------------------------------------------------------------ building
    @classmethod
    def from_settings(cls, settings) -> "Engine":
        """Load the checkpoint at settings.model_path and size the KV cache from settings."""
        from services.worker.model import load_model

        overlaps = {"auto": None, "on": True, "off": False}
        if settings.engine_overlap not in overlaps:
            raise ValueError(f"engine_overlap must be auto, on or off, got {settings.engine_overlap!r}")
        model = load_model(settings.model_path, backend=settings.backend, device=settings.device, dtype=settings.dtype)
        config = model.config
        max_model_len = settings.max_model_len or config.max_position_embeddings
        if max_model_len > config.max_position_embeddings:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's "
                             f"max_position_embeddings {config.max_position_embeddings}")
        num_blocks = kv_blocks_per_group(model, settings, max_model_len)
        return cls(
            model,
            num_blocks=num_blocks,
            block_size=settings.block_size,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            max_model_len=max_model_len,
            eos_token_ids=_eos_token_ids(settings.model_path, config),
            overlap=overlaps[settings.engine_overlap],
        )

    # ------------------------------------------------------------------ requests
    def check_request(self, request_id: str, token_ids: list[int], params: SamplingParams) -> None:
        """Raise EngineInputError if add_request would refuse this request (no state change)."""
        if not isinstance(request_id, str) or not request_id:
            raise EngineInputError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self.requests:
            raise EngineInputError(f"request {request_id!r} is already running")
        if not isinstance(token_ids, (list, tuple)):
            raise EngineInputError(f"token_ids must be a list of integers, got {type(token_ids).__name__}")
        if not token_ids:
            raise EngineInputError("the prompt is empty: give at least one token")
        for i, token in enumerate(token_ids):
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < self.vocab_size:
                raise EngineInputError(f"token_ids[{i}] = {token!r} is not a token id of this model "
                                       f"(0..{self.vocab_size - 1})")
        check_params(params, self.vocab_size)
        total = len(token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise EngineInputError(
                f"the prompt ({len(token_ids)} tokens) plus max_tokens ({params.max_tokens}) is {total} tokens, "
                f"beyond this model's context of {self.max_model_len}")
        for group, pool in self.blocks.pools.items():
            need = self.blocks.min_blocks(group, total)
            if need > pool.num_total:
                raise EngineInputError(
                    f"the request needs up to {need} KV blocks ({group} layers) but the cache holds "
                    f"{pool.num_total}; lower max_tokens or shorten the prompt")

    def add_request(self, request_id: str, token_ids: list[int], params: SamplingParams,
                    arrived: float | None = None) -> None:
        """Queue a request; EngineInputError (and nothing queued) if it is bad.

        arrived: when the caller took it (time.monotonic()); now if None.
        """
        self.check_request(request_id, token_ids, params)
        seq = Sequence(
            request_id=request_id,
            token_ids=list(token_ids),
            params=params,
            num_prompt_tokens=len(token_ids),
            generator=make_generator(params.seed, self.device) if params.seed is not None else None,
        )
        if arrived is not None:
            seq.times.arrived = arrived
        self.requests[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks now; its "abort" output comes with the next step.

        Returns False for an unknown or already finished request.
        """
        seq = self.requests.get(request_id)
        if seq is None or seq.status is Status.FINISHED:
            return False
        self._finish(seq, "abort")
        return True

    def has_work(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting or self._done or self._pending)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """One iteration: schedule, forward, sample; the outputs of every request that moved.

        With overlap, the step's tokens reach the host during the next call: that call
        launches the following step first (its inputs read the tokens on the device), then
        reads them while the device runs it, so the host's work hides behind the device's.
        """
        launched, self._pending = self._pending, None
        early = launched is not None and self._overlappable()
        ahead = self._launch() if early else None
        resolved = self._resolve(launched) if launched is not None else []
        if not early:
            ahead = self._launch()
        if ahead is not None:
            if self._overlappable():
                self._pending = ahead
            else:
                resolved += self._resolve(ahead)
        return self._collect(resolved)

    def _overlappable(self) -> bool:
        """Whether a step may launch before the last one's tokens are read: no live request samples on the host."""
        return self.overlap and not any(needs_host(s.params) for s in self.requests.values())

    def _launch(self) -> _Launched | None:
        """Schedule, run the forward pass and start sampling; None when nothing is scheduled or it failed."""
        pending = self._in_flight
        chunks = self.scheduler.schedule()
        for seq in self.scheduler.unschedulable:
            self._finish(seq, "error", "the request does not fit in the KV cache")
        self.scheduler.unschedulable.clear()
        if not chunks:
            return None
        self._steps += 1
        now = time.monotonic()
        new = 0
        for chunk in chunks:
            if chunk.seq.times.scheduled is None:
                chunk.seq.times.scheduled = now
                new += 1
        if self._step_log is not None:
            self._log_step(now, chunks, new)
        try:
            logits = self.model(self._forward_batch(chunks, pending), self.kv)
        except Exception as exc:  # a backend error must not take the engine down
            log.exception("forward pass failed for %d sequences", len(chunks))
            for chunk in chunks:
                self._finish(chunk.seq, "error", f"forward pass failed: {exc}")
            return None
        for chunk in chunks:
            seq = chunk.seq
            seq.num_computed = chunk.end
            prompt_part = chunk.prompt_tokens
            self._prefill_tokens += prompt_part
            self._decode_tokens += chunk.end - chunk.start - prompt_part
            # blocks full of known tokens go into the prefix cache now, before the next step's
            # window release frees them; a placeholder's block waits for its token (_resolve)
            known = chunk.end - 1 if seq.token_ids[chunk.end - 1] == PLACEHOLDER else chunk.end
            self.blocks.register_full_blocks(seq.blocks, seq.token_ids, known)
        launched = _Launched(chunks)
        rows = [i for i, c in enumerate(chunks) if c.completes]
        if rows:
            self._sample(launched, [chunks[i].seq for i in rows], logits if len(rows) == logits.shape[0] else logits[rows])
        self._in_flight = launched
        return launched

    def _log_step(self, now: float, chunks: list[Chunk], new: int) -> None:
        """The step's line: monotonic time, decode rows, prompt tokens, prompts started, waiting and running."""
        prompt_parts = [c.prompt_tokens for c in chunks]
        decode, prompt = prompt_parts.count(0), sum(prompt_parts)
        self._step_log.write(json.dumps({"t": round(now, 6), "decode": decode, "prompt_tokens": prompt, "new": new,
                                         "waiting": len(self.scheduler.waiting),
                                         "running": len(self.scheduler.running)}) + "\n")

    def _sample(self, launched: _Launched, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Start drawing one token per sequence; each gets a placeholder where its token will go."""
        sampling = [SamplingRow(s.params, s.token_ids, s.num_prompt_tokens, s.generator) for s in seqs]
        try:
            if any(needs_host(s.params) for s in seqs):  # logprobs or penalties: sampled now, on the host
                launched.sampled = sample(logits, sampling, self.generator)
                drawn = _with_finite(logits, to_device(launched.sampled.token_ids, logits.device))
            else:
                drawn = self._fused_draw(logits, sampling) if self._fused_draw is not None else None
                if drawn is None:
                    drawn = _with_finite(logits, choose(logits, sampling, self.generator))
        except Exception as exc:
            log.exception("sampling failed for %d sequences", len(seqs))
            for seq in seqs:
                self._finish(seq, "error", f"sampling failed: {exc}")
            return
        launched.tokens = drawn[0]
        launched.host = _to_host(drawn)
        if launched.tokens.is_cuda:
            launched.ready = torch.cuda.Event()
            launched.ready.record()
        for seq in seqs:
            at = seq.num_tokens
            # a sequence its token finishes by length takes none: the next step must not schedule it
            if self._ends_by_length(seq, at):
                launched.rows.append((seq, None))
            else:
                seq.token_ids.append(PLACEHOLDER)
                launched.rows.append((seq, at))

    def _ends_by_length(self, seq: Sequence, at: int) -> bool:
        """Whether the token at index `at` is the request's last by max_tokens or the context."""
        return at + 1 - seq.num_prompt_tokens >= seq.params.max_tokens or at + 1 >= self.max_model_len

    def _resolve(self, launched: _Launched) -> list[Sequence]:
        """Read a launched step's tokens, append them, end finished requests; the sequences it ran."""
        if launched is self._in_flight:
            self._in_flight = None
        if launched.ready is not None:
            launched.ready.synchronize()
        tokens, finite = launched.host.tolist() if launched.host is not None else ([], [])
        now = time.monotonic()
        for chunk in launched.chunks:
            seq = chunk.seq
            if seq.status is Status.RUNNING:  # every token before chunk.end is real now
                self.blocks.register_full_blocks(seq.blocks, seq.token_ids, chunk.end)
        for j, (seq, at) in enumerate(launched.rows):
            if seq.status is Status.FINISHED:  # aborted, or failed, since the launch
                continue
            if not finite[j]:
                self._finish(seq, "error", "the model produced non-finite logits")
                continue
            token = tokens[j]
            if at is None:
                at = seq.num_tokens
                seq.token_ids.append(token)
            else:
                seq.token_ids[at] = token
            seq.pending_tokens.append(token)
            if seq.times.first_token is None:
                seq.times.first_token = now
            self._generated += 1
            if launched.sampled is not None and launched.sampled.logprobs[j] is not None:
                seq.pending_logprobs.append(launched.sampled.logprobs[j])
                seq.pending_top.append(launched.sampled.top_logprobs[j] or [])
            p = seq.params
            if token in p.stop_token_ids or (token in self.eos_token_ids and not p.ignore_eos):
                self._finish(seq, "stop")
            elif self._ends_by_length(seq, at):
                self._finish(seq, "length")
        return [c.seq for c in launched.chunks]

    def _forward_batch(self, chunks: list[Chunk], pending: _Launched | None) -> ForwardBatch:
        """The step's inputs; a placeholder token is read on the device from the pending step's draw."""
        tokens: list[int] = []
        positions: list[int] = []
        for c in chunks:
            tokens += c.seq.token_ids[c.start : c.end]
            positions += range(c.start, c.end)
        token_ids = torch.tensor(tokens, dtype=torch.long)
        if PLACEHOLDER in tokens:
            row = {id(seq): j for j, (seq, at) in enumerate(pending.rows) if at is not None}
            where = [i for i, t in enumerate(tokens) if t == PLACEHOLDER]
            source = [row[id(c.seq)] for c in chunks if PLACEHOLDER in c.seq.token_ids[c.start : c.end]]
            if where == list(range(len(pending.rows))) and source == where:
                token_ids = pending.tokens if len(tokens) == len(where) else torch.cat(
                    [pending.tokens, to_device(token_ids[len(where):], self.device)])
            else:
                token_ids[where] = 0
                token_ids = to_device(token_ids, self.device)
                token_ids[to_device(where, self.device)] = pending.tokens[to_device(source, self.device)]
        tables = {g: [c.seq.blocks.tables[g] for c in chunks] for g in self.blocks.pools}
        for g in GROUPS:
            tables.setdefault(g, [[] for _ in chunks])
        return ForwardBatch(
            token_ids=token_ids,
            positions=torch.tensor(positions, dtype=torch.long),
            query_lens=[c.end - c.start for c in chunks],
            context_lens=[c.end for c in chunks],
            block_tables=tables,
        )

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        """End a request: free its blocks and keep it for the next output.

        A step still in flight may write the freed blocks: later steps, which may reuse
        them, run after it on the same stream.
        """
        if seq.status is Status.FINISHED:
            return
        self.scheduler.remove(seq, keep_cached=reason != "error")
        seq.finish_reason = reason
        seq.error = error
        seq.times.finished = time.monotonic()
        self._done.append(seq)

    def _collect(self, seqs: list[Sequence]) -> list[RequestOutput]:
        """Outputs of requests that got tokens this step or finished since the last one."""
        outputs = []
        seen = set()
        for seq in seqs + self._done:
            if id(seq) in seen:
                continue
            seen.add(id(seq))
            if seq.pending_tokens or seq.finish_reason is not None:
                outputs.append(seq.take_output())
            if seq.finish_reason is not None:
                self._finished += 1
                self.requests.pop(seq.request_id, None)
        self._done.clear()
        return outputs

    # ------------------------------------------------------------------ reporting
    def stats(self) -> EngineStats:
        running = self.scheduler.running
        return EngineStats(
            num_running=len(running),
            num_waiting=len(self.scheduler.waiting),
            prefill_tokens_computed=self._prefill_tokens,
            decode_tokens_computed=self._decode_tokens,
            cached_prompt_tokens=self.scheduler.cached_prompt_tokens,
            generated_tokens=self._generated,
            num_preemptions=self.scheduler.num_preemptions,
            requests_finished=self._finished,
            steps=self._steps,
            free_blocks={g: p.num_free for g, p in self.blocks.pools.items()},
            total_blocks={g: p.num_total for g, p in self.blocks.pools.items()},
            cached_blocks={g: p.num_cached for g, p in self.blocks.pools.items()},
            block_size=self.block_size,
            max_model_len=self.max_model_len,
        )

    def drain_kv_events(self) -> tuple[list[int], list[int]]:
        """(stored, removed) prefix-block hashes since the last call, for the scheduler's index."""
        return self.blocks.drain_kv_events()


def _with_finite(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[2, rows] int64: the tokens, 0 where a row's logits are not all finite (the next step must read a
    real token id; the engine fails that request), and the finite flags."""
    finite = torch.isfinite(logits).all(dim=-1)
    return torch.stack([torch.where(finite, tokens, 0), finite.long()])


def _to_host(values: torch.Tensor) -> torch.Tensor:
    """values copied to the host without waiting: a pinned tensor filled once the device gets there."""
    if not values.is_cuda:
        return values
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    return host


def _eos_token_ids(path: str, config) -> list[int]:
    """EOS ids from config.json and generation_config.json (gpt-oss lists several there)."""
    ids = set(config.eos_token_ids)
    try:
        with open(os.path.join(path, "generation_config.json"), encoding="utf-8") as fh:
            extra = json.load(fh).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        extra = None
    if isinstance(extra, int):
        extra = [extra]
    ids.update(t for t in extra or [] if isinstance(t, int))
    return sorted(ids)


__all__ = ["Engine", "EngineInputError", "EngineStats", "RequestOutput"]
