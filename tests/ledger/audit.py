"""Exactly-once checks read straight from the chain (raw JSON-RPC, no decoding of ours: the RecordsSettled
payload is sliced here by hand): how many times each request id was settled, and the receipt of every
transaction sent to the ledger.
Shared by the multi-settler tests and bench/settle_soak.py."""

from __future__ import annotations

import signal
import subprocess
from collections import Counter
from dataclasses import dataclass

from eth_utils import keccak

RECORDS_SETTLED_TOPIC = (
    "0x" + keccak(text="RecordsSettled(bytes32,address,uint64,bytes32[],bytes32[],uint256[],bytes)").hex()
)
RECORD_BYTES = 42


def _rpc(w3, method: str, params: list):
    resp = w3.provider.make_request(method, params)
    if resp.get("error"):
        raise RuntimeError(f"{method}: {resp['error']}")
    return resp["result"]


def record_settled_counts(w3, ledger: str, from_block: int, to_block: int | None = None) -> Counter:
    """request id ("0x"+64 hex) -> number of times it was settled, from eth_getLogs of RecordsSettled (one
    log per batch; its data's fifth head word points at the packed records, 42 bytes each, request id
    first)."""
    to_block = int(_rpc(w3, "eth_blockNumber", []), 16) if to_block is None else to_block
    counts: Counter = Counter()
    step = 2_000
    for start in range(from_block, to_block + 1, step):
        logs = _rpc(
            w3,
            "eth_getLogs",
            [
                {
                    "address": ledger,
                    "topics": [RECORDS_SETTLED_TOPIC],
                    "fromBlock": hex(start),
                    "toBlock": hex(min(start + step - 1, to_block)),
                }
            ],
        )
        for log in logs:
            data = bytes.fromhex(log["data"][2:])
            at = int.from_bytes(data[4 * 32 : 5 * 32], "big")
            size = int.from_bytes(data[at : at + 32], "big")
            packed = data[at + 32 : at + 32 + size]
            for off in range(0, size, RECORD_BYTES):
                counts["0x" + packed[off : off + 32].hex()] += 1
    return counts


@dataclass
class LedgerTx:
    tx_hash: str
    sender: str
    block: int
    status: int
    gas_used: int


def ledger_transactions(w3, ledger: str, from_block: int, senders=None) -> list[LedgerTx]:
    """Every transaction to `ledger` (from `senders` when given) in blocks from_block..latest, with its receipt
    status."""
    want = {s.lower() for s in senders} if senders else None
    latest = int(_rpc(w3, "eth_blockNumber", []), 16)
    out = []
    for n in range(from_block, latest + 1):
        block = _rpc(w3, "eth_getBlockByNumber", [hex(n), True])
        for tx in block["transactions"]:
            if (tx.get("to") or "").lower() != ledger.lower():
                continue
            if want is not None and tx["from"].lower() not in want:
                continue
            rcpt = _rpc(w3, "eth_getTransactionReceipt", [tx["hash"]])
            out.append(LedgerTx(tx["hash"], tx["from"].lower(), n, int(rcpt["status"], 16), int(rcpt["gasUsed"], 16)))
    return out


def stop_settlers(procs: list[subprocess.Popen], timeout: float = 30) -> None:
    """SIGTERM every settler process (they hand their claims back), wait, and kill what is still running."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
