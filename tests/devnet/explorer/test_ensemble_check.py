"""The explorer checks an ensemble's component records against the request's one signed receipt: each
record's derived id, its adapter and its share of the node's counts."""

import json
import time

from common.identity import Identity
from devnet.explorer.signature import NOT_VERIFIED, VERIFIED, check_record_signature
from ledger.models import UsageRecord
from ledger.outbox import ensemble_usage
from node.adapters.ensemble import ensemble_key
from node.receipts import make_receipt, receipt_for_record, sign_receipt
from tests.devnet.explorer.scenario import peer_id_of
from tests.utils.chain import rand_id


def _rows(ident: Identity):
    parts = [(rand_id(), 0.7), (rand_id(), 0.3)]
    now = int(time.time() * 1000)
    receipt = make_receipt(
        request_id=rand_id(),
        adapter_id=ensemble_key(parts),
        node_id=ident.node_id,
        prompt_tokens=11,
        completion_tokens=9,
        finish_reason="length",
        started_at=now,
        finished_at=now + 5,
        ensemble=parts,
    )
    sig = sign_receipt(receipt, ident.node_key)
    usage = dict(
        request_id=receipt["request_id"],
        adapter_id=receipt["adapter_id"],
        node_id=ident.node_id,
        prompt_tokens=11,
        completion_tokens=9,
        node_prompt_tokens=11,
        node_completion_tokens=9,
        receipt_json=json.dumps(receipt),
        node_signature=sig,
    )
    return receipt, [UsageRecord(**u) for u in ensemble_usage(usage, parts)]


def test_every_component_record_verifies_against_the_one_receipt():
    ident = Identity.generate()
    receipt, rows = _rows(ident)
    assert [(r.prompt_tokens, r.completion_tokens) for r in rows] == [(8, 6), (3, 3)]
    for r in rows:
        check = check_record_signature(r, peer_id_of(ident))
        assert check.state == VERIFIED, check.reason
    assert receipt_for_record(receipt, rand_id()) is None


def test_a_component_record_claiming_another_share_is_not_verified():
    ident = Identity.generate()
    _, (first, second) = _rows(ident)
    first.adapter_id = second.adapter_id  # billed to the other adapter
    assert check_record_signature(first, peer_id_of(ident)).state == NOT_VERIFIED
    _, (first, _) = _rows(ident)
    first.node_completion_tokens = first.completion_tokens = 7  # more than its share of the receipt
    check = check_record_signature(first, peer_id_of(ident))
    assert check.state == NOT_VERIFIED and "completion_tokens" in check.reason
