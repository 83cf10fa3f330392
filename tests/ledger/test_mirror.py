"""Registry mirror tables follow AdapterRegistry events, incrementally."""

import json
import sqlite3

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text
from sqlmodel import Session, select

from common.wire import node_id_of
from gateway.chain_registry import RegistryView
from ledger.db import init_db, make_engine
from ledger.errors import UnknownNode
from ledger.mirror import CURSOR, sync_registry
from ledger.models import AdapterMirror, DatasetMirror, NodeMirror, SyncCursor
from tests.utils.chain import rand_id, register_sample

pytestmark = pytest.mark.integration


def test_mirror_tracks_registrations_and_updates(anvil_chain, tmp_path):
    env = anvil_chain
    engine = make_engine(f"sqlite:///{tmp_path}/mirror.db")
    init_db(engine)
    reg = register_sample(env, price=1234, shares=(1000, 2000))
    client = env.client()
    assert sync_registry(engine, client) > 0
    with Session(engine) as s:
        a = s.get(AdapterMirror, reg.adapter_id)
        assert (a.owner, a.price_per_1k_tokens, a.base_model) == (reg.owner.address, "1234", reg.base_model)
        assert json.loads(a.datasets_json) == [[reg.dataset_ids[0], 1000], [reg.dataset_ids[1], 2000]]
        n = s.get(NodeMirror, reg.node_id)
        assert (n.operator, n.active, json.loads(n.multiaddrs_json)) == (
            reg.operator.address,
            True,
            ["/ip4/127.0.0.1/tcp/4001"],
        )
        assert s.get(DatasetMirror, reg.dataset_ids[0]).payee == reg.payees[0].address
    assert sync_registry(engine, client) == 0  # nothing new

    heir = env.users[7]
    env.client(reg.owner).set_adapter_price(reg.adapter_id, 99)
    env.client(reg.owner).transfer_adapter(reg.adapter_id, heir.address)
    new_base = rand_id()
    env.client(reg.operator).update_node(
        reg.node_id, peer_id="p2", multiaddrs=[], api_url="http://new", base_model=new_base
    )
    env.client(reg.operator).set_node_active(reg.node_id, False)
    env.client(reg.payees[0]).set_dataset_payee(reg.dataset_ids[0], heir.address)
    assert sync_registry(engine, client) == 5
    with Session(engine) as s:
        a = s.get(AdapterMirror, reg.adapter_id)
        assert (a.owner, a.price_per_1k_tokens) == (heir.address, "99")
        n = s.get(NodeMirror, reg.node_id)
        assert (n.active, n.api_url, n.peer_id, n.base_model) == (False, "http://new", "p2", new_base)
        assert s.get(DatasetMirror, reg.dataset_ids[0]).payee == heir.address
    engine.dispose()


def test_mirror_tracks_names_publishers_contributors_and_node_keys(anvil_chain, tmp_path):
    from ledger.models import NameMirror

    env = anvil_chain
    engine = make_engine(f"sqlite:///{tmp_path}/names.db")
    init_db(engine)
    reg = register_sample(env, shares=(1000,))
    name = env.client().get_adapter(reg.adapter_id).name
    heir = env.users[7]
    env.client(reg.owner).transfer_name(name, heir.address)
    sync_registry(engine, env.client())
    with Session(engine) as s:
        assert s.get(NameMirror, name).owner == heir.address
        a = s.get(AdapterMirror, reg.adapter_id)
        assert (a.owner, a.publisher) == (reg.owner.address, reg.owner.address)
        d = s.get(DatasetMirror, reg.dataset_ids[0])
        assert d.contributor == reg.payees[0].address and d.name.startswith("ds-")
        n = s.get(NodeMirror, reg.node_id)
        assert "0x" + n.public_key == env.client().get_node(reg.node_id).public_key
    engine.dispose()


def test_mirror_tables_of_an_older_schema_are_rebuilt_from_events(anvil_chain, tmp_path):
    from sqlalchemy import text

    from ledger.mirror import ensure_mirror_schema

    env = anvil_chain
    reg = register_sample(env)
    url = f"sqlite:///{tmp_path}/old.db"
    old = make_engine(url)
    with old.begin() as c:  # the adapters table as it was before publishers were mirrored
        c.execute(
            text(
                "CREATE TABLE adapters (adapter_id VARCHAR(66) PRIMARY KEY, owner VARCHAR(42), name VARCHAR,"
                " version VARCHAR, predecessor VARCHAR(66), base_model VARCHAR(66), price_per_1k_tokens VARCHAR,"
                " datasets_json TEXT, registered_block INTEGER, updated_block INTEGER)"
            )
        )
        c.execute(text("CREATE TABLE sync_cursors (name VARCHAR(64) PRIMARY KEY, block INTEGER)"))
        c.execute(text("INSERT INTO sync_cursors VALUES ('registry', 999999)"))
    old.dispose()
    engine = make_engine(url)
    assert ensure_mirror_schema(engine) and not ensure_mirror_schema(engine)  # once per engine
    sync_registry(engine, env.client())  # from the deploy block again
    with Session(engine) as s:
        assert s.get(AdapterMirror, reg.adapter_id).publisher == reg.owner.address
    engine.dispose()


def _rpc(client, method: str, params: list):
    resp = client.w3.provider.make_request(method, params)
    assert "error" not in resp, resp
    return resp.get("result")


def test_a_registration_a_reorg_dropped_leaves_the_mirror(anvil_chain, engine):
    """The mirror kept a block number as its cursor: an event of a block a reorg dropped stayed applied for good (a
    node the chain does not know was listed and routed to)."""
    env = anvil_chain
    client = env.client()
    register_sample(env)
    sync_registry(engine, client)
    before = _rpc(client, "evm_snapshot", [])
    key = Ed25519PrivateKey.generate()
    ghost = node_id_of(key.public_key().public_bytes_raw())
    env.client(env.users[5]).register_node(
        key, peer_id="12D3KooWghost", multiaddrs=[], api_url="http://10.6.6.6:9000", base_model="0x" + "ab" * 32
    )
    sync_registry(engine, client)
    assert RegistryView(engine).node(ghost) is not None
    _rpc(client, "evm_revert", [before])  # the block with the registration is gone, and the chain grows past it
    _rpc(client, "anvil_mine", ["0x3"])
    with pytest.raises(UnknownNode):
        client.get_node(ghost)
    sync_registry(engine, client)
    assert RegistryView(engine).node(ghost) is None


def test_a_price_change_mined_in_a_replacement_block_is_read(anvil_chain, engine):
    """A reorg mines an owner's new price at a height the mirror had already read: it was never read, and the
    gateway quoted and bounded the adapter's requests at a price the chain no longer had."""
    env = anvil_chain
    reg = register_sample(env, price=10**12)
    client = env.client()
    sync_registry(engine, client)
    before = _rpc(client, "evm_snapshot", [])
    _rpc(client, "anvil_mine", ["0x1"])
    sync_registry(engine, client)  # the cursor at a block of the history about to be dropped
    _rpc(client, "evm_revert", [before])
    env.client(reg.owner).set_adapter_price(reg.adapter_id, 5 * 10**12)  # at the height the mirror has read
    _rpc(client, "anvil_mine", ["0x5"])
    sync_registry(engine, client)
    with Session(engine) as s:
        assert int(s.get(AdapterMirror, reg.adapter_id).price_per_1k_tokens) == 5 * 10**12


def test_a_rebuild_reads_the_chain_without_holding_the_database(anvil_chain, tmp_path, caplog):
    """A reorg under the cursor (routine at a chain's head) emptied the mirror first and then read every registry
    event from the deploy block: on SQLite the emptying took the write lock, held through every read of the
    rescan, and the gateway's usage writes waited on it."""
    url = f"sqlite:///{tmp_path}/gw.db"
    engine = make_engine(url)  # as the gateway makes it
    init_db(engine)
    env = anvil_chain
    client = env.client()
    register_sample(env)
    sync_registry(engine, client)
    _rpc(client, "anvil_reorg", [1, []])
    _rpc(client, "anvil_mine", ["0x1"])
    blocked: list[str] = []
    events = client.events

    def write_then_read(*a, **kw):  # the gateway recording usage while the mirror reads the chain
        other = sqlite3.connect(f"{tmp_path}/gw.db", timeout=0.2)
        try:
            other.execute("CREATE TABLE IF NOT EXISTS probe (x INTEGER)")
            other.execute("INSERT INTO probe VALUES (1)")
            other.commit()
        except sqlite3.OperationalError as e:
            blocked.append(str(e))
        finally:
            other.close()
        return events(*a, **kw)

    client.events = write_then_read
    with caplog.at_level("WARNING", logger="ledger.mirror"):
        assert sync_registry(engine, client) > 0
    assert "no longer the chain's" in caplog.text and blocked == []
    engine.dispose()


class _OneBlockBehind:
    """A load-balanced RPC whose backend answering now is one block behind the one the last sync asked."""

    def __init__(self, client, head: int) -> None:
        self._client, self._head = client, head

    def __getattr__(self, name):
        return getattr(self._client, name)

    def block_number(self) -> int:
        return self._head

    def block_hash(self, number: int):
        return None if number > self._head else self._client.block_hash(number)


def test_a_provider_behind_the_cursor_is_no_reorg(anvil_chain, engine):
    """A backend that does not have the cursor's block yet answers null for it: that was taken for a reorg, and the
    mirror was emptied and read again from the deploy block."""
    env = anvil_chain
    client = env.client()
    register_sample(env)
    sync_registry(engine, client)
    with Session(engine) as s:
        rows, at = len(s.exec(select(AdapterMirror)).all()), s.get(SyncCursor, CURSOR).block
    assert sync_registry(engine, _OneBlockBehind(client, at - 1)) == 0
    with Session(engine) as s:
        assert len(s.exec(select(AdapterMirror)).all()) == rows and s.get(SyncCursor, CURSOR).block == at


def test_a_cursor_moved_without_its_hash_is_no_reorg(anvil_chain, engine, caplog):
    """A gateway of an older release on the same database moves the cursor's block alone: the hash of the block the
    newer one read stayed beside it, and every later sync took it for a reorg and read the registry again."""
    env = anvil_chain
    client = env.client()
    register_sample(env)
    sync_registry(engine, client)
    _rpc(client, "anvil_mine", ["0x2"])
    with Session(engine) as s:  # what the older release's sync writes
        s.execute(text("UPDATE sync_cursors SET block = block + 1"))
        s.commit()
    with caplog.at_level("WARNING", logger="ledger.mirror"):
        sync_registry(engine, client)
        register_sample(env)
        assert sync_registry(engine, client) > 0
    assert "no longer the chain's" not in caplog.text


def test_the_mirror_reads_confirmations_behind_the_head(anvil_chain, engine):
    env = anvil_chain
    client = env.client()
    reg = register_sample(env)
    sync_registry(engine, client, confirmations=3)
    with Session(engine) as s:
        assert s.get(AdapterMirror, reg.adapter_id) is None
    _rpc(client, "anvil_mine", ["0x3"])
    sync_registry(engine, client, confirmations=3)
    with Session(engine) as s:
        assert s.get(AdapterMirror, reg.adapter_id) is not None


def test_a_chain_reset_below_the_cursor_is_read_again(anvil_chain, engine):
    """A chain far shorter than the cursor (a devnet reset, a deep reorg) answers null for the cursor's block, as
    a provider a block behind does: the mirror kept what the chain no longer has, and read none of the new chain's,
    until it grew past the old cursor."""
    env = anvil_chain
    client = env.client()
    before = _rpc(client, "evm_snapshot", [])
    gone = register_sample(env)
    _rpc(client, "anvil_mine", ["0x20"])
    assert sync_registry(engine, client) > 0
    _rpc(client, "evm_revert", [before])
    new = register_sample(env)
    sync_registry(engine, client)
    with Session(engine) as s:
        assert s.get(NodeMirror, gone.node_id) is None and s.get(NodeMirror, new.node_id) is not None


# a gateway's process that syncs the mirror and kills itself (SIGKILL) right after one table's DROP returns
_SYNC_AND_DIE = r"""
import os, sys
from sqlalchemy import event
from ledger.chain import ChainClient
from ledger.db import make_engine
from ledger.mirror import sync_registry

url, deployment, table = sys.argv[1:4]
engine = make_engine(url)

@event.listens_for(engine, "after_cursor_execute")
def _die(conn, cursor, statement, params, context, executemany):
    words = statement.split()
    if words[:2] == ["DROP", "TABLE"] and words[-1].strip('"') == table:
        os.kill(os.getpid(), 9)

sync_registry(engine, ChainClient.from_deployment(deployment, check=False))
"""


@pytest.mark.parametrize("table", ["sync_cursors", "datasets", "adapter_names", "adapters", "nodes"])
def test_a_rebuild_killed_between_its_drops_loses_nothing(anvil_chain, tmp_path, table):
    """The rebuild of an older schema drops each table on its own (SQLite commits each DROP): a kill between two
    drops must leave nothing a restart takes for a mirror already read (tables emptied under a cursor left at the
    head stayed empty for good)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = anvil_chain
    db = tmp_path / "gw.db"
    engine = make_engine(f"sqlite:///{db}")
    init_db(engine)
    reg = register_sample(env)
    assert sync_registry(engine, env.client()) > 0
    engine.dispose()
    con = sqlite3.connect(db)  # one mirror table of an older schema: the whole mirror is rebuilt
    con.execute("ALTER TABLE datasets DROP COLUMN name")
    con.commit()
    con.close()
    root = Path(__file__).resolve().parents[2]
    died = subprocess.run(
        [sys.executable, "-c", _SYNC_AND_DIE, f"sqlite:///{db}", str(env.deployment_path), table],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert died.returncode == -9, (died.returncode, died.stderr[-2000:])
    restarted = make_engine(f"sqlite:///{db}")
    sync_registry(restarted, env.client())
    with Session(restarted) as s:
        assert s.get(DatasetMirror, reg.dataset_ids[0]) is not None
        assert s.get(AdapterMirror, reg.adapter_id) is not None
        assert s.get(NodeMirror, reg.node_id) is not None
    restarted.dispose()


def test_the_gateways_snapshot_is_read_again_only_when_the_mirror_changed(anvil_chain, engine, monkeypatch):
    """RegistryView.sync re-read every adapter, node and name every 2 s whether or not an event came: 4,000 adapters a
    stranger registered made each read 58 ms (red team). It now reads them again when the mirror's change token moved:
    its own sync's events, a sibling gateway's (same database), or a rebuild."""
    env = anvil_chain
    reg = register_sample(env)
    name = f"adapter-{reg.adapter_id[2:8]}"  # register_sample's
    mine, sibling = RegistryView(engine, env.client()), RegistryView(engine, env.client())
    reads = []
    real = RegistryView.reload
    monkeypatch.setattr(RegistryView, "reload", lambda self: (reads.append(self), real(self)))
    assert mine.sync() and reads == [mine]
    assert mine.adapter_by_name(name) is not None
    _rpc(env.client(), "anvil_mine", ["0x2"])  # blocks, no registry event
    assert mine.sync() and reads == [mine]
    env.client(reg.owner).set_adapter_price(reg.adapter_id, 77)
    assert sibling.sync()  # the sibling applies the event; this gateway's sync then finds nothing to apply...
    assert mine.sync() and reads == [mine, sibling, mine]  # ...and reads the snapshot again all the same
    heir = env.users[6]
    env.client(reg.owner).transfer_name(name, heir.address)
    assert mine.sync() and reads[-1] is mine and mine.name_owners[name] == heir.address
