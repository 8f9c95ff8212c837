"""POST /v1/completions: prompt text or token ids in, plain text out (no Harmony parsing)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from ..auth import authorize
from ..generation import Generation
from ..schemas import Completion, CompletionRequest
from ..sse import ChunkEvents, collect, json_text, stream_response

router = APIRouter(dependencies=[Depends(authorize)])


@router.post("/v1/completions", response_model=Completion)
async def create_completion(body: CompletionRequest, request: Request):
    gen = await Generation.start(request, "completion", body, "cmpl")
    want_logprobs = body.logprobs is not None
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return stream_response(gen, lambda g: completion_chunks(g, include_usage, want_logprobs))
    builder = CompletionBuilder(body.choices)
    await collect(request, gen, builder.consume)
    return builder.response(gen, want_logprobs)


def legacy_logprobs(entries: list[dict], offset: int) -> dict:
    """OpenAI chat-style logprob entries -> the completions API's parallel lists."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        out["tokens"].append(e["token"])
        out["token_logprobs"].append(e["logprob"])
        out["top_logprobs"].append({t["token"]: t["logprob"] for t in e.get("top_logprobs", [])})
        out["text_offset"].append(offset)
        offset += len(e["token"])
    return out


class CompletionBuilder:
    def __init__(self, choices: int):
        self.text = {i: [] for i in range(choices)}
        self.logprobs = {i: [] for i in range(choices)}
        self.finish = {i: None for i in range(choices)}

    async def consume(self, gen: Generation):
        async for d in gen.deltas():
            if d.index not in self.text:
                continue
            self.text[d.index].append(d.content)
            self.logprobs[d.index] += d.logprobs
            if d.finish_reason is not None:
                self.finish[d.index] = d.finish_reason
            yield None

    def response(self, gen: Generation, logprobs: bool) -> dict:
        return {
            "id": gen.request_id,
            "object": "text_completion",
            "created": gen.created,
            "model": gen.model,
            "choices": [
                {
                    "index": i,
                    "text": "".join(self.text[i]),
                    "logprobs": legacy_logprobs(self.logprobs[i], 0) if logprobs else None,
                    "finish_reason": self.finish[i],
                }
                for i in sorted(self.text)
            ],
            "usage": gen.usage.as_dict(),
        }


async def completion_chunks(gen: Generation, include_usage: bool, logprobs: bool):
    """text_completion chunk events: one per Delta with text (or a finish), then usage if asked."""
    events = ChunkEvents(gen, "text_completion", include_usage)
    offsets: dict[int, int] = {}
    async for d in gen.deltas():
        if not (d.content or d.finish_reason is not None or (logprobs and d.logprobs)):
            continue
        lp = "null"
        if logprobs:
            lp = json_text(legacy_logprobs(d.logprobs, offsets.get(d.index, 0)))
            offsets[d.index] = offsets.get(d.index, 0) + sum(len(e["token"]) for e in d.logprobs)
        yield events.choices(f'{{"index":{d.index},"text":{json_text(d.content)},"logprobs":{lp},'
                             f'"finish_reason":{json_text(d.finish_reason)}}}')
    if include_usage:
        yield events.usage(gen.usage.as_dict())
