"""An event the database cannot hold is logged and skipped; it must not wedge the registry sync
(PostgreSQL refuses a btree entry over 2704 bytes, and every event of a sync is one transaction)."""

import logging

import pytest
from sqlalchemy import text
from sqlmodel import Session

from ledger.db import init_db, make_engine
from ledger.mirror import CURSOR, sync_registry
from ledger.models import AdapterMirror, NameMirror, SyncCursor
from tests.utils.chain import forge_dataset_logs, rand_id, register_sample
from tests.utils.postgres import postgres  # noqa: F401 - fixture

pytestmark = pytest.mark.integration


def test_an_event_the_database_refuses_is_skipped_not_retried_forever(anvil_chain, tmp_path, caplog):
    env = anvil_chain
    engine = make_engine(f"sqlite:///{tmp_path}/skip.db")
    init_db(engine)
    sync_registry(engine, env.client())
    poison = f"poison-{rand_id()[2:10]}"
    # stands in for PostgreSQL's "index row size exceeds btree maximum": this name cannot be stored
    with engine.begin() as conn:
        conn.execute(
            text(
                f"CREATE TRIGGER refuse_poison BEFORE INSERT ON {NameMirror.__tablename__} WHEN "
                f"NEW.name = '{poison}' BEGIN SELECT RAISE(ABORT, 'index row too large'); END"
            )
        )
    c = env.client(env.users[3])
    c.register_adapter(rand_id(), name=poison, version="1", base_model=rand_id())
    after = register_sample(env)  # later events, in later blocks
    with caplog.at_level(logging.ERROR, logger="ledger.mirror"):
        assert sync_registry(engine, env.client()) > 0
    assert any("NameRegistered" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    to_block = env.client().block_number()
    with Session(engine) as s:
        assert s.get(SyncCursor, CURSOR).block == to_block  # the cursor advanced past the poison
        assert s.get(NameMirror, poison) is None
        assert s.get(AdapterMirror, after.adapter_id) is not None  # and everything after it was applied
    assert sync_registry(engine, env.client()) == 0
    engine.dispose()


def test_gateways_sharing_a_postgresql_database_sync_one_at_a_time(anvil_chain, postgres):
    """Two gateways' syncs at once inserted the same rows and one collided on the key (seen in the gateway
    soak); a sync that finds another holding the lock leaves it to that one."""
    from ledger.mirror import _SYNC_LOCK

    env = anvil_chain
    reg = register_sample(env)
    engine = make_engine(postgres.new_database("mirror_lock"))
    init_db(engine)
    with engine.connect() as other:  # another gateway, mid-sync
        other.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _SYNC_LOCK})
        assert sync_registry(engine, env.client()) == 0
        with Session(engine) as s:
            assert s.get(SyncCursor, CURSOR) is None and s.get(AdapterMirror, reg.adapter_id) is None
        other.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _SYNC_LOCK})
        other.commit()
    assert sync_registry(engine, env.client()) > 0
    with Session(engine) as s:
        assert s.get(AdapterMirror, reg.adapter_id) is not None
    engine.dispose()


def test_a_passing_database_error_fails_the_sync_instead_of_losing_the_event(anvil_chain, tmp_path, monkeypatch):
    """A lock timeout or deadlock is no reason to skip an event for good: the sync fails, the cursor
    stays, and the next sync applies the event."""
    from sqlalchemy.exc import OperationalError

    import ledger.mirror as mirror

    env = anvil_chain
    engine = make_engine(f"sqlite:///{tmp_path}/passing.db")
    init_db(engine)
    sync_registry(engine, env.client())
    with Session(engine) as s:
        before = s.get(SyncCursor, CURSOR).block
    reg = register_sample(env)
    real = mirror._apply

    def locked(s, ev):
        raise OperationalError("UPDATE nodes", {}, Exception("database is locked"))

    monkeypatch.setattr(mirror, "_apply", locked)
    with pytest.raises(OperationalError):
        sync_registry(engine, env.client())
    with Session(engine) as s:
        assert s.get(SyncCursor, CURSOR).block == before
    monkeypatch.setattr(mirror, "_apply", real)
    assert sync_registry(engine, env.client()) > 0
    with Session(engine) as s:
        assert s.get(AdapterMirror, reg.adapter_id) is not None
    engine.dispose()


def test_an_event_whose_string_is_not_utf8_is_left_out_not_a_wedge(anvil_chain, tmp_path, caplog):
    # registerDataset took any bytes as its name (it refuses them now: test_registry.py); web3 failed the whole
    # range of logs on one that is not UTF-8, before any per-event skip: every gateway's sync stopped at that
    # block for good. A log of a registry that takes them is left out.
    env = anvil_chain
    engine = make_engine(f"sqlite:///{tmp_path}/utf8.db")
    init_db(engine)
    sync_registry(engine, env.client())
    forge_dataset_logs(env, env.new_account(), b"\xff\xfe not utf-8", env.users[0].address)
    after = register_sample(env)  # an honest registration after it
    with caplog.at_level(logging.WARNING, logger="ledger.chain"):
        assert sync_registry(engine, env.client()) > 0
    assert any("DatasetRegistered" in r.getMessage() and "does not decode" in r.getMessage() for r in caplog.records)
    with Session(engine) as s:
        assert s.get(AdapterMirror, after.adapter_id) is not None
        assert s.get(SyncCursor, CURSOR).block == env.client().block_number()
    engine.dispose()
