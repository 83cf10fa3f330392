"""An honest peer with no standing on its target (a `loramesh adapter fetch`, or a node registered since the target
last read the registry) downloading one adapter at RATE bytes a second, above the server's minimum rate. Prints
{"receiving": true} once 1.25 MiB came, then {"ok": bool, "bytes": n, "error": str | None} when the
download ended, and holds its connection until stdin closes. With --dialled, it prints {"listening": multiaddr}
and waits for the target to dial it (as the target's DHT or a fetch may), then downloads over that connection.

    python -m tests.node.p2p.slow_downloader TARGET_MULTIADDR ADAPTER_ID RATE [--dialled]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from node.p2p.config import P2PConfig
from node.p2p.host import build_host, full_addrs, route_libp2p_logging
from node.p2p.protocol import PROTOCOL_ID, Pace, request_package

LISTEN = "/ip4/127.0.0.1/tcp/0"
# read when it says it is receiving: past the sender's first 1 MiB DATA frame, whose write completing shows reading
RECEIVING = 1280 * 1024


def _say(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class _Paced:
    """The stream, read no faster than `rate` bytes a second."""

    def __init__(self, stream, rate: float) -> None:
        self.stream, self.rate, self.got, self.start = stream, rate, 0, time.monotonic()

    async def read(self, n: int | None = None) -> bytes:
        data = await self.stream.read(min(n or 16384, 16384))
        if self.got < RECEIVING <= self.got + len(data):
            _say({"receiving": True})
        self.got += len(data)
        ahead = self.got / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            await trio.sleep(ahead)
        return data

    async def write(self, data: bytes) -> None:
        await self.stream.write(data)


async def main(target: str, adapter_id: str, rate: float, dialled: bool) -> None:
    info = info_from_p2p_addr(Multiaddr(target))
    route_libp2p_logging()
    _, host = build_host(os.urandom(32), P2PConfig(listen=LISTEN))
    async with host.run(listen_addrs=[Multiaddr(LISTEN)]):
        if dialled:
            _say({"listening": full_addrs(host)[0]})
            with trio.fail_after(120):  # never dialled: the test failed; end rather than linger
                while not host.get_network().get_connections(info.peer_id):
                    await trio.sleep(0.05)
        else:
            await host.connect(info)
        stream = await host.new_stream(info.peer_id, [TProtocol(PROTOCOL_ID)])
        paced, error = _Paced(stream, rate), None
        try:
            with tempfile.TemporaryDirectory() as tmp:
                await request_package(
                    paced, adapter_id, Path(tmp), timeout=10, max_bytes=1 << 30, pace=Pace(10.0, 256 * 1024, 5.0)
                )
            await stream.close()  # as the node's fetcher does
        except Exception as e:  # what the test looks for: the download cut
            error = repr(e)[:300]
        _say({"ok": error is None, "bytes": paced.got, "error": error})
        await trio.to_thread.run_sync(sys.stdin.read)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], float(sys.argv[3]), "--dialled" in sys.argv[4:])
