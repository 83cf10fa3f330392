"""Upload slots against made-up peer ids: the per-peer cap alone let four free peer ids hold all eight
slots with streams that never ask; peers without standing now share half, and peers with standing
(registered nodes, bootstrap peers, peers that served us) still get a slot."""

from __future__ import annotations

from types import SimpleNamespace

import trio

from node.adapters import AdapterStore
from node.p2p.config import P2PConfig
from node.p2p.server import AdapterServer
from node.p2p.standing import TRUSTED, UNKNOWN


class IdleStream:
    """A stream from `peer` that never sends its request; records what the server wrote before closing."""

    def __init__(self, peer: str) -> None:
        self.muxed_conn = SimpleNamespace(peer_id=peer)
        self.written = b""
        self.closed = False

    async def read(self, n: int | None = None) -> bytes:
        await trio.sleep_forever()

    async def write(self, data: bytes) -> None:
        self.written += data

    async def close(self) -> None:
        self.closed = True

    async def reset(self) -> None:
        self.closed = True


def test_strangers_share_half_the_slots_and_peers_with_standing_still_get_one(tmp_path):
    config = P2PConfig(max_inbound_streams=8, max_streams_per_peer=2, request_timeout=30.0)
    server = AdapterServer(AdapterStore(tmp_path / "store"), config=config)
    server.standing = lambda peer: TRUSTED if peer.startswith("registered") else UNKNOWN

    async def main():
        async with trio.open_nursery() as nursery:
            idle = [IdleStream(f"made-up-{i // 2}") for i in range(8)]  # 4 peer ids, 2 streams each
            for s in idle:
                nursery.start_soon(server.handle, s)
            await trio.sleep(0.1)
            assert sum(s.closed for s in idle) == 4  # the second half was refused
            assert all(b"without standing" in s.written for s in idle if s.closed)
            honest = IdleStream("registered-node")
            nursery.start_soon(server.handle, honest)
            await trio.sleep(0.1)
            assert not honest.closed  # it holds a slot: the server is waiting for its request
            nursery.cancel_scope.cancel()

    trio.run(main)
