"""Engine fixtures: a small real checkpoint, an engine factory that checks KV accounting.

The small checkpoint is the tiny preset with a 1024-token vocabulary and 2 layers
(one sliding with a 16-token window, one full), so CPU steps take milliseconds and
prompts of a few dozen tokens run well past the window.
"""

from __future__ import annotations

import os

import pytest
import torch
from engine_helpers import MAX_MODEL_LEN, VOCAB, WINDOW, assert_all_blocks_free

from services.worker.engine.engine import Engine
from services.worker.model import load_model, make_checkpoint


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model's ops are too small to split; on a shared 2-core machine a second
    intra-op thread only spins against other processes (10x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_model(tmp_path_factory):
    path = os.path.join(str(tmp_path_factory.mktemp("engine")), "gpt-oss-small")
    make_checkpoint(path, seed=0, vocab_size=VOCAB, sliding_window=WINDOW, num_hidden_layers=2)
    return load_model(path)


@pytest.fixture(params=[False, True], ids=["serial", "overlap"])
def make_engine(small_model, request):
    """Engine(small_model, **overrides); after the test every engine must hold no block.

    Every test runs twice: with each step read before the next is launched, and with
    the overlap a GPU engine uses (the next step launched first, its inputs read from
    the last step's draws): both must give the same tokens.
    """
    engines: list[Engine] = []

    def build(**overrides) -> Engine:
        options = dict(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                       max_model_len=MAX_MODEL_LEN, seed=0, overlap=request.param)
        options.update(overrides)
        engine = Engine(small_model, **options)
        engines.append(engine)
        return engine

    yield build
    for engine in engines:
        assert_all_blocks_free(engine)
