"""Every SSE event is one line to every client: model text may hold U+0085, U+2028 or
U+2029, which str.splitlines() (httpx's aiter_lines among others) breaks lines at;
a client reading such an event got half a JSON object (seen in test_drain)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from services.gateway.sse import event


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_an_event_is_one_line_that_round_trips(text):
    payload = {"choices": [{"index": 0, "text": text}]}
    framed = event(payload)
    lines = framed.splitlines()
    assert lines[0].startswith("data: ") and lines[1:] == [""]
    assert json.loads(lines[0][len("data: "):]) == payload


def test_line_separators_are_escaped():
    framed = event({"t": "a\u2028b\x85c\u2029d"})
    assert framed == 'data: {"t":"a\\u2028b\\u0085c\\u2029d"}\n\n'
