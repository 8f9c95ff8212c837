"""Attention over the paged KV cache in plain PyTorch, with sinks and sliding windows.

A step's sequences are padded to a rectangle: [seqs, max new tokens] queries against
[seqs, max keys] keys gathered from the cache through the block tables. A window
layer gathers only the keys some new token can see (the last `window` positions
before each query), so blocks wholly out of the window are never read and may be
NO_BLOCK in its table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.worker.model.batch import NO_BLOCK, ForwardBatch

SCORE_ELEMENTS = 1 << 26  # most attention scores held at once (256 MiB in float32)


@dataclass
class AttentionPlan:
    """Indices for one (group, window) pair, shared by every layer that has it.

    write_slots [T]: flat cache slot (block * block_size + offset) of each new token.
    query_index [S, Q]: row of `q` for each padded query (0 where padding).
    query_valid [S, Q] bool.
    key_slots [S, K]: flat cache slot of each gathered key (0 where padding).
    key_valid [S, K] bool: False for padding keys (their slot may hold anything, even NaN).
    mask [S, Q, K] bool: True where the query may attend to the key.
    """

    write_slots: torch.Tensor
    query_index: torch.Tensor
    query_valid: torch.Tensor
    key_slots: torch.Tensor
    key_valid: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def build(
        cls, batch: ForwardBatch, group: str, window: int | None, block_size: int, device: torch.device
    ) -> "AttentionPlan":
        tables = batch.block_tables.get(group)
        if tables is None or len(tables) != batch.num_seqs:
            raise ValueError(f"ForwardBatch needs one {group!r} block table per sequence")
        query_lens = torch.tensor(batch.query_lens, dtype=torch.int64)
        context_lens = torch.tensor(batch.context_lens, dtype=torch.int64)
        if (query_lens < 1).any() or (query_lens > context_lens).any():
            raise ValueError("every sequence needs 1 <= query_len <= context_len")
        if int(query_lens.sum()) != batch.token_ids.shape[0]:
            raise ValueError(f"query_lens sum to {int(query_lens.sum())} but there are {batch.token_ids.shape[0]} tokens")
        max_blocks = max(len(t) for t in tables)
        table = torch.full((batch.num_seqs, max(max_blocks, 1)), NO_BLOCK, dtype=torch.int64)
        for s, row in enumerate(tables):
            if len(row) * block_size < batch.context_lens[s]:
                raise ValueError(
                    f"{group} block table of sequence {s} covers {len(row) * block_size} positions, "
                    f"needs {batch.context_lens[s]}"
                )
            table[s, : len(row)] = torch.tensor(row, dtype=torch.int64)

        first_new = context_lens - query_lens  # cache position of each sequence's first new token
        max_q = int(query_lens.max())
        q_offset = torch.arange(max_q)
        query_valid = q_offset[None, :] < query_lens[:, None]  # [S, Q]
        starts = torch.cumsum(query_lens, 0) - query_lens
        query_index = torch.where(query_valid, starts[:, None] + q_offset[None, :], 0)
        query_pos = first_new[:, None] + q_offset[None, :]  # [S, Q]

        # keys: from the oldest position the first new token can see, up to the end
        lowest = first_new - (window - 1) if window else torch.zeros_like(first_new)
        lowest = lowest.clamp_min(0)
        max_k = int((context_lens - lowest).max())
        key_pos = lowest[:, None] + torch.arange(max_k)[None, :]  # [S, K]
        key_valid = key_pos < context_lens[:, None]
        key_blocks = table.gather(1, (key_pos // block_size).clamp_max(table.shape[1] - 1))
        holes = key_valid & (key_blocks == NO_BLOCK)
        if holes.any():
            s, k = holes.nonzero()[0].tolist()
            raise ValueError(f"{group} block table of sequence {s} has NO_BLOCK at position {int(key_pos[s, k])}, "
                             f"which a new token attends to")
        key_slots = torch.where(key_valid, key_blocks * block_size + key_pos % block_size, 0)

        mask = key_valid[:, None, :] & (key_pos[:, None, :] <= query_pos[:, :, None])
        if window:
            mask &= query_pos[:, :, None] - key_pos[:, None, :] < window
        mask &= query_valid[:, :, None]

        seq_of_token = torch.repeat_interleave(torch.arange(batch.num_seqs), query_lens)
        token_pos = first_new[seq_of_token] + (torch.arange(len(seq_of_token)) - starts[seq_of_token])
        token_blocks = table[seq_of_token, token_pos // block_size]
        if (token_blocks == NO_BLOCK).any():
            s = int(seq_of_token[(token_blocks == NO_BLOCK).nonzero()[0, 0]])
            raise ValueError(f"{group} block table of sequence {s} has NO_BLOCK where a new token is written")
        write_slots = token_blocks * block_size + token_pos % block_size

        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return cls(move(write_slots), move(query_index), move(query_valid), move(key_slots), move(key_valid), move(mask))


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: AttentionPlan,
    sinks: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Write the new k/v into the cache, then attend over it.

    q [T, heads, head_dim], k/v [T, kv_heads, head_dim] (rotary applied);
    k_cache/v_cache [blocks, block_size, kv_heads, head_dim]; sinks [heads] float32
    (a per-head logit that takes part in the softmax and contributes no value).
    Returns [T, heads * head_dim] float32.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k.shape[1]
    group_size = num_heads // kv_heads
    k_flat = k_cache.view(-1, kv_heads, head_dim)
    v_flat = v_cache.view(-1, kv_heads, head_dim)
    k_flat[plan.write_slots] = k.to(k_cache.dtype)
    v_flat[plan.write_slots] = v.to(v_cache.dtype)

    seqs, max_q = plan.query_index.shape
    queries = q.float()[plan.query_index].view(seqs, max_q, kv_heads, group_size, head_dim)
    keys = k_flat[plan.key_slots].float()  # [S, K, kv_heads, head_dim]
    # padding keys read whatever sits in slot 0; a zero probability times NaN would still be NaN
    values = v_flat[plan.key_slots].float().masked_fill(~plan.key_valid[:, :, None, None], 0.0)
    sink = sinks.float().view(1, kv_heads, group_size, 1, 1)
    # long prefills go in query slices so the score tensor stays bounded
    step = max(1, SCORE_ELEMENTS // (seqs * num_heads * max(1, keys.shape[1])))
    pieces = []
    for q0 in range(0, max_q, step):
        scores = torch.einsum("sqhgd,skhd->shgqk", queries[:, q0:q0 + step], keys) * scale  # [S, kvh, g, q, K]
        scores = scores.masked_fill(~plan.mask[:, None, None, q0:q0 + step, :], float("-inf"))
        sink_column = sink.expand(seqs, -1, -1, scores.shape[3], 1)
        probs = torch.softmax(torch.cat((scores, sink_column), dim=-1), dim=-1)[..., :-1]
        pieces.append(torch.einsum("shgqk,skhd->sqhgd", probs, values))  # [S, q, kvh, g, head_dim]
    out = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
    return out.reshape(seqs, max_q, num_heads * head_dim)[plan.query_valid]
