"""A node whose every connection slot is held still dials the provider it needs: strangers' inbound connections
fill the inbound slots, and the node's own dials to strangers (providers it was led to try) fill the rest. py-libp2p
refuses a dial at max_connections, and its pruner trims only above it: the node could fetch from no new provider
for as long as the strangers held on (red team: 100 s and more, then py-libp2p's negative dial cache on top)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from node.adapters import AdapterStore
from node.p2p import P2PConfig, P2PError, P2PNode
from tests.utils.factories import make_base, make_package
from tests.utils.gateway import poll
from tests.utils.p2p import REPO, PeerProcess

pytestmark = pytest.mark.integration

MAX_CONNECTIONS = 6  # 2 inbound slots (max_connections less the 4 kept for the node's own dials)


def _process(module: str, *args: str) -> subprocess.Popen:
    """A helper process (`python -m module args`); its stdin closed ends it. Its stdout is read unbuffered
    (`_line`): a buffered readline took two lines at once, and the second one was never seen."""
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)


def _strangers(target: str, *args: str) -> subprocess.Popen:
    """The strangers' process (holding_peers.py) against `target`."""
    return _process("tests.node.p2p.holding_peers", target, *args)


_unread: dict[int, bytes] = {}  # a process's output read but not yet taken as lines (by pid)


def _said(proc: subprocess.Popen) -> bool:
    """Whether the process has a line for `_line` now."""
    if b"\n" not in _unread.get(proc.pid, b"") and select.select([proc.stdout], [], [], 0)[0]:
        _unread[proc.pid] = _unread.get(proc.pid, b"") + os.read(proc.stdout.fileno(), 65536)
    return b"\n" in _unread.get(proc.pid, b"")


def _line(proc: subprocess.Popen, timeout: float = 60.0) -> dict:
    """The process's next JSON line, within `timeout`."""
    deadline = time.monotonic() + timeout
    while b"\n" not in _unread.get(proc.pid, b""):
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(proc.stdout.fileno(), 65536) if ready else b""
        assert chunk, f"the process said nothing within {timeout} s (or ended)"
        _unread[proc.pid] = _unread.get(proc.pid, b"") + chunk
    line, _, _unread[proc.pid] = _unread[proc.pid].partition(b"\n")
    return json.loads(line)


@pytest.mark.parametrize("busy", ["", "busy", "asking"])
def test_a_node_with_every_slot_held_by_strangers_still_fetches_from_a_new_provider(tmp_path, packages, busy):
    """busy: the strangers it dialled keep an adapter stream open back to it, asking nothing: a connection carrying
    a transfer was never closed, so they kept their slots (review). asking: the streams ask for a package the node
    seeds and read nothing: an upload under way spared its connection, whatever the peer's standing, and the node
    could close none (red team on that fix: 10 fetches of 10 failed over 45 s)."""
    pkg, seeded = packages.main, packages.stalled
    owners = tmp_path / "owners.json"
    owners.write_text(json.dumps({pkg.adapter_id: packages.owner, seeded.adapter_id: packages.owner}))
    AdapterStore(tmp_path / "h").install(pkg.path)
    AdapterStore(tmp_path / "v").install(seeded.path)
    honest = PeerProcess(store=tmp_path / "h", owners=owners, base=packages.base)
    friend = PeerProcess(store=tmp_path / "f", owners=owners)  # the victim's bootstrap peer: trusted
    victim = PeerProcess(
        store=tmp_path / "v",
        owners=owners,
        base=packages.base,
        bootstrap=friend.addrs,
        config={"max_connections": MAX_CONNECTIONS},
    )
    asking = ["--ask", seeded.adapter_id] if busy == "asking" else []
    strangers = _strangers(
        victim.addrs[0], "--inbound", "2", "--listeners", "3", *(["--busy", *asking] if busy else [])
    )
    try:
        held = _line(strangers)
        assert held["inbound"] == 2
        poll(lambda: friend.peer_id in victim.call("status")["peers"], timeout=30)  # the bootstrap dial, at start
        for addr in held["listeners"]:  # the node's own dials, to strangers (as to providers it was told of)
            assert victim.call("connect", addr=addr)["ok"]
        if busy:  # asking: the inbound strangers' streams ask too
            assert _line(strangers) == {"busy": 5 if asking else 3}
        assert len(victim.call("status")["peers"]) == MAX_CONNECTIONS

        got = victim.call("fetch", adapter_id=pkg.adapter_id, providers=honest.addrs, timeout=60)

        assert got["ok"], got
        assert got["peer_id"] == honest.peer_id and got["attempts"] == 1
        peers = victim.call("status")["peers"]
        # a stranger's connection made room (its own dial to one), never the trusted peer's
        assert len(peers) <= MAX_CONNECTIONS and honest.peer_id in peers and friend.peer_id in peers
    finally:
        _end(strangers)
        for peer in (victim, friend, honest):
            peer.stop()


def test_two_dials_at_once_each_get_a_slot_strangers_cannot_take(tmp_path, packages):
    """Every slot taken, strangers dialling again every few milliseconds, and two fetches from two new providers at
    once: both dials picked the same connection to close (one failed at the cap), and the strangers took a freed
    slot before the node's own dial (which failed too); each failure kept py-libp2p from dialling that provider
    for 60 s (red team)."""
    a, b = packages.main, packages.stalled  # served honestly by the providers here
    owners = {pkg.adapter_id: packages.owner for pkg in (a, b)}
    (tmp_path / "owners.json").write_text(json.dumps(owners))
    providers = []
    for pkg in (a, b):
        AdapterStore(tmp_path / pkg.adapter_id).install(pkg.path)
        providers.append(PeerProcess(store=tmp_path / pkg.adapter_id, owners=tmp_path / "owners.json"))
    friend = PeerProcess(store=tmp_path / "f", owners=tmp_path / "owners.json")
    config = P2PConfig(listen="/ip4/127.0.0.1/tcp/0", bootstrap=tuple(friend.addrs), max_connections=MAX_CONNECTIONS)
    store = AdapterStore(tmp_path / "v")
    victim = P2PNode(seed=os.urandom(32), store=store, owner_of=owners.get, config=config, base_dir=packages.base)
    victim.start()
    strangers = _strangers(victim.listen_addrs[0], "--inbound", "1", "--listeners", "3", "--redial", "3")
    try:
        held = _line(strangers)
        poll(lambda: friend.peer_id in victim.connected_peers(), timeout=30)
        for addr in held["listeners"]:
            victim.connect(addr)
        poll(lambda: len(victim.connected_peers()) == MAX_CONNECTIONS, timeout=30)  # a redialler took the last
        with ThreadPoolExecutor(2) as pool:
            fetches = [
                pool.submit(victim.fetch, pkg.adapter_id, providers=p.addrs) for pkg, p in zip((a, b), providers)
            ]
            got = [f.result(timeout=120) for f in fetches]
        assert [g.adapter_id for g in got] == [a.adapter_id, b.adapter_id]
        assert friend.peer_id in victim.connected_peers()
    finally:
        _end(strangers)
        victim.stop()
        for peer in (friend, *providers):
            peer.stop()


def _dead_addr() -> str:
    """A full multiaddr where nothing listens (a port just released) for a peer id nobody holds: a node registered
    with a dead address, or a provider gone."""
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"/ip4/127.0.0.1/tcp/{port}/p2p/{ID.from_pubkey(create_new_key_pair().public_key)}"


def test_a_dial_to_a_dead_address_closes_no_connection(tmp_path, packages):
    """Every slot taken: a dial to an address where nothing answers (a node registered with a dead address costs a
    stranger gas only) closed a connection first, and the dial then failed all the same (red team)."""
    owners = tmp_path / "owners.json"
    owners.write_text("{}")
    friend = PeerProcess(store=tmp_path / "f", owners=owners)
    victim = PeerProcess(
        store=tmp_path / "v", owners=owners, bootstrap=friend.addrs, config={"max_connections": MAX_CONNECTIONS}
    )
    strangers = _strangers(victim.addrs[0], "--inbound", "2", "--listeners", "3")
    try:
        held = _line(strangers)
        poll(lambda: friend.peer_id in victim.call("status")["peers"], timeout=30)
        for addr in held["listeners"]:
            assert victim.call("connect", addr=addr)["ok"]
        before = set(victim.call("status")["peers"])
        assert len(before) == MAX_CONNECTIONS

        for _ in range(3):
            assert not victim.call("connect", addr=_dead_addr())["ok"]

        assert set(victim.call("status")["peers"]) == before
    finally:
        _end(strangers)
        for peer in (victim, friend):
            peer.stop()


def _end(proc: subprocess.Popen) -> None:
    """End a helper process: its stdin closed, killed if it lingers."""
    proc.stdin.close()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


def _stop(node: P2PNode | None, procs: list[subprocess.Popen], *peers: PeerProcess) -> None:
    try:
        if node is not None:
            node.stop()
    finally:
        for proc in procs:
            _end(proc)
        for peer in peers:
            peer.stop()


def _node_among_registered(tmp_path, packages, owners: dict, holds, registered: int, *trusted_too: str):
    """A node (max_connections 8: 4 inbound slots) holding `holds`, connected to `registered` peers it trusts (the
    registered nodes it dials at start: listeners of a holding_peers process, which is returned to be ended) and
    trusting `trusted_too`. Returns (node, that process, the registered peers' ids)."""
    proc, node = (
        _strangers("/ip4/127.0.0.1/tcp/1/p2p/" + _dead_addr().split("/p2p/")[1], "--listeners", str(registered)),
        None,
    )
    try:
        nodes = _line(proc)["listeners"]
        ids = {a.split("/p2p/")[1] for a in nodes}
        store = AdapterStore(tmp_path / "v")
        store.install(holds.path)
        trusted = ids | set(trusted_too)
        node = P2PNode(
            seed=os.urandom(32),
            store=store,
            owner_of=owners.get,
            config=P2PConfig(listen="/ip4/127.0.0.1/tcp/0", max_connections=8),
            base_dir=packages.base,
            trusted_peer=trusted.__contains__,
        )
        node.start()
        for addr in nodes:
            node.connect(addr)
    except BaseException:
        _stop(node, [proc])
        raise
    return node, proc, ids


@pytest.fixture(scope="module")
def big_package(tmp_path_factory, packages):
    """A 5.8 MB package: its download, at a pace above the server's minimum, outlasts the strangers' start and the
    victim's own fetch."""
    work = tmp_path_factory.mktemp("big")
    base = make_base(work / "base", hidden_size=512, intermediate_size=2048, num_layers=8, num_heads=8, num_kv_heads=4)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return make_package(base, work / "pkg", name="big", rank=16, targets=targets)


@pytest.mark.parametrize("dialled", [False, True], ids=["it-dialled", "node-dialled"])
def test_a_download_under_way_is_not_closed_to_make_room(tmp_path, packages, big_package, dialled):
    """An honest peer with no standing (an `adapter fetch`, or a node registered since the registry was last read)
    downloading from the node; strangers' inbound connections, newer than its own, bring the node to its cap. The
    node's next dial closed the oldest connection of no standing, the download's, after 1.4 of its 2.9 MB (red
    team): an upload being read is spared whatever the peer's standing, and whoever dialled (node-dialled: over a
    connection the node made, as its DHT or a fetch may, it was still cut, red team on that fix)."""
    pkg, other = big_package, packages.main
    owners = {pkg.adapter_id: packages.owner, other.adapter_id: packages.owner}
    (tmp_path / "owners.json").write_text(json.dumps(owners))
    AdapterStore(tmp_path / "p").install(other.path)
    provider = PeerProcess(store=tmp_path / "p", owners=tmp_path / "owners.json")
    victim, registered, _ = _node_among_registered(tmp_path, packages, owners, pkg, 5, provider.peer_id)
    procs = [registered]
    try:
        args = [victim.listen_addrs[0], pkg.adapter_id, str(300 * 1024), *(["--dialled"] if dialled else [])]
        honest = _process("tests.node.p2p.slow_downloader", *args)
        procs.append(honest)
        if dialled:
            victim.connect(_line(honest)["listening"])
        assert _line(honest) == {"receiving": True}
        procs.append(_strangers(victim.listen_addrs[0], "--inbound", "2"))
        assert _line(procs[-1])["inbound"] == 2
        poll(lambda: len(victim.connected_peers()) == 8, timeout=30)

        victim.fetch(other.adapter_id, providers=provider.addrs)

        assert not _said(honest), "the download ended before the dial: the test showed nothing"
        got = _line(honest, 120)
        assert got["ok"], got
        assert got["bytes"] >= sum(f.size for f in pkg.manifest.files)
    finally:
        _stop(victim, procs, provider)


class _LateThenSilent:
    """A stranger's address: its listen queue full (backlog 0, one connection of its own never accepted) until
    `late` seconds after arm(), so a SYN is dropped and the one retransmitted after that gets in; every connection
    it accepts then is held open, silent (no libp2p handshake)."""

    def __init__(self, late: float) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(0)
        self.port = self.server.getsockname()[1]
        self.filler = socket.create_connection(("127.0.0.1", self.port))
        self.late, self.held, self.done = late, [], threading.Event()

    def arm(self) -> None:
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        if self.done.wait(self.late):  # the attack's own delay
            return
        self.server.settimeout(0.05)
        while not self.done.is_set():
            with contextlib.suppress(OSError):
                self.held.append(self.server.accept()[0])

    def close(self) -> None:
        self.done.set()
        for s in (*self.held, self.filler, self.server):
            s.close()


def test_a_dial_at_the_cap_keeps_to_its_timeout_whatever_the_address_does(tmp_path):
    """At the cap, an address that accepted TCP only after 3 s and then stalled the handshake held the dial 3 s in
    the check that it answers and a whole dial_timeout more in the dial (8.3 s of 5, red team): one timeout holds
    for both."""
    config = P2PConfig(listen="/ip4/127.0.0.1/tcp/0", max_connections=MAX_CONNECTIONS)
    victim = P2PNode(seed=os.urandom(32), store=AdapterStore(tmp_path / "v"), owner_of=lambda _a: None, config=config)
    victim.start()
    strangers = _strangers(victim.listen_addrs[0], "--inbound", "2", "--listeners", "4")
    late = _LateThenSilent(2.5)
    try:
        for addr in _line(strangers)["listeners"]:
            victim.connect(addr)
        poll(lambda: len(victim.connected_peers()) == MAX_CONNECTIONS, timeout=30)
        late.arm()
        started = time.monotonic()
        with pytest.raises(P2PError, match="timed out"):
            victim.connect(f"/ip4/127.0.0.1/tcp/{late.port}/p2p/{_dead_addr().split('/p2p/')[1]}")
        assert time.monotonic() - started < config.dial_timeout + 1.5  # 8.3 s before: the check's 3 s, then 5
    finally:
        _end(strangers)
        late.close()
        victim.stop()


def test_strangers_asking_for_a_package_and_reading_nothing_shield_no_connection(tmp_path, packages):
    """Two strangers dial in and keep asking for a package the node seeds, reading nothing; the node's other
    connections are its dials to registered nodes. An upload over a connection the peer dialled was spared however
    it went: no connection could go, and 35 fetches of 35 from a provider with no standing failed over 62 s (red
    team). Asking is not reading: theirs go."""
    pkg, seeded = packages.main, packages.stalled
    owners = {pkg.adapter_id: packages.owner, seeded.adapter_id: packages.owner}
    (tmp_path / "owners.json").write_text(json.dumps(owners))
    AdapterStore(tmp_path / "p").install(pkg.path)
    provider = PeerProcess(store=tmp_path / "p", owners=tmp_path / "owners.json")
    victim, registered, trusted = _node_among_registered(tmp_path, packages, owners, seeded, 6)
    procs = [registered]
    try:
        procs.append(_strangers(victim.listen_addrs[0], "--inbound", "2", "--ask", seeded.adapter_id))
        assert _line(procs[-1])["inbound"] == 2
        assert _line(procs[-1]) == {"busy": 2}
        poll(lambda: len(victim.connected_peers()) == 8, timeout=30)

        got = victim.fetch(pkg.adapter_id, providers=provider.addrs)

        assert got.adapter_id == pkg.adapter_id
        assert trusted <= set(victim.connected_peers())  # a stranger's connection went, no registered node's
    finally:
        _stop(victim, procs, provider)
