"""The QKV projection with rotary and cache write in its epilogue (kernels/qkv_rope.py) on the GPU: bit for bit
the GEMV + rope_cache pair, within bf16 rounding of the torch reference, at gpt-oss shapes and odd ones."""

import pytest

from qkv_rope_cases import GPT_OSS, SMALL, check

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("case", SMALL + GPT_OSS)
def test_qkv_rope_matches_gemv_and_rope_cache(case):
    check(*case, device="cuda")
