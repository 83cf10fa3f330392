"""The index database's file and engines: SQLite in WAL mode, one writer (the refresher) and many readers.

Pages read while the refresher writes: WAL lets them, and each page's session is one read transaction
(an explicit BEGIN on the first statement), so a page sees one committed state of the index: the cursor,
the rows and the sums of the same refresh step. The writer takes the write lock at BEGIN (BEGIN IMMEDIATE),
so two explorers sharing a data dir never interleave their steps (the second re-reads the cursor first).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sqlalchemy import event, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError
from sqlmodel import create_engine

from devnet.explorer.tables import ADAPTER_SEARCH, ADAPTER_SEARCH_DDL, SCHEMA_VERSION, IndexModel

log = logging.getLogger(__name__)

INDEX_FILE = "explorer-index.sqlite"


def _engine(path: Path, begin: str) -> Engine:
    engine = create_engine(f"sqlite:///{path}", connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # pysqlite's own BEGIN handling off: the "begin" hook below says when
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a power cut may lose the last steps, never corrupt the file; the index is a cache of the chain
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        conn.exec_driver_sql(begin)

    return engine


class IndexDatabase:
    """The index file under `folder`: `reader` for pages, `writer` for the refresher (the only writer)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / INDEX_FILE
        self._open()
        try:
            self._ensure_schema()
        except DatabaseError as e:
            # sqlite3's own DatabaseError: the file is not a database any more (a disk error, a copy cut short),
            # and the index is a cache, rebuilt. Not its subclasses: a lock another explorer holds past the busy
            # timeout, a read-only disk or an I/O error must never move a healthy index (and its WAL) aside
            if type(e.orig).__name__ != "DatabaseError":
                raise
            self.dispose()
            aside = self.path.with_name(f"{self.path.name}.damaged")
            log.warning("explorer index %s is damaged (%s): moved to %s, rebuilding it", self.path, e.orig, aside)
            for suffix in ("-wal", "-shm"):
                self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)
            os.replace(self.path, aside)
            self._open()
            self._ensure_schema()

    def _open(self) -> None:
        self.writer = _engine(self.path, "BEGIN IMMEDIATE")
        self.reader = _engine(self.path, "BEGIN")

    def _ensure_schema(self) -> None:
        """Create the tables; an index written by another schema version is dropped first. The version is the
        file's own (SQLite's user_version, set when the tables are made), not the cursor row's: that row is written
        by the first refresh, and an older index that never reached its chain had none, so it was kept, its tables
        without the newer columns, and every refresh and every page failed on it for good (red team)."""
        with self.writer.begin() as conn:
            names = {n for n in inspect(conn).get_table_names() if n.startswith("explorer_")}
            version = conn.exec_driver_sql("PRAGMA user_version").scalar()
            if names and version != SCHEMA_VERSION:
                log.warning(
                    "explorer index %s is of schema %s, not %d: rebuilding",
                    self.path,
                    version or "1-3 (an older explorer's, which kept it elsewhere)",
                    SCHEMA_VERSION,
                )
                # the search index first: it drops its shadow tables with it (IF EXISTS then passes them), and a
                # shadow table dropped before it left it unopenable ("vtable constructor failed"), which the set's
                # order (a hash seed's) did now and then
                for name in sorted(names, key=lambda n: (n != ADAPTER_SEARCH, n)):
                    conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{name}"')
            IndexModel.metadata.create_all(conn)
            conn.exec_driver_sql(ADAPTER_SEARCH_DDL)
            conn.exec_driver_sql(f"PRAGMA user_version = {int(SCHEMA_VERSION)}")

    def clear(self, conn) -> None:
        """Empty every index table (inside the caller's write transaction)."""
        for table in reversed(IndexModel.metadata.sorted_tables):
            conn.execute(table.delete())
        conn.exec_driver_sql(f"DELETE FROM {ADAPTER_SEARCH}")

    def dispose(self) -> None:
        self.writer.dispose()
        self.reader.dispose()
