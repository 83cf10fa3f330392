"""P2PNode driven from asyncio (as the node daemon will), against peer processes and in-process hosts."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from dataclasses import replace

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from node.adapters import AdapterStore
from node.p2p import P2PConfig, P2PNode
from node.p2p.errors import FetchError, P2PError
from tests.utils.p2p import FaultyServer

pytestmark = pytest.mark.integration

CONFIG = P2PConfig(listen="/ip4/127.0.0.1/tcp/0", read_timeout=2, discover_timeout=3, announce_interval=1)


def _owners(packages):
    ids = [p.adapter_id for p in (packages.main, packages.stalled, packages.dropped, packages.tampered)]
    return {i: packages.owner for i in ids}.get


def test_provider_without_the_adapter_refuses(mesh, packages):
    pkg = packages.oversized  # A does not hold it; F does (and misbehaves)
    got = mesh.c.call("fetch", adapter_id=pkg.adapter_id, providers=[mesh.a.addrs[0]])

    assert not got["ok"]
    assert got["failures"][0] == f"{mesh.a.peer_id}: provider refused: this node does not hold adapter {pkg.adapter_id}"


def test_afetch_from_asyncio_reports_progress(mesh, packages, tmp_path):
    store = AdapterStore(tmp_path / "store")
    seen = []
    with P2PNode(
        seed=os.urandom(32), store=store, owner_of=_owners(packages), config=CONFIG, base_dir=packages.base
    ) as node:

        async def main():
            return await node.afetch(packages.main.adapter_id, providers=[mesh.a.addrs[0]], on_progress=seen.append)

        pkg = asyncio.run(main())
        assert node.held == [packages.main.adapter_id]
    assert pkg.path == store.path_for(packages.main.adapter_id) and pkg.signer == packages.owner
    states = [s.state for s in seen]
    assert states[0] == "discovering" and states[-2:] == ["verifying", "done"]
    last = seen[-1]
    assert last.done == last.total == sum(f.size for f in packages.main.manifest.files)


def test_cancelling_afetch_discards_the_partial_download(mesh, packages, tmp_path):
    store = AdapterStore(tmp_path / "store")
    config = replace(CONFIG, read_timeout=30)  # the stall would last 30 s; the caller gives up first
    with P2PNode(
        seed=os.urandom(32), store=store, owner_of=_owners(packages), config=config, base_dir=packages.base
    ) as node:

        async def main():
            await asyncio.wait_for(node.afetch(packages.stalled.adapter_id, providers=[mesh.f.addrs[0]]), 1.5)

        with pytest.raises(TimeoutError):
            asyncio.run(main())
        for _ in range(50):
            status = {t.adapter_id: t for t in node.transfers()}.get(packages.stalled.adapter_id)
            if status and status.state == "failed":
                break
            asyncio.run(asyncio.sleep(0.1))
        assert status.state == "failed"
    assert not store.path_for(packages.stalled.adapter_id).exists()
    assert list((tmp_path / "store" / ".tmp").iterdir()) == []


class _StallAll(FaultyServer):
    faults = {}


def test_inbound_stream_cap_refuses_extra_streams(packages, tmp_path):
    stalled, dropped = packages.stalled, packages.dropped
    _StallAll.faults = {stalled.adapter_id: "stall", dropped.adapter_id: "stall"}
    server_store = AdapterStore(tmp_path / "server")
    server_store.install(stalled.path)
    server_store.install(dropped.path)
    server_cfg = replace(CONFIG, max_inbound_streams=1, read_timeout=3)
    with (
        P2PNode(
            seed=os.urandom(32),
            store=server_store,
            owner_of=_owners(packages),
            config=server_cfg,
            server_factory=_StallAll,
        ) as server,
        P2PNode(
            seed=os.urandom(32),
            store=AdapterStore(tmp_path / "client"),
            owner_of=_owners(packages),
            config=replace(CONFIG, read_timeout=4.5),
        ) as client,
    ):
        addr = server.listen_addrs[0]

        async def main():
            first = asyncio.create_task(client.afetch(stalled.adapter_id, providers=[addr]))
            # the first stream holds the only slot, stalled until the client's read timeout (4.5 s, below the 5 s
            # transfer grace) gives it up: the second asks 2 s in, 2.5 s before the slot frees
            await asyncio.sleep(2.0)
            with pytest.raises(FetchError, match="provider refused: busy: already serving 1 streams"):
                await client.afetch(dropped.adapter_id, providers=[addr])
            with pytest.raises(FetchError, match="stalled mid-frame"):
                await first

        asyncio.run(main())


def test_calls_before_start_are_refused(packages, tmp_path):
    node = P2PNode(seed=os.urandom(32), store=AdapterStore(tmp_path / "s"), owner_of=_owners(packages), config=CONFIG)
    with pytest.raises(P2PError, match="the p2p node is not started"):
        node.fetch(packages.main.adapter_id)


def test_bad_seed_refused(packages, tmp_path):
    with pytest.raises(ValueError, match=r"node seed must be 32 bytes \(Identity.node_seed\), got 5"):
        P2PNode(seed=b"short", store=AdapterStore(tmp_path / "s"), owner_of=_owners(packages), config=CONFIG)


def test_listen_port_in_use_fails_start_with_one_line(packages, tmp_path):
    with P2PNode(
        seed=os.urandom(32), store=AdapterStore(tmp_path / "a"), owner_of=_owners(packages), config=CONFIG
    ) as first:
        taken = first.listen_addrs[0].split("/p2p/")[0]
        second = P2PNode(
            seed=os.urandom(32),
            store=AdapterStore(tmp_path / "b"),
            owner_of=_owners(packages),
            config=replace(CONFIG, listen=taken),
        )
        with pytest.raises(P2PError, match="the p2p host failed to start: ") as err:
            second.start()
        assert "\n" not in str(err.value) and "sub-exception" not in str(err.value)
        print(err.value)


def test_announce_requires_holding_the_adapter(packages, tmp_path):
    with P2PNode(
        seed=os.urandom(32), store=AdapterStore(tmp_path / "s"), owner_of=_owners(packages), config=CONFIG
    ) as node:
        with pytest.raises(P2PError, match="this node's store does not hold it"):
            node.announce(packages.main.adapter_id)


def _tarpit() -> tuple[socket.socket, int]:
    """A TCP port that accepts connections and never says a word."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held = []

    def accept():
        while True:
            try:
                held.append(srv.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return srv, srv.getsockname()[1]


def test_peers_from_the_registry_are_dialled_beside_each_other_in_the_background(mesh, packages, tmp_path):
    # anyone may register nodes whose addresses accept and never answer: dialled one after another, 12 of
    # them held a node's start for 60 s (dial_timeout each) before its API served, and an honest peer
    # listed after them waited as long
    srv, port = _tarpit()
    fake = [  # 12 registered peers (each its own id) at the silent port
        f"/ip4/127.0.0.1/tcp/{port}/p2p/{ID.from_pubkey(create_new_key_pair().public_key).to_base58()}"
        for _ in range(12)
    ]
    with P2PNode(
        seed=os.urandom(32), store=AdapterStore(tmp_path / "s"), owner_of=_owners(packages), config=CONFIG
    ) as node:
        started = time.monotonic()
        node.add_peers(fake + [mesh.a.addrs[0]])
        assert time.monotonic() - started < 1.0  # it returns at once: the dials go on in the background
        deadline = started + 2 * CONFIG.dial_timeout
        while mesh.a.peer_id not in node.connected_peers():
            assert time.monotonic() < deadline, "the honest peer was not dialled beside the silent ones"
            time.sleep(0.1)
    srv.close()


def test_the_status_stays_bounded_however_many_adapters_were_asked_for(tmp_path):
    """Each fetch kept its progress for good, and the status page (every heartbeat's body) listed all: a client
    naming 250 adapters this node lacked made every gateway refuse its heartbeats (over 64 KiB)."""
    from node.p2p.errors import UnregisteredAdapter
    from node.p2p.fetcher import RECENT_TRANSFERS
    from node.p2p.node import STATUS_LIST

    with P2PNode(
        seed=os.urandom(32), store=AdapterStore(tmp_path / "store"), owner_of=lambda _aid: None, config=CONFIG
    ) as node:
        asked = [f"0x{i:064x}" for i in range(1, 101)]
        for aid in asked:
            with pytest.raises(UnregisteredAdapter):
                node.fetch(aid)
        kept = node.transfers()
        assert [t.adapter_id for t in kept] == asked[-RECENT_TRANSFERS:]  # the newest, the last at the end
        assert all(t.state == "failed" for t in kept)

        async def locks() -> int:
            return len(node._m().fetcher._locks)

        assert node._thread.call(locks) == 0  # one per id fetched, kept for good, until now
        status = node.status()
        assert len(status["transfers"]) == STATUS_LIST and status["held"] == [] and status["held_count"] == 0
