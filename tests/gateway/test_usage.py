"""Usage capture: a verified receipt writes the completion record and the outbox row together (base-model
requests included, under the zero adapter id); anything else writes the completion record only, saying why."""

from __future__ import annotations

import time

import pytest
from sqlmodel import Session, select

from gateway.models import CompletionRecord, RequestStatus
from gateway.usage import RequestEnd, UsageRecorder
from ledger.models import UsageRecord
from ledger.types import BASE_MODEL_ADAPTER_ID
from node.keys import Identity
from node.receipts import check_receipt, make_receipt, sign_receipt
from tests.utils.gateway import make_db

ADAPTER = "0x" + "aa" * 32


@pytest.fixture
def setup(tmp_path):
    engine = make_db(tmp_path / "u.db")
    ident = Identity.generate()
    keys = {ident.node_id: ident.node_public_key}
    return engine, ident, UsageRecorder(engine, keys.get)


def end_for(ident, *, rid=None, adapter=ADAPTER, completion=4, reason="stop", sign_with=None, **kw) -> RequestEnd:
    rid = rid or "0x" + f"{int(time.time_ns()):064x}"
    now = int(time.time() * 1000)
    r = make_receipt(request_id=rid, adapter_id=adapter, node_id=ident.node_id, prompt_tokens=3,
                     completion_tokens=completion, finish_reason=reason, started_at=now, finished_at=now)
    sig = sign_receipt(r, ident.node_key) if sign_with is None else sign_with
    base = dict(request_id=rid, model="acme/a", adapter_id=adapter, node_id=ident.node_id, status=RequestStatus.OK,
                finish_reason=reason, receipt=r, signature=sig, completion_tokens=completion, key_id=7)
    return RequestEnd(**(base | kw))


def rows(engine):
    with Session(engine) as s:
        return s.exec(select(CompletionRecord)).all(), s.exec(select(UsageRecord)).all()


def test_verified_receipt_writes_both(setup):
    engine, ident, rec = setup
    end = end_for(ident)
    assert rec.record(end) == "recorded"
    done, usage = rows(engine)
    assert [d.request_id for d in done] == [u.request_id for u in usage] == [end.request_id]
    u = usage[0]
    assert (u.adapter_id, u.node_id, u.prompt_tokens, u.completion_tokens, u.gateway_key_id) == \
        (ADAPTER, ident.node_id, 3, 4, 7)
    import json

    check_receipt(json.loads(u.receipt_json), u.node_signature, ident.node_public_key)
    assert done[0].status == "ok"


def test_bad_signature_is_not_in_outbox(setup):
    engine, ident, rec = setup
    other = Identity.generate()
    end = end_for(ident)
    end.signature = sign_receipt(end.receipt | {"node_id": other.node_id}, other.node_key)
    assert rec.record(end) == "unreceipted"
    done, usage = rows(engine)
    assert usage == [] and done[0].status == RequestStatus.UNRECEIPTED and "receipt refused" in done[0].error


def test_receipt_for_another_request_refused(setup):
    engine, ident, rec = setup
    end = end_for(ident)
    end.request_id = "0x" + "01" * 32
    assert rec.record(end) == "unreceipted"
    assert "request_id" in rows(engine)[0][0].error


def test_unknown_node_key(setup):
    engine, _, rec = setup
    stranger = Identity.generate()
    assert rec.record(end_for(stranger)) == "unreceipted"
    assert "no public key" in rows(engine)[0][0].error


def test_tokens_without_receipt_are_recorded_as_such(setup):
    engine, ident, rec = setup
    end = end_for(ident, status=RequestStatus.NODE_FAILED)
    end.receipt = end.signature = None
    assert rec.record(end) == "unreceipted"
    done, usage = rows(engine)
    assert usage == [] and done[0].status == RequestStatus.NODE_FAILED and done[0].completion_tokens == 4


def test_base_model_request_is_in_the_outbox_under_the_zero_adapter_id(setup):
    import json

    engine, ident, rec = setup
    end = end_for(ident, adapter=None)
    assert rec.record(end) == "recorded"
    done, usage = rows(engine)
    assert [d.request_id for d in done] == [u.request_id for u in usage] == [end.request_id]
    assert done[0].adapter_id is None  # the gateway's own record says "no adapter"
    u = usage[0]
    assert (u.adapter_id, u.node_id, u.prompt_tokens, u.completion_tokens) == \
        (BASE_MODEL_ADAPTER_ID, ident.node_id, 3, 4)
    receipt = json.loads(u.receipt_json)  # the node signed "no adapter" for exactly this request
    assert receipt["adapter_id"] is None and receipt["request_id"] == end.request_id
    check_receipt(receipt, u.node_signature, ident.node_public_key)


def test_base_and_adapter_receipts_are_not_interchangeable(setup):
    engine, ident, rec = setup
    claims_adapter = end_for(ident)  # receipt names an adapter, the request was for the base model
    claims_adapter.adapter_id = None
    assert rec.record(claims_adapter) == "unreceipted"
    claims_base = end_for(ident, adapter=None)  # receipt says base model, the request named an adapter
    claims_base.adapter_id = ADAPTER
    assert rec.record(claims_base) == "unreceipted"
    done, usage = rows(engine)
    assert usage == [] and all("adapter_id" in d.error for d in done)


def test_same_request_twice_fails_loudly(setup):
    from gateway.usage import UsageError

    engine, ident, rec = setup
    end = end_for(ident)
    rec.record(end)
    with pytest.raises(UsageError, match="could not record"):
        rec.record(end_for(ident, rid=end.request_id))
    assert len(rows(engine)[1]) == 1


def test_concurrent_records_all_land(setup):
    from concurrent.futures import ThreadPoolExecutor

    engine, ident, rec = setup
    ends = [end_for(ident, rid="0x" + f"{i + 1:064x}") for i in range(32)]
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(rec.record, ends)) == {"recorded"}
    done, usage = rows(engine)
    assert {d.request_id for d in done} == {u.request_id for u in usage} == {e.request_id for e in ends}
