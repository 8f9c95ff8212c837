"""A request through the formatter's state: Submits out, TokenEvents in, Deltas back."""

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from services.formatter.render import RenderError, render_chat
from services.formatter.request import InFlightRequest, split_sub_request_id
from shared.protocol import GenerateRequest, TokenEvent

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def start(encoding, endpoint="chat", **body):
    base = dict(CHAT) if endpoint == "chat" else {"model": "m"}
    return InFlightRequest.start(GenerateRequest("r1", endpoint, {**base, **body}), encoding)


def test_n_choices_get_their_own_seed_and_one_prompt(encoding):
    request, submits = start(encoding, n=3, seed=7, max_tokens=5, temperature=0.5)
    assert [s.request_id for s in submits] == ["r1/0", "r1/1", "r1/2"]
    assert [s.params.seed for s in submits] == [7, 8, 9]
    assert all(s.params.max_tokens == 5 and s.params.temperature == 0.5 for s in submits)
    assert submits[0].token_ids == submits[2].token_ids
    assert set(submits[0].params.stop_token_ids) == set(encoding.stop_tokens_for_assistant_actions())
    assert request.prompt_tokens == len(submits[0].token_ids)
    assert split_sub_request_id("a/b/12") == ("a/b", 12) and split_sub_request_id("nope") is None


def test_chat_tokens_become_channel_deltas_and_usage(encoding):
    request, submits = start(encoding, logprobs=True, top_logprobs=2)
    assert submits[0].params.logprobs == 2
    ids = encoding.encode(
        "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>Answer.<|return|>",
        allowed_special="all",
    )
    half = len(ids) // 2
    first = TokenEvent("r1/0", ids[:half], [-0.5] * half, [[[ids[0], -0.5], [5, -1.5]]] * half, prompt_tokens=10, cached_tokens=4)
    deltas, aborts = request.on_event(0, first, encoding)
    rest = ids[half:]
    last = TokenEvent("r1/0", rest, [-0.25] * len(rest), [], finish_reason="stop")
    more, aborts2 = request.on_event(0, last, encoding)
    deltas += more
    assert not aborts and not aborts2 and request.done
    assert "".join(d.reasoning_content for d in deltas) == "Think."
    assert "".join(d.content for d in deltas) == "Answer."
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].completion_tokens == len(ids)
    assert deltas[-1].reasoning_tokens == len(encoding.encode("Think."))
    assert deltas[-1].prompt_tokens == request.prompt_tokens and deltas[-1].cached_tokens == 4
    entries = [e for d in deltas for e in d.logprobs]
    assert len(entries) == len(ids)
    assert entries[0]["token"] == "<|channel|>" and entries[0]["logprob"] == -0.5
    assert bytes(entries[0]["bytes"]) == b"<|channel|>"
    assert [t["logprob"] for t in entries[0]["top_logprobs"]] == [-0.5, -1.5]


def test_tool_call_finish_reason(encoding):
    request, _ = start(encoding, tools=[{"type": "function", "function": {"name": "f"}}])
    ids = encoding.encode("<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}<|call|>", allowed_special="all")
    deltas, _ = request.on_event(0, TokenEvent("r1/0", ids, finish_reason="stop"), encoding)
    assert deltas[-1].finish_reason == "tool_calls"
    assert [(c.name, c.arguments) for c in deltas[-1].tool_calls] == [("f", "{}")]


def test_stop_string_cuts_and_aborts(encoding):
    request, _ = start(encoding, "completion", prompt="x", stop=["lazy"], n=2)
    ids = encoding.encode("The quick brown fox jumps over the lazy dog")
    deltas, aborts = request.on_event(1, TokenEvent("r1/1", ids[:6]), encoding)
    more, aborts2 = request.on_event(1, TokenEvent("r1/1", ids[6:]), encoding)
    text = "".join(d.content for d in deltas + more)
    assert text == "The quick brown fox jumps over the "
    assert more[-1].finish_reason == "stop" and more[-1].index == 1
    assert not aborts and [a.request_id for a in aborts2] == ["r1/1"]
    assert request.on_event(1, TokenEvent("r1/1", ids[:2]), encoding) == ([], [])  # late tokens ignored
    assert not request.done  # choice 0 still runs


def test_error_from_below_ends_every_choice(encoding):
    request, _ = start(encoding, n=2)
    deltas, aborts = request.on_event(0, TokenEvent("r1/0", error="prompt too long", status=400, finish_reason="error"), encoding)
    assert deltas[0].error == "prompt too long" and deltas[0].status == 400
    assert [a.request_id for a in aborts] == ["r1/1"] and request.done


def test_completion_prompt_batch_and_token_ids(encoding):
    request, submits = start(encoding, "completion", prompt=[[1, 2, 3], [4, 5]], n=2, max_tokens=3)
    assert [s.token_ids for s in submits] == [[1, 2, 3], [1, 2, 3], [4, 5], [4, 5]]
    assert request.prompt_tokens == 5 and len(request.choices) == 4
    assert 199999 in submits[0].params.stop_token_ids


def test_ignore_eos_drops_the_implicit_end_tokens_but_keeps_named_ones(encoding):
    _, submits = start(encoding, "completion", prompt=[1, 2, 3], ignore_eos=True, stop_token_ids=[42])
    assert submits[0].params.ignore_eos and submits[0].params.stop_token_ids == [42]


@pytest.mark.parametrize("body", [{"n": 0}, {"n": 1000}, {"messages": []}, {"temperature": "hot"}])
def test_bad_requests_are_render_errors(encoding, body):
    with pytest.raises(RenderError):
        start(encoding, **body)


def test_default_max_tokens_fits_the_context(encoding):
    _, submits = InFlightRequest.start(GenerateRequest("r", "chat", CHAT), encoding, max_model_len=100)
    prompt = len(submits[0].token_ids)
    assert submits[0].params.max_tokens == 100 - prompt
    _, submits = InFlightRequest.start(GenerateRequest("r", "chat", CHAT), encoding, max_model_len=0)
    assert submits[0].params.max_tokens == 4096  # context unknown: the cap
    _, submits = InFlightRequest.start(GenerateRequest("r", "completion", {"prompt": "x"}), encoding, max_model_len=1000)
    assert submits[0].params.max_tokens == 16
    _, submits = InFlightRequest.start(GenerateRequest("r", "chat", {**CHAT, "max_tokens": 7}), encoding, max_model_len=100)
    assert submits[0].params.max_tokens == 7


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ids=st.lists(st.integers(0, 201087), max_size=60),
    cuts=st.lists(st.integers(1, 8), min_size=1, max_size=10),
    stop=st.sampled_from([None, "a", " the", "\n", "<|end|>"]),
    endpoint=st.sampled_from(["chat", "completion"]),
)
def test_any_token_stream_gives_deltas_and_ends(encoding, ids, cuts, stop, endpoint):
    body = {**CHAT, "stop": stop} if endpoint == "chat" else {"model": "m", "prompt": "x", "stop": stop}
    request, _ = InFlightRequest.start(GenerateRequest("r", endpoint, body), encoding)
    pos, deltas = 0, []
    for cut in cuts:
        chunk, pos = ids[pos : pos + cut], pos + cut
        out, _ = request.on_event(0, TokenEvent("r/0", chunk, [-1.0] * len(chunk)), encoding)
        deltas += out
    out, _ = request.on_event(0, TokenEvent("r/0", ids[pos:], finish_reason="length"), encoding)
    deltas += out
    assert request.done and [d.finish_reason for d in deltas if d.finish_reason] in (["length"], ["stop"])
    text = "".join(d.content for d in deltas)
    if stop:
        assert stop not in text


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["role", "content", "type", "text", "function", "name", "tool_calls", "tool_call_id"]), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["messages", "prompt", "n", "tools", "tool_choice", "stop", "seed", "max_tokens", "temperature", "logprobs", "reasoning_effort"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.fixed_dictionaries({}, optional={f: JSON for f in FIELDS}), endpoint=st.sampled_from(["chat", "completion"]))
def test_any_body_renders_or_is_a_render_error(encoding, body, endpoint):
    """A sender other than the gateway may send anything: only RenderError (a 400) may come out."""
    try:
        InFlightRequest.start(GenerateRequest("r", endpoint, body), encoding)
    except RenderError as exc:
        assert str(exc)


def test_logprobs_only_when_asked(encoding):
    request, _ = start(encoding, "completion", prompt="x")
    deltas, _ = request.on_event(0, TokenEvent("r1/0", [1, 2], [-0.1, -0.2], finish_reason="length"), encoding)
    assert deltas[0].logprobs == [] and deltas[0].content
