"""A reorg while the indexer reads a chunk's logs: the chunk's last block hash was read after eth_getLogs, so a
reorg landing between the two kept the dropped blocks' logs under the new chain's hash, every later reorg check
passed, and the explorer showed a dataset and a node the chain never had (red team). The hash is read before the
logs and again after now, as ledger.mirror.sync_registry does, and a step whose block changed is read again.

Real anvil (its own, module-scoped: it is reverted here), real SQLite; the only injection is the reorg's moment,
right after the log query returns (on a live chain that moment is chance)."""

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
