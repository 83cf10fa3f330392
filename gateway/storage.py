"""Files the gateway keeps secrets in: its SQLite database (API key hashes, usage) and its key file are
created 0600, and a database URL is logged only with its password hidden."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

log = logging.getLogger(__name__)


def create_private_file(path: Path, data: bytes = b"") -> None:
    """Create `path` readable by its owner only (O_EXCL: an existing file is never overwritten)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def redact_db_url(url: str) -> str:
    """The database URL as it may be logged or shown: the password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "<unparseable database URL>"


def prepare_sqlite_file(url: str) -> None:
    """For a file-backed SQLite URL: create the file 0600 before SQLite does (it would use the umask, often
    world-readable), and take read access from others on an existing one. SQLite gives its -wal, -shm and
    journal files the database file's permissions."""
    try:
        u = make_url(url)
    except (ArgumentError, ValueError):
        return
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:" or u.database.startswith("file:"):
        return
    path = Path(u.database)
    if not path.exists():
        try:
            create_private_file(path)
        except FileExistsError:  # created meanwhile (a sibling process): tightened below
            pass
        except FileNotFoundError:  # no such folder: SQLite says so itself
            return
    mode = path.stat().st_mode
    if mode & 0o077:
        try:
            os.chmod(path, mode & 0o700)
            log.warning("database %s was readable by others; made it 0600", path.name)
        except PermissionError:
            log.warning("database %s is readable by others and not ours to change; make it 0600", path.name)
