"""The node's libp2p host as built by node/p2p/host.py:build_host, in one process: what py-libp2p 0.8.1 does that
the build mends."""

from __future__ import annotations

import os

import trio
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from node.p2p.config import P2PConfig
from node.p2p.host import build_host, full_addrs

LISTEN = "/ip4/127.0.0.1/tcp/0"


def test_inbound_connections_that_closed_give_their_handshake_slots_back():
    """py-libp2p's swarm takes an inbound slot (max_connections - min_connections of them) when it accepts a
    connection and gave it back only when the whole host stopped: after that many inbound connections in its life,
    all closed, a node accepted none (any peer's churn, or a stranger's throwaway ids, cut it off the mesh). With 6
    connections, 2 slots: the fifth peer, one after another, still connects, and the handler of each is gone."""

    async def main():
        _, node = build_host(os.urandom(32), P2PConfig(listen=LISTEN, max_connections=6))
        async with node.run(listen_addrs=[Multiaddr(LISTEN)]):
            info = info_from_p2p_addr(Multiaddr(full_addrs(node)[0]))
            slots = node.get_network()._inbound_limiter
            assert slots.total_tokens == 2
            for _ in range(5):
                _, peer = build_host(os.urandom(32), P2PConfig(listen=LISTEN))
                async with peer.run(listen_addrs=[Multiaddr(LISTEN)]):
                    with trio.fail_after(10):
                        await peer.connect(info)
                    await peer.disconnect(node.get_id())
                with trio.fail_after(10):
                    while node.get_connected_peers() or slots.borrowed_tokens:
                        await trio.sleep(0.05)

    trio.run(main)
