"""The fused rotary + KV-cache write kernel on the GPU, at small and gpt-oss-20b shapes (GPU only)."""

import pytest

from rope_cache_cases import GPT_OSS, SMALL, check

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("case", SMALL + GPT_OSS, ids=str)
def test_rope_and_cache_matches_reference(case):
    check(*case, device="cuda")
