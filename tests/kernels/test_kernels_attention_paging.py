"""FlashInfer page metadata and cache slots built from the engine's block tables (CPU: no kernel runs)."""

import pytest
import torch

from kernels.attention import page_metadata, write_slots
from services.worker.model.batch import NO_BLOCK, ForwardBatch

BS = 4


def _batch(tables, query_lens, context_lens):
    tokens = sum(query_lens)
    return ForwardBatch(token_ids=torch.zeros(tokens, dtype=torch.long), positions=torch.zeros(tokens, dtype=torch.long),
                        query_lens=query_lens, context_lens=context_lens,
                        block_tables={"full": tables, "sliding": tables})


def test_pages_skip_leading_no_blocks_and_pad():
    # seq 0: 10 tokens (3 pages, last holds 2), 2 new; seq 1: 13 tokens, its first 2 blocks left the window
    batch = _batch([[7, 3, 9, 11], [NO_BLOCK, NO_BLOCK, 5, 6]], [2, 1], [10, 13])
    qo, kv_indptr, indices, last = page_metadata(batch, "sliding", BS, pad_to=4, scratch_block=99)
    assert qo.tolist() == [0, 2, 3, 4, 5]
    assert kv_indptr.tolist() == [0, 3, 5, 6, 7]
    assert indices.tolist() == [7, 3, 9, 5, 6, 99, 99]
    assert last.tolist() == [2, 1, 1, 1]
    assert all(t.dtype == torch.int32 for t in (qo, kv_indptr, indices, last))
    assert write_slots(batch, "sliding", BS).tolist() == [9 * BS + 0, 9 * BS + 1, 6 * BS + 0]


def test_a_hole_inside_the_keys_is_refused():
    batch = _batch([[NO_BLOCK, 4, NO_BLOCK, 6]], [1], [13])
    with pytest.raises(ValueError, match="hole"):
        page_metadata(batch, "sliding", BS)


def test_writing_into_a_dropped_block_is_refused():
    batch = _batch([[NO_BLOCK, NO_BLOCK]], [1], [5])
    with pytest.raises(ValueError, match="NO_BLOCK where a new token is written"):
        write_slots(batch, "sliding", BS)


def test_empty_step_of_padding_only():
    batch = ForwardBatch(token_ids=torch.zeros(0, dtype=torch.long), positions=torch.zeros(0, dtype=torch.long),
                         query_lens=[], context_lens=[], block_tables={"full": [], "sliding": []})
    qo, kv_indptr, indices, last = page_metadata(batch, "full", BS, pad_to=2, scratch_block=3)
    assert qo.tolist() == [0, 1, 2] and kv_indptr.tolist() == [0, 1, 2]
    assert indices.tolist() == [3, 3] and last.tolist() == [1, 1]
    assert write_slots(batch, "full", BS).numel() == 0


def test_a_hole_is_found_in_a_big_step_too():
    # past 4096 pages the check runs on the page tensor; the error still names the sequence
    tables = [list(range(s * 64, (s + 1) * 64)) for s in range(70)]
    tables[41][30] = NO_BLOCK
    batch = _batch(tables, [1] * 70, [64 * BS] * 70)
    with pytest.raises(ValueError, match="sequence 41 has a NO_BLOCK hole"):
        page_metadata(batch, "full", BS)
    tables[41][30] = 41 * 64 + 30
    _, kv_indptr, indices, _ = page_metadata(batch, "full", BS)
    assert indices.tolist() == list(range(70 * 64)) and kv_indptr[-1] == 70 * 64


def test_xqa_page_table_is_rectangular_with_scratch_in_the_gaps():
    from kernels.decode_attention import page_table

    # seq 0: 10 tokens (3 pages); seq 1: 13 tokens (4 pages), its first 2 blocks left the window; 2 padding rows
    batch = _batch([[7, 3, 9, 11], [NO_BLOCK, NO_BLOCK, 5, 6]], [1, 1], [10, 13])
    flat, lengths, width = page_table(batch, "sliding", BS, scratch_block=99, rows=4)
    assert width == 4
    assert list(flat) == [7, 3, 9, 99, 99, 99, 5, 6] + [99] * 8
    assert list(lengths) == [10, 13, 1, 1]
    # without padding rows: just the step's sequences (the last page, 11, is past seq 0's 10 tokens)
    flat, lengths, width = page_table(batch, "full", BS, scratch_block=0)
    assert list(flat) == [7, 3, 9, 0, 0, 0, 5, 6] and list(lengths) == [10, 13]


def test_xqa_page_table_refuses_a_hole_and_an_oversized_step():
    from kernels.decode_attention import page_table

    with pytest.raises(ValueError, match="hole"):
        page_table(_batch([[NO_BLOCK, 4, NO_BLOCK, 6]], [1], [13]), "sliding", BS, scratch_block=0)
    with pytest.raises(ValueError, match="does not fit"):
        page_table(_batch([[1], [2]], [1, 1], [1, 1]), "full", BS, scratch_block=0, rows=1)


def test_prefill_backend_reads_the_environment_and_refuses_other_names(monkeypatch):
    from kernels.attention import prefill_backend

    monkeypatch.delenv("ROSE_PREFILL_ATTENTION", raising=False)
    assert prefill_backend() == "auto"
    for family in ("fa2", "fa3", "auto"):
        monkeypatch.setenv("ROSE_PREFILL_ATTENTION", family)
        assert prefill_backend() == family
    monkeypatch.setenv("ROSE_PREFILL_ATTENTION", "fa4")
    with pytest.raises(ValueError, match="fa2, fa3 or auto"):
        prefill_backend()


def test_prefill_families_take_fa3_on_hopper_only(monkeypatch):
    from kernels.attention import prefill_families

    monkeypatch.delenv("ROSE_PREFILL_ATTENTION", raising=False)
    assert prefill_families((9, 0)) == ("fa2", "fa3")  # auto: fa3 for steps of prompt chunks alone
    assert prefill_families((8, 0)) == ("fa2", "fa2") and prefill_families((10, 0)) == ("fa2", "fa2")
    monkeypatch.setenv("ROSE_PREFILL_ATTENTION", "fa3")
    assert prefill_families((9, 0)) == ("fa3", "fa3")
    with pytest.raises(ValueError, match="needs a Hopper GPU"):
        prefill_families((8, 9))
    monkeypatch.setenv("ROSE_PREFILL_ATTENTION", "fa2")
    assert prefill_families((9, 0)) == ("fa2", "fa2")

