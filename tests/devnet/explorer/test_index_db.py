"""The explorer's index file is a cache of the chain: a damaged one is set aside and built again, never the
reason the explorer stops (it stopped with "database disk image is malformed", naming no file)."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from devnet.explorer.index_db import INDEX_FILE, IndexDatabase


@pytest.mark.parametrize("damage", ["garbage", "cut-short", "zeroed"])
def test_a_damaged_index_is_set_aside_and_rebuilt(tmp_path, damage, caplog):
    IndexDatabase(tmp_path).dispose()
    path = tmp_path / INDEX_FILE
    data = path.read_bytes()
    for suffix in ("-wal", "-shm"):
        (tmp_path / (INDEX_FILE + suffix)).unlink(missing_ok=True)
    path.write_bytes({"garbage": b"not sqlite " * 500, "cut-short": data[:50], "zeroed": b"\0" * len(data)}[damage])
    db = IndexDatabase(tmp_path)
    try:
        with db.reader.begin() as conn:
            assert conn.execute(text("SELECT count(*) FROM explorer_cursor")).scalar() == 0
    finally:
        db.dispose()
    damaged = {"garbage": b"not sqlite " * 500, "cut-short": data[:50], "zeroed": b"\0" * len(data)}[damage]
    assert (tmp_path / f"{INDEX_FILE}.damaged").read_bytes() == damaged  # kept for a look, out of the way
    assert "is damaged" in caplog.text and str(path) in caplog.text
