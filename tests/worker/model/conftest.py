"""Model tests run their small matmuls on one thread.

On a shared 2-core runner, torch's intra-op threads spin against other test
processes and a tiny forward pass gets 10-20x slower; one thread is faster here.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
