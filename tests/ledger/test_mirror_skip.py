"""H4: an event the database cannot hold is logged and skipped; it must not wedge the registry sync
(PostgreSQL refuses a btree entry over 2704 bytes, and every event of a sync is one transaction)."""

import logging

import pytest
from sqlalchemy import text
from sqlmodel import Session

from ledger.db import init_db, make_engine
from ledger.mirror import CURSOR, sync_registry
from ledger.models import AdapterMirror, NameMirror, SyncCursor
from tests.utils.chain import rand_id, register_sample

pytestmark = pytest.mark.integration


def test_an_event_the_database_refuses_is_skipped_not_retried_forever(anvil_chain, tmp_path, caplog):
    env = anvil_chain
    engine = make_engine(f"sqlite:///{tmp_path}/skip.db")
    init_db(engine)
    sync_registry(engine, env.client())
    poison = f"poison-{rand_id()[2:10]}"
    # stands in for PostgreSQL's "index row size exceeds btree maximum": this name cannot be stored
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TRIGGER refuse_poison BEFORE INSERT ON {NameMirror.__tablename__} WHEN "
                          f"NEW.name = '{poison}' BEGIN SELECT RAISE(ABORT, 'index row too large'); END"))
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
