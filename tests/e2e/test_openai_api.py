"""The OpenAI API end to end through a real mesh (gateway, 2 formatters, scheduler,
worker with the tiny random model), driven by the official `openai` client.

The random model never speaks Harmony, so its chat output reaches the client as
plain content; parsing real Harmony tool-call tokens is tested in tests/formatter.
"""

from __future__ import annotations

import datetime as dt

import openai
import pytest
from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    ToolDescription,
)

from shared.vocab import load_harmony_encoding

pytestmark = pytest.mark.e2e

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": WEATHER}}]


# Spans go to each child's log (stderr), flushed quickly, for the one-trace test.
MESH = dict(formatters=2, workers=1, env={"ROSE_OTEL_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "50"})


@pytest.fixture(scope="module")
def api(mesh):
    m = mesh(**MESH)
    client = openai.OpenAI(base_url=m.base_url, api_key="unused", max_retries=0, timeout=120)
    client.model_id = client.models.list().data[0].id
    return client


@pytest.fixture(scope="module")
def encoding(vocab_dir):
    return load_harmony_encoding(vocab_dir)


def harmony_length(encoding, messages, effort=ReasoningEffort.MEDIUM) -> int:
    """The prompt length openai-harmony itself renders for a conversation (today's date)."""
    system = (
        SystemContent.new()
        .with_reasoning_effort(effort)
        .with_conversation_start_date(dt.datetime.now(dt.timezone.utc).date().isoformat())
    )
    conversation = Conversation.from_messages([Message.from_role_and_content(Role.SYSTEM, system), *messages])
    return len(encoding.render_conversation_for_completion(conversation, Role.ASSISTANT))


def test_models_lists_the_served_model(api):
    assert api.model_id == "gpt-oss-tiny"


def test_chat_usage_matches_harmony_and_generated_tokens(api, encoding):
    r = api.chat.completions.create(
        model=api.model_id, messages=[{"role": "user", "content": "Say hi"}], max_tokens=12, seed=3, logprobs=True, reasoning_effort="low"
    )
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert r.usage.prompt_tokens == harmony_length(encoding, [Message.from_role_and_content(Role.USER, "Say hi")], ReasoningEffort.LOW)
    assert r.usage.completion_tokens == len(choice.logprobs.content)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 12
    assert r.usage.completion_tokens_details.reasoning_tokens == 0  # random tokens are never an analysis message
    assert 0 <= r.usage.prompt_tokens_details.cached_tokens <= r.usage.prompt_tokens


def test_stream_matches_whole_response_for_one_seed(api):
    kwargs = dict(model=api.model_id, messages=[{"role": "user", "content": "Count to five"}], max_tokens=16, seed=11)
    whole = api.chat.completions.create(**kwargs)
    chunks = list(api.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == (whole.choices[0].message.content or "")
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_seed_reproducibility(api):
    kwargs = dict(model=api.model_id, prompt="Once upon a time", max_tokens=16, temperature=1.0)
    a = api.completions.create(**kwargs, seed=42).choices[0].text
    b = api.completions.create(**kwargs, seed=42).choices[0].text
    c = api.completions.create(**kwargs, seed=43).choices[0].text
    assert a == b and a != c


def test_completions_text_and_token_ids(api, encoding):
    r = api.completions.create(model=api.model_id, prompt="The capital of France is", max_tokens=8, seed=1, logprobs=2)
    assert r.object == "text_completion"
    assert r.usage.prompt_tokens == len(encoding.encode("The capital of France is"))
    assert r.usage.completion_tokens == len(r.choices[0].logprobs.tokens)
    assert all(len(top) <= 2 for top in r.choices[0].logprobs.top_logprobs)
    ids = encoding.encode("The capital of France is")
    by_ids = api.completions.create(model=api.model_id, prompt=ids, max_tokens=8, seed=1)
    assert by_ids.usage.prompt_tokens == len(ids)
    assert by_ids.choices[0].text == r.choices[0].text  # same tokens in, same seed: same text out
    streamed = list(api.completions.create(model=api.model_id, prompt=ids, max_tokens=8, seed=1, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text


def test_tool_call_round_trip_renders_and_completes(api, encoding):
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    r = api.chat.completions.create(model=api.model_id, messages=messages, tools=TOOLS, max_tokens=8, seed=5)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    developer = DeveloperContent.new().with_function_tools([ToolDescription.new("get_weather", "Current weather", WEATHER)])
    expected = harmony_length(
        encoding,
        [
            Message.from_role_and_content(Role.DEVELOPER, developer),
            Message.from_role_and_content(Role.USER, "What is the weather in Paris?"),
            Message.from_role_and_content(Role.ASSISTANT, '{"city": "Paris"}')
            .with_channel("commentary").with_recipient("functions.get_weather").with_content_type("<|constrain|>json"),
            Message.from_author_and_content(Author.new(Role.TOOL, "functions.get_weather"), '{"temp_c": 21}')
            .with_channel("commentary").with_recipient("assistant"),
        ],
    )
    assert r.usage.prompt_tokens == expected


def test_two_choices(api):
    r = api.chat.completions.create(
        model=api.model_id, messages=[{"role": "user", "content": "Pick a word"}], n=2, max_tokens=10, seed=9, logprobs=True
    )
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    tokens = [[t.token for t in c.logprobs.content] for c in r.choices]
    assert tokens[0] != tokens[1]  # seed + i per choice
    streamed = list(api.chat.completions.create(
        model=api.model_id, messages=[{"role": "user", "content": "Pick a word"}], n=2, max_tokens=10, seed=9, stream=True
    ))
    for c in r.choices:
        text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices and ch.choices[0].index == c.index)
        assert text == (c.message.content or "")


def test_stop_string_cuts_the_output(api):
    kwargs = dict(model=api.model_id, prompt="A list of animals:", max_tokens=24, seed=17)
    text = api.completions.create(**kwargs).choices[0].text
    stop = next(text[i : i + 3] for i in range(4, len(text) - 3) if text[i : i + 3].strip())
    cut = api.completions.create(**kwargs, stop=[stop]).choices[0]
    assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop"
    chat_kwargs = dict(model=api.model_id, messages=[{"role": "user", "content": "Tell me more"}], max_tokens=24, seed=17)
    content = api.chat.completions.create(**chat_kwargs).choices[0].message.content or ""
    if len(content) > 8:
        stop = next(content[i : i + 3] for i in range(4, len(content) - 3) if content[i : i + 3].strip())
        cut = api.chat.completions.create(**chat_kwargs, stop=stop).choices[0]
        assert cut.message.content == content[: content.index(stop)] and cut.finish_reason == "stop"


def test_logprobs_and_top_logprobs(api):
    r = api.chat.completions.create(
        model=api.model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=6, seed=2, logprobs=True, top_logprobs=3
    )
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    for e in entries:
        assert e.logprob <= 0 and bytes(e.bytes).decode("utf-8", errors="replace") == e.token
        assert len(e.top_logprobs) == 3
        values = [t.logprob for t in e.top_logprobs]
        assert values == sorted(values, reverse=True) and e.logprob <= values[0] + 1e-4


def test_errors_are_openai_errors(api):
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model=api.model_id, messages=[{"role": "user", "content": "x"}], temperature=9)
    with pytest.raises(openai.BadRequestError) as err:
        api.completions.create(model=api.model_id, prompt="x " * 200_000, max_tokens=4)
    assert err.value.status_code == 400


def test_one_request_is_one_trace_across_the_four_services(mesh, api):
    import os
    import re
    import time

    m = mesh(**MESH)
    api.chat.completions.create(model=api.model_id, messages=[{"role": "user", "content": "trace me"}], max_tokens=3)
    roles = {"gateway": ["gateway"], "formatter": ["formatter-0", "formatter-1"], "scheduler": ["scheduler"], "worker": ["worker-0"]}

    def trace_ids(role: str) -> set[str]:
        ids = set()
        for child in roles[role]:
            with open(os.path.join(m.log_dir, f"{child}.log"), encoding="utf-8", errors="replace") as f:
                text = f.read()
            if f'"service.name": "rose-{role}"' in text:
                ids |= set(re.findall(r'"trace_id": "(0x[0-9a-f]{32})"', text))
        return ids

    deadline = time.monotonic() + 20
    while True:
        traces = {role: trace_ids(role) for role in roles}
        common = set.intersection(*traces.values())
        if common or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(traces.values()), f"no spans from {[r for r, ids in traces.items() if not ids]}"
    assert common, "no trace id shared by gateway, formatter, scheduler and worker"


def test_concurrent_mixed_requests_all_complete(api):
    """Many requests at once over both formatters: streams, n=2, logprobs; none lost."""
    import asyncio

    async def run() -> list:
        client = openai.AsyncOpenAI(base_url=str(api.base_url), api_key="unused", max_retries=0, timeout=120)

        async def one(i: int) -> tuple[int, int]:
            if i % 3 == 0:
                stream = await client.chat.completions.create(
                    model=api.model_id, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=8,
                    stream=True, stream_options={"include_usage": True}, logprobs=True,
                )
                counted, usage = 0, None
                async for chunk in stream:
                    usage = chunk.usage or usage
                    counted += sum(len(c.logprobs.content) for c in chunk.choices if c.logprobs and c.logprobs.content)
                return usage.completion_tokens, counted
            if i % 3 == 1:
                r = await client.completions.create(model=api.model_id, prompt=f"p{i}", max_tokens=8, n=2, logprobs=0)
                return r.usage.completion_tokens, sum(len(c.logprobs.tokens) for c in r.choices)
            r = await client.chat.completions.create(
                model=api.model_id, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=8, logprobs=True
            )
            return r.usage.completion_tokens, len(r.choices[0].logprobs.content)

        try:
            return await asyncio.gather(*(one(i) for i in range(48)))
        finally:
            await client.close()

    results = asyncio.run(run())
    assert len(results) == 48
    assert all(usage == counted and usage > 0 for usage, counted in results), results
