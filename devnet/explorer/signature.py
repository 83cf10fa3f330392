"""Check a record's node receipt: its fields match the record and its Ed25519 signature verifies.

What is billed is the gateway's own count (it tokenized the prompt and relayed every token); the
receipt's counts are kept beside it (node_prompt_tokens / node_completion_tokens) and are what the
signature covers, so the receipt is compared with those. A record without a receipt (the node died
mid-stream; billed at the gateway's count) has no signature to check.

The outbox row holds the receipt and signature but not the node's public key. A node's libp2p
identity is its node key (node/p2p/host.py builds the host from the node seed), and an Ed25519
peer id embeds the public key, so the peer id registered on chain yields the key; it counts only
when sha256(key) is the record's node id. Without such a key the signature is shown unchecked.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.wire import UntrustedJSONError, parse_json, sha256_hex
from ledger.models import UsageRecord
from ledger.types import BASE_MODEL_ADAPTER_ID
from node.receipts import ReceiptError, check_receipt, receipt_for_record

B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
# identity multihash (0x00, 36 bytes) of the protobuf PublicKey {Type: Ed25519 (1), Data: 32 bytes}
ED25519_PEER_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])
# A receipt is a handful of ids and counts (a few hundred bytes); whatever a node sent is kept in the
# database as it came, so it is parsed here as a stranger's bytes.
MAX_RECEIPT_BYTES = 16 * 1024
VERIFIED, NOT_VERIFIED, UNCHECKED, NO_RECEIPT = "verified", "not-verified", "unchecked", "no-receipt"


def b58decode(text: str) -> bytes | None:
    """Bitcoin-alphabet base58 (libp2p peer ids); None for a character outside the alphabet."""
    n = 0
    for c in text:
        i = B58.find(c)
        if i < 0:
            return None
        n = n * 58 + i
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * (len(text) - len(text.lstrip("1"))) + body


def public_key_from_peer_id(peer_id: str | None) -> bytes | None:
    """The raw Ed25519 public key embedded in a base58 peer id ("12D3KooW..."), else None."""
    raw = b58decode(peer_id) if peer_id else None
    if raw is None or len(raw) != 38 or not raw.startswith(ED25519_PEER_PREFIX):
        return None
    return raw[len(ED25519_PEER_PREFIX) :]


@dataclass(slots=True)
class SignatureCheck:
    """state: verified | not-verified | unchecked (no public key whose hash is the node id) | no-receipt."""

    state: str
    reason: str
    signature: str
    receipt: dict | None = None
    public_key: str | None = None

    @property
    def label(self) -> str:
        return {VERIFIED: "verified", NOT_VERIFIED: "NOT verified", NO_RECEIPT: "no receipt"}.get(
            self.state, "not checkable"
        )


def check_record_signature(row: UsageRecord, peer_id: str | None) -> SignatureCheck:
    """Check the row's receipt against the row, then its signature with the key from `peer_id`."""
    sig = row.node_signature
    if row.receipt_json is None or sig is None:
        return SignatureCheck(
            NO_RECEIPT, "the node sent no receipt (it failed mid-stream); billed at the gateway's own count", sig or ""
        )
    try:
        receipt = parse_json(row.receipt_json, max_bytes=MAX_RECEIPT_BYTES, max_depth=8, what="the stored receipt")
    except UntrustedJSONError as e:
        return SignatureCheck(NOT_VERIFIED, str(e), sig)  # "the stored receipt is not valid JSON: ..."
    if not isinstance(receipt, dict):
        return SignatureCheck(NOT_VERIFIED, "the stored receipt is not a JSON object", sig)
    shown = receipt_for_record(receipt, row.request_id) or receipt  # an ensemble's record: its share of it
    for name in ("request_id", "adapter_id", "node_id", "prompt_tokens", "completion_tokens"):
        want = getattr(row, name)
        if name.endswith("_tokens") and getattr(row, "node_" + name) is not None:
            want = getattr(row, "node_" + name)  # the receipt's own count, kept beside the billed one
        if name == "adapter_id" and want == BASE_MODEL_ADAPTER_ID:
            want = None  # a base-model record: the node's receipt says "no adapter" (null)
        if shown.get(name) != want:
            return SignatureCheck(
                NOT_VERIFIED, f"the receipt says {name} = {shown.get(name)!r}, the record says {want!r}", sig, receipt
            )
    for name in ("prompt_tokens", "completion_tokens"):
        billed, claimed = getattr(row, name), shown.get(name)
        if isinstance(claimed, int) and billed > claimed:  # the gateway never relays more than the node made
            return SignatureCheck(
                NOT_VERIFIED,
                f"the record bills {billed} {name.replace('_', ' ')}, more than the "
                f"node's signed receipt claims ({claimed})",
                sig,
                receipt,
            )
    key = public_key_from_peer_id(peer_id)
    if key is None or sha256_hex(key) != row.node_id:
        if peer_id is None:
            why = "the node is not registered on chain"
        elif not peer_id:
            why = "the node registered no peer id"
        else:
            why = f"its registered peer id {peer_id} does not embed a key whose sha256 is the node id"
        return SignatureCheck(UNCHECKED, f"not checkable without the node key ({why})", sig, receipt)
    try:
        check_receipt(receipt, sig, key)
    except ReceiptError as e:
        return SignatureCheck(NOT_VERIFIED, str(e), sig, receipt, key.hex())
    return SignatureCheck(
        VERIFIED,
        "Ed25519 signature of the node key (from its on-chain peer id) over the receipt's canonical JSON",
        sig,
        receipt,
        key.hex(),
    )
