"""bench/mixed_step.py's step specs: the batches it times must be ones the engine could hand a backend."""

from __future__ import annotations

import pytest
import torch

from bench.mixed_step import BLOCK, parse_step, step_batch
from services.worker.model import load_model
from services.worker.model.batch import NO_BLOCK


def test_parse_step_reads_decode_rows_and_chunks():
    assert parse_step("63x8192+1985@6144") == [(63, 1, 8192), (1, 1985, 8129)]
    with pytest.raises(ValueError, match="neither"):
        parse_step("63-8192")


def test_step_batch_gives_each_sequence_its_blocks_and_frees_the_window():
    batch, blocks = step_batch("2x300+40@200", window=128, vocab=100)
    assert batch.query_lens == [1, 1, 40] and batch.context_lens == [300, 300, 240]
    assert batch.positions.tolist() == [299, 299] + list(range(200, 240))
    full = batch.block_tables["full"]
    assert [len(t) for t in full] == [19, 19, 15] and blocks["full"] == 53
    assert len({b for t in full for b in t}) == 53  # no block shared between sequences
    # a decode row at 299 keeps keys from 171 on (block 10); the chunk from 72 on (block 4)
    assert [t.count(NO_BLOCK) for t in batch.block_tables["sliding"]] == [(299 - 128) // BLOCK] * 2 + [(200 - 128) // BLOCK]


def test_step_batch_runs_through_the_torch_model(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    c = model.config
    batch, blocks = step_batch("3x40+24@16", c.sliding_window, c.vocab_size)
    kv = model.make_kv_cache(blocks, BLOCK)
    logits = model(batch, kv)
    assert logits.shape == (4, c.vocab_size) and torch.isfinite(logits).all()
