"""OpenAI request bodies -> prompt token ids, with openai-harmony.

Chat: a Harmony system message (identity, knowledge cutoff, today's date, reasoning
effort), a developer message (the request's system/developer messages as
instructions, its tools as the `functions` namespace), the turns, and the
`<|start|>assistant` prefix. Completions: the prompt text encoded plainly with
o200k_harmony, or token ids passed through.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    HarmonyEncoding,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    ToolDescription,
)

REASONING_EFFORTS = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}
KNOWLEDGE_CUTOFF = "2024-06"
# o200k_harmony: 199998 byte-pair ranks plus special and reserved tokens up to 201087.
HARMONY_VOCAB_SIZE = 201088


class RenderError(ValueError):
    """The request cannot be rendered; the client gets a 400 with this message."""


def message_text(content: Any, where: str) -> str:
    """An OpenAI message `content` (a string or a list of text parts) as one string."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RenderError(f"{where}.content[{i}]: only text parts are supported, got {kind!r}")
            texts.append(part["text"])
        return "".join(texts)
    raise RenderError(f"{where}.content: expected a string or a list of text parts")


def _tool_descriptions(body: dict) -> list[ToolDescription]:
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise RenderError("tools must be a list")
    choice = body.get("tool_choice")
    if choice == "none":
        return []
    descriptions = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RenderError(f"tools[{i}].function.name: required")
        descriptions.append(
            ToolDescription.new(function["name"], function.get("description") or "", function.get("parameters"))
        )
    if isinstance(choice, dict):
        # Harmony has no way to force a call; offering only the named tool is the closest.
        wanted = (choice.get("function") or {}).get("name")
        descriptions = [d for d in descriptions if d.name == wanted]
        if not descriptions:
            raise RenderError(f"tool_choice names function {wanted!r}, which is not in tools")
    return descriptions


def build_conversation(body: dict, today: dt.date | None = None) -> Conversation:
    """The Harmony conversation for a chat request body (validated by the gateway)."""
    today = today or dt.datetime.now(dt.timezone.utc).date()
    effort_name = body.get("reasoning_effort") or "medium"
    effort = REASONING_EFFORTS.get(effort_name.lower()) if isinstance(effort_name, str) else None
    if effort is None:
        raise RenderError(f"reasoning_effort must be one of low, medium, high, got {body.get('reasoning_effort')!r}")
    system = (
        SystemContent.new()
        .with_reasoning_effort(effort)
        .with_knowledge_cutoff(KNOWLEDGE_CUTOFF)
        .with_conversation_start_date(today.isoformat())
    )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RenderError("messages must be a list of at least one message")
    instructions = []
    turns: list[Message] = []
    call_names: dict[str, str] = {}  # tool_call_id -> function name, for the tool results
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise RenderError(f"{where}: expected an object")
        role = msg.get("role")
        if role in ("system", "developer"):
            instructions.append(message_text(msg.get("content"), where))
        elif role == "user":
            turns.append(Message.from_role_and_content(Role.USER, message_text(msg.get("content"), where)))
        elif role == "assistant":
            turns.extend(_assistant_messages(msg, where, call_names))
        elif role == "tool":
            turns.append(_tool_result(msg, where, call_names))
        else:
            raise RenderError(f"{where}.role: unsupported role {role!r}")
    developer = DeveloperContent.new()
    if instructions:
        developer = developer.with_instructions("\n\n".join(instructions))
    tools = _tool_descriptions(body)
    if tools:
        developer = developer.with_function_tools(tools)
    head = [Message.from_role_and_content(Role.SYSTEM, system)]
    if instructions or tools:
        head.append(Message.from_role_and_content(Role.DEVELOPER, developer))
    return Conversation.from_messages(head + turns)


def _assistant_messages(msg: dict, where: str, call_names: dict[str, str]) -> list[Message]:
    out = []
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        out.append(Message.from_role_and_content(Role.ASSISTANT, reasoning).with_channel("analysis"))
    text = message_text(msg.get("content"), where)
    if text:
        out.append(Message.from_role_and_content(Role.ASSISTANT, text).with_channel("final"))
    calls = msg.get("tool_calls") or []
    if not isinstance(calls, list):
        raise RenderError(f"{where}.tool_calls: expected a list")
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise RenderError(f"{where}.tool_calls[{j}].function.name: required")
        arguments = function.get("arguments") or "{}"
        if call.get("id"):
            call_names[call["id"]] = name
        out.append(
            Message.from_role_and_content(Role.ASSISTANT, arguments)
            .with_channel("commentary")
            .with_recipient(f"functions.{name}")
            .with_content_type("<|constrain|>json")
        )
    if not out:
        raise RenderError(f"{where}: an assistant message needs content or tool_calls")
    return out


def _tool_result(msg: dict, where: str, call_names: dict[str, str]) -> Message:
    name = call_names.get(msg.get("tool_call_id") or "") or msg.get("name")
    if not name:
        raise RenderError(
            f"{where}.tool_call_id: {msg.get('tool_call_id')!r} matches no earlier assistant tool call"
        )
    text = message_text(msg.get("content"), where)
    return (
        Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{name}"), text)
        .with_channel("commentary")
        .with_recipient("assistant")
    )


def render_chat(encoding: HarmonyEncoding, body: dict, today: dt.date | None = None) -> list[int]:
    """Chat request body -> prompt token ids ending with `<|start|>assistant`."""
    conversation = build_conversation(body, today)
    try:
        return encoding.render_conversation_for_completion(conversation, Role.ASSISTANT)
    except Exception as exc:  # openai-harmony raises plain Exceptions from Rust
        raise RenderError(f"cannot render the conversation: {exc}") from None


def render_completion_prompts(encoding: HarmonyEncoding, body: dict, vocab_size: int = HARMONY_VOCAB_SIZE) -> list[list[int]]:
    """Completion `prompt` -> one token-id list per prompt (a string, ids, or a batch of either)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], int):  # one prompt of ids (checked below)
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    else:
        raise RenderError("prompt must be a non-empty string, list of strings, token ids, or list of token-id lists")
    out = []
    for i, item in enumerate(prompts):
        if isinstance(item, str):
            # Plain text: special-token spellings in user text are just text.
            ids = encoding.encode(item, disallowed_special=())
        elif isinstance(item, list) and all(type(t) is int for t in item):  # (not bool, an int subclass)
            if item and not (0 <= min(item) and max(item) < vocab_size):
                bad = next(t for t in item if not 0 <= t < vocab_size)
                raise RenderError(f"prompt[{i}]: token id {bad} is outside the vocabulary [0, {vocab_size})")
            ids = list(item)
        else:
            raise RenderError(f"prompt[{i}]: expected a string or a list of token ids")
        if not ids:
            raise RenderError(f"prompt[{i}] is empty")
        out.append(ids)
    return out

