"""A node's libp2p host: built from the node seed (TCP + Noise + Yamux only), the check that its
port is free, the guard that keeps one stream's error from stopping the host, and the full
multiaddr strings (…/p2p/<peer id>) peers dial."""

from __future__ import annotations

import logging
import socket

import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from multiaddr import Multiaddr

from node.p2p.config import P2PConfig
from node.p2p.errors import P2PError

log = logging.getLogger(__name__)


def build_host(seed: bytes, config: P2PConfig):
    """A libp2p host with the node's Ed25519 identity, TCP + Noise + Yamux only; returns (key pair, host)."""
    key_pair = create_new_key_pair(seed)
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},  # Mplex is ~6x slower for bulk (pitfall 6)
        listen_addrs=[Multiaddr(config.listen)],
        connection_config=ConnectionConfig(
            max_connections_per_peer=1,  # pitfall 4: brings a dial from ~250 ms to ~15 ms
            max_connections=config.max_connections,
            high_watermark=config.max_connections,
            low_watermark=min(8, config.max_connections),
            min_connections=min(4, config.max_connections),
            dial_timeout=config.dial_timeout,
        ),
    )
    return key_pair, host


def _refuse_taken_port(listen: str) -> None:
    """Fail when another process already listens on the port.

    py-libp2p sets SO_REUSEPORT on its listeners, so a second node on the same port would start
    fine and the kernel would split incoming connections between the two. A probe without
    SO_REUSEPORT cannot bind while another listener holds the port.
    """
    ma = Multiaddr(listen)
    protos = {p.name for p in ma.protocols()}
    if "tcp" not in protos or int(ma.value_for_protocol("tcp")) == 0:
        return
    family, host = (socket.AF_INET6, ma.value_for_protocol("ip6")) if "ip6" in protos else (
        socket.AF_INET, ma.value_for_protocol("ip4"))
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR: a restart right after a crash must not trip over TIME_WAIT sockets.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(ma.value_for_protocol("tcp"))))
        except OSError as e:
            raise P2PError(f"cannot listen on {listen}: {e.strerror or e}") from e


def _addr_str(addr: Multiaddr, peer_id: str) -> str:
    s = str(addr)
    return s if "/p2p/" in s else f"{s}/p2p/{peer_id}"


def guard_stream_handlers(host) -> None:
    """Wrap every registered protocol handler so that an error from one stream ends only that stream.

    py-libp2p runs handlers inside the swarm's own task group: an exception a handler lets through
    (pubsub lets protobuf's DecodeError through for an RPC that is not protobuf) stops the whole
    swarm, and the node is off the mesh for good while its process lives on. Call once every
    handler is registered (GossipSub, Kademlia, ours).
    """
    handlers = host.get_mux().handlers
    for protocol, handler in list(handlers.items()):
        if handler is not None and not getattr(handler, "_loramesh_guarded", False):
            handlers[protocol] = _guarded(protocol, handler)


def _guarded(protocol, handler):
    async def run(stream) -> None:
        try:
            await handler(stream)
        except Exception as e:
            try:
                peer = str(stream.muxed_conn.peer_id)
            except AttributeError:
                peer = "?"
            log.info("%s stream from %s dropped: %s: %s", protocol, peer, type(e).__name__, str(e)[:200])
            with trio.move_on_after(2):
                try:
                    await stream.reset()
                except Exception:
                    pass

    run._loramesh_guarded = True  # type: ignore[attr-defined]
    return run
