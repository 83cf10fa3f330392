"""A malicious libp2p peer in its own process, driven by JSON lines on stdin (tests/node/p2p/test_attacks.py).

    python -m tests.node.p2p.malicious_peer

It uses the node's own host stack (TCP + Noise + Yamux, GossipSub on the announcement topic) but
none of its checks. Prints {"ok", "peer_id", "addrs"} once listening, then answers each command:

  {"cmd": "connect", "addr"}                              dial a peer (and join its GossipSub mesh)
  {"cmd": "publish", "nested": N} / {"hex": ...}          publish raw bytes on the announcement topic
  {"cmd": "pubsub_garbage", "addr"}                       send a peer a GossipSub RPC that is not protobuf
  {"cmd": "flood", "peer", "kind", "count"}               send a connected peer `count` RPCs on the GossipSub
        stream it has (fewer, answered as `sent`, where the peer resets the stream meanwhile): badsig (a message
        on the topic whose signature does not verify), foreign_graft (GRAFTs for made-up topics)
  {"cmd": "rotate", "addr", "kind", "ids", "per_id", "wait", "seconds"}
        a new peer id (key, connection, Noise handshake) each time: up to `ids` of them (or for `seconds`), one
        after the other, each opens a GossipSub stream to the target, sends `per_id` copies of one message of
        `kind` (badsig; badann: a 96 KB announcement, validly pubsub-signed, whose own signature is wrong) and waits
        up to `wait` s for the target to close its connection. Answers how many completed the handshake
        (`handshakes`), how many it closed, and its own CPU seconds
  {"cmd": "burst", "addr", "ids"}                         `ids` new peer ids (hosts started first) dial the target
        all at once; answers how many completed the handshake
  {"cmd": "announce", "adapters", "fakes": N, "future_s": S, "own": bool, "interval": s}
        signed announcements: from N made-up peer ids (each with its own key), or from this peer
        (own) for `adapters`, dated S seconds ahead
  {"cmd": "connected", "peer"}                            whether this peer has a connection to `peer`
  {"cmd": "serve", "adapter_id", "fault", "pkg"}          answer REQUESTs for adapter_id with a fault:
        nested_manifest (1 MiB of "["), nested_signature (64 KiB of "[" after the real manifest),
        dup_manifest (the manifest with a key repeated), trickle (real frames at 1 byte/s)
  {"cmd": "idle_streams", "peer", "addr", "count"}        open adapter streams and never send a request
  {"cmd": "stream_states"}                                how many of those the other side ended
  {"cmd": "provide_keys", "addr", "count"}               made-up hosts send ADD_PROVIDER for that many random keys
  {"cmd": "fake_providers", "addr", "adapter_id", "count"} that many made-up hosts each send the
        target a DHT ADD_PROVIDER for the adapter (their addresses accept no adapter stream)
  {"cmd": "quit"}
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import _encode_key
from libp2p.kad_dht.provider_store import ProviderStore
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import PUBSUB_SIGNING_PREFIX, Pubsub
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.varint import encode_varint_prefixed
from multiaddr import Multiaddr

from node.adapters import MANIFEST_FILE, SIGNATURE_FILE
from node.p2p.config import P2PConfig
from node.p2p.discovery import MAX_ANNOUNCEMENT_BYTES, TOPIC, Announcement, dht_key, sign_announcement
from node.p2p.host import build_host, full_addrs, route_libp2p_logging
from node.p2p.protocol import HEADER, PROTOCOL_ID, Kind, encode, encode_header, package_sections

LISTEN = "/ip4/127.0.0.1/tcp/0"


class Malice:
    def __init__(self, host, pubsub, nursery: trio.Nursery) -> None:
        self.host, self.pubsub, self.nursery = host, pubsub, nursery
        self.peer_id = host.get_id().to_base58()
        self.faults: dict[str, tuple[str, Path]] = {}
        self.idle: list = []
        self.idle_ended = 0
        self.requests = 0
        self.fakes: list = []
        host.set_stream_handler(TProtocol(PROTOCOL_ID), self.handle)

    @property
    def addrs(self) -> list[str]:
        return full_addrs(self.host)

    # -- as a provider --------------------------------------------------------------------

    async def handle(self, stream) -> None:
        self.requests += 1
        try:
            head = await stream.read(HEADER.size)
            _, n = HEADER.unpack(head)
            adapter_id = json.loads(await stream.read(n))["adapter_id"]
            fault, pkg = self.faults.get(adapter_id, ("none", None))
            manifest = (pkg / MANIFEST_FILE).read_bytes() if pkg else b""
            signature = (pkg / SIGNATURE_FILE).read_bytes() if pkg else b""
            if fault == "nested_manifest":
                await stream.write(encode_header(Kind.MANIFEST, 1 << 20) + b"[" * (1 << 20))
            elif fault == "nested_signature":  # then the real files, so a fetcher goes on to install it
                await stream.write(
                    encode(Kind.MANIFEST, manifest) + encode_header(Kind.SIGNATURE, 64 << 10) + b"[" * (64 << 10)
                )
                for kind, payload in package_sections(pkg, adapter_id):
                    if kind not in (Kind.MANIFEST, Kind.SIGNATURE):
                        await stream.write(encode(kind, payload))
            elif fault == "dup_manifest":
                # "name" once more with the same value: the same manifest to a lenient parser (same id),
                # other bytes on disk, and a second copy a stricter parser refuses
                name = json.loads(manifest)["name"]
                dup = manifest[:-1] + b',"name":' + json.dumps(name).encode() + b"}"
                await stream.write(encode(Kind.MANIFEST, dup) + encode(Kind.SIGNATURE, signature))
                for kind, payload in package_sections(pkg, adapter_id):
                    if kind not in (Kind.MANIFEST, Kind.SIGNATURE):
                        await stream.write(encode(kind, payload))
            elif fault == "trickle":
                data = (
                    encode(Kind.MANIFEST, manifest) + encode(Kind.SIGNATURE, signature) + encode_header(Kind.DATA, 1024)
                )
                await stream.write(data)
                while True:  # one byte a second, forever: never a read timeout, never done
                    await stream.write(b"\0")
                    await trio.sleep(1)
            else:
                await stream.write(encode(Kind.ERROR, b"no"))
            await trio.sleep(60)
        except Exception:
            pass
        finally:
            with trio.move_on_after(1):
                try:
                    await stream.reset()
                except Exception:
                    pass

    # -- as a client that never asks ------------------------------------------------------

    async def idle_stream(self, peer: ID) -> None:
        stream = await self.host.new_stream(peer, [TProtocol(PROTOCOL_ID)])
        self.idle.append(stream)
        self.nursery.start_soon(self._wait_end, stream)

    async def _wait_end(self, stream) -> None:
        try:
            while await stream.read(65536):
                pass
        except Exception:
            pass
        self.idle_ended += 1

    # -- made-up DHT providers ------------------------------------------------------------

    async def fake_provider(self, target, adapter_id: str, task_status=trio.TASK_STATUS_IGNORED):
        key_pair, host = build_host(os.urandom(32), P2PConfig(listen=LISTEN))
        async with host.run(listen_addrs=[Multiaddr(LISTEN)]):
            await host.connect(target)
            # the library's own ADD_PROVIDER message, sent by a host whose id is the provider's
            await ProviderStore(host)._send_add_provider(target.peer_id, _encode_key(dht_key(adapter_id)))
            task_status.started(host.get_id().to_base58())
            await trio.sleep_forever()

    async def provide_keys(self, target, keys: list[bytes]) -> None:
        """A made-up host sends ADD_PROVIDER for each key (a peer may send 10 in 10 s: give it at most 10)."""
        key_pair, host = build_host(os.urandom(32), P2PConfig(listen=LISTEN))
        async with host.run(listen_addrs=[Multiaddr(LISTEN)]):
            await host.connect(target)
            for key in keys:
                await ProviderStore(host)._send_add_provider(target.peer_id, key)

    # -- a new peer id for every few strikes ------------------------------------------------

    async def rotate(self, cmd: dict) -> dict:
        target = info_from_p2p_addr(Multiaddr(cmd["addr"]))
        data = _bad_announcement() if cmd["kind"] == "badann" else b"x" * 64
        ids, handshakes, closed, sent = 0, 0, 0, 0
        cpu0, until = time.process_time(), time.monotonic() + cmd.get("seconds", float("inf"))
        while ids < cmd.get("ids", 1 << 62) and time.monotonic() < until:
            ids += 1
            key_pair, host = build_host(os.urandom(32), P2PConfig(listen=LISTEN))
            async with host.run(listen_addrs=[Multiaddr(LISTEN)]):
                try:
                    with trio.fail_after(10):
                        await host.connect(target)
                        handshakes += 1
                        stream = await host.new_stream(target.peer_id, [PROTOCOL_ID_V12, PROTOCOL_ID_V11])
                except Exception:
                    continue  # refused or timed out: the next id
                msg = rpc_pb2.Message(
                    data=data, topicIDs=[TOPIC], from_id=host.get_id().to_bytes(), seqno=os.urandom(8)
                )
                if cmd["kind"] == "badsig":
                    msg.signature = os.urandom(64)
                else:  # signed as py-libp2p signs: the pubsub signature verifies, the announcement's does not
                    msg.signature = key_pair.private_key.sign(PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString())
                    msg.key = key_pair.public_key.serialize()
                frame = encode_varint_prefixed(rpc_pb2.RPC(publish=[msg]).SerializeToString())
                try:
                    for _ in range(cmd["per_id"]):
                        with trio.fail_after(5):
                            await stream.write(frame)
                        sent += 1
                except Exception:
                    pass  # closed by the target meanwhile
                with trio.move_on_after(cmd.get("wait", 5.0)):
                    while target.peer_id in host.get_network().get_connections_map():
                        await trio.sleep(0.02)
                if target.peer_id not in host.get_network().get_connections_map():
                    closed += 1
        return {
            "ids": ids,
            "handshakes": handshakes,
            "closed": closed,
            "sent": sent,
            "cpu_s": time.process_time() - cpu0,
        }

    async def burst(self, cmd: dict) -> dict:
        """`ids` new peer ids dial the target at once: their hosts are all listening before the first dial."""
        target = info_from_p2p_addr(Multiaddr(cmd["addr"]))
        hosts = [build_host(os.urandom(32), P2PConfig(listen=LISTEN))[1] for _ in range(cmd["ids"])]
        async with contextlib.AsyncExitStack() as stack:
            for host in hosts:
                await stack.enter_async_context(host.run(listen_addrs=[Multiaddr(LISTEN)]))
            handshakes, seconds = await dial_at_once(hosts, target)
        return {"ids": len(hosts), "handshakes": handshakes, "seconds": seconds}

    # -- commands -------------------------------------------------------------------------

    async def command(self, cmd: dict) -> dict:
        op = cmd["cmd"]
        if op == "connect":
            info = info_from_p2p_addr(Multiaddr(cmd["addr"]))
            await self.host.connect(info)
            for _ in range(50):  # until the target's subscription to the topic reached us
                if info.peer_id in self.pubsub.peer_topics.get(TOPIC, set()):
                    break
                await trio.sleep(0.1)
            return {"peer_id": info.peer_id.to_base58()}
        if op == "publish":
            data = b"[" * cmd["nested"] if "nested" in cmd else bytes.fromhex(cmd["hex"])
            await self.pubsub.publish(TOPIC, data)
            return {"bytes": len(data)}
        if op == "announce":
            ts = int((time.time() + cmd.get("future_s", 0)) * 1000)
            adapters = tuple(cmd["adapters"])
            if cmd.get("own"):
                keys = [self.host.get_private_key()]
                ids = [self.peer_id]
            else:
                pairs = [create_new_key_pair(os.urandom(32)) for _ in range(cmd["fakes"])]
                keys = [kp.private_key for kp in pairs]
                ids = [ID.from_pubkey(kp.public_key).to_base58() for kp in pairs]
            for key, pid in zip(keys, ids):
                addrs = tuple(self.addrs) if pid == self.peer_id else (f"/ip4/127.0.0.1/tcp/1/p2p/{pid}",)
                addrs = tuple(cmd.get("addrs", addrs))  # what it claims, parsable or not
                await self.pubsub.publish(TOPIC, sign_announcement(Announcement(pid, addrs, adapters, ts), key))
                # paced (`interval`, 0.11 s unless given): the flood is the count, not the burst
                await trio.sleep(cmd.get("interval", 0.11))
            return {"published": len(ids)}
        if op == "pubsub_garbage":  # a GossipSub RPC that is not protobuf, on the pubsub protocol itself
            info = info_from_p2p_addr(Multiaddr(cmd["addr"]))
            stream = await self.host.new_stream(info.peer_id, [TProtocol(PROTOCOL_ID_V11)])
            await stream.write(encode_varint_prefixed(b"\xff" * 64))
            await trio.sleep(0.5)
            return {}
        if op == "flood":
            target = ID.from_base58(cmd["peer"])
            # its own pubsub stream, or a new one where the library's failed to open ("fail to read from multiselect
            # communicator" at times on a loaded machine: the test then failed before any strike)
            stream = self.pubsub.peers.get(target) or await self.host.new_stream(target, [TProtocol(PROTOCOL_ID_V11)])
            sent = 0
            for i in range(cmd["count"]):
                if cmd["kind"] == "badsig":
                    msg = rpc_pb2.Message(
                        data=b"x" * 64, topicIDs=[TOPIC], from_id=self.host.get_id().to_bytes(), seqno=os.urandom(8)
                    )
                    msg.signature = os.urandom(64)
                    rpc = rpc_pb2.RPC(publish=[msg])
                else:
                    grafts = [rpc_pb2.ControlGraft(topicID=f"made-up-{i}-{j}") for j in range(20)]
                    rpc = rpc_pb2.RPC(control=rpc_pb2.ControlMessage(graft=grafts))
                try:
                    await stream.write(encode_varint_prefixed(rpc.SerializeToString()))
                except Exception:  # cut off meanwhile: the target reset the stream (the test then looks at its log)
                    break
                sent += 1
            return {"sent": sent}
        if op == "rotate":
            return await self.rotate(cmd)
        if op == "burst":
            return await self.burst(cmd)
        if op == "connected":
            return {"connected": ID.from_base58(cmd["peer"]) in self.host.get_connected_peers()}
        if op == "serve":
            self.faults[cmd["adapter_id"]] = (cmd["fault"], Path(cmd["pkg"]))
            return {}
        if op == "idle_streams":
            info = info_from_p2p_addr(Multiaddr(cmd["addr"]))
            await self.host.connect(info)
            opened = 0
            for _ in range(cmd["count"]):
                try:
                    with trio.fail_after(5):
                        await self.idle_stream(info.peer_id)
                    opened += 1
                except Exception:
                    pass
            return {"opened": opened}
        if op == "stream_states":
            return {"opened": len(self.idle), "ended": self.idle_ended, "requests": self.requests}
        if op == "fake_providers":
            target = info_from_p2p_addr(Multiaddr(cmd["addr"]))
            ids = []
            for _ in range(cmd["count"]):
                ids.append(await self.nursery.start(self.fake_provider, target, cmd["adapter_id"]))
            return {"fakes": ids}
        if op == "provide_keys":  # content keys nobody holds, from made-up hosts: 10 keys each
            target = info_from_p2p_addr(Multiaddr(cmd["addr"]))
            keys = [os.urandom(32) for _ in range(cmd["count"])]
            for i in range(0, len(keys), 10):
                await self.provide_keys(target, keys[i : i + 10])
            return {"keys": len(keys)}
        raise ValueError(f"unknown command {op!r}")


async def dial_at_once(hosts, target) -> tuple[int, float]:
    """Each of `hosts` (running) dials `target` at once: how many got in (a handshake), and the seconds it took."""
    handshakes = 0

    async def dial(host) -> None:
        nonlocal handshakes
        try:
            with trio.fail_after(10):
                await host.connect(target)
            handshakes += 1
        except Exception:
            pass  # refused (closed before its handshake, 4 tries over) or timed out

    start = time.monotonic()
    async with trio.open_nursery() as nursery:
        for host in hosts:
            nursery.start_soon(dial, host)
    return handshakes, time.monotonic() - start


def _bad_announcement() -> bytes:
    """An announcement as big as the node takes (96 KB), fresh and well formed, that fails only its last check: its
    signature is another key's (the most a node spends on one that fails)."""
    signer, other = create_new_key_pair(os.urandom(32)), create_new_key_pair(os.urandom(32))
    pid = ID.from_pubkey(signer.public_key).to_base58()
    adapters = tuple("0x" + os.urandom(32).hex() for _ in range(1024))
    ts = int(time.time() * 1000)

    def signed(pad: int) -> bytes:
        addrs = (f"/ip4/127.0.0.1/tcp/1/p2p/{pid}", "/dns4/" + "a" * pad)
        return sign_announcement(Announcement(pid, addrs, adapters, ts), other.private_key)

    room = MAX_ANNOUNCEMENT_BYTES - 64 - len(signed(0))
    return signed(max(0, room))


async def _lines(stream: trio.lowlevel.FdStream):
    buf = b""
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield json.loads(line)


def _reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main() -> None:
    route_libp2p_logging()
    _, host = build_host(os.urandom(32), P2PConfig(listen=LISTEN))
    gossipsub = GossipSub(
        protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11],
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_initial_delay=0.1,
        heartbeat_interval=1,
        eclipse_protection_enabled=False,
        spam_protection_enabled=False,  # its own library's limit on what it sends binds no attacker
    )
    pubsub = Pubsub(host, gossipsub)
    async with host.run(listen_addrs=[Multiaddr(LISTEN)]):
        async with background_trio_service(pubsub), background_trio_service(gossipsub):
            await pubsub.wait_until_ready()
            await pubsub.subscribe(TOPIC)
            async with trio.open_nursery() as nursery:
                m = Malice(host, pubsub, nursery)
                _reply({"ok": True, "peer_id": m.peer_id, "addrs": m.addrs})
                async for cmd in _lines(trio.lowlevel.FdStream(os.dup(0))):
                    if cmd.get("cmd") == "quit":
                        _reply({"ok": True})
                        break
                    try:
                        _reply({"ok": True, **await m.command(cmd)})
                    except Exception as e:
                        _reply({"ok": False, "type": type(e).__name__, "error": str(e)})
                nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
