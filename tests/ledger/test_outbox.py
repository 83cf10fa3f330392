"""The outbox API the gateway calls, and the database helpers (real SQLite files)."""

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from ledger import batching
from ledger.batching import move_to_batch, pending_rows
from ledger.db import init_db, make_engine
from ledger.models import RecordStatus, UsageRecord
from ledger.outbox import OutboxError, add_usage_record, count_by_status
from tests.utils.postgres import postgres  # noqa: F401 - fixture


@pytest.fixture
def engine(tmp_path):
    e = make_engine(f"sqlite:///{tmp_path}/db/outbox.db")
    init_db(e)
    yield e
    e.dispose()


def _rec(**kw):
    base = dict(
        request_id="0x" + "01" * 32,
        adapter_id="0x" + "02" * 32,
        node_id="0x" + "03" * 32,
        prompt_tokens=3,
        completion_tokens=4,
        receipt_json={"b": 1, "a": "é"},
        node_signature="0xsig",
    )
    return {**base, **kw}


def test_sqlite_uses_wal(engine):
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_record_is_written_in_the_callers_transaction(engine):
    with Session(engine) as s:
        add_usage_record(s, **_rec(), gateway_key_id=7)
        s.rollback()
    with Session(engine) as s:
        assert s.exec(select(UsageRecord)).all() == []
        rec = add_usage_record(s, **_rec(request_id="0x" + "AB" * 32), gateway_key_id=7)
        s.commit()
        assert rec.id is not None
    with Session(engine) as s:
        (row,) = s.exec(select(UsageRecord)).all()
        assert row.request_id == "0x" + "ab" * 32  # normalised to lowercase
        assert row.status == RecordStatus.PENDING and row.batch_id is None and row.gateway_key_id == 7
        assert row.receipt_json == '{"a":"é","b":1}'
        assert row.created_at.tzinfo is not None
        assert count_by_status(s) == {"pending": 1}
        assert [r.id for r in pending_rows(s, 10)] == [row.id]


def test_duplicate_request_id_fails_at_commit(engine):
    with Session(engine) as s:
        add_usage_record(s, **_rec())
        s.commit()
        add_usage_record(s, **_rec())
        with pytest.raises(IntegrityError):
            s.commit()


@pytest.mark.parametrize(
    "bad",
    [
        {"request_id": "0x1234"},
        {"adapter_id": "zz" * 32},
        {"node_id": b"\x00" * 31},
        {"prompt_tokens": -1},
        {"completion_tokens": 2**64},
        {"prompt_tokens": 1.5},
        {"prompt_tokens": True},
        {"receipt_json": ""},
        {"receipt_json": 5},
        {"node_signature": ""},
    ],
)
def test_invalid_records_are_refused(engine, bad):
    with Session(engine) as s, pytest.raises(OutboxError):
        add_usage_record(s, **_rec(**bad))


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_move_to_batch_moves_only_pending_rows_in_order(db, tmp_path, request, monkeypatch):
    """A batch's rows move in one statement (here in chunks of 2, so leaf positions run on across chunks),
    each with its leaf and fee; a row another batch took meanwhile is not moved, and the count says so,
    which is what makes the settler roll the batch back (no record in two batches)."""
    url = request.getfixturevalue("postgres").new_database("move") if db == "postgres" else None
    e = make_engine(url or f"sqlite:///{tmp_path}/move.db")
    init_db(e)
    monkeypatch.setattr(batching, "_MOVE_CHUNK", 2)
    with Session(e) as s:
        for i in range(1, 6):
            add_usage_record(s, **_rec(request_id="0x" + f"{i:02x}" * 32))
        s.commit()
        ids = list(s.exec(select(UsageRecord.id).order_by(UsageRecord.id)))
    a, b = "0x" + "aa" * 32, "0x" + "bb" * 32
    with Session(e) as s:
        assert move_to_batch(s, a, [(ids[0], 10), (ids[1], 11), (ids[2], 12)]) == 3
        s.commit()
        assert move_to_batch(s, b, [(ids[2], 20), (ids[3], 21), (ids[4], 22)]) == 2  # ids[2] is in batch a
        s.rollback()
    with Session(e) as s:
        rows = s.exec(select(UsageRecord).order_by(UsageRecord.id)).all()
        got = [(r.status, r.batch_id, r.leaf_index, r.fee_wei) for r in rows]
    assert got == [
        (RecordStatus.SUBMITTED, a, 0, "10"),
        (RecordStatus.SUBMITTED, a, 1, "11"),
        (RecordStatus.SUBMITTED, a, 2, "12"),
        (RecordStatus.PENDING, None, None, None),
        (RecordStatus.PENDING, None, None, None),
    ]
    e.dispose()
