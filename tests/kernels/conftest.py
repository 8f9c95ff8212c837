"""Kernel tests draw fresh random inputs every run; a failing test prints its seed, and
ROSE_TEST_SEED=<seed> replays it."""

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_seed():
    seed = int(os.environ.get("ROSE_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"torch seed {seed}")  # shown with a failure's captured output
    torch.manual_seed(seed)
