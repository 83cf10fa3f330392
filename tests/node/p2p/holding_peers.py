"""Strangers that hold a node's connection slots, in one process of their own: `--inbound` throwaway hosts that
each dial the target once and keep the connection open, and `--listeners` hosts that only listen (the target is
made to dial them); with `--busy`, a listener the target dialled keeps an adapter stream open back to it on that
connection, asking nothing (opened again every second, as the target's server drops it after its request
timeout), so that the connection looks like a transfer. Prints {"inbound": n, "listeners": [full multiaddrs]} once
every dial is done (then {"busy": n} once each listener has its first stream open), and holds everything until
stdin closes. With `--ask ADAPTER_ID`, each such stream asks for that package (one the target seeds: adapter
ids are public) and then reads nothing, so that the target is uploading to it; the `--inbound` hosts then keep
such streams open too ({"busy": n} counts them all). `--redial` hosts dial the target
again every few milliseconds whenever they are not connected to it, to take any inbound slot that comes free.

    python -m tests.node.p2p.holding_peers TARGET_MULTIADDR --inbound 2 --listeners 4 [--busy [--ask ID]] [--redial 3]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from common.wire import canonical_json
from node.p2p.config import P2PConfig
from node.p2p.host import build_host, full_addrs, route_libp2p_logging
from node.p2p.protocol import PROTOCOL_ID, Kind, write_frame

LISTEN = "/ip4/127.0.0.1/tcp/0"


async def _busy(host, peer, total: int, ask: str | None, *, counts: dict) -> None:
    """Once connected to `peer`: an adapter stream to it, asking nothing (or for `ask`'s package, then reading
    nothing), opened again every second. When every busy host has its first one open, {"busy": n} is printed."""
    while not host.get_network().get_connections(peer):
        await trio.sleep(0.1)
    first = True
    async with trio.open_nursery() as nursery:
        while True:
            try:
                with trio.fail_after(3):
                    stream = await host.new_stream(peer, [TProtocol(PROTOCOL_ID)])
                    if ask:
                        await write_frame(stream, Kind.REQUEST, canonical_json({"adapter_id": ask}), timeout=3)
                nursery.start_soon(_held, stream)
                if first:
                    first, counts["busy"] = False, counts.get("busy", 0) + 1
                    if counts["busy"] == total:
                        _say({"busy": total})
            except Exception as e:  # its connection was closed: what the test looks for
                print(f"stream failed: {e}", file=sys.stderr)
            await trio.sleep(1.0)


def _say(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _held(stream) -> None:
    with contextlib.suppress(Exception):
        await stream.read(1)


async def _host(target, counts: dict, *, busy: tuple = (), task_status=trio.TASK_STATUS_IGNORED) -> None:
    _, host = build_host(os.urandom(32), P2PConfig(listen=LISTEN))
    async with host.run(listen_addrs=[Multiaddr(LISTEN)]):
        if target is None:
            task_status.started(full_addrs(host)[0])
            if busy:
                await _busy(host, *busy, counts=counts)
        else:
            try:
                with trio.fail_after(10):
                    await host.connect(target)
                counts["inbound"] += 1
            except Exception as e:  # reported in the count: the test says what it expected
                print(f"dial failed: {e}", file=sys.stderr)
            task_status.started(None)
            if busy:
                await _busy(host, *busy, counts=counts)
        await trio.sleep_forever()


async def _redial(target, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    _, host = build_host(os.urandom(32), P2PConfig(listen=LISTEN, dial_timeout=2.0))
    swarm = host.get_network()
    async with host.run(listen_addrs=[Multiaddr(LISTEN)]):
        task_status.started()
        while True:
            if not swarm.get_connections(target.peer_id):
                swarm._negative_peer_cache.clear()  # refused a moment ago is no reason to wait
                with contextlib.suppress(Exception), trio.move_on_after(2):
                    await host.connect(target)
            await trio.sleep(0.005)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("--inbound", type=int, default=0)
    ap.add_argument("--listeners", type=int, default=0)
    ap.add_argument("--busy", action="store_true")
    ap.add_argument("--ask")
    ap.add_argument("--redial", type=int, default=0)
    args = ap.parse_args()
    route_libp2p_logging()
    target = info_from_p2p_addr(Multiaddr(args.target))
    counts: dict = {"inbound": 0, "listeners": []}
    async with trio.open_nursery() as nursery:
        total = (args.listeners if args.busy else 0) + (args.inbound if args.ask else 0)
        busy = (target.peer_id, total, args.ask)
        for _ in range(args.inbound):
            await nursery.start(functools.partial(_host, target, counts, busy=busy if args.ask else ()))
        for _ in range(args.listeners):
            listener = functools.partial(_host, None, counts, busy=busy if args.busy else ())
            counts["listeners"].append(await nursery.start(listener))
        for _ in range(args.redial):
            await nursery.start(_redial, target)
        _say({"inbound": counts["inbound"], "listeners": counts["listeners"]})
        stdin = trio.lowlevel.FdStream(os.dup(0))
        while await stdin.receive_some(1024):
            pass
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
