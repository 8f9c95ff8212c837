"""Kernel tests draw fresh random inputs every run; a failing test prints its seed."""

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_seed():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"torch seed {seed}")  # shown with a failure's captured output, to replay it
    torch.manual_seed(seed)
