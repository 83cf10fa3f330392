"""Merkle trees: sorted-pair hashing, odd nodes promoted, proofs for every leaf."""

import pytest
from eth_utils import keccak

from ledger.merkle import MerkleTree, hash_pair, leaf_hash, verify_proof
from ledger.types import SettleRecord


def _leaves(n):
    return [keccak(bytes([i])) for i in range(n)]


def _naive_root(leaves):
    level = list(leaves)
    while len(level) > 1:
        nxt = []
        for i in range(0, len(level), 2):
            if i + 1 < len(level):
                a, b = sorted((level[i], level[i + 1]))
                nxt.append(keccak(a + b))
            else:
                nxt.append(level[i])
        level = nxt
    return level[0]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9, 100])
def test_root_and_every_proof(n):
    leaves = _leaves(n)
    tree = MerkleTree(leaves)
    assert tree.root == _naive_root(leaves)
    for i, leaf in enumerate(leaves):
        assert verify_proof(leaf, tree.proof(i), tree.root)
    if n > 1:
        assert not verify_proof(keccak(b"other"), tree.proof(0), tree.root)
        assert not verify_proof(leaves[0], tree.proof(1), tree.root) or leaves[0] == leaves[1]


def test_hash_pair_is_order_free():
    a, b = keccak(b"a"), keccak(b"b")
    assert hash_pair(a, b) == hash_pair(b, a) == keccak(min(a, b) + max(a, b))


def test_leaf_is_abi_encoded_sequence_and_record():
    r = SettleRecord("0x" + "01" * 32, "0x" + "02" * 32, "0x" + "03" * 32, 5, 7)
    encoded = (
        (9).to_bytes(32, "big")
        + bytes.fromhex("01" * 32 + "02" * 32 + "03" * 32)
        + (5).to_bytes(32, "big")
        + (7).to_bytes(32, "big")
    )
    assert leaf_hash(r, 9) == keccak(encoded)


def test_errors():
    with pytest.raises(ValueError):
        MerkleTree([])
    with pytest.raises(IndexError):
        MerkleTree(_leaves(3)).proof(3)
    with pytest.raises(ValueError):
        SettleRecord("0x01", "0x" + "02" * 32, "0x" + "03" * 32, 1, 1)
    with pytest.raises(ValueError):
        SettleRecord("0x" + "01" * 32, "0x" + "02" * 32, "0x" + "03" * 32, -1, 1)
