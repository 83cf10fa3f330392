"""Settled records on the wire and in Merkle trees, exactly as AttributionLedger reads, hashes and verifies them.

This module is the one place the record formats are defined in Python (tests/contracts holds each equal
to the contract's):
- leaf = keccak256(abi.encode(sequence, requestId, adapterId, nodeId, promptTokens, completionTokens))
  (AttributionLedger.leafOf): six 32-byte words; `sequence` is the record's number in its settler's
  gapless sequence (the batch's firstSequence + its position), so a proof of a leaf proves which
  sequence number paid the request;
- inner = keccak256(min(a, b) ++ max(a, b)) (sorted pairs, so a proof needs no left/right flags); an odd
  node at the end of a level moves up unchanged;
- a packed record (settleBatch's `records`, RecordsSettled's `records`) is RECORD_BYTES = 42 bytes:
  requestId (32), adapter index (1), node index (1) into the batch's adapter table (its entries strictly
  increasing in (adapter id, maxPrices entry): an adapter once per price its records are charged) and its
  strictly increasing node id table, promptTokens (uint32), completionTokens (uint32), big-endian;
- a batch id is the first 28 bytes of keccak256(abi.encode(adapterIds, nodeIds, records, maxPrices)), then a
  4-byte salt (batch_id_of): it names what the batch settles, and the most each adapter of it may cost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from eth_abi import encode as abi_encode
from sha3 import keccak_256

from common.wire import hex0x, id_bytes
from ledger.types import SettleRecord

_WORD = 32
RECORD_BYTES = 42
NO_PRICE_LIMIT = 2**256 - 1  # settleBatch's bound on an adapter's price when the caller priced nothing (tests, tools)
MAX_ADAPTERS_PER_BATCH = 32  # AttributionLedger.MAX_ADAPTERS_PER_BATCH (the base model counts as one)
MAX_NODES_PER_BATCH = 64  # AttributionLedger.MAX_NODES_PER_BATCH
MAX_TOKEN_COUNT = 2**32 - 1  # a packed record's promptTokens and completionTokens are uint32


def keccak(data: bytes) -> bytes:
    """keccak-256 through safe-pysha3's C hash object directly: eth_utils.keccak's checks and backend
    dispatch cost ~5 us a call, most of a batch's tree (see pyproject.toml)."""
    return keccak_256(data).digest()


def encode_leaf(r: SettleRecord, sequence: int) -> bytes:
    """abi.encode(sequence, requestId, adapterId, nodeId, promptTokens, completionTokens): the leaf's
    preimage, written out by hand (web3's generic encoder costs about 0.5 ms a record; the tests hold it
    equal to eth_abi's and to the contract's leafOf)."""
    return _leaf_preimage(r, sequence, bytes.fromhex(r.adapter_id[2:] + r.node_id[2:]))


def _leaf_preimage(r: SettleRecord, sequence: int, adapter_node: bytes) -> bytes:
    # SettleRecord holds its ids normalised ("0x" + 64 lowercase hex), so no to_id per field here;
    # adapter_node is the adapter and node ids as 64 bytes, which a batch's records share
    return (
        sequence.to_bytes(_WORD, "big")
        + bytes.fromhex(r.request_id[2:])
        + adapter_node
        + r.prompt_tokens.to_bytes(_WORD, "big")
        + r.completion_tokens.to_bytes(_WORD, "big")
    )


def leaf_hash(record: SettleRecord, sequence: int) -> bytes:
    """The leaf (32 bytes) of `record` settled with this sequence number, as AttributionLedger.leafOf
    computes it."""
    return keccak(encode_leaf(record, sequence))


def hash_pair(a: bytes, b: bytes) -> bytes:
    """Sorted-pair inner node."""
    return keccak(a + b) if a < b else keccak(b + a)


# What each record of a batch may cost per 1k tokens (settleBatch's maxPrices, by adapter entry): one bound per
# adapter (adapter id, ZERO_ID for the base model -> bound), one per record (in the records' order: records of one
# adapter priced apart, e.g. quotes under a raise's grace, go in entries of their own), or None (no bound,
# NO_PRICE_LIMIT: tests and tools)
MaxPrices: TypeAlias = Mapping[str, int] | Sequence[int] | None


@dataclass(frozen=True, slots=True)
class PackedBatch:
    """A batch's records as settleBatch takes them: the adapter table (adapter_ids, with max_prices beside it:
    an adapter once per bound, entries in increasing (id, bound)), the node table (strictly increasing) and
    the packed records, in the records' order."""

    adapter_ids: tuple[str, ...]
    max_prices: tuple[int, ...]
    node_ids: tuple[str, ...]
    records: bytes


def batch_id_of(packed: PackedBatch, salt: int = 0) -> str:
    """The batch id the ledger takes for these records at these bounds: the first 28 bytes of
    keccak256(abi.encode(adapterIds, nodeIds, records, maxPrices)), then `salt` (uint32, big-endian).

    The id names the content and its prices, not the settler: a batch another settler took over is sent under
    the one id it had, so should both sends land the chain settles it once; and an id taken from the mempool
    settles only those very records at those very bounds (the ledger may charge an adapter below its price,
    down to the bound, during a price's grace: a copy with lower bounds is another batch). The salt tells
    apart a batch re-formed from the very records of an abandoned one (ledger.settler: re-pricing after
    InsufficientDeposit)."""
    content = abi_encode(
        ["bytes32[]", "bytes32[]", "bytes", "uint256[]"],
        [
            [id_bytes(a) for a in packed.adapter_ids],
            [id_bytes(n) for n in packed.node_ids],
            packed.records,
            list(packed.max_prices),
        ],
    )
    return hex0x(keccak(content)[:28] + salt.to_bytes(4, "big"))


def batch_id_for(records: Sequence[SettleRecord], salt: int = 0, max_prices: MaxPrices = None) -> str:
    """batch_id_of the records packed as settleBatch takes them, at these bounds."""
    return batch_id_of(pack_records(records, max_prices), salt)


class BatchTooWide(ValueError):
    """More adapter entries or nodes than one batch may hold."""


def record_bounds(records: Sequence[SettleRecord], max_prices: MaxPrices) -> list[int]:
    """Each record's bound (MaxPrices), in order. KeyError for an adapter a mapping lacks, ValueError for a
    sequence of another length."""
    if max_prices is None:
        return [NO_PRICE_LIMIT] * len(records)
    if isinstance(max_prices, Mapping):
        return [max_prices[r.adapter_id] for r in records]
    if len(max_prices) != len(records):
        raise ValueError(f"{len(max_prices)} bounds for {len(records)} records")
    return list(max_prices)


def pack_records(records: Sequence[SettleRecord], max_prices: MaxPrices = None) -> PackedBatch:
    """Pack records for settleBatch at these bounds (see the module docstring). Raises BatchTooWide past the
    ledger's limits and ValueError for token counts a packed record cannot hold."""
    bounds = record_bounds(records, max_prices)
    entries = sorted({(r.adapter_id, b) for r, b in zip(records, bounds, strict=True)})
    nodes = sorted({r.node_id for r in records})
    if len(entries) > MAX_ADAPTERS_PER_BATCH:
        raise BatchTooWide(f"{len(entries)} adapter entries in one batch, at most {MAX_ADAPTERS_PER_BATCH}")
    if len(nodes) > MAX_NODES_PER_BATCH:
        raise BatchTooWide(f"{len(nodes)} nodes in one batch, at most {MAX_NODES_PER_BATCH}")
    a_index = {e: i for i, e in enumerate(entries)}
    n_index = {n: i for i, n in enumerate(nodes)}
    out = bytearray()
    for r, b in zip(records, bounds, strict=True):
        if r.prompt_tokens > MAX_TOKEN_COUNT or r.completion_tokens > MAX_TOKEN_COUNT:
            raise ValueError(f"record {r.request_id}: token counts above {MAX_TOKEN_COUNT} cannot be settled")
        out += bytes.fromhex(r.request_id[2:])
        out += bytes((a_index[r.adapter_id, b], n_index[r.node_id]))
        out += r.prompt_tokens.to_bytes(4, "big") + r.completion_tokens.to_bytes(4, "big")
    return PackedBatch(tuple(a for a, _ in entries), tuple(b for _, b in entries), tuple(nodes), bytes(out))


def unpack_records(
    adapter_ids: Sequence[bytes | str], node_ids: Sequence[bytes | str], packed: bytes
) -> list[tuple[bytes, bytes, bytes, int, int, int]]:
    """The records of a RecordsSettled log (or settleBatch calldata): (request id, adapter id, node id,
    prompt tokens, completion tokens, adapter index), ids as 32 bytes; the adapter index is the record's entry
    in the adapter table (its price: the log's prices[index]). Raises ValueError on a malformed payload."""
    if len(packed) % RECORD_BYTES:
        raise ValueError(f"packed records are {len(packed)} bytes, not a multiple of {RECORD_BYTES}")
    adapters = [_b(a) for a in adapter_ids]
    nodes = [_b(n) for n in node_ids]
    out = []
    for off in range(0, len(packed), RECORD_BYTES):
        a, n = packed[off + 32], packed[off + 33]
        if a >= len(adapters) or n >= len(nodes):
            raise ValueError(f"packed record {off // RECORD_BYTES} indexes past its batch's id tables")
        out.append(
            (
                packed[off : off + 32],
                adapters[a],
                nodes[n],
                int.from_bytes(packed[off + 34 : off + 38], "big"),
                int.from_bytes(packed[off + 38 : off + 42], "big"),
                a,
            )
        )
    return out


class MerkleTree:
    """All levels of the tree over the given leaves, in order; `.root`, `.proof(i)`."""

    def __init__(self, leaves: Sequence[bytes]) -> None:
        if not leaves:
            raise ValueError("a Merkle tree needs at least one leaf")
        self.levels: list[list[bytes]] = [list(leaves)]
        while len(level := self.levels[-1]) > 1:
            up = [keccak(a + b) if a < b else keccak(b + a) for a, b in zip(level[0::2], level[1::2])]
            if len(level) % 2:
                up.append(level[-1])  # the odd node at the end moves up unchanged
            self.levels.append(up)

    @classmethod
    def from_records(cls, records: Sequence[SettleRecord], first_sequence: int) -> MerkleTree:
        """The tree of a batch whose first record has sequence number `first_sequence`."""
        pairs: dict[tuple[str, str], bytes] = {}  # (adapter, node) -> their 64 bytes: a batch has few
        leaves = []
        for sequence, r in enumerate(records, first_sequence):
            if (adapter_node := pairs.get((r.adapter_id, r.node_id))) is None:
                adapter_node = pairs[r.adapter_id, r.node_id] = bytes.fromhex(r.adapter_id[2:] + r.node_id[2:])
            leaves.append(keccak(_leaf_preimage(r, sequence, adapter_node)))
        return cls(leaves)

    @property
    def root(self) -> bytes:
        return self.levels[-1][0]

    @property
    def root_hex(self) -> str:
        return hex0x(self.root)

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
