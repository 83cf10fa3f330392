"""The trio side of a node's p2p layer: libp2p host, adapter protocol, GossipSub and Kademlia.

Everything here runs on the p2p thread's trio loop; P2PNode (node.py) is the facade other threads
call. A whole fetch (discover -> dial -> stream -> verify -> rename) is one coroutine here.
Mesh holds the host and its lifecycle and peers; its flows are mixed in from Discovery
(discovery.py: announce, find providers) and Fetcher (fetcher.py: fetch, verify, install).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import trio
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from node.adapters import AdapterStore
from common.wire import restore_recursion_limit
from node.p2p.announce import TOPIC, ProviderBook
from node.p2p.codec import PROTOCOL_ID
from node.p2p.config import P2PConfig
from node.p2p.discovery import Discovery
from node.p2p.errors import P2PError
from node.p2p.fetcher import Fetcher, OwnerOf, TransferStatus
from node.p2p.host import _addr_str, _refuse_taken_port, build_host, guard_stream_handlers
from node.p2p.server import AdapterServer
from node.p2p.standing import PeerStanding

log = logging.getLogger(__name__)


class Mesh(Discovery, Fetcher):
    """One node's libp2p host and the flows that run on it (trio only)."""

    def __init__(
        self,
        *,
        seed: bytes,
        store: AdapterStore,
        owner_of: OwnerOf,
        config: P2PConfig,
        base_dir: Path | None = None,
        server_factory: type[AdapterServer] = AdapterServer,
        trusted_peer: Callable[[str], bool] | None = None,
    ) -> None:
        if len(seed) != 32:
            raise ValueError(f"node seed must be 32 bytes, got {len(seed)}")
        # Defence in depth: every peer's bytes go through common.wire.parse_json, and with py_ecc's
        # limit of 100,000 any other deep recursion would overflow the C stack instead of raising.
        restore_recursion_limit()
        self.config = config
        self.store = store
        self.owner_of = owner_of
        self.base_dir = base_dir
        self.key_pair, self.host = build_host(seed, config)
        self.peer_id = self.host.get_id().to_base58()
        self.server = server_factory(store, config=config)
        self.host.set_stream_handler(TProtocol(PROTOCOL_ID), self.server.handle)
        self.dht = KadDHT(self.host, DHTMode.SERVER)
        self.gossipsub = GossipSub(
            protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11],
            degree=6,
            degree_low=4,
            degree_high=12,
            heartbeat_initial_delay=0.1,
            heartbeat_interval=1,
            eclipse_protection_enabled=False,  # all peers of a small or local mesh share one IP
        )
        self.pubsub = Pubsub(self.host, self.gossipsub)
        guard_stream_handlers(self.host)  # adapter, Kademlia, GossipSub, identify: all registered by now
        self.standing = PeerStanding(base_backoff=config.backoff_base, max_backoff=config.backoff_max,
                                     trusted=trusted_peer or (lambda _p: False))
        for addr in config.bootstrap:  # peers the operator named are trusted
            try:
                self.standing.trust(info_from_p2p_addr(Multiaddr(addr)).peer_id.to_base58())
            except Exception:  # an address without /p2p/<id> names no peer; dialing it reports that
                pass
        self.server.standing = self.standing.level
        self.book = ProviderBook(max_age=config.announce_max_age, max_peers=config.book_max_peers,
                                 max_ids=config.book_max_ids, standing=self.standing.level)
        self.held: set[str] = set()
        self.transfers: dict[str, TransferStatus] = {}
        self._fetch_locks: dict[str, trio.Lock] = {}
        self._provide_send, self._provide_recv = trio.open_memory_channel[str](1024)
        self._announce_now = trio.Event()
        self._nursery: trio.Nursery | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Mesh]:
        """Listen, join GossipSub and the DHT, dial bootstrap peers; stop everything on exit."""
        _refuse_taken_port(self.config.listen)
        async with self.host.run(listen_addrs=[Multiaddr(self.config.listen)]):
            async with background_trio_service(self.pubsub), background_trio_service(self.gossipsub):
                await self.pubsub.wait_until_ready()
                self.pubsub.set_topic_validator(TOPIC, self._validate_gossip, False)
                subscription = await self.pubsub.subscribe(TOPIC)
                async with background_trio_service(self.dht), trio.open_nursery() as nursery:
                    self._nursery = nursery
                    held = await trio.to_thread.run_sync(self.store.list)
                    self.held.update(p.adapter_id for p in held)
                    for adapter_id in self.held:
                        self._provide_send.send_nowait(adapter_id)
                    nursery.start_soon(self._receive_announcements, subscription)
                    nursery.start_soon(self._announce_loop)
                    nursery.start_soon(self._provide_loop)
                    nursery.start_soon(self._routing_table_loop)
                    if self.config.bootstrap:
                        nursery.start_soon(self.add_peers, list(self.config.bootstrap))
                    try:
                        yield self
                    finally:
                        self._nursery = None
                        nursery.cancel_scope.cancel()

    @property
    def listen_addrs(self) -> list[str]:
        return [_addr_str(a, self.peer_id) for a in self.host.get_addrs()]

    # -- peers -----------------------------------------------------------------------------

    async def connect(self, multiaddr: str) -> str:
        """Dial a peer by full multiaddr (…/p2p/<peer id>); returns its peer id."""
        try:
            info = info_from_p2p_addr(Multiaddr(multiaddr))
        except Exception as e:
            raise P2PError(f"bad peer multiaddr {multiaddr!r}: expected /ip4/…/tcp/…/p2p/<peer id> ({e})") from e
        await self._dial(info)
        return info.peer_id.to_base58()

    async def add_peers(self, multiaddrs: list[str]) -> None:
        """Dial each address (bootstrap or chain registry); failures are logged, not raised."""
        for addr in multiaddrs:
            try:
                await self.connect(addr)
            except P2PError as e:
                log.warning("could not reach peer %s: %s", addr, e)

    async def _dial(self, info: PeerInfo) -> None:
        if info.peer_id == self.host.get_id():
            return
        try:
            with trio.fail_after(self.config.dial_timeout):
                await self.host.connect(info)
        except trio.TooSlowError as e:
            raise P2PError(f"dialing {info.peer_id} timed out after {self.config.dial_timeout:g}s") from e
        except Exception as e:
            raise P2PError(f"cannot dial {info.peer_id}: {e}") from e
        await self.dht.add_peer(info.peer_id, skip_server_mode_check=True)

    async def _routing_table_loop(self) -> None:
        # Peers that dialed us (or that the mesh found) join the DHT routing table too.
        while True:
            for pid in self.host.get_connected_peers():
                try:
                    await self.dht.add_peer(pid, skip_server_mode_check=True)
                except Exception as e:  # a peer that vanished mid-update
                    log.debug("routing table add %s: %s", pid, e)
            await trio.sleep(2.0)
