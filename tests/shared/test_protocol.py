import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.protocol import (
    PROTOCOL_VERSION, Abort, Delta, FrameError, SamplingParams, Submit, TokenEvent, ToolCallDelta, decode, encode,
)


def test_round_trip_keeps_every_field():
    msg = Submit("r1", [1, 2, 3], SamplingParams(max_tokens=5, temperature=0.5, seed=7, stop_token_ids=[9]),
                 trace={"traceparent": "00-abc-def-01"})
    assert decode(encode(msg)) == msg
    delta = Delta("r1", index=1, content="hi", tool_calls=[ToolCallDelta(0, "call_1", "f", "{}")], finish_reason="stop")
    assert decode(encode(delta)) == delta


def test_ints_are_accepted_where_floats_are_declared():
    frame = msgpack.packb([PROTOCOL_VERSION, "Submit", {"request_id": "r", "token_ids": [1], "params": {"temperature": 1}}])
    assert decode(frame).params.temperature == 1.0


@pytest.mark.parametrize("frame, message", [
    (b"\xc1", "not msgpack"),
    (msgpack.packb([PROTOCOL_VERSION, "Abort"]), "not \\[version"),
    (msgpack.packb([PROTOCOL_VERSION + 1, "Abort", {"request_id": "r"}]), "protocol version"),
    (msgpack.packb([PROTOCOL_VERSION, "Nope", {}]), "unknown message type"),
    (msgpack.packb([PROTOCOL_VERSION, "Abort", {}]), "request_id: missing"),
    (msgpack.packb([PROTOCOL_VERSION, "Abort", {"request_id": 5}]), "expected str"),
    (msgpack.packb([PROTOCOL_VERSION, "Abort", {"request_id": "r", "x": 1}]), "unknown fields"),
    (msgpack.packb([PROTOCOL_VERSION, "TokenEvent", {"request_id": "r", "token_ids": [1, "a"]}]), r"token_ids\[1\]"),
    (msgpack.packb([PROTOCOL_VERSION, "TokenEvent", {"request_id": "r", "token_ids": [True]}]), "expected an integer"),
    (msgpack.packb([PROTOCOL_VERSION, "Submit", {"request_id": "r", "token_ids": [], "params": []}]), "expected a map"),
])
def test_malformed_frames_raise_frame_error(frame, message):
    with pytest.raises(FrameError, match=message):
        decode(frame)


def test_encode_refuses_non_messages():
    with pytest.raises(TypeError):
        encode({"request_id": "r"})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_anything_but_frame_error(data):
    try:
        decode(data)
    except FrameError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["Submit", "TokenEvent", "Delta", "Abort", "Heartbeat", "KvEvent"]),
       st.dictionaries(st.sampled_from(["request_id", "token_ids", "params", "worker_id", "stored", "index",
                                        "tool_calls", "logprobs", "finish_reason", "x"]), json_values, max_size=5))
def test_structured_garbage_is_rejected_or_typed(name, payload):
    try:
        msg = decode(msgpack.packb([PROTOCOL_VERSION, name, payload]))
    except FrameError:
        return
    assert type(msg).__name__ == name
    assert decode(encode(msg)) == msg
