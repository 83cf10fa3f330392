"""The explorer's index file is a cache of the chain: a damaged one is set aside and built again, never the
reason the explorer stops (it stopped with "database disk image is malformed", naming no file)."""

from __future__ import annotations

import os
import sqlite3

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


@pytest.mark.parametrize("cursor", [True, False], ids=["refreshed", "never-refreshed"])
def test_an_index_of_an_older_schema_is_dropped_and_built_again(tmp_path, caplog, cursor):
    """Schema 3 added the numbers pages are found by (ordinals, counts, ranks): an index written by an older
    explorer lacks them, and is rebuilt from the chain rather than read. Older explorers kept their version in the
    cursor row, which only a refresh writes: one that never reached its chain left none, and the index was kept,
    and failed every refresh and page after (red team); the version is the file's now (user_version)."""
    from devnet.explorer.tables import SCHEMA_VERSION

    IndexDatabase(tmp_path).dispose()
    old = sqlite3.connect(tmp_path / INDEX_FILE)
    with old:
        old.execute("PRAGMA user_version = 0")  # as every older explorer left it
        old.execute("DROP TABLE explorer_usage")  # as schema 2 had it: no tokens_rank
        old.execute("CREATE TABLE explorer_usage (kind VARCHAR, key VARCHAR, records INTEGER, PRIMARY KEY (kind, key))")
        old.execute("INSERT INTO explorer_usage VALUES ('all', '', 7)")
        if cursor:
            old.execute(
                "INSERT INTO explorer_cursor (id, chain_id, registry_address, ledger_address, deploy_block, block,"
                " block_hash, log_index, head, span, records, batches, adapters, names, accounts, contributors)"
                " VALUES (1, 1, '0x1', '0x2', 0, 100, '', -1, 100, 0, 7, 1, 0, 0, 0, 0)"
            )
    old.close()
    db = IndexDatabase(tmp_path)
    try:
        with db.reader.begin() as conn:
            assert conn.execute(text("SELECT count(*) FROM explorer_cursor")).scalar() == 0
            assert conn.execute(text("SELECT count(*) FROM explorer_usage")).scalar() == 0
            conn.execute(text("SELECT tokens_rank FROM explorer_usage"))  # the new columns are there
    finally:
        db.dispose()
    assert f"an older explorer's, which kept it elsewhere), not {SCHEMA_VERSION}: rebuilding" in caplog.text
    # and a file of this schema is kept as it is
    caplog.clear()
    IndexDatabase(tmp_path).dispose()
    assert "rebuilding" not in caplog.text


def test_an_older_index_with_a_search_table_is_rebuilt_whatever_the_hash_seed(tmp_path):
    """The tables of an older index were dropped in a set's order: where a shadow table of the names' trigram
    index (FTS5) came before the index itself, its drop failed ("vtable constructor failed") and the explorer
    could not start; with PYTHONHASHSEED random, a run now and then (CI). Each seed here is another order."""
    import subprocess
    import sys

    script = (
        "import sqlite3, sys\n"
        "from pathlib import Path\n"
        "from devnet.explorer.index_db import INDEX_FILE, IndexDatabase\n"
        "folder = Path(sys.argv[1])\n"
        "IndexDatabase(folder).dispose()\n"
        "old = sqlite3.connect(folder / INDEX_FILE)\n"
        "old.execute('PRAGMA user_version = 0')\n"
        "old.close()\n"
        "IndexDatabase(folder).dispose()\n"
    )
    for seed in range(8):
        folder = tmp_path / str(seed)
        folder.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        r = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, env=env)
        assert r.returncode == 0, f"seed {seed}: {r.stderr[-500:]}"
