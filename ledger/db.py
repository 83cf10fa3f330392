"""Database engines: SQLite (WAL) by default, any SQLAlchemy URL (e.g. postgresql+psycopg://...)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DatabaseError
from sqlmodel import Session, SQLModel, create_engine

import ledger.models  # noqa: F401 - registers the tables on SQLModel.metadata

log = logging.getLogger(__name__)

DEFAULT_DB_URL = "sqlite:///loramesh.db"


def redact_url(url: str) -> str:
    """A database URL as it may be logged, printed or put in an error: its password shown as ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "<a database URL that does not parse>"


def sqlite_file(url: str) -> Path | None:
    """The file a SQLite URL names, or None (in-memory, a `file:` URI, or not SQLite)."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:" or u.database.startswith("file:"):
        return None
    return Path(u.database).expanduser()


def _create_private(path: Path) -> None:
    """Create the database file 0600 before SQLite does: SQLite would create it by the umask (often
    world-readable), and it holds API key hashes and usage. Its -wal, -shm and journal files take the
    database file's permissions. An existing file is left as it is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:  # created meanwhile by a sibling process (a gateway and its settler): theirs
        pass


def _utc_session(dbapi_conn, _record) -> None:
    """Every PostgreSQL session in UTC. Timestamps may be stored without a zone (tables an older sqlmodel made):
    aware datetimes are then written as UTC and compared with `now()` (settler leases) only in a UTC session. Set
    once connected, not in the startup options, which a PGTZ variable of the process overrides: a revocation
    written from a shell in New York time read 5 h old, and no gateway ended the key's streams (review)."""
    autocommit = dbapi_conn.autocommit
    dbapi_conn.autocommit = True  # SET outside a transaction, so that it lasts the session
    with dbapi_conn.cursor() as cur:
        cur.execute("SET TIME ZONE 'UTC'")
    dbapi_conn.autocommit = autocommit


def make_engine(
    url: str = DEFAULT_DB_URL, *, immediate: bool = False, echo: bool = False, create: bool = True
) -> Engine:
    """An engine for `url`. SQLite gets WAL, a 30 s busy timeout and foreign keys, and a file it creates is
    0600; immediate=True makes every SQLite transaction take the write lock at BEGIN, so a read-then-write
    transaction never fails on a snapshot another process moved (the settler uses it). A URL that does not
    parse is a ValueError that shows it without its password; so is, with create=False, a SQLite file that
    does not exist (a command that reads a database, given a mistyped path, would otherwise make an empty
    one and answer from it)."""
    try:
        path = sqlite_file(url)
    except (ArgumentError, ValueError) as e:
        raise ValueError(
            f"database URL {redact_url(url)} is not valid: expected e.g. sqlite:///gateway.db or "
            "postgresql+psycopg://user:password@host/db"
        ) from e
    if not url.startswith("sqlite"):
        try:
            engine = create_engine(url, echo=echo, pool_pre_ping=True)
        except ModuleNotFoundError as e:  # the URL's driver is an optional dependency
            extra = " (pip install 'loramesh[postgres]')" if "psycopg" in str(e.name) else ""
            raise ValueError(f"database URL {redact_url(url)} needs the {e.name} driver{extra}") from None
        except ArgumentError as e:  # a dialect or driver SQLAlchemy does not know
            raise ValueError(f"database URL {redact_url(url)}: {e}") from None
        if engine.dialect.name == "postgresql":
            event.listen(engine, "connect", _utc_session)
        return engine
    if path is not None and not path.exists():
        if not create:
            raise ValueError(f"no database at {path}: check --db (this command reads an existing one)")
        _create_private(path)
    if path is not None:  # SQLite opens a path as written: `~` would be a folder named ~ in the working directory
        url = make_url(url).set(database=str(path))
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


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


_INIT_LOCK = 0x6C6D5F696E6974  # pg_advisory_lock key of init_db ("lm_init")


def init_db(engine: Engine) -> None:
    """Bring the database to the newest schema (ledger/migrations says how: create what is missing, then
    Alembic's revisions). Several processes (gateways, settlers) may call it at once on one PostgreSQL
    database: they take turns (an advisory lock), as CREATE TABLE and ALTER TABLE race. A SQLite file that
    is not a database (damaged, or another file) is a DamagedDatabase naming it."""
    try:
        _init_db(engine)
    except DatabaseError as e:
        path = sqlite_file(str(engine.url))
        if path is None or type(e.orig).__name__ != "DatabaseError":  # sqlite3's own: not locked, not a bug
            raise
        raise DamagedDatabase(
            f"database {path} cannot be read ({e.orig}): it is damaged or not a loramesh database; "
            "restore it from a backup, or move it aside to start an empty one"
        ) from e


class DamagedDatabase(RuntimeError):
    """A database file that cannot be read as one."""


def _init_db(engine: Engine) -> None:
    with engine.connect() as conn:
        if is_postgres(engine):
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _INIT_LOCK})
        try:
            insp = inspect(conn)
            versioned = insp.has_table("alembic_version")
            legacy = not versioned and any(insp.has_table(t.name) for t in SQLModel.metadata.sorted_tables)
            SQLModel.metadata.create_all(conn)
            _add_missing_columns(conn)
            _migrate(conn, stamp_first=BASELINE if legacy else None, fresh=not versioned and not legacy)
            conn.commit()
        finally:
            if is_postgres(engine):
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _INIT_LOCK})
                conn.commit()


BASELINE = "0001"  # the schema create_all made before migrations existed


def _alembic(conn):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.attributes["connection"] = conn
    return cfg


def _migrate(conn, *, stamp_first: str | None, fresh: bool) -> None:
    """A fresh database is stamped at the newest revision (its tables were just made so); a legacy one is
    stamped at `stamp_first` and upgraded; a versioned one is upgraded."""
    from alembic import command

    cfg = _alembic(conn)
    if fresh:
        command.stamp(cfg, "head")
        return
    if stamp_first is not None:
        log.info("database made before migrations: stamped at %s, upgrading", stamp_first)
        command.stamp(cfg, stamp_first)
    command.upgrade(cfg, "head")


def schema_revision(engine: Engine) -> str | None:
    """The database's Alembic revision (None: not versioned yet)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


# Tables whose rows exist nowhere else (the outbox and its batches): an older schema gets the new
# columns added in place. The registry mirrors are rebuilt from chain events instead (ledger.mirror).
# Other packages' tables opt in with `__table_args__ = {"info": {"migrate_columns": True}}` (the gateway's).
MIGRATED_TABLES = ("usage_records", "batches")


def _migrated(table) -> bool:
    return table.name in MIGRATED_TABLES or bool(table.info.get("migrate_columns"))


def _add_missing_columns(conn) -> None:
    """ALTER TABLE ... ADD COLUMN for each nullable column missing from an existing migrated table (the
    only kind a table with rows can take without a default). The one migration: init_db runs it under its
    lock, so processes starting together never race on the same ALTER TABLE."""
    insp = inspect(conn)
    for table in SQLModel.metadata.sorted_tables:
        if not _migrated(table) or not insp.has_table(table.name):
            continue
        have = {c["name"] for c in insp.get_columns(table.name)}
        for col in table.columns:
            if col.name in have or not col.nullable or col.primary_key:
                continue
            ddl = col.type.compile(dialect=conn.dialect)
            log.info("adding column %s.%s (%s)", table.name, col.name, ddl)
            conn.execute(text(f'ALTER TABLE "{table.name}" ADD COLUMN "{col.name}" {ddl}'))


def session(engine: Engine) -> Session:
    """A Session that keeps objects readable after commit."""
    return Session(engine, expire_on_commit=False)
