"""CUDA graphs of the cuda backend's decode step, one per batch-size bucket.

A decode step (one new token for each of n sequences) launches some 30 kernels a
layer; eager, the host cannot issue them as fast as the GPU runs them. Here each
bucket size b is captured once (the engine captures every bucket up to its
max_num_seqs at start-up; otherwise at a bucket's first use), and a step of n <= b
sequences replays the graph of the smallest such b:

    plan      host: FlashInfer page metadata (or XQA page tables) and cache slots into
              the bucket's fixed buffers, token ids and positions into its input buffers
    replay    device: embedding .. lm_head for b rows
    logits    the first n rows of the bucket's output buffer

A step that also brings short prompt chunks (the tail of a prompt whose prefix the
cache held, a short prompt) replays a decode graph too, one row a new token
(`as_decode_rows`): each row attends to its sequence's keys up to its own position,
the causal mask of a prefill. Eager, such a step costs what a prefill's launches cost
on the host; at 64 streams with cached prefixes nearly every step was one.

Rows n..b are padding: token 0 at position 0, writing and reading only the scratch
block the model added to each KV pool (`PagedKVCache.scratch_blocks`), so they
touch no sequence's cache. Graphs share one memory pool and one FlashInfer float
workspace per (group, window): steps run one at a time, and a step's logits are read
before the next step starts.
"""

from __future__ import annotations

import os

import torch

from kernels.split_decode import FRESH_KEYS
from services.worker.model.batch import GROUPS, NO_BLOCK, ForwardBatch, HostStaging, PagedKVCache

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# A prompt chunk runs as decode rows when it is at most this many tokens (the split decode attention reads a
# row's newest FRESH_KEYS after its PDL wait: the chunk's keys written this step) and the step's prompt rows
# read at most EXTEND_KEYS keys in all: each row reads its sequence's keys again (L2 holds some of it)
EXTEND_TOKENS = FRESH_KEYS
EXTEND_KEYS = 64 * 4096


def is_decode(batch: ForwardBatch) -> bool:
    """Whether every sequence of the step brings exactly one new token."""
    return all(q == 1 for q in batch.query_lens)


def as_decode_rows(batch: ForwardBatch, max_rows: int) -> ForwardBatch | None:
    """The step as one row a new token (a decode step's shape), or None where its prompt chunks are too long.

    Row i of a chunk is a sequence whose context ends at that token: same block tables, context
    cut there. token_ids and positions are already one entry a token. A decode step is returned as is.
    """
    if is_decode(batch):
        return batch
    if batch.positions.numel() > max_rows or max(batch.query_lens) > EXTEND_TOKENS:
        return None
    if sum(q * ctx for q, ctx in zip(batch.query_lens, batch.context_lens) if q > 1) > EXTEND_KEYS:
        return None
    rows = [(s, ctx - q + 1 + i)
            for s, (q, ctx) in enumerate(zip(batch.query_lens, batch.context_lens)) for i in range(q)]
    return ForwardBatch(token_ids=batch.token_ids, positions=batch.positions, query_lens=[1] * len(rows),
                        context_lens=[ctx for _, ctx in rows],
                        block_tables={g: [tables[s] for s, _ in rows] for g, tables in batch.block_tables.items()})


class _Captured:
    """One bucket: its graph, the buffers it reads and the logits it writes."""

    def __init__(self, graph, attention, tokens, positions, logits):
        self.graph, self.attention = graph, attention
        self.tokens, self.positions, self.logits = tokens, positions, logits


class DecodeGraphs:
    """The decode graphs of one model over one KV cache (graphs bind the cache's tensors)."""

    def __init__(self, model, kv: PagedKVCache, buckets: tuple[int, ...] = BUCKETS):
        if kv.scratch_blocks is None:
            raise ValueError("decode graphs need a KV cache with scratch blocks (make it with model.make_kv_cache)")
        self.model, self.kv, self.buckets = model, kv, buckets
        self.pool = torch.cuda.graph_pool_handle()
        self.workspaces: dict = {}
        self.max_pages = {g: kv.k[kv.layer_groups.index(g)].shape[0] for g in set(kv.layer_groups)}
        # XQA's page tables (kernels/decode_attention.py) list each sequence's pages from position 0,
        # sliding ones too (leading pages out of the window on scratch): as wide as the most pages a
        # sequence can hold, the largest pool's or the context limit's, whichever is fewer
        longest = -(-model.config.max_position_embeddings // kv.block_size)
        self.xqa_width = min(max(self.max_pages.values()), longest) if model.decode_attention is not None else None
        self.captured: dict[int, _Captured] = {}
        # most rows a step with prompt chunks may take (as_decode_rows): past what capture_up_to captured,
        # such a step takes the prefill graphs (cuda_prefill_graphs.py) rather than stop for a capture;
        # ROSE_GRAPH_PROMPT_ROWS=0: always those.
        # Only through the split decode attention, whose loads before the PDL wait skip a row's newest
        # FRESH_KEYS: XQA's and FlashInfer's kernels are not known to wait before reading keys that the cache
        # write just before them may still be writing.
        split = model.decode_attention is not None and model.decode_attention.split
        self.prompt_rows = split and os.environ.get("ROSE_GRAPH_PROMPT_ROWS", "1") != "0"
        self.extend_rows = buckets[-1] if self.prompt_rows else 0
        self.staging = HostStaging(1 << 12)  # token ids and positions on their way to a graph's inputs

    def fits(self, batch: ForwardBatch) -> bool:
        """A decode step within the largest bucket whose page lists fit the graphs' index buffers.

        XQA: every sequence's pages fit a row of its page tables. FlashInfer's wrapper: each
        group's buffer holds its pool's worth of pages plus the padding; sequences that share
        prefix blocks each list them, so a step can list more pages than the pool has blocks:
        such a step runs eagerly. Each group is checked against its own pool: the sliding pool
        is sized for windows, the full one for whole contexts.
        """
        if batch.num_seqs > self.buckets[-1] or not is_decode(batch):
            return False
        if self.xqa_width is not None:  # one row per sequence: only its own pages count
            return max(-(-ctx // self.kv.block_size) for ctx in batch.context_lens) <= self.xqa_width
        return all(step_pages(batch, g, self.kv.block_size) <= n for g, n in self.max_pages.items())

    def capture_up_to(self, num_seqs: int) -> None:
        """Capture every bucket a step of up to num_seqs sequences can use, largest first.

        At start-up, so no request waits for a capture (a bucket's first capture also
        compiles its kernels); the largest first, so the shared pool is sized once.
        """
        top = self.bucket(min(num_seqs, self.buckets[-1]))
        self.extend_rows = top if self.prompt_rows else 0
        for b in sorted((b for b in self.buckets if b <= top), reverse=True):
            if b not in self.captured:
                self._capture(b)

    def bucket(self, num_seqs: int) -> int:
        return next(b for b in self.buckets if b >= num_seqs)

    def __call__(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [num_seqs, vocab] float32 of a decode step; a view valid until the next step."""
        n = batch.num_seqs
        b = self.bucket(n)
        step = self.captured.get(b) or self._capture(b)
        step.attention.plan(batch, self.model.attention_keys, self.kv.scratch_blocks)
        self.staging.begin()
        if batch.token_ids.is_cpu:
            step.tokens.copy_(self.staging.put(_padded(batch.token_ids, b)), non_blocking=True)
        else:  # the last step's draws; padding rows keep earlier ids, which are valid and touch only scratch
            step.tokens[:n].copy_(batch.token_ids)
        step.positions.copy_(self.staging.put(_padded(batch.positions, b)), non_blocking=True)
        self.staging.end()
        step.graph.replay()
        return step.logits[:n]

    def _capture(self, b: int) -> _Captured:
        from kernels.attention import SinkAttention
        from kernels.decode_attention import DecodeAttention
        from services.worker.model.cuda_moe import captured_step

        m = self.model
        c = m.config
        dev = m.device
        shape = (c.num_attention_heads, c.num_key_value_heads, c.head_dim, self.kv.block_size, m.dtype, dev)
        if m.decode_attention is not None:
            widths = {g: self.xqa_width for g in self.max_pages}
            # the eager instance's kernel (chosen when the model loaded), so graphs run what eager steps run
            attention = DecodeAttention(*shape, graph_rows=b, widths=widths, buffers=self.workspaces,
                                        split=m.decode_attention.split)
        else:
            attention = SinkAttention(*shape, graph_batch=b, max_pages=self.max_pages, workspaces=self.workspaces)
        # plan a step of padding rows only: capture needs valid metadata, not real sequences
        empty = ForwardBatch(token_ids=torch.zeros(0, dtype=torch.long), positions=torch.zeros(0, dtype=torch.long),
                             query_lens=[], context_lens=[], block_tables={g: [] for g in GROUPS})
        attention.plan(empty, m.attention_keys, self.kv.scratch_blocks)
        tokens = torch.zeros(b, dtype=torch.long, device=dev)
        positions = torch.zeros(b, dtype=torch.long, device=dev)
        # one eager run first on a side stream: compiles kernels and makes lazy handles outside the capture
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), captured_step():
            m.decode_logits(tokens, positions, attention, self.kv)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), captured_step():
            logits = m.decode_logits(tokens, positions, attention, self.kv)
        step = _Captured(graph, attention, tokens, positions, logits)
        self.captured[b] = step
        return step


def step_pages(batch: ForwardBatch, group: str, block_size: int) -> int:
    """Pages a step's sequences list in one group, as page_metadata lists them (a sliding
    table's leading NO_BLOCKs, blocks out of every window, are not listed)."""
    total = 0
    for table, ctx in zip(batch.block_tables[group], batch.context_lens):
        n = (ctx + block_size - 1) // block_size
        total += n - (table[:n].count(NO_BLOCK) if table and table[0] == NO_BLOCK else 0)
    return total


def _padded(values: torch.Tensor, size: int) -> torch.Tensor:
    """values [n] int64 (CPU) followed by zeros up to size."""
    out = torch.zeros(size, dtype=torch.long)
    out[: values.numel()] = values
    return out
