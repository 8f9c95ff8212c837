"""One request in flight through the formatter: render, fan out to n choices, parse back.

`InFlightRequest.start` turns a `GenerateRequest` into `Submit`s (one per choice:
n per prompt, seed + choice index when a seed is given). `on_event` turns each
`TokenEvent` of a choice into a `Delta` for the gateway, plus the `Abort`s to send
down (a stop string matched, or one choice failed and the rest are no use).

Delta counters are per choice and cumulative (`completion_tokens`,
`reasoning_tokens`, `cached_tokens`); `prompt_tokens` is the whole request's
rendered length (all prompts once, not per choice), the same on every Delta.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from openai_harmony import HarmonyEncoding

from shared.protocol import Abort, Delta, GenerateRequest, SamplingParams, Submit, TokenEvent

from .parse import HarmonyStreamParser, Piece, StopStringWatcher, TextDecoder, token_bytes
from .render import RenderError, render_chat, render_completion_prompts

# Used when a request gives no max_tokens (bounded by the context left after the prompt).
DEFAULT_CHAT_MAX_TOKENS = 4096
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's legacy completions default
MAX_CHOICES = 128
MAX_SUB_REQUESTS = 1024  # prompts x n of one request
ENDOFTEXT = 199999


def sub_request_id(request_id: str, index: int) -> str:
    return f"{request_id}/{index}"


def split_sub_request_id(sub_id: str) -> tuple[str, int] | None:
    request_id, sep, index = sub_id.rpartition("/")
    if not sep or not index.isdigit():
        return None
    return request_id, int(index)


@functools.cache
def _action_stops(encoding: HarmonyEncoding) -> tuple[int, ...]:
    return tuple(encoding.stop_tokens_for_assistant_actions())


def action_stops(encoding: HarmonyEncoding) -> list[int]:
    """The Harmony tokens that end an assistant turn (<|return|>, <|call|>): asked of the encoding once (~70 us)."""
    return list(_action_stops(encoding))


def default_max_tokens(endpoint: str, prompt_len: int, max_model_len: int) -> int:
    """max_tokens for a request that names none: the rest of the context, within a cap."""
    cap = DEFAULT_CHAT_MAX_TOKENS if endpoint == "chat" else DEFAULT_COMPLETION_MAX_TOKENS
    if max_model_len > prompt_len:
        return min(cap, max_model_len - prompt_len)
    return cap  # context unknown (or already too long: the engine explains)


def sampling_params(body: dict, endpoint: str, stop_token_ids: list[int], default_max: int) -> SamplingParams:
    """The request's sampling settings; `seed` is the base seed (choice i uses seed + i)."""
    if endpoint == "chat":
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or default_max
        logprobs = (body.get("top_logprobs") or 0) if body.get("logprobs") else None
    else:
        max_tokens = body.get("max_tokens") or default_max
        logprobs = body.get("logprobs")
    ignore_eos = bool(body.get("ignore_eos") or False)
    # Harmony's stop tokens are the model's end-of-sequence ids: ignore_eos ignores them,
    # as vLLM does with generation_config's eos ids; stop ids the caller names still stop.
    implicit = [] if ignore_eos else list(stop_token_ids)
    params = SamplingParams(
        max_tokens=int(max_tokens),
        stop_token_ids=implicit + [t for t in body.get("stop_token_ids") or [] if t not in implicit],
        logprobs=logprobs,
        ignore_eos=ignore_eos,
    )
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
        value = body.get(name)
        if value is not None:
            setattr(params, name, type(getattr(params, name))(value))
    if body.get("seed") is not None:
        params.seed = int(body["seed"])
    return params


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else [s for s in stop if isinstance(s, str) and s]


def logprob_entries(
    encoding: HarmonyEncoding, event: TokenEvent
) -> list[dict]:
    """OpenAI `logprobs.content` entries for the event's tokens (empty when not asked for)."""
    if len(event.logprobs) != len(event.token_ids):
        return []

    def entry(token_id: int, logprob: float) -> dict:
        raw = token_bytes(encoding, token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "bytes": list(raw), "logprob": float(logprob)}

    out = []
    for k, (token_id, logprob) in enumerate(zip(event.token_ids, event.logprobs)):
        item = entry(token_id, logprob)
        tops = event.top_logprobs[k] if k < len(event.top_logprobs) else []
        item["top_logprobs"] = [entry(int(t), lp) for t, lp in tops]
        out.append(item)
    return out


@dataclass
class Choice:
    """One sub-request: its parser, stop-string watchers and counters."""

    index: int
    sub_id: str
    parser: HarmonyStreamParser | None  # chat
    decoder: TextDecoder | None  # completion
    content_watch: StopStringWatcher
    reasoning_watch: StopStringWatcher
    completion_tokens: int = 0
    cached_tokens: int = 0
    finished: bool = False


@dataclass
class InFlightRequest:
    request_id: str
    endpoint: str
    prompt_tokens: int
    want_logprobs: bool = False
    choices: list[Choice] = field(default_factory=list)

    @classmethod
    def start(
        cls, request: GenerateRequest, encoding: HarmonyEncoding, trace: dict | None = None, max_model_len: int = 0
    ) -> tuple["InFlightRequest", list[Submit]]:
        """Render the request and make its Submits; RenderError for a request that cannot be served.

        max_model_len: the serving context as the scheduler last said (0: unknown),
        bounding the default max_tokens.
        """
        body = request.body if isinstance(request.body, dict) else {}
        n = 1 if body.get("n") is None else body["n"]
        if not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
            raise RenderError(f"n must be an integer from 1 to {MAX_CHOICES}")
        try:
            return cls._start(request, body, n, encoding, trace, max_model_len)
        except (AttributeError, TypeError, KeyError) as exc:
            # The gateway validates bodies; this is for any other sender of a malformed one.
            raise RenderError(f"malformed request body: {exc}") from None

    @classmethod
    def _start(cls, request: GenerateRequest, body: dict, n: int, encoding: HarmonyEncoding, trace, max_model_len: int):
        if request.endpoint == "chat":
            prompts = [render_chat(encoding, body)]
            stops = action_stops(encoding)
        elif request.endpoint == "completion":
            prompts = render_completion_prompts(encoding, body)
            stops = action_stops(encoding) + [ENDOFTEXT]
        else:
            raise RenderError(f"unknown endpoint {request.endpoint!r}")
        try:
            default_max = default_max_tokens(request.endpoint, max(len(p) for p in prompts), max_model_len)
            params = sampling_params(body, request.endpoint, stops, default_max)
        except (TypeError, ValueError) as exc:
            raise RenderError(f"bad sampling parameter: {exc}") from None
        if len(prompts) * n > MAX_SUB_REQUESTS:
            raise RenderError(f"{len(prompts)} prompts x n={n} is more than {MAX_SUB_REQUESTS} generations in one request")
        words = stop_strings(body)
        state = cls(
            request.request_id,
            request.endpoint,
            prompt_tokens=sum(len(p) for p in prompts),
            want_logprobs=params.logprobs is not None,
        )
        submits = []
        for p, prompt in enumerate(prompts):
            for i in range(n):
                index = p * n + i
                sub_id = sub_request_id(request.request_id, index)
                chat = request.endpoint == "chat"
                state.choices.append(
                    Choice(
                        index=index,
                        sub_id=sub_id,
                        parser=HarmonyStreamParser(encoding) if chat else None,
                        decoder=None if chat else TextDecoder(encoding),
                        content_watch=StopStringWatcher(words),
                        reasoning_watch=StopStringWatcher(words),
                    )
                )
                choice_params = SamplingParams(**{**params.__dict__, "stop_token_ids": list(params.stop_token_ids)})
                if params.seed is not None:
                    choice_params.seed = params.seed + index
                submits.append(Submit(sub_id, list(prompt), choice_params, dict(trace or {})))
        return state, submits

    @property
    def done(self) -> bool:
        return all(c.finished for c in self.choices)

    def unfinished_aborts(self, reason: str = "abort") -> list[Abort]:
        """Aborts for every choice still generating, which are then taken as finished."""
        out = []
        for choice in self.choices:
            if not choice.finished:
                choice.finished = True
                out.append(Abort(choice.sub_id, reason))
        return out

    def fail(self, error: str, status: int) -> tuple[Delta, list[Abort]]:
        """End the whole request with an error (the gateway answers it with `status`)."""
        aborts = self.unfinished_aborts("error")
        return Delta(self.request_id, error=error, status=status, finish_reason="error", prompt_tokens=self.prompt_tokens), aborts

    def on_event(self, index: int, event: TokenEvent, encoding: HarmonyEncoding) -> tuple[list[Delta], list[Abort]]:
        """A TokenEvent of choice `index` -> Deltas for the gateway and Aborts to send down."""
        if not 0 <= index < len(self.choices) or self.choices[index].finished:
            return [], []  # late events of a choice already ended (stop string, abort)
        choice = self.choices[index]
        if event.error or event.finish_reason == "error":
            choice.finished = True  # already ended below; only the others need an Abort
            delta, aborts = self.fail(event.error or "generation failed", event.status or 500)
            delta.index = index
            return [delta], aborts
        choice.completion_tokens += len(event.token_ids)
        choice.cached_tokens = max(choice.cached_tokens, event.cached_tokens)
        finishing = event.finish_reason is not None
        if choice.parser is not None:
            piece = choice.parser.feed(event.token_ids)
            if finishing:
                piece.extend(choice.parser.finish())
        else:
            piece = Piece(content=choice.decoder.decode(event.token_ids))
            if finishing:
                piece.content += choice.decoder.flush()
        content = choice.content_watch.push(piece.content)
        reasoning = choice.reasoning_watch.push(piece.reasoning)
        stopped = choice.content_watch.stopped or choice.reasoning_watch.stopped
        aborts = []
        if stopped or finishing:
            content += choice.content_watch.flush()
            reasoning += choice.reasoning_watch.flush()
            choice.finished = True
        finish_reason = None
        if stopped:
            finish_reason = "stop"
            if not finishing:
                aborts.append(Abort(choice.sub_id, "stop"))
        elif finishing:
            finish_reason = event.finish_reason
            if finish_reason == "stop" and choice.parser is not None and choice.parser.tool_calls:
                finish_reason = "tool_calls"
        delta = Delta(
            request_id=self.request_id,
            index=index,
            content=content,
            reasoning_content=reasoning,
            tool_calls=[] if stopped else piece.tool_calls,
            token_ids=list(event.token_ids),
            logprobs=logprob_entries(encoding, event) if self.want_logprobs else [],
            finish_reason=finish_reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=choice.completion_tokens,
            reasoning_tokens=choice.parser.reasoning_tokens if choice.parser is not None else 0,
            cached_tokens=choice.cached_tokens,
        )
        return [delta], aborts
