"""Our contracts' events from raw JSON-RPC logs, decoded by slicing their fixed-width hex fields.

The ledger's per-batch events (RewardAccrued, BatchSettled) and the money and settler events have only
static fields: 32-byte words at fixed offsets of `data`, indexed fields in `topics`. Slicing the hex, with
`int(word, 16)` and `bytes.fromhex`, reads one in about 2 us (bench/explorer.py, 2 shared cores,
2026-12-03); eth_abi's decode of the same words takes 11 us called per log, web3's process_log after
formatting the log 220 us. The records come in bulk: one RecordsSettled log per batch carries every record
of the batch packed (ledger.merkle: 42 bytes each, adapter and node as indexes into the log's id tables),
so the log's data is turned into bytes once and each record is a few slices of it. Registry events carry strings,
arrays and structs, are few, and go through web3's own decoding (`Web3Events`), as the gateway's registry
mirror reads them (ledger.registry_events); one that does not decode (a string that is not UTF-8: anyone can
emit one) is left out with a warning.

A log that does not have the shape of its event (wrong number of topics, data of the wrong length) raises
IndexDecodeError: the explorer reads only the two deployed contracts' addresses, so that means the
deployment file names contracts of another build.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from eth_utils import event_abi_to_log_topic, to_checksum_address
from hexbytes import HexBytes

from ledger.errors import LedgerError
from ledger.merkle import RECORD_BYTES
from ledger.types import Role

logger = logging.getLogger(__name__)
WORD = 64  # hex digits in a 32-byte word
ROLES = {int(r): r.name.lower() for r in Role}


class IndexDecodeError(LedgerError):
    """A log of our contracts that does not have its event's shape."""


def topic_map(contracts) -> dict[str, str]:
    """topic0 ("0x" + lowercase hex) -> event name, for every event of the given web3 contracts."""
    out = {}
    for contract in contracts:
        for item in contract.abi:
            if item.get("type") == "event":
                out["0x" + event_abi_to_log_topic(item).hex()] = item["name"]
    return out


def _shape(log: dict, name: str, topics: int, words: int) -> tuple[list[str], str]:
    t, d = log.get("topics") or [], log.get("data") or ""
    if len(t) != topics or len(d) != 2 + words * WORD:
        raise IndexDecodeError(
            f"{name} log in tx {log.get('transactionHash')} has {len(t)} topics and {(len(d) - 2) // 2} data bytes, "
            f"expected {topics} and {words * 32}: is the deployment file of this build of the contracts?"
        )
    return t, d


def address_of(topic: str) -> str:
    """The address in an indexed address topic (its last 20 bytes), checksummed."""
    return to_checksum_address("0x" + topic[-40:])


def word(data: str, i: int) -> str:
    """The i-th 32-byte word of `data` ("0x" + hex) as "0x" + 64 hex digits."""
    return "0x" + data[2 + i * WORD : 2 + (i + 1) * WORD]


def uint(data: str, i: int) -> int:
    return int(data[2 + i * WORD : 2 + (i + 1) * WORD], 16)


@dataclass(slots=True)
class SettledRecord:
    """One record of a RecordsSettled log, as the index stores it: ids as bytes, hex kept for the sums' keys;
    sequence is its number in its settler's sequence."""

    request_id: bytes
    batch_id: bytes
    adapter_hex: str
    node_hex: str
    prompt_tokens: int
    completion_tokens: int
    fee: int
    sequence: int


def _array_at(raw: bytes, head_word: int, what: str, log: dict) -> tuple[int, int]:
    """(start of the items, item count) of the dynamic field whose offset is head word `head_word`."""
    at = int.from_bytes(raw[head_word * 32 : head_word * 32 + 32], "big")
    if at + 32 > len(raw):
        raise IndexDecodeError(f"RecordsSettled in tx {log.get('transactionHash')}: {what} lies past its data")
    return at + 32, int.from_bytes(raw[at : at + 32], "big")


def records_settled(log: dict) -> list[SettledRecord]:
    """RecordsSettled(bytes32 indexed batchId, address indexed settler, uint64 firstSequence,
    bytes32[] adapterIds, bytes32[] nodeIds, uint256[] prices, bytes records): every record of the
    batch in leaf order, each fee = prices[adapter] * tokens / 1000 rounded down, as the ledger charged."""
    t, d = log.get("topics") or [], log.get("data") or ""
    if len(t) != 3 or len(d) < 2 + 5 * WORD:
        raise IndexDecodeError(
            f"RecordsSettled log in tx {log.get('transactionHash')} has {len(t)} topics and {(len(d) - 2) // 2} "
            "data bytes: is the deployment file of this build of the contracts?"
        )
    raw = bytes.fromhex(d[2:])
    first = int.from_bytes(raw[:32], "big")
    a_at, n_adapters = _array_at(raw, 1, "adapterIds", log)
    n_at, n_nodes = _array_at(raw, 2, "nodeIds", log)
    p_at, n_prices = _array_at(raw, 3, "prices", log)
    r_at, size = _array_at(raw, 4, "records", log)
    if n_prices != n_adapters or max(a_at + 32 * n_adapters, n_at + 32 * n_nodes, r_at + size) > len(raw):
        raise IndexDecodeError(f"RecordsSettled in tx {log.get('transactionHash')} does not decode")
    if size % RECORD_BYTES:
        raise IndexDecodeError(f"RecordsSettled in tx {log.get('transactionHash')}: records of {size} bytes")
    adapters = ["0x" + raw[a_at + 32 * i : a_at + 32 * i + 32].hex() for i in range(n_adapters)]
    nodes = ["0x" + raw[n_at + 32 * i : n_at + 32 * i + 32].hex() for i in range(n_nodes)]
    prices = [int.from_bytes(raw[p_at + 32 * i : p_at + 32 * i + 32], "big") for i in range(n_prices)]
    batch = bytes.fromhex(t[1][2:])
    out = []
    for i, off in enumerate(range(r_at, r_at + size, RECORD_BYTES)):
        a, n = raw[off + 32], raw[off + 33]
        if a >= n_adapters or n >= n_nodes:
            raise IndexDecodeError(f"RecordsSettled in tx {log.get('transactionHash')}: record {i} indexes past")
        p = int.from_bytes(raw[off + 34 : off + 38], "big")
        c = int.from_bytes(raw[off + 38 : off + 42], "big")
        out.append(
            SettledRecord(
                raw[off : off + 32], batch, adapters[a], nodes[n], p, c, prices[a] * (p + c) // 1000, first + i
            )
        )
    return out


def batch_settled(log: dict) -> dict:
    """BatchSettled(bytes32 indexed batchId, address indexed settler, bytes32 merkleRoot, uint32 recordCount,
    uint256 totalFees)."""
    t, d = _shape(log, "BatchSettled", 3, 3)
    return {
        "batch_id": t[1].lower(),
        "settler": address_of(t[2]),
        "merkle_root": word(d, 0).lower(),
        "record_count": uint(d, 1),
        "total_fees": uint(d, 2),
    }


def reward_accrued(log: dict) -> dict:
    """RewardAccrued(bytes32 indexed batchId, address indexed account, bytes32 indexed adapterId, Role role,
    bytes32 subjectId, uint256 amount)."""
    t, d = _shape(log, "RewardAccrued", 4, 3)
    role = uint(d, 0)
    if role not in ROLES:
        raise IndexDecodeError(f"RewardAccrued in tx {log.get('transactionHash')} has role {role}, not a Role")
    return {
        "batch_id": t[1].lower(),
        "account": address_of(t[2]),
        "adapter_id": t[3].lower(),
        "role": ROLES[role],
        "subject_id": word(d, 1).lower(),
        "amount": uint(d, 2),
    }


def money(log: dict, name: str) -> tuple[str, str, int]:
    """(kind, account, amount) of Deposited (settler indexed, from indexed, amount), DepositReclaimed (settler
    indexed, amount) or RewardWithdrawn (account indexed, amount)."""
    if name == "Deposited":
        t, d = _shape(log, name, 3, 1)
        return "deposit", address_of(t[1]), uint(d, 0)
    t, d = _shape(log, name, 2, 1)
    return ("reclaim" if name == "DepositReclaimed" else "withdrawal"), address_of(t[1]), uint(d, 0)


def settler_of(log: dict, name: str) -> str:
    """The settler of SettlerGranted / SettlerRevoked (address indexed settler)."""
    t, _ = _shape(log, name, 2, 0)
    return address_of(t[1])


class Web3Events:
    """web3's decoding of our contracts' events, for the few logs that need it: registry events (strings,
    arrays, structs) and a transaction page's receipt."""

    def __init__(self, contracts) -> None:
        self._events = {}
        for contract in contracts:
            for item in contract.abi:
                if item.get("type") == "event":
                    self._events[bytes(event_abi_to_log_topic(item))] = getattr(contract.events, item["name"])()
        self._addresses = {c.address for c in contracts}

    def decode(self, log):
        """The decoded event of a web3-formatted log from one of our contracts, else None."""
        if log["address"] not in self._addresses or not log["topics"]:
            return None
        event = self._events.get(bytes(log["topics"][0]))
        return event.process_log(log) if event is not None else None

    def decode_raw(self, log: dict):
        """The decoded event of a raw JSON-RPC log (hex strings), as web3 would have returned it; None (and a
        warning) for one that does not decode: anyone can emit a registry event whose string is not UTF-8, and
        raising on it stopped the index at that block for good."""
        formatted = {
            "address": to_checksum_address(log["address"]),
            "topics": [HexBytes(t) for t in log["topics"]],
            "data": HexBytes(log["data"]),
            "blockNumber": int(log["blockNumber"], 16),
            "blockHash": HexBytes(log["blockHash"]),
            "transactionHash": HexBytes(log["transactionHash"]),
            "transactionIndex": int(log["transactionIndex"], 16),
            "logIndex": int(log["logIndex"], 16),
        }
        try:
            return self.decode(formatted)
        except Exception as e:  # noqa: BLE001 - web3 raises several kinds for data that does not decode
            logger.warning(
                "log %d of tx %s does not decode (%s); left out",
                formatted["logIndex"],
                log["transactionHash"],
                type(e).__name__,
            )
            return None
