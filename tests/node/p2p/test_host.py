"""The node's libp2p host as built by node/p2p/host.py:build_host, in one process: what py-libp2p 0.8.1 does that
the build mends."""

from __future__ import annotations

import contextlib
import os

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.common import PROTOCOL_ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from node.p2p.config import P2PConfig
from node.p2p.host import build_host, full_addrs

LISTEN = "/ip4/127.0.0.1/tcp/0"
KAD = TProtocol(PROTOCOL_ID)


def test_an_inbound_connection_holds_its_slot_until_it_closes():
    """py-libp2p's swarm takes an inbound slot (max_connections - min_connections of them: the rest is left to the
    node's own dials) when it accepts a connection, and gave it back only when the whole host stopped: after that
    many inbound connections in its life, all closed, a node accepted none (any peer's churn, or a stranger's
    throwaway ids, cut it off the mesh). With 6 connections, 2 slots: a connection holds one while it is open, and
    the fifth peer, one after another, still connects."""

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
                    assert slots.borrowed_tokens == 1
                    await peer.disconnect(node.get_id())
                with trio.fail_after(10):
                    while node.get_connected_peers() or slots.borrowed_tokens:
                        await trio.sleep(0.05)

    trio.run(main)


async def _find_node(host, node) -> bool:
    """Whether `node` answers one Kademlia FIND_NODE from `host` within 5 s."""
    from libp2p.kad_dht.pb.kademlia_pb2 import Message
    from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes

    with trio.move_on_after(5):
        try:
            stream = await host.new_stream(node.get_id(), [KAD])
            ask = Message(type=Message.MessageType.FIND_NODE, key=os.urandom(32))
            await stream.write(encode_varint_prefixed(ask.SerializeToString()))
            answer = Message()
            answer.ParseFromString(await read_varint_prefixed_bytes(stream))
            return answer.type == Message.MessageType.FIND_NODE
        except Exception:
            return False
    return False


@contextlib.asynccontextmanager
async def _dht_node(peers: int):
    """A node whose DHT is bounded as a node's is (node/p2p/host.py:bound_dht_streams), and `peers` hosts connected
    to it: (node, its DHT, the hosts)."""
    from libp2p.kad_dht.kad_dht import DHTMode, KadDHT

    from node.p2p.host import bound_dht_streams

    _, node = build_host(os.urandom(32), P2PConfig(listen=LISTEN))
    dht = KadDHT(node, DHTMode.SERVER)
    bound_dht_streams(dht)
    async with node.run(listen_addrs=[Multiaddr(LISTEN)]), contextlib.AsyncExitStack() as stack:
        info = info_from_p2p_addr(Multiaddr(full_addrs(node)[0]))
        hosts = [build_host(os.urandom(32), P2PConfig(listen=LISTEN))[1] for _ in range(peers)]
        for h in hosts:
            await stack.enter_async_context(h.run(listen_addrs=[Multiaddr(LISTEN)]))
            await h.connect(info)
        yield node, dht, hosts


def test_silent_kademlia_streams_of_strangers_leave_the_dht_answering(monkeypatch):
    """py-libp2p's DHT serves 12 streams at once and waits for each one's next message for ever: one peer with 12
    silent streams kept it from answering anyone. Two strangers open 16 each: they hold 2 each, those are reset
    once silent past the read deadline, and an honest FIND_NODE is answered meanwhile and after."""
    from node.p2p import host as host_module

    monkeypatch.setattr(host_module, "DHT_READ_IDLE_S", 3.0)

    async def main():
        async with _dht_node(3) as (node, dht, hosts):
            silent = []
            for stranger in hosts[:2]:
                for _ in range(16):
                    with contextlib.suppress(Exception):  # refused: the stranger's share is taken
                        silent.append(await stranger.new_stream(node.get_id(), [KAD]))
            with trio.fail_after(10):  # their handlers start soon after the streams open
                while not dht._inbound_limiter.borrowed_tokens:
                    await trio.sleep(0.05)
            await trio.sleep(0.2)
            assert 0 < dht._inbound_limiter.borrowed_tokens <= 4
            assert await _find_node(hosts[2], node)
            with trio.fail_after(10):
                while dht._inbound_limiter.borrowed_tokens:  # the silent ones reset after their deadline
                    await trio.sleep(0.1)
            assert await _find_node(hosts[2], node)

    trio.run(main)


def test_inbound_connections_from_one_address_are_capped():
    """Peer ids cost nothing: one machine's 60 connections held every inbound slot of a node, and its own dials had
    the 4 left. With 2 per address, a third peer from 127.0.0.1 is refused while two are connected, and a fourth is
    taken once one leaves."""

    async def main():
        _, node = build_host(os.urandom(32), P2PConfig(listen=LISTEN, max_inbound_per_network=2))
        async with node.run(listen_addrs=[Multiaddr(LISTEN)]):
            info = info_from_p2p_addr(Multiaddr(full_addrs(node)[0]))
            peers = [build_host(os.urandom(32), P2PConfig(listen=LISTEN))[1] for _ in range(4)]
            async with contextlib.AsyncExitStack() as stack:
                for p in peers:
                    await stack.enter_async_context(p.run(listen_addrs=[Multiaddr(LISTEN)]))
                for p in peers[:2]:
                    with trio.fail_after(10):
                        await p.connect(info)
                with trio.move_on_after(10), contextlib.suppress(Exception):
                    await peers[2].connect(info)
                await trio.sleep(0.3)
                assert set(node.get_connected_peers()) == {peers[0].get_id(), peers[1].get_id()}
                await peers[0].disconnect(node.get_id())
                with trio.fail_after(10):
                    while len(node.get_connected_peers()) > 1:
                        await trio.sleep(0.05)
                    await peers[3].connect(info)
                assert set(node.get_connected_peers()) == {peers[1].get_id(), peers[3].get_id()}

    trio.run(main)


@pytest.mark.parametrize(
    ("address", "network"),
    [
        ("8.8.8.8", "8.8.8.0/24"),
        ("2606:4700:4700::1111", "2606:4700:4700::/64"),
        ("::ffff:8.8.8.8", "8.8.8.0/24"),
        # IPv4 written as IPv6 is its IPv4 network (re-attack): 6to4 (one IPv4 owner had 65,536 /64s), NAT64 (every
        # IPv4 peer was one /64), Teredo (each address its own network)
        ("2002:808:808::1", "8.8.8.0/24"),
        ("2002:808:808:1::1", "8.8.8.0/24"),
        ("64:ff9b::8.8.8.8", "8.8.8.0/24"),
        ("64:ff9b::9.9.9.9", "9.9.9.0/24"),
        ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", "8.8.8.0/24"),
        ("127.0.0.2", "127.0.0.2"),
        ("10.1.2.3", "10.1.2.3"),
        ("fe80::1", "fe80::1"),
        ("not an address", "not an address"),
    ],
)
def test_a_network_is_a_public_addresss_24_or_64_and_any_other_address_alone(address, network):
    from node.p2p.host import network_of

    assert network_of(address) == network


def test_kademlia_streams_from_one_network_are_capped(monkeypatch):
    """Peer ids cost nothing: a cap per peer alone let one address's peers hold every DHT stream."""
    from node.p2p import host as host_module

    monkeypatch.setattr(host_module, "DHT_STREAMS_PER_NETWORK", 3)

    async def main():
        async with _dht_node(2) as (node, dht, peers):
            opened = []
            for p in peers:
                for _ in range(2):
                    with contextlib.suppress(Exception):
                        opened.append(await p.new_stream(node.get_id(), [KAD]))
            with trio.fail_after(10):  # their handlers start soon after the streams open
                while dht._inbound_limiter.borrowed_tokens < 3:
                    await trio.sleep(0.05)
            await trio.sleep(0.3)
            assert dht._inbound_limiter.borrowed_tokens == 3

    trio.run(main)
