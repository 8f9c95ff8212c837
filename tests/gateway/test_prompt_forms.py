"""A completion's `prompt` keeps its form: token ids (strict ones on the fast path, 1.0 and true as
before), strings that look like numbers stay strings, and empty or out-of-range ids are refused."""

import pytest
from pydantic import ValidationError

from services.gateway.schemas import CompletionRequest


@pytest.mark.parametrize("prompt,parsed", [
    ([5, 200005], [5, 200005]),
    ([[1], [2, 3]], [[1], [2, 3]]),
    ("12", "12"),
    (["12", "34"], ["12", "34"]),
    ([1.0, True], [1, 1]),
    ([[2.0]], [[2]]),
])
def test_prompt_forms(prompt, parsed):
    value = CompletionRequest.model_validate({"model": "m", "prompt": prompt}).prompt
    assert value == parsed and type(value) is type(parsed)
    if isinstance(parsed, list):
        assert [type(v) for v in value] == [type(v) for v in parsed]


@pytest.mark.parametrize("prompt", [[], [[]], [-1], [2**31], [1.5], [[1], "a"]])
def test_bad_prompts_are_refused(prompt):
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": prompt})
