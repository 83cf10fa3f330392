"""Usage capture: the gateway's own counts are billed; the node's verified receipt goes beside them when it
is within the tolerance, and anything else is kept as DISPUTED (never settled), saying why. The completion
record and the outbox row are written together; a request is opened before it is dispatched."""

from __future__ import annotations

import json
import time

import pytest
from sqlmodel import Session, select

from common.identity import Identity
from gateway.tables import CompletionRecord, GatewayInstance, RequestStatus
from gateway.usage import RequestEnd, UsageError, UsageRecorder
from ledger.models import RecordStatus, UsageRecord
from ledger.outbox import component_request_id
from ledger.types import BASE_MODEL_ADAPTER_ID
from node.adapters.ensemble import ensemble_key
from node.receipts import check_receipt, make_receipt, sign_receipt
from tests.utils.gateway import make_db
from tests.utils.postgres import postgres  # noqa: F401 - the fixture

ADAPTER = "0x" + "aa" * 32


@pytest.fixture
def setup(tmp_path):
    engine = make_db(tmp_path / "u.db")
    ident = Identity.generate()
    keys = {ident.node_id: ident.node_public_key}
    return engine, ident, UsageRecorder(engine, keys.get, instance_id="me")


def end_for(
    ident,
    *,
    rid=None,
    adapter=ADAPTER,
    completion=4,
    prompt=3,
    claimed=None,
    reason="stop",
    sign_with=None,
    ensemble=None,
    **kw,
) -> RequestEnd:
    """An end where the gateway counted prompt/completion and the node's receipt claims `claimed`; with
    `ensemble` ((adapter id, weight) pairs) the request ran them as one, under the ensemble's id."""
    rid = rid or "0x" + f"{int(time.time_ns()):064x}"
    now = int(time.time() * 1000)
    cp, cc = claimed or (prompt, completion)
    if ensemble is not None:
        adapter = ensemble_key(ensemble)
    r = make_receipt(
        request_id=rid,
        adapter_id=adapter,
        node_id=ident.node_id,
        prompt_tokens=cp,
        completion_tokens=cc,
        finish_reason=reason,
        started_at=now,
        finished_at=now,
        ensemble=ensemble,
    )
    sig = sign_receipt(r, ident.node_key) if sign_with is None else sign_with
    base = dict(
        request_id=rid,
        model="acme/a",
        adapter_id=adapter,
        node_id=ident.node_id,
        status=RequestStatus.OK,
        finish_reason=reason,
        receipt=r,
        signature=sig,
        prompt_tokens=prompt,
        completion_tokens=completion,
        key_id=7,
        max_tokens=16,
    )
    return RequestEnd(**(base | kw))


def rows(engine):
    with Session(engine) as s:
        return s.exec(select(CompletionRecord)).all(), s.exec(select(UsageRecord)).all()


def test_receipt_that_matches_writes_both(setup):
    engine, ident, rec = setup
    end = end_for(ident)
    assert rec.record(end) == "recorded"
    done, usage = rows(engine)
    assert [d.request_id for d in done] == [u.request_id for u in usage] == [end.request_id]
    u = usage[0]
    assert (u.adapter_id, u.node_id, u.prompt_tokens, u.completion_tokens, u.gateway_key_id, u.status) == (
        ADAPTER,
        ident.node_id,
        3,
        4,
        7,
        RecordStatus.PENDING,
    )
    assert (u.node_prompt_tokens, u.node_completion_tokens) == (3, 4)
    check_receipt(json.loads(u.receipt_json), u.node_signature, ident.node_public_key)
    assert done[0].status == "ok" and done[0].error is None


@pytest.mark.parametrize("billed", ["withheld", "unsent"])
def test_an_end_the_outbox_refused_is_judged_and_billed_again_from_the_gateways_counts(setup, monkeypatch, billed):
    """The recorder judges the receipt against the gateway's counts, then makes them what is billed (none of a
    whole answer never sent; less a tool call's text held back from a streaming client that left), on the end
    itself. An end the outbox refused is recorded again as it is (outbox_tick): judged against the billed counts,
    an honest node was disputed (review), and the held text came out twice (re-attack: 85 billed, 29 after a
    retry)."""
    from sqlalchemy.exc import OperationalError

    import gateway.usage

    engine, ident, rec = setup
    real, calls = gateway.usage.add_usage_record, []

    def refused_once(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("INSERT", {}, Exception("database is locked"))
        return real(*a, **kw)

    monkeypatch.setattr(gateway.usage, "add_usage_record", refused_once)
    kw = {"withheld": True} if billed == "withheld" else {"unsent": 2}
    end = end_for(ident, completion=6, claimed=(3, 6), aborted=True, status=RequestStatus.CLIENT_CLOSED, **kw)
    with pytest.raises(UsageError):
        rec.record(end)
    assert rec.record(end) == "recorded", end.disputed  # as outbox_tick records it again
    assert rec.record(end) == "already_closed"
    _, (u,) = rows(engine)
    assert u.status == RecordStatus.PENDING and (u.node_prompt_tokens, u.node_completion_tokens) == (3, 6)
    want = (0, 0) if billed == "withheld" else (3, 4)
    assert (u.prompt_tokens, u.completion_tokens) == (end.prompt_tokens, end.completion_tokens) == want


def test_inflated_receipt_is_disputed_at_the_gateways_count(setup):
    engine, ident, rec = setup
    end = end_for(ident, prompt=5, completion=2, claimed=(5_000_000, 5_000_000))
    assert rec.record(end) == "disputed"
    done, (u,) = rows(engine)
    assert (u.prompt_tokens, u.completion_tokens) == (5, 2)  # billed: what the gateway saw
    assert (u.node_prompt_tokens, u.node_completion_tokens) == (5_000_000, 5_000_000)
    assert u.status == RecordStatus.DISPUTED and "5000000 prompt tokens" in u.error and "5000000 completion" in u.error
    assert "disputed" in done[0].error and end.disputed


@pytest.mark.parametrize(
    "claimed,aborted,result",
    [
        # ended on its own (done read, not aborted): the receipt says exactly what was relayed
        ((3, 4), False, "recorded"),
        ((3, 5), False, "disputed"),
        ((3, 3), False, "disputed"),
        ((4, 4), False, "disputed"),
        # aborted or cut: the node may have made more than the client got, never fewer, never more than
        # the request allows (max_tokens 16); billed either way: the 4 delivered
        ((3, 4), True, "recorded"),
        ((3, 5), True, "recorded"),
        ((3, 16), True, "recorded"),
        ((3, 17), True, "disputed"),
        ((3, 3), True, "disputed"),
        ((4, 5), True, "disputed"),
    ],
)
def test_tolerance(setup, claimed, aborted, result):
    engine, ident, rec = setup
    assert rec.record(end_for(ident, claimed=claimed, aborted=aborted)) == result
    (u,) = rows(engine)[1]
    assert (u.prompt_tokens, u.completion_tokens) == (3, 4)
    assert (u.node_prompt_tokens, u.node_completion_tokens) == claimed


def open_for(rec: UsageRecorder, end: RequestEnd, *, max_tokens: int) -> None:
    """Open `end`'s request as the gateway does before dispatch (key 7, model acme/a, 3 prompt tokens)."""
    rec.open(
        request_id=end.request_id,
        model="acme/a",
        adapter_id=ADAPTER,
        node_id=end.node_id,
        key_id=7,
        prompt_tokens=3,
        max_tokens=max_tokens,
    )


def signed_raw(ident, end: RequestEnd, **counts) -> None:
    """Give `end` a receipt with counts make_receipt refuses, correctly signed all the same."""
    from common.wire import canonical_json

    end.receipt = end.receipt | counts
    end.signature = ident.node_key.sign(canonical_json(end.receipt)).hex()


def test_receipt_count_past_64_bits_is_disputed_and_the_request_closed(setup):
    engine, ident, rec = setup
    end = end_for(ident, aborted=True, status=RequestStatus.CLIENT_CLOSED)
    open_for(rec, end, max_tokens=16)
    signed_raw(ident, end, completion_tokens=2**64)
    assert rec.record(end) == "disputed"
    (done,), (u,) = rows(engine)
    assert done.status == RequestStatus.CLIENT_CLOSED and u.status == RecordStatus.DISPUTED
    assert "receipt refused" in u.error and "2**64" in u.error and u.receipt_json is None
    assert (u.prompt_tokens, u.completion_tokens) == (3, 4)


def test_a_receipt_weight_no_float_holds_is_disputed_and_the_request_closed(setup):
    # float(10**400) raised OverflowError past the receipt check: the close was never written (the request
    # left open, its node undisputed) and reconciliation later billed the node's claim
    engine, ident, rec = setup
    end = end_for(ident, completion=4)
    open_for(rec, end, max_tokens=100)
    signed_raw(ident, end, ensemble=[[ADAPTER, 10**400], ["0x" + "bb" * 32, 1]])
    assert rec.record(end) == "disputed"
    (done,), (u,) = rows(engine)
    assert done.status != RequestStatus.OPEN and u.status == RecordStatus.DISPUTED and "receipt refused" in u.error
    assert (u.prompt_tokens, u.completion_tokens) == (3, 4)


def test_receipt_count_the_database_cannot_hold_is_disputed_and_the_request_closed(setup):
    # below 2**64, so a valid receipt, but past what a SQLite integer holds: the record is kept disputed,
    # the node's claim in its reason, and the request is closed (never left open, never "database down")
    engine, ident, rec = setup
    end = end_for(ident, aborted=True, status=RequestStatus.CLIENT_CLOSED)
    signed_raw(ident, end, completion_tokens=2**63)
    assert rec.record(end) == "disputed"
    (done,), (u,) = rows(engine)
    assert done.status == RequestStatus.CLIENT_CLOSED and u.status == RecordStatus.DISPUTED
    assert str(2**63) in u.error and u.node_completion_tokens is None
    assert (u.prompt_tokens, u.completion_tokens) == (3, 4)


def test_a_request_is_closed_once(setup):
    # a live gateway's own close and a sibling's reconciliation never both write: the second finds the
    # request closed and writes nothing
    engine, ident, rec = setup
    sibling = UsageRecorder(engine, {ident.node_id: ident.node_public_key}.get, instance_id="sibling")
    for first, second in ((rec, sibling), (sibling, rec)):
        rid = "0x" + f"{time.time_ns():064x}"
        rec.open(
            request_id=rid,
            model="acme/a",
            adapter_id=ADAPTER,
            node_id=ident.node_id,
            key_id=7,
            prompt_tokens=3,
            max_tokens=16,
        )
        live = end_for(ident, rid=rid)
        lost = end_for(ident, rid=rid, served=False, status=RequestStatus.LOST, error="its gateway died")
        ends = {rec: live, sibling: lost}
        assert first.record(ends[first]) == ("recorded" if first is rec else "not_served")
        assert second.record(ends[second]) == "already_closed"
        with Session(engine) as s:
            row = s.get(CompletionRecord, rid)
            n = len(s.exec(select(UsageRecord).where(UsageRecord.request_id == rid)).all())
        assert (row.status, n) == ((RequestStatus.OK, 1) if first is rec else (RequestStatus.LOST, 0))


def test_a_request_without_an_open_row_is_still_recorded(setup):
    engine, ident, rec = setup
    assert rec.record(end_for(ident)) == "recorded"
    assert rows(engine)[0][0].status == RequestStatus.OK


def test_bad_signature_is_disputed(setup):
    engine, ident, rec = setup
    other = Identity.generate()
    end = end_for(ident)
    end.signature = sign_receipt(end.receipt | {"node_id": other.node_id}, other.node_key)
    assert rec.record(end) == "disputed"
    done, (u,) = rows(engine)
    assert u.status == RecordStatus.DISPUTED and "receipt refused" in u.error and u.receipt_json is None
    assert (u.prompt_tokens, u.completion_tokens) == (3, 4)


def test_receipt_for_another_request_is_disputed(setup):
    engine, ident, rec = setup
    end = end_for(ident)
    end.request_id = "0x" + "01" * 32
    assert rec.record(end) == "disputed"
    assert "request_id" in rows(engine)[1][0].error


def test_missing_receipt_from_a_node_that_answered_is_disputed(setup):
    engine, ident, rec = setup
    end = end_for(ident)
    end.receipt = end.signature = None
    assert rec.record(end) == "disputed"
    assert "no receipt" in rows(engine)[1][0].error


def test_node_lost_mid_stream_is_billed_at_the_gateways_count(setup):
    engine, ident, rec = setup
    end = end_for(ident, status=RequestStatus.NODE_FAILED, node_lost=True, aborted=True)
    end.receipt = end.signature = None
    assert rec.record(end) == "recorded"
    done, (u,) = rows(engine)
    assert u.status == RecordStatus.PENDING and (u.prompt_tokens, u.completion_tokens) == (3, 4)
    assert u.receipt_json is None and u.node_signature is None and u.node_completion_tokens is None
    assert done[0].status == RequestStatus.NODE_FAILED


def test_reconciled_completion_is_the_receipts_capped_at_max_tokens(setup):
    engine, ident, rec = setup
    ok = end_for(ident, completion=0, claimed=(3, 9), reconciled=True, status=RequestStatus.RECONCILED)
    assert rec.record(ok) == "recorded"
    over = end_for(ident, completion=0, claimed=(3, 40), reconciled=True, status=RequestStatus.RECONCILED)
    assert rec.record(over) == "disputed"
    usage = {u.request_id: u for u in rows(engine)[1]}
    assert usage[ok.request_id].completion_tokens == 9 and usage[ok.request_id].status == RecordStatus.PENDING
    assert usage[over.request_id].completion_tokens == 16 and usage[over.request_id].status == RecordStatus.DISPUTED


def test_not_served_writes_no_usage(setup):
    engine, ident, rec = setup
    end = end_for(ident, served=False, status=RequestStatus.NOT_SERVED, completion=0)
    assert rec.record(end) == "not_served"
    done, usage = rows(engine)
    assert usage == [] and done[0].status == RequestStatus.NOT_SERVED


def test_open_then_close_and_orphans(setup):
    engine, ident, rec = setup
    rec.open(
        request_id="0x" + "0a" * 32,
        model="acme/a",
        adapter_id=ADAPTER,
        node_id=ident.node_id,
        key_id=7,
        prompt_tokens=3,
        max_tokens=16,
    )
    (row,), _ = rows(engine)
    assert (row.status, row.prompt_tokens, row.max_tokens, row.instance_id) == ("open", 3, 16, "me")
    other = UsageRecorder(engine, lambda _: None, instance_id="other")
    other.beat()
    assert [r.request_id for r in other.orphaned(lease_s=60)] == ["0x" + "0a" * 32]  # "me" never wrote: dead
    rec.beat()
    assert other.orphaned(lease_s=60) == []  # mine, and I am alive
    with Session(engine) as s:  # I stopped writing a minute ago
        me = s.get(GatewayInstance, "me")
        me.last_seen = me.last_seen.replace(year=2000)
        s.add(me)
        s.commit()
    assert [r.request_id for r in other.orphaned(lease_s=60)] == ["0x" + "0a" * 32]
    assert rec.record(end_for(ident, rid="0x" + "0a" * 32)) == "recorded"
    (row,), (u,) = rows(engine)
    assert row.status == "ok" and row.max_tokens == 16 and u.request_id == row.request_id
    assert other.orphaned(lease_s=60) == []


def test_base_model_request_is_in_the_outbox_under_the_zero_adapter_id(setup):
    engine, ident, rec = setup
    end = end_for(ident, adapter=None)
    assert rec.record(end) == "recorded"
    done, usage = rows(engine)
    assert done[0].adapter_id is None  # the gateway's own record says "no adapter"
    u = usage[0]
    assert (u.adapter_id, u.node_id, u.prompt_tokens, u.completion_tokens) == (
        BASE_MODEL_ADAPTER_ID,
        ident.node_id,
        3,
        4,
    )
    receipt = json.loads(u.receipt_json)  # the node signed "no adapter" for exactly this request
    assert receipt["adapter_id"] is None and receipt["request_id"] == end.request_id
    check_receipt(receipt, u.node_signature, ident.node_public_key)


def test_base_and_adapter_receipts_are_not_interchangeable(setup):
    engine, ident, rec = setup
    claims_adapter = end_for(ident)  # receipt names an adapter, the request was for the base model
    claims_adapter.adapter_id = None
    assert rec.record(claims_adapter) == "disputed"
    claims_base = end_for(ident, adapter=None)  # receipt says base model, the request named an adapter
    claims_base.adapter_id = ADAPTER
    assert rec.record(claims_base) == "disputed"
    done, usage = rows(engine)
    assert all(u.status == RecordStatus.DISPUTED and "adapter_id" in u.error for u in usage)


def test_same_request_twice_is_written_once(setup):
    engine, ident, rec = setup
    end = end_for(ident)
    rec.record(end)
    assert rec.record(end_for(ident, rid=end.request_id, completion=5, claimed=(3, 5))) == "already_closed"
    (done,), (u,) = rows(engine)
    assert done.completion_tokens == u.completion_tokens == 4


def test_a_refused_write_is_a_usage_error(setup, monkeypatch):
    from sqlalchemy.exc import OperationalError

    import gateway.usage

    engine, ident, rec = setup

    def locked(*a, **kw):
        raise OperationalError("INSERT", {}, Exception("database is locked"))

    monkeypatch.setattr(gateway.usage, "add_usage_record", locked)
    with pytest.raises(UsageError, match="could not record"):
        rec.record(end_for(ident))
    assert rows(engine) == ([], [])


def test_concurrent_records_all_land(setup):
    from concurrent.futures import ThreadPoolExecutor

    engine, ident, rec = setup
    ends = [end_for(ident, rid="0x" + f"{i + 1:064x}") for i in range(32)]
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(rec.record, ends)) == {"recorded"}
    done, usage = rows(engine)
    assert {d.request_id for d in done} == {u.request_id for u in usage} == {e.request_id for e in ends}


def test_disputed_nodes_are_read_back(setup):
    from gateway.disputes import kept_out

    engine, ident, rec = setup
    rec.record(end_for(ident, claimed=(3, 99)))
    assert list(kept_out(engine)) == [ident.node_id]


def test_older_gateway_tables_get_the_new_columns(tmp_path):
    # one migration for every table (ledger.db.init_db, under its lock); the gateway has no copy of its own
    from sqlalchemy import inspect, text

    import gateway.tables
    from ledger.db import init_db, make_engine

    assert not hasattr(gateway.tables, "add_missing_columns")
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    with engine.begin() as c:  # the tables as an older gateway made them
        c.execute(text(OLD_KEY_POLICIES))
        c.execute(text(OLD_REQUESTS))
    init_db(engine)
    init_db(engine)  # idempotent
    cols = {c["name"] for c in inspect(engine).get_columns("gateway_requests")}
    assert {"max_tokens", "instance_id", "reconcile_attempted_at"} <= cols
    assert "max_price_per_1k_tokens" in {c["name"] for c in inspect(engine).get_columns("gateway_key_policies")}


OLD_KEY_POLICIES = "CREATE TABLE gateway_key_policies (key_id INTEGER PRIMARY KEY, tokens_per_minute INTEGER)"
OLD_REQUESTS = (
    "CREATE TABLE gateway_requests (request_id VARCHAR(66) PRIMARY KEY, key_id INTEGER, "
    "model VARCHAR NOT NULL, adapter_id VARCHAR(66), node_id VARCHAR(66), status VARCHAR(16) "
    "NOT NULL, finish_reason VARCHAR, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER "
    "NOT NULL, attempts INTEGER NOT NULL, ttft_ms FLOAT, latency_ms FLOAT, error VARCHAR, "
    "created_at TIMESTAMP NOT NULL, finished_at TIMESTAMP NOT NULL)"
)


def test_gateways_starting_together_on_postgres_all_migrate(postgres):
    # several processes start at once on one older database: they take turns, none fails
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import inspect, text

    import gateway.tables  # noqa: F401 - registers the gateway's tables
    from ledger.db import init_db, make_engine

    url = postgres.new_database("migrate")
    with make_engine(url).begin() as c:
        c.execute(text(OLD_KEY_POLICIES))
        c.execute(text(OLD_REQUESTS))
    engines = [make_engine(url) for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(init_db, engines))
    cols = {c["name"] for c in inspect(engines[0]).get_columns("gateway_requests")}
    assert {"max_tokens", "instance_id", "reconcile_attempted_at"} <= cols
    for e in engines:
        e.dispose()


def test_a_claim_past_a_postgres_integer_is_disputed_and_the_request_closed(postgres):
    # PostgreSQL's bigint columns stop at 2**63: a receipt claiming more (a valid receipt: counts are below
    # 2**64) used to fail the write as a DataError, taken for the database being down (every request
    # refused, the end retried for ever); it is a value this record cannot hold: kept disputed without the
    # node's counts, closed
    from ledger.db import init_db, make_engine

    engine = make_engine(postgres.new_database("claims"))
    init_db(engine)
    ident = Identity.generate()
    rec = UsageRecorder(engine, {ident.node_id: ident.node_public_key}.get, instance_id="me")
    end = end_for(ident, aborted=True, status=RequestStatus.CLIENT_CLOSED, claimed=(3, 2**63))
    open_for(rec, end, max_tokens=16)
    assert rec.record(end) == "disputed"
    (done,), (u,) = rows(engine)
    assert done.status == RequestStatus.CLIENT_CLOSED and u.status == RecordStatus.DISPUTED
    assert str(2**63) in u.error and u.node_completion_tokens is None
    engine.dispose()


def test_a_nul_in_the_nodes_words_does_not_keep_the_request_open_on_postgres(postgres):
    # PostgreSQL refuses a NUL in text: a node's finish_reason "stop\x00" (or an error message with one) failed
    # every retry of the close, the dispute unwritten, the request left for reconciliation to bill the claim
    from ledger.db import init_db, make_engine

    engine = make_engine(postgres.new_database("nul"))
    init_db(engine)
    ident = Identity.generate()
    rec = UsageRecorder(engine, {ident.node_id: ident.node_public_key}.get, instance_id="me")
    end = end_for(ident, completion=4, claimed=(3, 99), max_tokens=100)  # an inflated claim: a dispute
    open_for(rec, end, max_tokens=100)
    end.finish_reason, end.error = "stop\x00", "engine\x00 broke"
    assert rec.record(end) == "disputed"
    (done,), (u,) = rows(engine)
    assert done.status != RequestStatus.OPEN and done.finish_reason == "stop"  # the receipt's
    assert "\x00" not in done.error
    assert u.status == RecordStatus.DISPUTED and (u.prompt_tokens, u.completion_tokens) == (3, 4)
    engine.dispose()


def test_a_live_gateways_close_after_a_siblings_reconciliation_lowers_the_bill(setup):
    # a sibling took this gateway for dead and reconciled its open request first, billing the node's receipt
    # (12, capped at max_tokens 16); the live gateway delivered 4: its close finds the request closed and
    # lowers the still pending usage record to what the client got. It never raises it, nor touches a
    # record already in a batch.
    engine, ident, rec = setup
    sibling = UsageRecorder(engine, {ident.node_id: ident.node_public_key}.get, instance_id="sibling")
    rids = []
    for live_count in (4, 14, 4):
        rid = "0x" + f"{time.time_ns():064x}"
        rids.append(rid)
        rec.open(
            request_id=rid,
            model="acme/a",
            adapter_id=ADAPTER,
            node_id=ident.node_id,
            key_id=7,
            prompt_tokens=3,
            max_tokens=16,
        )
        reconciled = end_for(
            ident, rid=rid, completion=0, claimed=(3, 12), reconciled=True, status=RequestStatus.RECONCILED
        )
        assert sibling.record(reconciled) == "recorded"
        if len(rids) == 3:  # batched before the live gateway's close: left as it is
            with Session(engine) as s:
                u = s.exec(select(UsageRecord).where(UsageRecord.request_id == rid)).one()
                u.status = RecordStatus.SUBMITTED
                s.add(u)
                s.commit()
        live = end_for(
            ident, rid=rid, completion=live_count, claimed=(3, 12), aborted=True, status=RequestStatus.CLIENT_CLOSED
        )
        assert rec.record(live) == "already_closed"
    with Session(engine) as s:
        got = [
            (
                s.get(CompletionRecord, rid).completion_tokens,
                s.exec(select(UsageRecord).where(UsageRecord.request_id == rid)).one().completion_tokens,
            )
            for rid in rids
        ]
    assert got == [(4, 4), (12, 12), (12, 12)]


def test_a_siblings_reconciliation_of_an_ensemble_is_lowered_record_by_record(setup):
    # as above for an ensemble: its records are under the components' derived ids, each lowered to its share
    # of what the live gateway delivered (looked up under the request's own id, none was found: 12 stayed)
    engine, ident, rec = setup
    sibling = UsageRecorder(engine, {ident.node_id: ident.node_public_key}.get, instance_id="sibling")
    parts = ((ADAPTER, 0.5), ("0x" + "ab" * 32, 0.5))
    rid = "0x" + f"{time.time_ns():064x}"
    rec.open(
        request_id=rid,
        model="acme/a+acme/b",
        adapter_id=ensemble_key(parts),
        node_id=ident.node_id,
        key_id=7,
        prompt_tokens=3,
        max_tokens=16,
    )
    common = dict(rid=rid, claimed=(3, 12), ensemble=parts)
    reconciled = end_for(ident, completion=0, reconciled=True, status=RequestStatus.RECONCILED, **common)
    assert sibling.record(reconciled) == "recorded"
    live = end_for(ident, completion=4, aborted=True, status=RequestStatus.CLIENT_CLOSED, **common)
    assert rec.record(live) == "already_closed"
    with Session(engine) as s:
        shares = [
            s.exec(select(UsageRecord).where(UsageRecord.request_id == component_request_id(rid, i))).one()
            for i in range(2)
        ]
        done = s.get(CompletionRecord, rid)
    assert [(u.prompt_tokens, u.completion_tokens) for u in shares] == [(2, 2), (1, 2)]
    assert (done.prompt_tokens, done.completion_tokens) == (3, 4)
