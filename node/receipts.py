"""Usage receipts: what a node served for one request, signed with the node's Ed25519 key.

Receipt (all fields required, timestamps unix ms; integers below 2**64):
    {"request_id": "0x..", "adapter_id": "0x.." | null, "node_id": "0x..", "prompt_tokens": int,
     "completion_tokens": int, "finish_reason": "stop"|"length"|"abort", "started_at": int, "finished_at": int}
An ensemble request's receipt adds "ensemble": [[adapter_id, weight], ...] (its components in order), and its
adapter_id is the ensemble's id, the hash of that list (node/adapters/ensemble.py), so the signature covers
every component and weight and a receipt whose list and id disagree is malformed.
signature = hex(Ed25519(canonical_json(receipt))). node_id = sha256(raw public key), so a verifier
holding the public key (from /status or the chain registry) checks it against the receipt's node_id."""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.wire import canonical_json, is_id, node_id_of
from node.adapters.ensemble import check_components, ensemble_key

RECEIPT_FIELDS = (
    "request_id",
    "adapter_id",
    "node_id",
    "prompt_tokens",
    "completion_tokens",
    "finish_reason",
    "started_at",
    "finished_at",
)
ENSEMBLE_FIELD = "ensemble"  # present only on an ensemble request's receipt
FINISH_REASONS = ("stop", "length", "abort")
# counts and timestamps are uint64, as in the outbox and on chain: a receipt with a larger one is malformed
MAX_UINT64 = 2**64 - 1


class ReceiptError(ValueError):
    """A receipt that is malformed or whose signature does not verify."""


def public_key_bytes(node_key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key of a node key."""
    return node_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def check_receipt_fields(receipt: dict) -> None:
    """Raise ReceiptError unless the receipt has exactly the receipt fields with valid values. Anything a
    value makes a check raise is a ReceiptError too: the receipt comes from the node, and an error that
    escaped (10**400 as a weight: OverflowError) left its request open and its node undisputed."""
    try:
        _check_receipt_fields(receipt)
    except ReceiptError:
        raise
    except Exception as e:  # noqa: BLE001 - a value no check expected: malformed, whatever it raised
        raise ReceiptError(f"receipt is malformed ({type(e).__name__})") from None


def _check_receipt_fields(receipt: dict) -> None:
    if not isinstance(receipt, dict) or set(receipt) - {ENSEMBLE_FIELD} != set(RECEIPT_FIELDS):
        got = sorted(receipt) if isinstance(receipt, dict) else type(receipt).__name__
        raise ReceiptError(f"receipt fields are {got}, expected {sorted(RECEIPT_FIELDS)}")
    if ENSEMBLE_FIELD in receipt:
        parts = receipt[ENSEMBLE_FIELD]
        try:
            if not isinstance(parts, list) or not all(isinstance(p, list) and len(p) == 2 for p in parts):
                raise ValueError(f"expected a list of [adapter_id, weight] pairs, got {parts!r:.200}")
            key = ensemble_key([tuple(p) for p in parts])
        except ValueError as e:
            raise ReceiptError(f"receipt ensemble: {e}") from None
        if receipt["adapter_id"] != key:
            raise ReceiptError(f"receipt adapter_id {receipt['adapter_id']!r} is not its ensemble's id {key}")
    for k in ("request_id", "node_id"):
        if not is_id(receipt[k]):
            raise ReceiptError(f"receipt {k} {receipt[k]!r} is not '0x' + 64 lowercase hex")
    if receipt["adapter_id"] is not None and not is_id(receipt["adapter_id"]):
        raise ReceiptError(f"receipt adapter_id {receipt['adapter_id']!r} is not '0x' + 64 lowercase hex or null")
    for k in ("prompt_tokens", "completion_tokens", "started_at", "finished_at"):
        v = receipt[k]
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < MAX_UINT64 + 1:
            raise ReceiptError(f"receipt {k} {v!r} is not a non-negative integer below 2**64")
    if receipt["finish_reason"] not in FINISH_REASONS:
        raise ReceiptError(f"receipt finish_reason {receipt['finish_reason']!r} is not one of {FINISH_REASONS}")
    if receipt["finished_at"] < receipt["started_at"]:
        raise ReceiptError("receipt finished_at is before started_at")


def make_receipt(
    *,
    request_id: str,
    adapter_id: str | None,
    node_id: str,
    prompt_tokens: int,
    completion_tokens: int,
    finish_reason: str,
    started_at: int,
    finished_at: int,
    ensemble: list[tuple[str, float]] | None = None,
) -> dict:
    """A checked receipt dict (with the ensemble's components when the request named several adapters)."""
    receipt = {
        "request_id": request_id,
        "adapter_id": adapter_id,
        "node_id": node_id,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "finish_reason": finish_reason,
        "started_at": started_at,
        "finished_at": finished_at,
    }
    if ensemble is not None:
        receipt[ENSEMBLE_FIELD] = [[aid, w] for aid, w in check_components(ensemble)]
    check_receipt_fields(receipt)
    return receipt


def sign_receipt(receipt: dict, node_key: Ed25519PrivateKey) -> str:
    """Hex Ed25519 signature over the receipt's canonical JSON; the receipt must name this key's node."""
    check_receipt_fields(receipt)
    if receipt["node_id"] != node_id_of(public_key_bytes(node_key)):
        raise ReceiptError(f"receipt node_id {receipt['node_id']} is not this key's node id")
    return node_key.sign(canonical_json(receipt)).hex()


def check_receipt(receipt: dict, signature_hex: str, public_key: bytes) -> None:
    """Raise ReceiptError unless the receipt is well formed, names this key's node, and the signature verifies."""
    check_receipt_fields(receipt)
    try:
        key_node_id = node_id_of(public_key)
    except ValueError as e:
        raise ReceiptError(str(e)) from None
    if receipt["node_id"] != key_node_id:
        raise ReceiptError(f"receipt node_id {receipt['node_id']} does not match the public key ({key_node_id})")
    try:
        sig = bytes.fromhex(signature_hex)
    except (TypeError, ValueError) as e:
        raise ReceiptError(f"signature is not hex: {signature_hex!r}") from e
    if len(sig) != 64:
        raise ReceiptError(f"an Ed25519 signature is 64 bytes, got {len(sig)}")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(sig, canonical_json(receipt))
    except InvalidSignature as e:
        raise ReceiptError(f"receipt signature does not verify for node {receipt['node_id']}") from e


def receipt_for_record(receipt: dict, record_request_id: str) -> dict | None:
    """The receipt's fields as one usage record of its request shows them: the receipt itself, or for an
    ensemble's component record (ledger.outbox.ensemble_usage) its derived id, its adapter and the node's
    counts shared by weight as the gateway shared them; None when the record is none of the request's."""
    from ledger.outbox import component_request_id, split_by_weight

    parts = receipt.get(ENSEMBLE_FIELD) if isinstance(receipt, dict) else None
    if parts is None:
        return receipt if receipt.get("request_id") == record_request_id else None
    try:
        pairs = check_components([tuple(p) for p in parts])
        ids = [component_request_id(receipt["request_id"], i) for i in range(len(pairs))]
        i = ids.index(record_request_id)
        weights = [w for _, w in pairs]
        split = {k: split_by_weight(receipt[k], weights)[i] for k in ("prompt_tokens", "completion_tokens")}
    except (ValueError, TypeError, KeyError):  # ValueError: not one of its ids, or a malformed receipt
        return None
    return receipt | {"request_id": ids[i], "adapter_id": pairs[i][0]} | split


def verify_receipt(receipt: dict, signature_hex: str, public_key: bytes) -> bool:
    """True when check_receipt passes."""
    try:
        check_receipt(receipt, signature_hex, public_key)
    except ReceiptError:
        return False
    return True
