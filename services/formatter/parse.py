"""Generated tokens -> text pieces: Harmony channels, plain text, stop strings.

`HarmonyStreamParser` wraps openai-harmony's `StreamableParser` for one choice and
routes each message's text by channel: `analysis` -> reasoning, `final` (and any
other text) -> content, `commentary` to `functions.NAME` -> a tool call. A model
that does not follow Harmony (the random tiny model never does) must still give the
user its text, so any parser error, a header that is not one, or a header still
open at the end switches the choice to plain decoded text, and nothing raises.
"""

from __future__ import annotations

import codecs
import secrets
from dataclasses import dataclass, field

from openai_harmony import HarmonyEncoding, Role, StreamableParser, StreamState

from shared.protocol import ToolCallDelta

# A real Harmony header (`<|channel|>commentary to=functions.name <|constrain|>json<|message|>`)
# is a handful of tokens; one this long is the model not speaking Harmony.
MAX_HEADER_TOKENS = 48

FUNCTIONS_PREFIX = "functions."


def token_bytes(encoding: HarmonyEncoding, token_id: int) -> bytes:
    """The exact bytes of one token (a token may hold part of a UTF-8 character)."""
    # surrogateescape round-trips bytes that are not valid UTF-8 on their own.
    return encoding.decode([token_id], errors="surrogateescape").encode("utf-8", "surrogateescape")


class TextDecoder:
    """Token ids -> text, incrementally: holds back a UTF-8 character split across tokens.

    Special tokens (<|return|>, <|end|>, ...) are skipped, as vLLM's
    skip_special_tokens does.
    """

    def __init__(self, encoding: HarmonyEncoding):
        self._encoding = encoding
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def decode(self, token_ids: list[int]) -> str:
        out = []
        for token in token_ids:
            if self._encoding.is_special_token(token):
                continue
            out.append(self._utf8.decode(token_bytes(self._encoding, token)))
        return "".join(out)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


@dataclass
class Piece:
    """What some tokens of one choice add to the response."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def extend(self, other: "Piece") -> None:
        self.content += other.content
        self.reasoning += other.reasoning
        for call in other.tool_calls:
            last = self.tool_calls[-1] if self.tool_calls else None
            if last is not None and last.index == call.index and call.id is None:
                last.arguments += call.arguments
            else:
                self.tool_calls.append(ToolCallDelta(call.index, call.id, call.name, call.arguments))


class HarmonyStreamParser:
    """One choice's completion tokens -> content / reasoning / tool-call pieces."""

    def __init__(self, encoding: HarmonyEncoding):
        self._encoding = encoding
        self._parser = StreamableParser(encoding, Role.ASSISTANT, strict=False)
        self._fallback: TextDecoder | None = None
        self._header: list[int] = []  # tokens of the message header being read
        self._route = "content"  # where the open message's text goes
        self.tool_calls = 0
        self.reasoning_tokens = 0

    @property
    def is_fallback(self) -> bool:
        return self._fallback is not None

    def feed(self, token_ids: list[int]) -> Piece:
        piece = Piece()
        for token in token_ids:
            if self._fallback is not None:
                piece.content += self._fallback.decode([token])
                continue
            piece.extend(self._feed_one(token))
        return piece

    def finish(self) -> Piece:
        """End of generation: text still held (an unfinished header, a split character)."""
        piece = Piece()
        if self._fallback is None and self._header:
            self._start_fallback(self._header, piece)
        if self._fallback is not None:
            piece.content += self._fallback.flush()
        return piece

    # ------------------------------------------------------------------
    def _feed_one(self, token: int) -> Piece:
        piece = Piece()
        was_content = self._parser.state == StreamState.CONTENT
        try:
            self._parser.process(token)
            state = self._parser.state
        except Exception:  # the Rust parser raises on anything outside Harmony
            self._start_fallback([] if was_content else self._header, piece)
            piece.content += self._fallback.decode([token])
            return piece
        if state == StreamState.CONTENT:
            if not was_content:
                self._open_message(piece)  # this token is <|message|>, not text
            elif self._route == "reasoning":
                self.reasoning_tokens += 1
            delta = self._parser.last_content_delta or ""
            if delta:
                self._add_text(piece, delta)
        elif state == StreamState.HEADER:
            self._header.append(token)
            if len(self._header) > MAX_HEADER_TOKENS:
                self._start_fallback(self._header, piece)
        else:  # EXPECT_START: a message just ended
            self._header = []
        return piece

    def _open_message(self, piece: Piece) -> None:
        self._header = []
        channel = self._parser.current_channel
        recipient = self._parser.current_recipient or ""
        if recipient.startswith(FUNCTIONS_PREFIX) and len(recipient) > len(FUNCTIONS_PREFIX):
            self._route = "tool"
            piece.tool_calls.append(
                ToolCallDelta(
                    index=self.tool_calls,
                    id="call_" + secrets.token_hex(12),
                    name=recipient[len(FUNCTIONS_PREFIX) :],
                    arguments="",
                )
            )
            self.tool_calls += 1
        elif channel == "analysis":
            self._route = "reasoning"
        else:
            self._route = "content"

    def _add_text(self, piece: Piece, text: str) -> None:
        if self._route == "reasoning":
            piece.reasoning += text
        elif self._route == "tool":
            piece.tool_calls.append(ToolCallDelta(index=self.tool_calls - 1, arguments=text))
        else:
            piece.content += text

    def _start_fallback(self, held: list[int], piece: Piece) -> None:
        self._fallback = TextDecoder(self._encoding)
        self._header = []
        if held:
            piece.content += self._fallback.decode(held)


class StopStringWatcher:
    """Cuts a text stream before the first stop string; holds back a possible partial one."""

    def __init__(self, stops: list[str]):
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Text safe to emit now; sets `stopped` when a stop string appeared."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buffer = self._held + text
        cut = min((i for i in (buffer.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buffer[:cut]
        keep = self._partial_suffix(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of buffer that begins some stop string."""
        best = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(buffer)), best, -1):
                if stop.startswith(buffer[-length:]):
                    best = length
                    break
        return best
