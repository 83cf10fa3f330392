"""The trio side of a node's p2p layer: libp2p host, adapter protocol, GossipSub and Kademlia.

Everything here runs on the p2p thread's trio loop; P2PNode (node.py) is the facade other threads
call. A whole fetch (discover -> dial -> stream -> verify -> rename) is one coroutine here.
"""

from __future__ import annotations

import logging
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import AsyncIterator

import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from node.adapters import AdapterStore, PackageError, VerifiedPackage
from node.canonical import is_id
from node.p2p.announce import TOPIC, Announcement, AnnouncementError, ProviderBook, sign_announcement, verify_announcement
from node.p2p.codec import PROTOCOL_ID
from node.p2p.config import P2PConfig
from node.p2p.errors import (
    FetchError,
    FrameError,
    NoProviders,
    P2PError,
    ProviderError,
    ProviderTimeout,
    UnregisteredAdapter,
)
from node.p2p.server import AdapterServer
from node.p2p.transfer import request_package

log = logging.getLogger(__name__)

OwnerOf = Callable[[str], str | None]


@dataclass(frozen=True, slots=True)
class Provider:
    """A peer said to hold an adapter, and where it listens."""

    peer_id: str
    addrs: tuple[str, ...]
    source: str  # "given", "gossip" or "dht"


@dataclass(frozen=True, slots=True)
class TransferStatus:
    """Progress of one fetch, for the CLI bar and the node's status page."""

    adapter_id: str
    state: str  # discovering | downloading | verifying | done | failed
    done: int = 0
    total: int = 0
    peer_id: str | None = None
    attempts: int = 0
    error: str | None = None
    failures: tuple[str, ...] = ()  # one line per provider that failed, in order


Progress = Callable[[TransferStatus], None]


def dht_key(adapter_id: str) -> str:
    """The DHT key of an adapter: its id as a sha2-256 multihash, hex (what KadDHT.provide takes)."""
    return "1220" + adapter_id[2:]


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


def _provider_from_addr(multiaddr: str) -> Provider:
    try:
        info = info_from_p2p_addr(Multiaddr(multiaddr))
    except Exception as e:
        raise P2PError(f"bad provider multiaddr {multiaddr!r}: expected /ip4/…/tcp/…/p2p/<peer id> ({e})") from e
    pid = info.peer_id.to_base58()
    return Provider(pid, tuple(_addr_str(a, pid) for a in info.addrs), "given")


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


class Mesh:
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
    ) -> None:
        if len(seed) != 32:
            raise ValueError(f"node seed must be 32 bytes, got {len(seed)}")
        self.config = config
        self.store = store
        self.owner_of = owner_of
        self.base_dir = base_dir
        self.key_pair, self.host = build_host(seed, config)
        self.peer_id = self.host.get_id().to_base58()
        self.server = server_factory(store, max_streams=config.max_inbound_streams, timeout=config.read_timeout)
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
        self.book = ProviderBook(max_age=config.announce_max_age)
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

    # -- discovery -------------------------------------------------------------------------

    async def announce(self, adapter_id: str) -> None:
        """Tell the mesh this node holds `adapter_id` (GossipSub now, DHT record paced)."""
        pkg = await trio.to_thread.run_sync(lambda: self.store.get(adapter_id, verify_hashes=False))
        if pkg is None:
            raise P2PError(f"cannot announce adapter {adapter_id}: this node's store does not hold it")
        self._hold(adapter_id)
        await self._publish_announcement()

    def _hold(self, adapter_id: str) -> None:
        if adapter_id not in self.held:
            self.held.add(adapter_id)
        try:
            self._provide_send.send_nowait(adapter_id)
        except trio.WouldBlock:
            log.warning("DHT provide queue full; %s will be provided on the next round", adapter_id)

    async def _publish_announcement(self) -> None:
        ann = Announcement(self.peer_id, tuple(self.listen_addrs), tuple(sorted(self.held)), int(time.time() * 1000))
        await self.pubsub.publish(TOPIC, sign_announcement(ann, self.key_pair.private_key))

    async def _announce_loop(self) -> None:
        while True:
            if self.held and self.host.get_connected_peers():
                try:
                    await self._publish_announcement()
                except Exception as e:
                    log.warning("announcement not published: %s", e)
            with trio.move_on_after(self.config.announce_interval):
                await self._announce_now.wait()
            self._announce_now = trio.Event()

    async def _provide_loop(self) -> None:
        # Paced: a remote accepts 10 ADD_PROVIDER per 10 s per peer and drops the rest silently.
        async for adapter_id in self._provide_recv:
            try:
                with trio.move_on_after(10):
                    await self.dht.provide(dht_key(adapter_id))
            except Exception as e:
                log.info("DHT provide for %s failed (GossipSub still announces it): %s", adapter_id, e)
            await trio.sleep(self.config.dht_provide_interval)

    def _validate_gossip(self, _forwarder: ID, msg) -> bool:
        try:
            verify_announcement(msg.data, now=time.time(), max_age=self.config.announce_max_age)
        except AnnouncementError as e:
            log.info("dropped announcement: %s", e)
            return False
        return True

    async def _receive_announcements(self, subscription) -> None:
        async for msg in subscription:
            try:
                ann = verify_announcement(msg.data, now=time.time(), max_age=self.config.announce_max_age)
            except AnnouncementError as e:
                log.info("dropped announcement: %s", e)
                continue
            if ann.peer_id != self.peer_id and self.book.add(ann):
                log.debug("peer %s holds %d adapters", ann.peer_id, len(ann.adapters))

    async def find_providers(self, adapter_id: str, *, wait: float = 0.0) -> list[Provider]:
        """Peers said to hold `adapter_id`, gossip first then DHT hints, de-duplicated; polls up to `wait` s."""
        if not is_id(adapter_id):
            raise ValueError(f"adapter id {adapter_id!r} is not a 0x-prefixed 64-hex id")
        deadline = trio.current_time() + wait
        next_dht = trio.current_time()
        dht_hits: list[Provider] = []
        while True:
            found: dict[str, Provider] = {}
            for ann in self.book.providers(adapter_id):
                found.setdefault(ann.peer_id, Provider(ann.peer_id, ann.addrs, "gossip"))
            if trio.current_time() >= next_dht:
                dht_hits = await self._dht_providers(adapter_id)
                next_dht = trio.current_time() + 1.0
            for p in dht_hits:
                found.setdefault(p.peer_id, p)
            found.pop(self.peer_id, None)
            if found or trio.current_time() >= deadline:
                return list(found.values())
            await trio.sleep(0.2)

    async def _dht_providers(self, adapter_id: str) -> list[Provider]:
        # Hints only: answered from a local cache when it has any entry, may list offline peers.
        infos = []
        try:
            with trio.move_on_after(self.config.dht_query_timeout):
                infos = await self.dht.find_providers(dht_key(adapter_id))
        except Exception as e:
            log.debug("DHT find_providers for %s failed: %s", adapter_id, e)
        out = []
        for info in infos:
            pid = info.peer_id.to_base58()
            out.append(Provider(pid, tuple(_addr_str(a, pid) for a in info.addrs), "dht"))
        return out

    # -- fetch -----------------------------------------------------------------------------

    def _set(self, status: TransferStatus, on_progress: Progress | None) -> None:
        self.transfers[status.adapter_id] = status
        if on_progress is not None:
            on_progress(status)

    async def fetch(
        self, adapter_id: str, *, providers: Sequence[str] = (), on_progress: Progress | None = None
    ) -> VerifiedPackage:
        """Download, verify against the registered owner and install; next provider on failure.

        `providers` (full multiaddrs, e.g. nodes the registry says hold it) are tried first, in order,
        then the peers discovery finds.
        """
        if not is_id(adapter_id):
            raise ValueError(f"adapter id {adapter_id!r} is not a 0x-prefixed 64-hex id")
        lock = self._fetch_locks.setdefault(adapter_id, trio.Lock())
        async with lock:
            status = TransferStatus(adapter_id, "discovering")
            self._set(status, on_progress)
            try:
                pkg = await self._fetch_locked(adapter_id, list(providers), status, on_progress)
            except BaseException as e:
                self._set(replace(self.transfers[adapter_id], state="failed", error=str(e) or type(e).__name__), on_progress)
                raise
            self._set(replace(self.transfers[adapter_id], state="done"), on_progress)
            return pkg

    async def _fetch_locked(
        self, adapter_id: str, given: list[str], status: TransferStatus, on_progress: Progress | None
    ) -> VerifiedPackage:
        owner = await trio.to_thread.run_sync(self.owner_of, adapter_id)
        if owner is None:
            raise UnregisteredAdapter(f"adapter {adapter_id} has no registered owner; refusing to fetch unsigned-for bytes")
        existing = await trio.to_thread.run_sync(lambda: self.store.get(adapter_id, verify_hashes=False))
        if existing is not None and existing.signer.lower() == owner.lower():
            return existing
        candidates = [_provider_from_addr(a) for a in given]
        if not candidates:
            candidates = await self.find_providers(adapter_id, wait=self.config.discover_timeout)
        else:
            candidates += await self.find_providers(adapter_id)
        order: dict[str, Provider] = {}
        for prov in candidates:  # de-duplicate: gossip and DHT often name the same peer
            if prov.peer_id != self.peer_id:
                order.setdefault(prov.peer_id, prov)
        if not order:
            raise NoProviders(f"no peer announced adapter {adapter_id} within {self.config.discover_timeout:g}s")
        failures: list[str] = []
        for attempt, prov in enumerate(order.values(), start=1):
            status = replace(status, state="downloading", peer_id=prov.peer_id, attempts=attempt, done=0, total=0,
                             failures=tuple(failures))
            self._set(status, on_progress)
            try:
                pkg = await self._fetch_from(prov, adapter_id, owner, status, on_progress)
            except (ProviderError, FrameError, PackageError, P2PError, OSError) as e:
                log.warning("provider %s failed for %s: %s", prov.peer_id, adapter_id, e)
                failures.append(f"{prov.peer_id}: {e}")
                self._set(replace(self.transfers[adapter_id], failures=tuple(failures)), on_progress)
                continue
            self._hold(adapter_id)
            self._announce_now.set()
            return pkg
        raise FetchError(f"no provider delivered a valid adapter {adapter_id} ({len(failures)} tried): " + "; ".join(failures))

    async def _fetch_from(
        self, prov: Provider, adapter_id: str, owner: str, status: TransferStatus, on_progress: Progress | None
    ) -> VerifiedPackage:
        info = PeerInfo(ID.from_base58(prov.peer_id), [Multiaddr(a.split("/p2p/")[0]) for a in prov.addrs])
        stream = await self._open_stream(info)
        tmp = Path(await trio.to_thread.run_sync(self.store.tmp_dir))
        try:

            def on_bytes(done: int, total: int) -> None:
                self._set(replace(status, done=done, total=total), on_progress)

            try:
                await request_package(
                    stream, adapter_id, tmp, timeout=self.config.read_timeout,
                    max_bytes=self.config.max_package_bytes, on_bytes=on_bytes,
                )
            except BaseException:
                with trio.move_on_after(2):
                    await _quietly(stream.reset)
                raise
            with trio.move_on_after(2):
                await _quietly(stream.close)
            self._set(replace(self.transfers[adapter_id], state="verifying"), on_progress)
            return await trio.to_thread.run_sync(self._install, tmp, owner)
        finally:
            if tmp.exists():  # shielded: on cancellation the partial download must still go
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(shutil.rmtree, tmp, True)

    async def _open_stream(self, info: PeerInfo):
        # A connection the peer just dropped can linger in the swarm ("No valid connections"):
        # then disconnect, dial afresh and try once more.
        for attempt in (1, 2):
            await self._dial(info)
            try:
                with trio.fail_after(self.config.dial_timeout):
                    return await self.host.new_stream(info.peer_id, [TProtocol(PROTOCOL_ID)])
            except trio.TooSlowError as e:
                raise ProviderTimeout(f"opening an adapter stream timed out after {self.config.dial_timeout:g}s") from e
            except Exception as e:
                if attempt == 2:
                    raise ProviderError(f"cannot open an adapter stream: {e}") from e
                log.info("stream to %s failed (%s); reconnecting", info.peer_id, e)
                with trio.move_on_after(2):
                    await _quietly(lambda: self.host.disconnect(info.peer_id))
        raise AssertionError("unreachable")

    def _install(self, tmp: Path, owner: str) -> VerifiedPackage:
        return self.store.install_from_tmp(tmp, expected_owner=owner, base_dir=self.base_dir)


async def _quietly(fn) -> None:
    try:
        await fn()
    except Exception:
        pass
