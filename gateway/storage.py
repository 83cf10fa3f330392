"""Files the gateway keeps secrets in: its SQLite database (API key hashes, usage) and its key file are
created 0600 (the database by ledger.db.make_engine; an existing one is tightened here)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sqlalchemy.exc import ArgumentError

from ledger.db import sqlite_file

log = logging.getLogger(__name__)


def create_private_file(path: Path, data: bytes = b"") -> None:
    """Create `path` readable by its owner only (O_EXCL: an existing file is never overwritten)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def tighten_sqlite_file(url: str) -> None:
    """For a file-backed SQLite database that exists already: take read access from others (a new file is
    created 0600 by ledger.db.make_engine). SQLite gives its -wal, -shm and journal files the database
    file's permissions."""
    try:
        path = sqlite_file(url)
    except (ArgumentError, ValueError):
        return
    if path is None or not path.exists():
        return
    mode = path.stat().st_mode
    if mode & 0o077:
        try:
            os.chmod(path, mode & 0o700)
            log.warning("database %s was readable by others; made it 0600", path.name)
        except PermissionError:
            log.warning("database %s is readable by others and not ours to change; make it 0600", path.name)
