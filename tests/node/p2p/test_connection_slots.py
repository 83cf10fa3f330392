"""A node whose every connection slot is held still dials the provider it needs: strangers' inbound connections
fill the inbound slots, and the node's own dials to strangers (providers it was led to try) fill the rest. py-libp2p
refuses a dial at max_connections, and its pruner trims only above it: the node could fetch from no new provider
for as long as the strangers held on (red team: 100 s and more, then py-libp2p's negative dial cache on top)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from node.adapters import AdapterStore
from tests.utils.gateway import poll
from tests.utils.p2p import REPO, PeerProcess

pytestmark = pytest.mark.integration

MAX_CONNECTIONS = 6  # 2 inbound slots (max_connections less the 4 kept for the node's own dials)


def test_a_node_with_every_slot_held_by_strangers_still_fetches_from_a_new_provider(tmp_path, packages):
    pkg = packages.main
    owners = tmp_path / "owners.json"
    owners.write_text(json.dumps({pkg.adapter_id: packages.owner}))
    AdapterStore(tmp_path / "h").install(pkg.path)
    honest = PeerProcess(store=tmp_path / "h", owners=owners, base=packages.base)
    friend = PeerProcess(store=tmp_path / "f", owners=owners)  # the victim's bootstrap peer: trusted
    victim = PeerProcess(
        store=tmp_path / "v",
        owners=owners,
        base=packages.base,
        bootstrap=friend.addrs,
        config={"max_connections": MAX_CONNECTIONS},
    )
    strangers = subprocess.Popen(
        [sys.executable, "-m", "tests.node.p2p.holding_peers", victim.addrs[0], "--inbound", "2", "--listeners", "3"],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        held = json.loads(strangers.stdout.readline())
        assert held["inbound"] == 2
        poll(lambda: friend.peer_id in victim.call("status")["peers"], timeout=30)  # the bootstrap dial, at start
        for addr in held["listeners"]:  # the node's own dials, to strangers (as to providers it was told of)
            assert victim.call("connect", addr=addr)["ok"]
        assert len(victim.call("status")["peers"]) == MAX_CONNECTIONS

        got = victim.call("fetch", adapter_id=pkg.adapter_id, providers=honest.addrs, timeout=60)

        assert got["ok"], got
        assert got["peer_id"] == honest.peer_id and got["attempts"] == 1
        peers = victim.call("status")["peers"]
        # a stranger's connection made room (its own dial to one), never the trusted peer's
        assert len(peers) <= MAX_CONNECTIONS and honest.peer_id in peers and friend.peer_id in peers
    finally:
        strangers.stdin.close()
        strangers.wait(30)
        for peer in (victim, friend, honest):
            peer.stop()
