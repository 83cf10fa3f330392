"""Strangers that hold a node's connection slots, in one process of their own: `--inbound` throwaway hosts that
each dial the target once and keep the connection open, and `--listeners` hosts that only listen (the target is
made to dial them). Prints {"inbound": n, "listeners": [full multiaddrs]} once every dial is done, then holds
everything until stdin closes.

    python -m tests.node.p2p.holding_peers TARGET_MULTIADDR --inbound 2 --listeners 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import trio
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from node.p2p.config import P2PConfig
from node.p2p.host import build_host, full_addrs, route_libp2p_logging

LISTEN = "/ip4/127.0.0.1/tcp/0"


async def _host(target, counts: dict, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    _, host = build_host(os.urandom(32), P2PConfig(listen=LISTEN))
    async with host.run(listen_addrs=[Multiaddr(LISTEN)]):
        if target is None:
            task_status.started(full_addrs(host)[0])
        else:
            try:
                with trio.fail_after(10):
                    await host.connect(target)
                counts["inbound"] += 1
            except Exception as e:  # reported in the count: the test says what it expected
                print(f"dial failed: {e}", file=sys.stderr)
            task_status.started(None)
        await trio.sleep_forever()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("--inbound", type=int, default=0)
    ap.add_argument("--listeners", type=int, default=0)
    args = ap.parse_args()
    route_libp2p_logging()
    target = info_from_p2p_addr(Multiaddr(args.target))
    counts: dict = {"inbound": 0, "listeners": []}
    async with trio.open_nursery() as nursery:
        for _ in range(args.inbound):
            await nursery.start(_host, target, counts)
        for _ in range(args.listeners):
            counts["listeners"].append(await nursery.start(_host, None, counts))
        sys.stdout.write(json.dumps(counts) + "\n")
        sys.stdout.flush()
        stdin = trio.lowlevel.FdStream(os.dup(0))
        while await stdin.receive_some(1024):
            pass
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
