"""Parsing real Harmony completions into reasoning / content / tool-call pieces; garbage never raises."""

from hypothesis import HealthCheck, given, settings, strategies as st

from services.formatter.parse import HarmonyStreamParser, Piece, StopStringWatcher, TextDecoder


def tokens(encoding, text):
    return encoding.encode(text, allowed_special="all")


def parse_streaming(encoding, ids):
    """Feed one token at a time, as the worker streams them; return the merged piece."""
    parser = HarmonyStreamParser(encoding)
    total = Piece()
    for token in ids:
        total.extend(parser.feed([token]))
    total.extend(parser.finish())
    return parser, total


def test_analysis_then_final(encoding):
    ids = tokens(
        encoding,
        "<|channel|>analysis<|message|>User greets. Reply.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hello! How can I help?<|return|>",
    )
    parser, piece = parse_streaming(encoding, ids)
    assert piece.reasoning == "User greets. Reply."
    assert piece.content == "Hello! How can I help?"
    assert piece.tool_calls == [] and not parser.is_fallback
    assert parser.reasoning_tokens == len(tokens(encoding, "User greets. Reply."))


def test_tool_call(encoding):
    ids = tokens(
        encoding,
        "<|channel|>analysis<|message|>Need the weather.<|end|>"
        '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>',
    )
    parser, piece = parse_streaming(encoding, ids)
    assert piece.reasoning == "Need the weather."
    assert piece.content == ""
    assert len(piece.tool_calls) == 1
    call = piece.tool_calls[0]
    assert call.index == 0 and call.name == "get_weather" and call.id.startswith("call_")
    assert call.arguments == '{"city": "Paris"}'
    assert parser.tool_calls == 1


def test_two_tool_calls_get_their_own_index(encoding):
    ids = tokens(
        encoding,
        "<|channel|>commentary to=functions.a <|constrain|>json<|message|>{}<|call|>"
        '<|start|>assistant<|channel|>commentary to=functions.b <|constrain|>json<|message|>{"x":1}<|call|>',
    )
    _, piece = parse_streaming(encoding, ids)
    assert [(c.index, c.name, c.arguments) for c in piece.tool_calls] == [(0, "a", "{}"), (1, "b", '{"x":1}')]
    assert piece.tool_calls[0].id != piece.tool_calls[1].id


def test_multibyte_text_survives_token_splits(encoding):
    text = "naïve café 😀 日本語"
    ids = tokens(encoding, "<|channel|>final<|message|>" + text + "<|return|>")
    assert parse_streaming(encoding, ids)[1].content == text


def test_text_outside_harmony_falls_back_to_content(encoding):
    plain = "just some text the model wrote without any header at all"
    parser, piece = parse_streaming(encoding, tokens(encoding, plain))
    assert piece.content == plain and parser.is_fallback


def test_text_after_a_message_ends_is_kept(encoding):
    ids = tokens(encoding, "<|channel|>final<|message|>Hi<|end|>trailing words")
    parser, piece = parse_streaming(encoding, ids)
    assert piece.content == "Hitrailing words" and parser.is_fallback


def test_long_header_falls_back_before_the_end(encoding):
    words = " ".join(["word"] * 80)
    parser = HarmonyStreamParser(encoding)
    out = parser.feed(tokens(encoding, words))
    assert parser.is_fallback and out.content == words


def test_text_decoder_skips_special_tokens(encoding):
    decoder = TextDecoder(encoding)
    assert decoder.decode(tokens(encoding, "a<|return|>b")) + decoder.flush() == "ab"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.one_of(st.integers(0, 201087), st.sampled_from(list(range(199998, 200020)))), max_size=120))
def test_random_tokens_never_raise(encoding, ids):
    parser = HarmonyStreamParser(encoding)
    piece = Piece()
    for start in range(0, len(ids), 7):
        piece.extend(parser.feed(ids[start : start + 7]))
    piece.extend(parser.finish())
    assert isinstance(piece.content, str) and isinstance(piece.reasoning, str)
    for call in piece.tool_calls:
        assert call.index < parser.tool_calls


def test_stop_string_cut_across_chunks():
    watch = StopStringWatcher(["STOP"])
    out = watch.push("hello ST")
    assert out == "hello " and not watch.stopped  # "ST" is held back: it may start STOP
    out += watch.push("OP and more")
    assert out == "hello " and watch.stopped
    assert watch.push("later") == "" and watch.flush() == ""


def test_stop_string_partial_released_when_not_a_match():
    watch = StopStringWatcher(["STOP", "xyz"])
    assert watch.push("aST") == "a"
    assert watch.push("ART") == "START"
    assert watch.flush() == "" and not watch.stopped
    watch = StopStringWatcher(["END"])
    assert watch.push("the EN") == "the "
    assert watch.flush() == "EN"
