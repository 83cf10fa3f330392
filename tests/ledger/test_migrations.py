"""The database schema moves forward with Alembic: a new database is made at the newest revision, one made by
the release before migrations (create_all, 32-bit counts on PostgreSQL) is upgraded with its rows kept, and
processes starting together on one database do not race."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from sqlmodel import Session, SQLModel, select

import gateway.tables  # noqa: F401 - registers the gateway's tables
from gateway.tables import CompletionRecord
from ledger.db import init_db, make_engine, schema_revision
from ledger.models import SettlementBatch, UsageRecord
from tests.utils.postgres import postgres  # noqa: F401 - the module-scoped fixture

BIG = 2**40  # more tokens than a 32-bit column holds
HEAD = "0005"  # the newest revision


def _previous_release(engine) -> None:
    """The schema as the release before migrations made it: create_all, with INTEGER where counts are
    BIGINT now, and no alembic_version table."""
    SQLModel.metadata.create_all(engine)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("ALTER TABLE usage_records ALTER COLUMN prompt_tokens TYPE INTEGER"))
            conn.execute(sa.text("ALTER TABLE usage_records ALTER COLUMN completion_tokens TYPE INTEGER"))
            conn.execute(sa.text("ALTER TABLE gateway_requests ALTER COLUMN completion_tokens TYPE INTEGER"))
            conn.execute(sa.text("ALTER TABLE sync_cursors ALTER COLUMN block TYPE INTEGER"))
    with Session(engine) as s:
        s.add(
            UsageRecord(
                request_id="0x" + "11" * 32,
                adapter_id="0x" + "22" * 32,
                node_id="0x" + "33" * 32,
                prompt_tokens=7,
                completion_tokens=9,
            )
        )
        s.add(CompletionRecord(request_id="0x" + "11" * 32, model="m", status="ok", completion_tokens=9))
        s.commit()


def _column_type(engine, table: str, column: str) -> str:
    return next(str(c["type"]) for c in sa.inspect(engine).get_columns(table) if c["name"] == column)


def test_a_new_database_is_made_at_the_newest_revision(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'new.db'}")
    init_db(engine)
    assert schema_revision(engine) == HEAD
    init_db(engine)  # again: nothing to do
    assert schema_revision(engine) == HEAD


def test_the_previous_releases_sqlite_database_is_upgraded(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    _previous_release(engine)
    assert schema_revision(engine) is None
    init_db(engine)
    assert schema_revision(engine) == HEAD
    with Session(engine) as s:
        row = s.exec(select(UsageRecord)).one()
        assert (row.prompt_tokens, row.completion_tokens) == (7, 9)
        row.completion_tokens = BIG
        s.add(row)
        s.commit()
        assert s.exec(select(UsageRecord)).one().completion_tokens == BIG


@pytest.mark.integration
def test_the_previous_releases_postgres_database_is_upgraded_to_64_bit_counts(postgres):  # noqa: F811
    engine = make_engine(postgres.new_database("old_release"))
    _previous_release(engine)
    assert _column_type(engine, "usage_records", "completion_tokens") == "INTEGER"
    with Session(engine) as s, pytest.raises(sa.exc.DBAPIError, match="out of range"):
        row = s.exec(select(UsageRecord)).one()
        row.completion_tokens = BIG
        s.add(row)
        s.commit()
    # two processes starting together on the old database: one migrates, the other waits its turn
    errors = []

    def start() -> None:
        try:
            init_db(make_engine(engine.url.render_as_string(hide_password=False)))
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and schema_revision(engine) == HEAD
    for table, column in [
        ("usage_records", "completion_tokens"),
        ("gateway_requests", "completion_tokens"),
        ("sync_cursors", "block"),
        ("adapters", "registered_block"),
    ]:
        assert _column_type(engine, table, column) == "BIGINT", (table, column)
    with Session(engine) as s:
        row = s.exec(select(UsageRecord)).one()
        assert (row.prompt_tokens, row.completion_tokens) == (7, 9)  # the rows are kept
        row.completion_tokens = BIG
        s.add(row)
        s.commit()
        assert s.exec(select(UsageRecord)).one().completion_tokens == BIG


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql+pg8000://gw:s3cret@db/x", "needs the pg8000 driver"),
        ("postgresql+nosuchdriver://gw:s3cret@db/x", "nosuchdriver"),
    ],
)
def test_a_database_url_without_its_driver_is_one_clear_line(url, says):
    with pytest.raises(ValueError, match=says) as ei:
        make_engine(url)
    assert "s3cret" not in str(ei.value)


def _at_0002(engine) -> None:
    """A database as revision 0002 left it: batches without first_seq (nor its index), one batch row."""
    from ledger.db import _alembic

    SQLModel.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP INDEX ix_batches_settler_first_seq"))
        conn.execute(sa.text("ALTER TABLE batches DROP COLUMN first_seq"))
        conn.execute(
            sa.text(
                "INSERT INTO batches (batch_id, merkle_root, record_count, status, attempts, created_at) "
                "VALUES ('0x' || :b, '0x' || :r, 3, 'settled', 1, CURRENT_TIMESTAMP)"
            ),
            {"b": "ab" * 32, "r": "cd" * 32},
        )
        from alembic import command

        command.stamp(_alembic(conn), "0002")


def _check_0003(engine) -> None:
    assert schema_revision(engine) == HEAD
    assert _column_type(engine, "batches", "first_seq") == "BIGINT"
    assert "ix_batches_settler_first_seq" in {i["name"] for i in sa.inspect(engine).get_indexes("batches")}
    with Session(engine) as s:
        (row,) = s.exec(select(SettlementBatch)).all()
        assert (row.record_count, row.first_seq) == (3, None)  # kept; a batch of the ledger without sequences


def test_a_0002_sqlite_database_gets_batch_sequence_numbers(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'v2.db'}")
    _at_0002(engine)
    init_db(engine)
    _check_0003(engine)


@pytest.mark.integration
def test_a_0002_postgres_database_gets_batch_sequence_numbers(postgres):  # noqa: F811
    engine = make_engine(postgres.new_database("at_0002"))
    _at_0002(engine)
    init_db(engine)
    _check_0003(engine)


def _at_0004(engine) -> None:
    """A database as revision 0004 left it: usage_records indexed by batch_id alone, one batch's records."""
    from ledger.db import _alembic

    SQLModel.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP INDEX ix_usage_records_batch_status"))
        conn.execute(sa.text("CREATE INDEX ix_usage_records_batch_id ON usage_records (batch_id)"))
        from alembic import command

        command.stamp(_alembic(conn), "0004")
    with Session(engine) as s:
        for i in range(3):
            s.add(
                UsageRecord(
                    request_id=f"0x{i:064x}",
                    adapter_id="0x" + "22" * 32,
                    node_id="0x" + "33" * 32,
                    prompt_tokens=1,
                    completion_tokens=1,
                    status="submitted",
                    batch_id="0x" + "ab" * 32,
                )
            )
        s.commit()


def _check_0005(engine, rows: int = 3) -> None:
    """The settler's moves of a batch's records search the (batch_id, status) index, not every record of a
    status; the rows are kept."""
    assert schema_revision(engine) == HEAD
    names = {i["name"] for i in sa.inspect(engine).get_indexes("usage_records")}
    assert "ix_usage_records_batch_status" in names and "ix_usage_records_batch_id" not in names
    with Session(engine) as s:
        assert len(s.exec(select(UsageRecord).where(UsageRecord.batch_id == "0x" + "ab" * 32)).all()) == rows
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            plan = conn.execute(
                sa.text(
                    "EXPLAIN QUERY PLAN UPDATE usage_records SET status = 'settled' "
                    "WHERE batch_id = :b AND status = 'submitted'"
                ),
                {"b": "0x" + "ab" * 32},
            ).all()
        assert "ix_usage_records_batch_status" in str(plan), plan


def test_a_0004_sqlite_database_indexes_records_by_batch_and_status(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'v4.db'}")
    _at_0004(engine)
    init_db(engine)
    _check_0005(engine)
    fresh = make_engine(f"sqlite:///{tmp_path / 'new.db'}")
    init_db(fresh)
    _check_0005(fresh, rows=0)


@pytest.mark.integration
def test_a_0004_postgres_database_indexes_records_by_batch_and_status(postgres):  # noqa: F811
    engine = make_engine(postgres.new_database("at_0004"))
    _at_0004(engine)
    init_db(engine)
    _check_0005(engine)


def test_every_postgres_session_is_in_utc_whatever_pgtz_says(postgres, monkeypatch):  # noqa: F811
    """The zone was set in the connection's startup options, which libpq's PGTZ overrides: a key revoked from a
    shell in New York time was stored 5 h in the past on a column without a zone, and no gateway ended its streams."""
    from sqlalchemy import text

    monkeypatch.setenv("PGTZ", "America/New_York")
    engine = make_engine(postgres.new_database("pgtz"))
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW TIME ZONE")).scalar() == "UTC"
            conn.rollback()  # a session handed back to the pool and taken again keeps it
        with engine.connect() as conn:
            assert conn.execute(text("SHOW TIME ZONE")).scalar() == "UTC"
    finally:
        engine.dispose()
