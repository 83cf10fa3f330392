"""Merkle trees of settled records, exactly as AttributionLedger builds and verifies them.

leaf = keccak256(abi.encode(requestId, adapterId, nodeId, promptTokens, completionTokens)) (leafOf);
inner = keccak256(min(a, b) ++ max(a, b)) (sorted pairs, so a proof needs no left/right flags);
an odd node at the end of a level moves up unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

from eth_utils import keccak

from common.wire import id_bytes
from ledger.types import SettleRecord

_WORD = 32


def encode_record(r: SettleRecord) -> bytes:
    """abi.encode(Record): five 32-byte words. It is both the record's settleBatch calldata and its leaf
    preimage. Written out by hand because web3's generic encoder costs about 0.5 ms a record (the tests
    hold it equal to eth_abi's encoding and to the contract's leafOf)."""
    # SettleRecord holds its ids normalised ("0x" + 64 lowercase hex), so no to_id per field here
    return (
        bytes.fromhex(r.request_id[2:])
        + bytes.fromhex(r.adapter_id[2:])
        + bytes.fromhex(r.node_id[2:])
        + r.prompt_tokens.to_bytes(_WORD, "big")
        + r.completion_tokens.to_bytes(_WORD, "big")
    )


def leaf_hash(record: SettleRecord) -> bytes:
    """The record's leaf (32 bytes), as AttributionLedger.leafOf computes it."""
    return keccak(encode_record(record))


def hash_pair(a: bytes, b: bytes) -> bytes:
    """Sorted-pair inner node."""
    return keccak(a + b) if a < b else keccak(b + a)


class MerkleTree:
    """All levels of the tree over the given leaves, in order; `.root`, `.proof(i)`."""

    def __init__(self, leaves: Sequence[bytes]) -> None:
        if not leaves:
            raise ValueError("a Merkle tree needs at least one leaf")
        self.levels: list[list[bytes]] = [list(leaves)]
        while len(level := self.levels[-1]) > 1:
            self.levels.append(
                [hash_pair(level[i], level[i + 1]) if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)]
            )

    @classmethod
    def from_records(cls, records: Sequence[SettleRecord]) -> MerkleTree:
        return cls([leaf_hash(r) for r in records])

    @property
    def root(self) -> bytes:
        return self.levels[-1][0]

    def proof(self, index: int) -> list[bytes]:
        """Sibling hashes from the leaf up (a promoted odd node contributes none)."""
        if not 0 <= index < len(self.levels[0]):
            raise IndexError(f"leaf index {index} out of range 0..{len(self.levels[0]) - 1}")
        out = []
        for level in self.levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                out.append(level[sibling])
            index //= 2
        return out


def verify_proof(leaf: bytes | str, proof: Sequence[bytes | str], root: bytes | str) -> bool:
    """Whether the proof takes the leaf to the root (hex ids or raw bytes accepted)."""
    h = _b(leaf)
    for p in proof:
        h = hash_pair(h, _b(p))
    return h == _b(root)


def _b(v: bytes | str) -> bytes:
    return v if isinstance(v, bytes) else id_bytes(v)
