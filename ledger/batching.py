"""What a settlement batch is formed from: the oldest pending outbox rows (claimed so that no two
settlers take the same row), their on-chain records and their fees (the batch's id is
ledger.merkle.batch_id_for: it names the records as settleBatch takes them)."""

from __future__ import annotations

from typing import NamedTuple

from sqlmodel import Session, select

from ledger.models import RecordStatus, UsageRecord
from ledger.types import SettleRecord

# One statement moves a whole batch's rows: one UPDATE a row (the driver's executemany) cost about twice as
# much on SQLite, and SQLAlchemy's parameter handling for 500 rows as much again. The rows are a VALUES list,
# whose columns SQLite and PostgreSQL both name column1..3 (SQLite takes no column list after its alias, and
# Python's sqlite3 reports no rowcount for a statement that starts with WITH).
_MOVE_CHUNK = 1000  # rows a statement: 3,000 parameters, far under SQLite's 32,766
_TABLE = UsageRecord.__tablename__
_MOVE_SQL = (
    f"UPDATE {_TABLE} SET status = {{p}}, batch_id = {{p}}, leaf_index = v.column2, fee_wei = v.column3 "
    f"FROM (VALUES {{rows}}) AS v WHERE {_TABLE}.id = v.column1 AND {_TABLE}.status = {{p}}"
)


def move_to_batch(session: Session, batch_id: str, rows: list[tuple[int, int]]) -> int:
    """Put the outbox rows (id, fee in wei) into batch `batch_id`, at leaf positions in this order, and only
    those still pending; returns how many moved (fewer than len(rows) means some were taken meanwhile, and
    the caller rolls back, so that no record is ever in two batches)."""
    conn = session.connection()
    p = "?" if conn.dialect.paramstyle == "qmark" else "%s"  # sqlite3's style, else psycopg's
    moved = 0
    for start in range(0, len(rows), _MOVE_CHUNK):
        chunk = rows[start : start + _MOVE_CHUNK]
        params: list = []
        for leaf, (rid, fee) in enumerate(chunk, start):
            params += (rid, leaf, str(fee))
        sql = _MOVE_SQL.format(rows=",".join([f"({p},{p},{p})"] * len(chunk)), p=p)
        moved += conn.exec_driver_sql(sql, (RecordStatus.SUBMITTED, batch_id, *params, RecordStatus.PENDING)).rowcount
    return moved


def to_settle_record(r: UsageRecord) -> SettleRecord:
    return SettleRecord(r.request_id, r.adapter_id, r.node_id, r.prompt_tokens, r.completion_tokens)


def record_fee(price_per_1k_tokens: int, prompt_tokens: int, completion_tokens: int) -> int:
    """A record's fee in wei exactly as AttributionLedger computes it: price * (prompt + completion) / 1000,
    rounded down."""
    return price_per_1k_tokens * (prompt_tokens + completion_tokens) // 1000


class PendingRow(NamedTuple):
    """An outbox row as the settler forms a batch of it. Not created_at: parsing 500 timestamps cost half
    the query; the settler reads the oldest's alone."""

    id: int
    request_id: str
    adapter_id: str
    node_id: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None
    quoted_price_per_1k: str | None


_PENDING_COLUMNS = tuple(getattr(UsageRecord, name) for name in PendingRow._fields)


def pending_rows(session: Session, limit: int, *, lock: bool = False) -> list[PendingRow]:
    """The oldest pending records as plain rows (the ORM objects cost more than the rest of a batch).

    lock=True claims them for the caller's transaction: on PostgreSQL `FOR UPDATE SKIP LOCKED`, so a
    second settler forming a batch at the same moment gets the next rows instead of waiting for (or
    colliding on) these; SQLite has no row locks and ignores it (the settler's SQLite transactions hold
    the database's write lock from BEGIN IMMEDIATE instead). Records that are disputed, rejected, set
    aside or already in a batch are never returned."""
    stmt = select(*_PENDING_COLUMNS).where(UsageRecord.status == RecordStatus.PENDING)
    stmt = stmt.order_by(UsageRecord.id).limit(limit)
    if lock:
        stmt = stmt.with_for_update(skip_locked=True)
    # Core, not the ORM's select (half the cost); named tuples, not SQLAlchemy's rows: reading their
    # attributes cost several times as much, and forming a batch reads each row's a dozen times
    return [PendingRow._make(r) for r in session.connection().execute(stmt)]
