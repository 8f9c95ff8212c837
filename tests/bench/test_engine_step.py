"""bench/engine_step.py's measuring loops on the CPU engine (the bench itself needs a GPU)."""

from __future__ import annotations

import pytest

from bench.engine_step import closed_loop, decode_phase
from services.worker.engine.engine import Engine
from services.worker.model import load_model


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint)


@pytest.mark.parametrize("overlap", [False, True])
def test_decode_phase_counts_the_tokens_after_the_last_prefill(model, overlap):
    engine = Engine(model, num_blocks=64, block_size=16, max_num_seqs=4, max_model_len=64, seed=0, overlap=overlap)
    result = decode_phase(engine, batch=3, prompt=10, output=6, vocab=model.config.vocab_size, seed=1)
    # every request's first token comes with the prefill; the 5 more each are the decode phase's
    assert result["tokens"] == 3 * 5
    assert result["steps"] >= 5 and result["step_ms"] > 0 and result["tokens_per_s"] > 0
    assert not engine.has_work()


@pytest.mark.parametrize("overlap", [False, True])
def test_closed_loop_finishes_every_request(model, overlap):
    engine = Engine(model, num_blocks=64, block_size=16, max_num_seqs=4, max_model_len=64, seed=0, overlap=overlap)
    result = closed_loop(engine, streams=2, requests=5, prompt=10, output=4, vocab=model.config.vocab_size)
    assert result["tokens"] == 5 * 4
    assert not engine.has_work() and not engine.requests
