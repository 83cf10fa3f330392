"""Database engines: SQLite (WAL) by default, any SQLAlchemy URL (e.g. postgresql+psycopg://...)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, create_engine

import ledger.models  # noqa: F401 - registers the tables on SQLModel.metadata

DEFAULT_DB_URL = "sqlite:///loramesh.db"


def make_engine(url: str = DEFAULT_DB_URL, *, immediate: bool = False, echo: bool = False) -> Engine:
    """An engine for `url`. SQLite gets WAL, a 30 s busy timeout and foreign keys; immediate=True
    makes every SQLite transaction take the write lock at BEGIN, so a read-then-write transaction
    never fails on a snapshot another process moved (the settler uses it)."""
    if not url.startswith("sqlite"):
        return create_engine(url, echo=echo, pool_pre_ping=True)
    if url.startswith("sqlite:///") and url not in ("sqlite://", "sqlite:///:memory:"):
        Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, echo=echo, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        if immediate:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    if immediate:

        @event.listens_for(engine, "begin")
        def _on_begin(conn) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def init_db(engine: Engine) -> None:
    """Create every table that does not exist yet."""
    SQLModel.metadata.create_all(engine)


def session(engine: Engine) -> Session:
    """A Session that keeps objects readable after commit."""
    return Session(engine, expire_on_commit=False)
