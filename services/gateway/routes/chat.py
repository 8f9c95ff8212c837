"""POST /v1/chat/completions: streamed (SSE chunks) and whole responses."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from ..auth import authorize
from ..generation import Generation
from ..schemas import ChatCompletion, ChatCompletionRequest
from ..sse import ChunkEvents, collect, json_text, stream_response

router = APIRouter(dependencies=[Depends(authorize)])


@router.post("/v1/chat/completions", response_model=ChatCompletion, response_model_exclude_none=False)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    gen = await Generation.start(request, "chat", body, "chatcmpl")
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return stream_response(gen, lambda g: chat_chunks(g, include_usage, body.logprobs))
    message = ChatMessageBuilder(body.choices)
    await collect(request, gen, message.consume)
    return message.response(gen, body.logprobs)


class ChatMessageBuilder:
    """Deltas -> one assistant message per choice."""

    def __init__(self, choices: int):
        self.content = {i: [] for i in range(choices)}
        self.reasoning = {i: [] for i in range(choices)}
        self.tool_calls: dict[int, dict[int, dict]] = {i: {} for i in range(choices)}
        self.logprobs = {i: [] for i in range(choices)}
        self.finish = {i: None for i in range(choices)}

    async def consume(self, gen: Generation):
        async for d in gen.deltas():
            i = d.index
            if i not in self.content:
                continue
            self.content[i].append(d.content)
            self.reasoning[i].append(d.reasoning_content)
            self.logprobs[i] += d.logprobs
            for call in d.tool_calls:
                slot = self.tool_calls[i].setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                slot["id"] = call.id or slot["id"]
                slot["name"] = call.name or slot["name"]
                slot["arguments"] += call.arguments
            if d.finish_reason is not None:
                self.finish[i] = d.finish_reason
            yield None

    def response(self, gen: Generation, logprobs: bool) -> dict:
        choices = []
        for i in sorted(self.content):
            calls = [
                {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for _, c in sorted(self.tool_calls[i].items())
            ]
            content = "".join(self.content[i])
            message = {
                "role": "assistant",
                "content": content if content or not calls else None,
                "reasoning_content": "".join(self.reasoning[i]) or None,
                "tool_calls": calls or None,
            }
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": {"content": self.logprobs[i]} if logprobs else None,
                    "finish_reason": self.finish[i],
                }
            )
        return {
            "id": gen.request_id,
            "object": "chat.completion",
            "created": gen.created,
            "model": gen.model,
            "choices": choices,
            "usage": gen.usage.as_dict(),
        }


async def chat_chunks(gen: Generation, include_usage: bool, logprobs: bool):
    """chat.completion.chunk events: a role chunk per choice, deltas, a finish chunk each."""
    events = ChunkEvents(gen, "chat.completion.chunk", include_usage)
    for i in range(gen.choices):
        yield events.choices(f'{{"index":{i},"delta":{{"role":"assistant","content":""}},"logprobs":null,"finish_reason":null}}')
    async for d in gen.deltas():
        entries = d.logprobs if logprobs else []
        if d.tool_calls or entries:
            delta = _delta_text(d)
        else:  # text only, the hot path: the delta object written directly
            parts = []
            if d.reasoning_content:
                parts.append('"reasoning_content":' + json_text(d.reasoning_content))
            if d.content:
                parts.append('"content":' + json_text(d.content))
            delta = "{" + ",".join(parts) + "}" if parts else ""
        if delta or entries:
            lp = json_text({"content": entries}) if entries else "null"
            yield events.choices(f'{{"index":{d.index},"delta":{delta or "{}"},"logprobs":{lp},"finish_reason":null}}')
        if d.finish_reason is not None:
            yield events.choices(f'{{"index":{d.index},"delta":{{}},"logprobs":null,"finish_reason":{json_text(d.finish_reason)}}}')
    if include_usage:
        yield events.usage(gen.usage.as_dict())


def _delta_text(d) -> str:
    """The JSON of one Delta's chunk delta (reasoning, content, tool calls); "" when it has none."""
    delta: dict = {}
    if d.reasoning_content:
        delta["reasoning_content"] = d.reasoning_content
    if d.content:
        delta["content"] = d.content
    if d.tool_calls:
        calls = []
        for call in d.tool_calls:
            item: dict = {"index": call.index}
            if call.id:
                item.update(id=call.id, type="function", function={"name": call.name, "arguments": call.arguments})
            else:
                item["function"] = {"arguments": call.arguments}
            calls.append(item)
        delta["tool_calls"] = calls
    return json_text(delta) if delta else ""
