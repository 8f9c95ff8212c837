"""cuda_graphs.as_decode_rows: a step with short prompt chunks as one row a new token (CPU: no graph runs here)."""

import torch

from services.worker.model.batch import NO_BLOCK, ForwardBatch
from services.worker.model.cuda_graphs import EXTEND_KEYS, EXTEND_TOKENS, as_decode_rows


def _batch(query_lens, context_lens):
    positions = torch.cat([torch.arange(c - q, c) for q, c in zip(query_lens, context_lens)])
    tables = {"full": [[10 * s + i for i in range(8)] for s in range(len(query_lens))],
              "sliding": [[NO_BLOCK] + [10 * s + i for i in range(1, 8)] for s in range(len(query_lens))]}
    return ForwardBatch(token_ids=torch.arange(positions.numel()), positions=positions, query_lens=list(query_lens),
                        context_lens=list(context_lens), block_tables=tables)


def test_a_decode_step_is_returned_as_is():
    batch = _batch([1, 1], [40, 7])
    assert as_decode_rows(batch, 256) is batch


def test_prompt_chunks_become_rows_whose_contexts_end_at_each_token():
    batch = _batch([1, 3, 2], [40, 20, 2])
    rows = as_decode_rows(batch, 256)
    assert rows.query_lens == [1] * 6
    assert rows.context_lens == [40, 18, 19, 20, 1, 2]
    # each row's context ends at its own token: positions are context - 1, row by row
    assert rows.positions.tolist() == [c - 1 for c in rows.context_lens]
    assert rows.token_ids is batch.token_ids
    for group, tables in batch.block_tables.items():
        assert rows.block_tables[group] == [tables[s] for s in (0, 1, 1, 1, 2, 2)]


def test_long_chunks_many_rows_or_too_many_keys_stay_eager():
    assert as_decode_rows(_batch([1, EXTEND_TOKENS + 1], [9, 100]), 256) is None
    assert as_decode_rows(_batch([1, EXTEND_TOKENS], [9, 100]), 256) is not None
    assert as_decode_rows(_batch([EXTEND_TOKENS, 1], [100, 9]), EXTEND_TOKENS) is None  # 65 rows, 64 allowed
    deep = EXTEND_KEYS // EXTEND_TOKENS + 1  # one chunk of EXTEND_TOKENS rows that far into its sequence
    assert as_decode_rows(_batch([EXTEND_TOKENS], [deep]), 256) is None
    assert as_decode_rows(_batch([EXTEND_TOKENS], [deep - 1]), 256) is not None
