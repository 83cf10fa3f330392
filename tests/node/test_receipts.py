"""Usage receipts: signed over canonical JSON, checked against the node id and key."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.wire import canonical_json, node_id_of
from node.receipts import (
    ReceiptError,
    check_receipt,
    make_receipt,
    public_key_bytes,
    sign_receipt,
    verify_receipt,
)

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PUB = public_key_bytes(KEY)


def _receipt(**over):
    r = dict(
        request_id="0x" + "1" * 64,
        adapter_id="0x" + "2" * 64,
        node_id=node_id_of(PUB),
        prompt_tokens=5,
        completion_tokens=7,
        finish_reason="length",
        started_at=1_700_000_000_000,
        finished_at=1_700_000_000_500,
    )
    r.update(over)
    return r


def test_sign_and_verify_round_trip():
    receipt = make_receipt(**_receipt())
    sig = sign_receipt(receipt, KEY)
    assert len(sig) == 128 and verify_receipt(receipt, sig, PUB)
    KEY.public_key().verify(bytes.fromhex(sig), canonical_json(receipt))  # plain Ed25519 over canonical JSON
    base = make_receipt(**_receipt(adapter_id=None))
    assert verify_receipt(base, sign_receipt(base, KEY), PUB)


def test_tampered_receipt_fails():
    receipt = _receipt()
    sig = sign_receipt(receipt, KEY)
    forged = _receipt(completion_tokens=70)
    assert not verify_receipt(forged, sig, PUB)
    with pytest.raises(ReceiptError, match="signature does not verify"):
        check_receipt(forged, sig, PUB)


def test_wrong_public_key_is_caught_by_node_id():
    other = public_key_bytes(Ed25519PrivateKey.generate())
    receipt = _receipt()
    with pytest.raises(ReceiptError, match="does not match the public key"):
        check_receipt(receipt, sign_receipt(receipt, KEY), other)


def test_signing_for_another_node_id_is_refused():
    with pytest.raises(ReceiptError, match="is not this key's node id"):
        sign_receipt(_receipt(node_id="0x" + "3" * 64), KEY)


@pytest.mark.parametrize(
    "over, message",
    [
        ({"finish_reason": "error"}, "finish_reason 'error' is not one of"),
        ({"prompt_tokens": -1}, "prompt_tokens -1 is not a non-negative integer"),
        ({"completion_tokens": True}, "completion_tokens True is not a non-negative integer"),
        ({"request_id": "0x12"}, "request_id '0x12' is not"),
        ({"adapter_id": "abc"}, "adapter_id 'abc' is not"),
        ({"finished_at": 1}, "finished_at is before started_at"),
        ({"extra": 1}, "receipt fields are"),
    ],
)
def test_malformed_receipts_are_refused(over, message):
    with pytest.raises(ReceiptError, match=message):
        make_receipt(**_receipt(**over)) if "extra" not in over else check_receipt(_receipt(**over), "00" * 64, PUB)


def test_bad_signature_encodings_are_refused():
    with pytest.raises(ReceiptError, match="signature is not hex"):
        check_receipt(_receipt(), "zz", PUB)
    with pytest.raises(ReceiptError, match="an Ed25519 signature is 64 bytes, got 2"):
        check_receipt(_receipt(), "abcd", PUB)


@pytest.mark.parametrize("field", ["prompt_tokens", "completion_tokens", "started_at", "finished_at"])
def test_counts_must_fit_in_64_bits(field):
    # the outbox and the ledger hold uint64 counts: a receipt with a larger one is malformed, so a gateway
    # disputes it like any refused receipt (it never reaches the outbox, which would refuse to write it)
    big = {field: 2**64} | ({"finished_at": 2**64} if field == "started_at" else {})
    with pytest.raises(ReceiptError, match="below 2\\*\\*64"):
        make_receipt(**_receipt(**big))
    receipt = _receipt(**{field: 2**64 - 1} | ({"finished_at": 2**64 - 1} if field == "started_at" else {}))
    sig = KEY.sign(canonical_json(receipt)).hex()
    check_receipt(receipt, sig, PUB)
    too_big = _receipt(**big)
    with pytest.raises(ReceiptError, match="below 2\\*\\*64"):
        check_receipt(too_big, KEY.sign(canonical_json(too_big)).hex(), PUB)
