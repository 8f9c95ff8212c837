"""Chunk events written as text are the same characters as the chunk dicts encoded, Delta by Delta."""

import asyncio
import json

import pytest

from services.gateway.formatter_link import RequestStream
from services.gateway.generation import UsageTotals, merge_delta
from services.gateway.routes.chat import chat_chunks
from services.gateway.routes.completions import completion_chunks, legacy_logprobs
from services.gateway.sse import event
from shared.protocol import Delta, ToolCallDelta

ENTRY = {"token": "h\u2028i", "logprob": -0.5, "bytes": [104], "top_logprobs": [{"token": "h", "logprob": -0.5, "bytes": [104]}]}
DELTAS = [
    Delta("r", reasoning_content="think \"hard\"\n", token_ids=[1], completion_tokens=1, reasoning_tokens=1),
    Delta("r", reasoning_content="more", content="é\u2029\x85 ok", token_ids=[2], completion_tokens=2),
    Delta("r", index=1, content="", token_ids=[3], completion_tokens=1),  # nothing to say yet
    Delta("r", index=1, content="</>&", logprobs=[ENTRY], token_ids=[4], completion_tokens=2),
    Delta("r", tool_calls=[ToolCallDelta(0, "call_1", "get", "{\"a\":")], token_ids=[5], completion_tokens=3),
    Delta("r", tool_calls=[ToolCallDelta(0, None, None, "1}")], token_ids=[6], completion_tokens=4),
    Delta("r", finish_reason="tool_calls", completion_tokens=4, prompt_tokens=9),
    Delta("r", index=1, content="end", finish_reason="length", completion_tokens=3, prompt_tokens=9, cached_tokens=2),
]


class FakeGeneration:
    """What the chunk writers read of a Generation."""

    request_id, created, model, choices = "chatcmpl-\u2028x", 1700000000, "gpt-oss-tiny", 2

    def __init__(self):
        self.usage = UsageTotals()

    async def deltas(self):
        for d in DELTAS:
            self.usage.add(d)
            yield d


def chat_reference(gen, include_usage: bool, logprobs: bool) -> list[str]:
    """The chunk dicts of chat_chunks before it wrote text (commit 9a15c03), encoded by event()."""
    def chunk(choices):
        payload = {"id": gen.request_id, "object": "chat.completion.chunk", "created": gen.created, "model": gen.model, "choices": choices}
        if include_usage:
            payload["usage"] = None
        return payload

    out = [event(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]))
           for i in range(gen.choices)]
    usage = UsageTotals()
    for d in DELTAS:
        usage.add(d)
        delta: dict = {}
        if d.reasoning_content:
            delta["reasoning_content"] = d.reasoning_content
        if d.content:
            delta["content"] = d.content
        if d.tool_calls:
            delta["tool_calls"] = [
                {"index": c.index, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                if c.id else {"index": c.index, "function": {"arguments": c.arguments}} for c in d.tool_calls]
        entries = d.logprobs if logprobs else []
        if delta or entries:
            out.append(event(chunk([{"index": d.index, "delta": delta, "logprobs": {"content": entries} if entries else None, "finish_reason": None}])))
        if d.finish_reason is not None:
            out.append(event(chunk([{"index": d.index, "delta": {}, "logprobs": None, "finish_reason": d.finish_reason}])))
    if include_usage:
        final = chunk([])
        final["usage"] = usage.as_dict()
        out.append(event(final))
    return out


def completion_reference(gen, include_usage: bool, logprobs: bool) -> list[str]:
    def chunk(choices):
        payload = {"id": gen.request_id, "object": "text_completion", "created": gen.created, "model": gen.model, "choices": choices}
        if include_usage:
            payload["usage"] = None
        return payload

    out, offsets, usage = [], {}, UsageTotals()
    for d in DELTAS:
        usage.add(d)
        if not (d.content or d.finish_reason is not None or (logprobs and d.logprobs)):
            continue
        lp = None
        if logprobs:
            lp = legacy_logprobs(d.logprobs, offsets.get(d.index, 0))
            offsets[d.index] = offsets.get(d.index, 0) + sum(len(e["token"]) for e in d.logprobs)
        out.append(event(chunk([{"index": d.index, "text": d.content, "logprobs": lp, "finish_reason": d.finish_reason}])))
    if include_usage:
        final = chunk([])
        final["usage"] = usage.as_dict()
        out.append(event(final))
    return out


async def written(chunks) -> list[str]:
    return [text async for text in chunks]


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("logprobs", [False, True])
def test_chunk_text_matches_the_encoded_chunk_dicts(include_usage, logprobs):
    chat = asyncio.run(written(chat_chunks(FakeGeneration(), include_usage, logprobs)))
    assert chat == chat_reference(FakeGeneration(), include_usage, logprobs)
    completion = asyncio.run(written(completion_chunks(FakeGeneration(), include_usage, logprobs)))
    assert completion == completion_reference(FakeGeneration(), include_usage, logprobs)
    for text in chat + completion:  # one line each, valid JSON
        assert text.startswith("data: ") and text.endswith("\n\n") and len(text[:-2].splitlines()) == 1
        json.loads(text[len("data: "):])


def test_queued_text_deltas_merge_in_order_and_the_rest_do_not():
    first = Delta("r", reasoning_content="a", token_ids=[1], logprobs=[{"t": 1}], completion_tokens=1)
    assert merge_delta(first, Delta("r", reasoning_content="b", content="c", token_ids=[2], logprobs=[{"t": 2}], completion_tokens=2))
    assert (first.reasoning_content, first.content, first.token_ids, first.completion_tokens) == ("ab", "c", [1, 2], 2)
    assert first.logprobs == [{"t": 1}, {"t": 2}]
    assert not merge_delta(first, Delta("r", reasoning_content="late"))  # reasoning after content keeps its own chunk
    assert not merge_delta(first, Delta("r", index=1, content="other choice"))
    assert not merge_delta(first, Delta("r", tool_calls=[ToolCallDelta(0, "c", "f", "")]))
    assert not merge_delta(first, Delta("r", error="boom", status=500, finish_reason="error"))
    assert merge_delta(first, Delta("r", content="d", finish_reason="stop", completion_tokens=3, prompt_tokens=4))
    assert (first.content, first.finish_reason, first.completion_tokens, first.prompt_tokens) == ("cd", "stop", 3, 4)
    assert not merge_delta(first, Delta("r", content="after the end"))
    assert first.reasoning_content == "ab" and first.content == "cd"


def test_a_stream_folds_the_deltas_queued_behind_the_one_taken():
    stream = RequestStream("r", link=None, pool=None)
    for i in range(3):
        stream.put(Delta("r", content=str(i), token_ids=[i], completion_tokens=i + 1))
    stream.put(Delta("r", index=1, content="x"))
    stream.put(Delta("r", content="3"))
    taken = stream.poll()
    stream.merge_queued(taken, merge_delta)
    assert (taken.content, taken.token_ids, taken.completion_tokens) == ("012", [0, 1, 2], 3)
    assert [stream.poll().content, stream.poll().content, stream.poll()] == ["x", "3", None]
