"""The gateway's SQLite database holds secrets (API key hashes, usage): created 0600 by ledger.db.make_engine,
an existing one is tightened here (the key file is written 0600 by common.files.write_private)."""

from __future__ import annotations

import logging
import os

from sqlalchemy.exc import ArgumentError

from ledger.db import sqlite_file

log = logging.getLogger(__name__)


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
