from shared.block_hash import block_hash, prefix_hashes


def test_hashes_chain_over_whole_prefixes():
    a = prefix_hashes(list(range(48)), 16)
    b = prefix_hashes(list(range(32)) + [7] * 16, 16)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    # same block content under a different parent is a different hash
    assert block_hash(list(range(16, 32))) != a[1]
    assert all(0 <= h < 2**63 for h in a)


def test_partial_block_is_not_hashed():
    assert len(prefix_hashes(list(range(47)), 16)) == 2
