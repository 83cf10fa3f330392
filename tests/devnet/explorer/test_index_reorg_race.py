"""A reorg while the indexer reads a chunk's logs: the chunk's last block hash was read after eth_getLogs, so a
reorg landing between the two kept the dropped blocks' logs under the new chain's hash, every later reorg check
passed, and the explorer showed a dataset and a node the chain never had (red team). The hash is read before the
logs and again after now, as ledger.mirror.sync_registry does, and a step whose block changed is read again.

Real anvil (its own, module-scoped: it is reverted here), real SQLite; the only injection is the reorg's moment,
right after the log query returns (on a live chain that moment is chance)."""

import threading

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.wire import node_id_of
from devnet.explorer.index import ChainIndex
from devnet.explorer.index_db import IndexDatabase
from tests.utils.chain import rand_id

pytestmark = pytest.mark.integration


def _register_ghosts(env) -> tuple[str, str]:
    """A dataset and a node registered by one user; returns (dataset id, node id)."""
    user = env.users[3]
    env.client(user).register_dataset("ghost-dataset", rand_id())
    key = Ed25519PrivateKey.generate()
    env.client(user).register_node(
        key, peer_id="12D3KooWghost", multiaddrs=[], api_url="http://127.0.0.1:9", base_model=rand_id()
    )
    return env.client().dataset_id("ghost-dataset", user.address), node_id_of(key.public_key().public_bytes_raw())


def test_a_reorg_between_the_log_query_and_the_cursor_write_is_read_again(anvil_chain, tmp_path):
    rpc = anvil_chain.client().w3.provider.make_request
    db = IndexDatabase(tmp_path / "index")
    index = ChainIndex(anvil_chain.client(), db)
    try:
        index.refresh()
        snapshot = rpc("evm_snapshot", [])["result"]
        dataset_id, node_id = _register_ghosts(anvil_chain)
        dropped_head = anvil_chain.client().block_number()
        real_query, fired = index.query, []

        def query_then_reorg(start: int, end: int) -> list:
            logs = real_query(start, end)
            if logs and not fired:  # the blocks just read are dropped, others mined at their heights (and one more)
                fired.append((start, end))
                assert rpc("evm_revert", [snapshot])["result"]
                for _ in range(dropped_head - anvil_chain.client().block_number() + 1):
                    rpc("evm_mine", [])
            return logs

        index.query = query_then_reorg
        index.refresh()
        index.query = real_query
        index.refresh()
        assert fired
        head = anvil_chain.client().block_number()
        cursor = index.cursor()
        assert cursor.block == head
        assert cursor.block_hash == anvil_chain.client().w3.eth.get_block(head)["hash"].to_0x_hex()
        with db.reader.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT (SELECT count(*) FROM explorer_datasets WHERE dataset_id = ?),"
                " (SELECT count(*) FROM explorer_nodes WHERE node_id = ?)",
                (dataset_id, node_id),
            ).one()
        assert tuple(rows) == (0, 0)  # neither is on the chain: the dropped blocks' logs were not kept
    finally:
        db.dispose()


def test_two_refreshes_at_once_do_not_take_each_other_for_a_reorg(anvil_chain, tmp_path, caplog):
    """The refresher and a tool's (or a test's) `refresh` may run at once: the block hash each pinned before its
    log query was one attribute of the index, so one's query was taken for the other's reorg and a pass ended short
    (an explorer test then read a page before the index had its records). Here the second refresh pins its first
    query while the first one's query is out, each in its own thread."""
    for i in range(6):  # blocks with events, read a block or two a query
        anvil_chain.client(anvil_chain.users[4]).register_dataset(f"both-{i}-{rand_id()[2:10]}", rand_id())
    db = IndexDatabase(tmp_path / "index")
    index = ChainIndex(anvil_chain.client(), db, max_span=2)
    real_query, calls = index.query, []
    second_pinned, first_applied = threading.Event(), threading.Event()

    def query(start: int, end: int) -> list:
        calls.append(threading.current_thread().name)
        if threading.current_thread().name == "first" and calls.count("first") == 2:
            second.start()  # the second refresh pins its query now, before this one's logs come back
            assert second_pinned.wait(30)
        elif threading.current_thread().name == "second" and not second_pinned.is_set():
            second_pinned.set()
            first_applied.wait(30)  # and writes nothing before the first has applied its chunk
        return real_query(start, end)

    index.query = query
    first = threading.Thread(target=lambda: (index.refresh(), first_applied.set()), name="first")
    second = threading.Thread(target=index.refresh, name="second")
    try:
        with caplog.at_level("INFO", logger="devnet.explorer.index"):
            first.start()
            first.join(60)
            second.join(60)
        assert second_pinned.is_set() and "changed while its logs were read" not in caplog.text
        assert index.cursor().block == anvil_chain.client().block_number()
    finally:
        db.dispose()
