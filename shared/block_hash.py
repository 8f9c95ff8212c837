"""Chained hashes of full KV blocks: the key of the prefix cache on workers and in Redis.

hash(block i) = H(hash(block i-1), tokens of block i), so equal hashes mean equal
whole prefixes. Stable across processes and machines (blake2b, not Python's hash),
and 63 bits so it fits a msgpack/Redis signed integer.
"""

from __future__ import annotations

import hashlib
import struct

ROOT_HASH = 0


def block_hash(token_ids: list[int], parent: int = ROOT_HASH) -> int:
    """Hash of one full block given its parent block's hash."""
    digest = hashlib.blake2b(struct.pack(f"<q{len(token_ids)}I", parent, *token_ids), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def prefix_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """Chained hashes of every full block of token_ids, in order."""
    hashes, parent = [], ROOT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_hash(token_ids[start : start + block_size], parent)
        hashes.append(parent)
    return hashes
