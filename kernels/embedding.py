"""Embedding lookup: out[t] = table[ids[t]], through the dispatch module's row gather kernel."""

import torch

from kernels.moe_dispatch import gather_rows


def embedding_reference(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Plain torch. table: [V, H]; ids: [T] -> [T, H]."""
    return table[ids.long()]


def embedding(table: torch.Tensor, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """CuTeDSL gather of table rows: [V, H] bf16, ids [T] int -> [T, H]."""
    return gather_rows(table, ids, out)
