"""Discovery: announcing the adapters a node holds and finding peers that hold one, from signed
GossipSub announcements first and paced Kademlia provider records as hints. Runs on the p2p
thread's trio loop as part of Mesh (mesh.py), which builds the host, GossipSub and DHT it uses."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio
from libp2p.kad_dht.kad_dht import _encode_key  # the key bytes KadDHT.provide stores under
from libp2p.peer.id import ID

from common.wire import is_id
from node.p2p.announce import (
    MAX_ADDRS,
    TOPIC,
    Announcement,
    AnnouncementError,
    ProviderBook,
    sign_announcement,
    verify_announcement,
)
from node.p2p.config import P2PConfig
from node.p2p.errors import P2PError
from node.p2p.host import _addr_str

if TYPE_CHECKING:
    from libp2p.abc import IHost
    from libp2p.crypto.keys import KeyPair
    from libp2p.kad_dht.kad_dht import KadDHT
    from libp2p.pubsub.pubsub import Pubsub

    from node.adapters import AdapterStore
    from node.p2p.standing import PeerStanding

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Provider:
    """A peer said to hold an adapter, and where it listens."""

    peer_id: str
    addrs: tuple[str, ...]
    source: str  # "given", "gossip" or "dht"


def dht_key(adapter_id: str) -> str:
    """The DHT key of an adapter: its id as a sha2-256 multihash, hex (what KadDHT.provide takes)."""
    return "1220" + adapter_id[2:]


class Discovery:
    """Mesh's announce and provider-lookup flows (a mixin: Mesh.__init__ builds the state below)."""

    config: P2PConfig
    store: AdapterStore
    host: IHost
    key_pair: KeyPair
    peer_id: str
    listen_addrs: list[str]
    pubsub: Pubsub
    dht: KadDHT
    book: ProviderBook
    standing: PeerStanding
    held: set[str]
    _provide_send: trio.MemorySendChannel[str]
    _provide_recv: trio.MemoryReceiveChannel[str]
    _announce_now: trio.Event
    _book_full_logged: float = float("-inf")

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
            self._verify(msg.data)
        except AnnouncementError as e:
            log.info("dropped announcement: %s", e)
            return False
        return True

    def _verify(self, data: bytes) -> Announcement:
        return verify_announcement(data, now=time.time(), max_age=self.config.announce_max_age,
                                   future_skew=self.config.announce_future_skew)

    async def _receive_announcements(self, subscription) -> None:
        async for msg in subscription:
            try:
                ann = self._verify(msg.data)
            except AnnouncementError as e:
                log.info("dropped announcement: %s", e)
                continue
            refused = self.book.refused
            if ann.peer_id != self.peer_id and self.book.add(ann):
                log.debug("peer %s holds %d adapters", ann.peer_id, len(ann.adapters))
            elif self.book.refused != refused and time.monotonic() - self._book_full_logged > 10:
                self._book_full_logged = time.monotonic()  # once per 10 s: a flood must not flood the log too
                log.warning("announcement book is full (%d peers, %d adapter ids): %d announcements from "
                            "new peers refused so far", len(self.book), self.book.id_count, self.book.refused)

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
        # That cache holds 20 providers per key, first come: records of providers that failed and
        # are backed off are dropped first, so real providers can take their slots (and an empty
        # cache sends the query to the network).
        for pid in list(self._local_dht_providers(adapter_id)):
            if self.standing.backed_off(pid):
                self._drop_dht_record(adapter_id, pid)
        infos = []
        try:
            with trio.move_on_after(self.config.dht_query_timeout):
                infos = await self.dht.find_providers(dht_key(adapter_id))
        except Exception as e:
            log.debug("DHT find_providers for %s failed: %s", adapter_id, e)
        out = []
        for info in infos:
            pid = info.peer_id.to_base58()
            out.append(Provider(pid, tuple(_addr_str(a, pid) for a in info.addrs[:MAX_ADDRS]), "dht"))
        return out

    def _local_dht_providers(self, adapter_id: str) -> dict:
        """The DHT's local provider records for `adapter_id` (peer id string -> record), as the library keeps them."""
        return self.dht.provider_store.providers.get(_encode_key(dht_key(adapter_id)), {})

    def _drop_dht_record(self, adapter_id: str, peer_id: str) -> None:
        """Forget a provider record of `adapter_id` in the DHT's local store (it failed us)."""
        records = self._local_dht_providers(adapter_id)
        for key in [k for k in records if k == peer_id or str(k) == peer_id]:
            del records[key]
