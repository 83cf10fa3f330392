"""Unit tests of the explorer's pieces that need no chain: receipt signatures, peer ids, proofs that
cannot start, plots, config."""

import json
import time

import pytest
from libp2p.peer.id import ID

from common.identity import Identity
from devnet.explorer import ExplorerConfig
from devnet.explorer.plots import Point, nice_ticks, step_chart
from devnet.explorer.proof import check_record_proof
from devnet.explorer.signature import (
    NO_RECEIPT,
    NOT_VERIFIED,
    UNCHECKED,
    VERIFIED,
    b58decode,
    check_record_signature,
    public_key_from_peer_id,
)
from ledger.models import UsageRecord
from node.receipts import make_receipt, sign_receipt
from tests.devnet.explorer.scenario import peer_id_of
from tests.utils.chain import rand_id


def signed_row(identity: Identity, **overrides) -> UsageRecord:
    now = int(time.time() * 1000)
    receipt = make_receipt(
        request_id=rand_id(),
        adapter_id=rand_id(),
        node_id=identity.node_id,
        prompt_tokens=11,
        completion_tokens=4,
        finish_reason="stop",
        started_at=now,
        finished_at=now + 5,
    )
    row = UsageRecord(
        request_id=receipt["request_id"],
        adapter_id=receipt["adapter_id"],
        node_id=identity.node_id,
        prompt_tokens=11,
        completion_tokens=4,
        receipt_json=json.dumps(receipt),
        node_signature=sign_receipt(receipt, identity.node_key),
    )
    for k, v in overrides.items():
        setattr(row, k, v)
    return row


def test_peer_id_yields_the_node_key():
    ident = Identity.generate()
    pid = peer_id_of(ident)
    assert b58decode(pid) == ID.from_base58(pid).to_bytes()
    assert public_key_from_peer_id(pid) == ident.node_public_key
    assert public_key_from_peer_id("12D3KooWtest") is None  # not a full peer id
    assert public_key_from_peer_id("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N") is None  # sha256 (RSA) peer id
    assert public_key_from_peer_id("not base58 0OIl") is None
    assert public_key_from_peer_id(None) is None
    assert b58decode("1112") == b"\0\0\0\x01"


def test_signature_verified_with_key_from_peer_id():
    ident = Identity.generate()
    check = check_record_signature(signed_row(ident), peer_id_of(ident))
    assert check.state == VERIFIED and check.label == "verified"
    assert check.public_key == ident.node_public_key.hex()


def test_base_model_record_signature_verified_against_a_null_adapter_receipt():
    ident = Identity.generate()
    now = int(time.time() * 1000)
    receipt = make_receipt(
        request_id=rand_id(),
        adapter_id=None,
        node_id=ident.node_id,
        prompt_tokens=5,
        completion_tokens=2,
        finish_reason="stop",
        started_at=now,
        finished_at=now,
    )
    row = UsageRecord(
        request_id=receipt["request_id"],
        adapter_id="0x" + "00" * 32,
        node_id=ident.node_id,
        prompt_tokens=5,
        completion_tokens=2,
        receipt_json=json.dumps(receipt),
        node_signature=sign_receipt(receipt, ident.node_key),
    )
    assert check_record_signature(row, peer_id_of(ident)).state == VERIFIED
    row.adapter_id = rand_id()  # a receipt for the base model does not vouch for an adapter record
    check = check_record_signature(row, peer_id_of(ident))
    assert check.state == NOT_VERIFIED and "adapter_id" in check.reason


def test_signature_of_another_key_is_not_verified():
    ident, other = Identity.generate(), Identity.generate()
    row = signed_row(ident)
    receipt = json.loads(row.receipt_json)
    row.node_signature = other.node_key.sign(json.dumps(receipt, sort_keys=True, separators=(",", ":")).encode()).hex()
    check = check_record_signature(row, peer_id_of(ident))
    assert check.state == NOT_VERIFIED and check.label == "NOT verified" and "does not verify" in check.reason


def test_receipt_disagreeing_with_record_is_not_verified():
    ident = Identity.generate()
    check = check_record_signature(signed_row(ident, prompt_tokens=12), peer_id_of(ident))
    assert check.state == NOT_VERIFIED
    assert check.reason == "the receipt says prompt_tokens = 11, the record says 12"


def test_receipt_that_is_not_json_is_not_verified():
    ident = Identity.generate()
    assert check_record_signature(signed_row(ident, receipt_json="{oops"), peer_id_of(ident)).reason.startswith(
        "the stored receipt is not valid JSON"
    )
    deep = check_record_signature(signed_row(ident, receipt_json="[" * 10_000), peer_id_of(ident))
    assert deep.state == NOT_VERIFIED and deep.reason == "the stored receipt is nested deeper than 8 levels"
    assert check_record_signature(signed_row(ident, receipt_json="[1]"), peer_id_of(ident)).state == NOT_VERIFIED


def test_signature_without_a_matching_key_is_unchecked():
    ident = Identity.generate()
    row = signed_row(ident)
    for peer_id, why in (
        (None, "not registered"),
        ("", "no peer id"),
        ("12D3KooWtest", "does not embed"),
        (peer_id_of(Identity.generate()), "does not embed"),
    ):  # another node's key
        check = check_record_signature(row, peer_id)
        assert check.state == UNCHECKED and check.label == "not checkable"
        assert check.reason.startswith("not checkable without the node key") and why in check.reason


def test_proof_of_unsettled_record_is_pending():
    row = signed_row(Identity.generate())
    check = check_record_proof(None, row, [], None)
    assert check.pending and not check.verified and "not in a batch yet" in check.reason
    row.batch_id, row.leaf_index, row.status = rand_id(), 0, "submitted"
    check = check_record_proof(None, row, [row], None)
    assert check.pending and "not settled on chain yet" in check.reason


def test_proof_with_missing_leaves_in_database_is_not_verified():
    row = signed_row(Identity.generate(), batch_id=rand_id(), leaf_index=1, status="settled")
    check = check_record_proof(None, row, [row], rand_id())
    assert not check.verified and not check.pending and "expected 0..n-1" in check.reason


def test_nice_ticks_cover_the_range():
    assert nice_ticks(0, 243) == [0, 50, 100, 150, 200, 250]
    assert nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    ticks = nice_ticks(0, 0.000194)
    assert ticks[0] == 0 and ticks[-1] >= 0.000194 and len(ticks) <= 7


def test_step_chart_draws_each_series_and_escapes_names():
    svg = step_chart({"a<b>": [Point(10, 5), Point(12, 9)], "c": [Point(11, 3)]}, title="t", y_label="y", chart_id="p")
    assert svg.startswith('<svg id="p"') and svg.endswith("</svg>")
    assert svg.count('class="series"') == 2 and "a&lt;b&gt;" in svg and "<b>" not in svg
    assert svg.count("<circle") == 3


def test_step_chart_without_data_says_so():
    assert "no settled batches yet" in step_chart({}, title="t", y_label="y", chart_id="p")


def test_config_wants_a_database_url(tmp_path):
    with pytest.raises(ValueError, match="not a database URL"):
        ExplorerConfig(deployment=tmp_path / "d.json", db_url="loramesh.db")


def test_record_billed_below_the_receipt_verifies_against_the_receipts_own_counts():
    ident = Identity.generate()
    # the gateway relayed 3 of the 4 tokens the node made (an abort in flight): billed 3, receipt 4
    row = signed_row(ident, completion_tokens=3, node_prompt_tokens=11, node_completion_tokens=4)
    assert check_record_signature(row, peer_id_of(ident)).state == VERIFIED


def test_record_billing_more_than_the_receipt_is_not_verified():
    ident = Identity.generate()
    row = signed_row(ident, completion_tokens=40, node_prompt_tokens=11, node_completion_tokens=4)
    check = check_record_signature(row, peer_id_of(ident))
    assert check.state == NOT_VERIFIED and "more than the node's signed receipt claims (4)" in check.reason


def test_record_without_receipt_says_so():
    ident = Identity.generate()
    check = check_record_signature(signed_row(ident, receipt_json=None, node_signature=None), peer_id_of(ident))
    assert check.state == NO_RECEIPT and check.label == "no receipt" and "gateway's own count" in check.reason


# ---- property-based: a stored receipt and signature are a node's bytes, whatever they hold ------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
_RECEIPT_KEYS = ("request_id", "adapter_id", "node_id", "prompt_tokens", "completion_tokens", "finish_reason")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    receipt_json=st.one_of(
        st.text(max_size=300),
        _JSON.map(json.dumps),
        st.dictionaries(st.sampled_from(_RECEIPT_KEYS), _JSON, max_size=6).map(json.dumps),
        st.integers(1, 40).map(lambda n: "[" * n + "]" * n),
        st.integers(1, 20_000).map(lambda n: "[" * n),
    ),
    signature=st.text(max_size=140),
    peer_id=st.none() | st.text(max_size=60),
)
def test_any_stored_receipt_is_checked_never_raises(receipt_json, signature, peer_id):
    ident = _FUZZ_IDENTITY
    check = check_record_signature(signed_row(ident, receipt_json=receipt_json, node_signature=signature), peer_id)
    assert check.state in (NOT_VERIFIED, UNCHECKED, VERIFIED, NO_RECEIPT) and check.reason
    assert check.state != VERIFIED  # nothing here was signed by the node key
    assert "\n" not in check.reason


_FUZZ_IDENTITY = Identity.generate()
