"""Rendering matches openai-harmony's own rendering of the same conversation."""

import datetime as dt

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

from services.formatter.render import RenderError, render_chat, render_completion_prompts

TODAY = dt.date(2026, 1, 2)
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "description": "city name"}},
    "required": ["city"],
}


def system(effort=ReasoningEffort.MEDIUM):
    content = (
        SystemContent.new()
        .with_reasoning_effort(effort)
        .with_knowledge_cutoff("2024-06")
        .with_conversation_start_date(TODAY.isoformat())
    )
    return Message.from_role_and_content(Role.SYSTEM, content)


def expected(encoding, messages):
    return encoding.render_conversation_for_completion(Conversation.from_messages(messages), Role.ASSISTANT)


def test_plain_user_turn(encoding):
    body = {"messages": [{"role": "user", "content": "Hello there"}]}
    got = render_chat(encoding, body, TODAY)
    assert got == expected(encoding, [system(), Message.from_role_and_content(Role.USER, "Hello there")])
    assert encoding.decode(got).endswith("<|start|>user<|message|>Hello there<|end|><|start|>assistant")


@pytest.mark.parametrize("effort,harmony", [("low", ReasoningEffort.LOW), ("high", ReasoningEffort.HIGH)])
def test_reasoning_effort(encoding, effort, harmony):
    body = {"messages": [{"role": "user", "content": "hi"}], "reasoning_effort": effort}
    got = render_chat(encoding, body, TODAY)
    assert got == expected(encoding, [system(harmony), Message.from_role_and_content(Role.USER, "hi")])
    assert f"Reasoning: {effort}" in encoding.decode(got)


def test_system_and_developer_become_instructions_with_tools(encoding):
    body = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            {"role": "user", "content": "Weather in Paris?"},
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": WEATHER}}],
    }
    developer = (
        DeveloperContent.new()
        .with_instructions("Be brief.\n\nAnswer in French.")
        .with_function_tools([ToolDescription.new("get_weather", "Current weather", WEATHER)])
    )
    want = expected(
        encoding,
        [
            system(),
            Message.from_role_and_content(Role.DEVELOPER, developer),
            Message.from_role_and_content(Role.USER, "Weather in Paris?"),
        ],
    )
    got = render_chat(encoding, body, TODAY)
    assert got == want
    assert "type get_weather" in encoding.decode(got)


def test_tool_call_and_result_round_trip(encoding):
    body = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": WEATHER}}],
    }
    developer = DeveloperContent.new().with_function_tools([ToolDescription.new("get_weather", "Current weather", WEATHER)])
    want = expected(
        encoding,
        [
            system(),
            Message.from_role_and_content(Role.DEVELOPER, developer),
            Message.from_role_and_content(Role.USER, "Weather in Paris?"),
            Message.from_role_and_content(Role.ASSISTANT, '{"city":"Paris"}')
            .with_channel("commentary")
            .with_recipient("functions.get_weather")
            .with_content_type("<|constrain|>json"),
            Message.from_author_and_content(Author.new(Role.TOOL, "functions.get_weather"), '{"temp_c": 21}')
            .with_channel("commentary")
            .with_recipient("assistant"),
        ],
    )
    got = render_chat(encoding, body, TODAY)
    assert got == want
    text = encoding.decode(got)
    assert "to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>" in text
    assert '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp_c": 21}' in text


def test_tool_choice_none_drops_tools(encoding):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": tools, "tool_choice": "none"}
    assert render_chat(encoding, body, TODAY) == render_chat(encoding, {"messages": body["messages"]}, TODAY)


@pytest.mark.parametrize(
    "body,match",
    [
        ({"messages": []}, "at least one"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "unsupported role"),
        ({"messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]}, "matches no earlier"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "only text parts"),
        ({"messages": [{"role": "assistant", "content": ""}]}, "content or tool_calls"),
        ({"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "function.name"),
    ],
)
def test_bad_conversations_are_render_errors(encoding, body, match):
    with pytest.raises(RenderError, match=match):
        render_chat(encoding, body, TODAY)


def test_completion_prompts(encoding):
    assert render_completion_prompts(encoding, {"prompt": "Hello world"}) == [encoding.encode("Hello world")]
    assert render_completion_prompts(encoding, {"prompt": [1, 2, 3]}) == [[1, 2, 3]]
    assert render_completion_prompts(encoding, {"prompt": ["a", [5, 6]]}) == [encoding.encode("a"), [5, 6]]
    # special-token spellings in plain text are text, not control tokens
    ids = render_completion_prompts(encoding, {"prompt": "<|end|>"})[0]
    assert 200007 not in ids and encoding.decode(ids) == "<|end|>"


@pytest.mark.parametrize("prompt", ["", [], [-1], [10**7], [[]], [1.5]])
def test_bad_completion_prompts(encoding, prompt):
    with pytest.raises(RenderError):
        render_completion_prompts(encoding, {"prompt": prompt})
