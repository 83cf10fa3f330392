"""Discovery: who holds an adapter. Signed GossipSub announcements of the adapters a node holds, the
bounded book of providers they fill, and Kademlia provider records as hints.

An announcement is canonical JSON {"payload": {...}, "sig": hex}; the signature is the node's
Ed25519 key over a domain tag plus the canonical payload, and the key is recovered from the peer id
in the payload, so a relay cannot forge or alter one. Stale or future-dated ones are dropped.
The bytes are size-checked and parsed by the bounded parser (depth 3 is all the format needs)
before anything else, and must be the canonical form that was signed.

A peer id costs nothing, so the book of providers is bounded (peers and ids over all peers) and
evicts by standing: peers this node has reason to trust (registered, bootstrap, a transfer that
succeeded) last, then the longest known; a flood of new ids only ever pushes out its own kind.

DHT provider records are hints only (they may name offline peers, and anyone can fill a key's slots
with made-up ids). Discovery runs on the p2p thread's trio loop; Mesh (node.py) builds the host,
GossipSub and DHT it uses.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from libp2p.crypto.keys import PrivateKey
from libp2p.kad_dht.kad_dht import _encode_key  # the key bytes KadDHT.provide stores under
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from common.logs import Throttled
from common.wire import UntrustedJSONError, canonical_json, is_id, parse_json
from node.adapters.errors import shown
from node.p2p.config import P2PConfig
from node.p2p.errors import AnnouncementError, P2PError, StaleAnnouncement
from node.p2p.host import addr_str, full_addrs
from node.p2p.standing import UNKNOWN, PeerStanding, Standing

if TYPE_CHECKING:
    from libp2p.abc import IHost
    from libp2p.crypto.keys import KeyPair
    from libp2p.kad_dht.kad_dht import KadDHT
    from libp2p.pubsub.pubsub import Pubsub

    from node.adapters import AdapterStore

log = logging.getLogger(__name__)


# -- signed announcements and the book they fill ---------------------------------------------------


TOPIC = "/loramesh/adapters/1"
DOMAIN = b"loramesh-announce/1\n"
MAX_ADAPTERS = 1024
MAX_ADDRS = 16
FUTURE_SKEW_S = 5.0
# 1,024 ids of 66 characters plus quotes and commas, 16 addresses and the signature fit in ~76 KB.
MAX_ANNOUNCEMENT_BYTES = 96 * 1024
# GossipSub's own limit (10 messages a second per forwarding peer) let one stranger's 25 announcements a second,
# each from a fresh key, mute the honest relay that passed them on: its neighbour dropped every announcement it
# relayed, an honest holder's included (red team). That limit is off (Mesh); these count signers, whoever
# forwards. A signer the book knows, or one with standing, has an announcement taken at most every
# SIGNER_GAP_S. One new to the book and with no standing (any key signs one) takes the newcomers' budget: on
# average NEWCOMERS_PER_S a second, NEWCOMERS_BURST at once. While a flood of fresh keys lasts, a newcomer's
# announcements get through only as often as they win a token; peers the book holds are not touched (one budget
# for every stranger let one key's flood silence an unregistered node, red team).
SIGNER_GAP_S = 1.0
NEWCOMERS_PER_S = 5.0
NEWCOMERS_BURST = 50
SIGNERS_KEPT = 4096  # signers whose last announcement's time is kept for SIGNER_GAP_S
# This node's own announcements, at least this far apart (announce_soon's after fetches coalesce): peers take one
# a SIGNER_GAP_S, and the newest, dropped, would leave them a stale list until the next round
ANNOUNCE_SPACING_S = 1.5 * SIGNER_GAP_S
CHECKED_KEPT = 1024  # announcements the validator checked, kept for the receive loop (not verified twice)


@dataclass(frozen=True, slots=True)
class Announcement:
    peer_id: str
    addrs: tuple[str, ...]
    adapters: tuple[str, ...]
    ts_ms: int  # unix time in milliseconds (an int keeps the canonical bytes unambiguous)

    def payload(self) -> dict:
        return {
            "v": 1,
            "peer_id": self.peer_id,
            "addrs": list(self.addrs),
            "adapters": list(self.adapters),
            "ts": self.ts_ms,
        }


def sign_announcement(ann: Announcement, key: PrivateKey) -> bytes:
    """The wire bytes of `ann`, signed with the node key."""
    sig = key.sign(DOMAIN + canonical_json(ann.payload()))
    return canonical_json({"payload": ann.payload(), "sig": sig.hex()})


def verify_announcement(data: bytes, *, now: float, max_age: float, future_skew: float = FUTURE_SKEW_S) -> Announcement:
    """Parse and check wire bytes; AnnouncementError names what was wrong."""
    try:
        doc = parse_json(data, max_bytes=MAX_ANNOUNCEMENT_BYTES, max_depth=3, what="announcement")
    except UntrustedJSONError as e:
        raise AnnouncementError(str(e)) from e
    try:
        payload, sig_hex = doc["payload"], doc["sig"]
        sig = bytes.fromhex(sig_hex)
        peer_id, addrs, adapters, ts = payload["peer_id"], payload["addrs"], payload["adapters"], payload["ts"]
    except (ValueError, KeyError, TypeError) as e:
        raise AnnouncementError(
            f"announcement is not {{payload: {{peer_id, addrs, adapters, ts}}, sig}} ({type(e).__name__})"
        ) from e
    if not isinstance(payload, dict) or payload.get("v") != 1:
        raise AnnouncementError(f"announcement version {shown(payload.get('v'))}; expected 1")
    if not (isinstance(addrs, list) and len(addrs) <= MAX_ADDRS and all(isinstance(a, str) for a in addrs)):
        raise AnnouncementError(f"announcement addrs must be a list of at most {MAX_ADDRS} multiaddr strings")
    if not (isinstance(adapters, list) and len(adapters) <= MAX_ADAPTERS and all(is_id(a) for a in adapters)):
        raise AnnouncementError(f"announcement adapters must be a list of at most {MAX_ADAPTERS} 0x ids")
    if not isinstance(ts, int) or isinstance(ts, bool):
        raise AnnouncementError(f"announcement ts {shown(ts)} is not an integer of milliseconds")
    if not isinstance(peer_id, str) or len(peer_id) > 128:
        raise AnnouncementError("announcement peer_id must be a base58 peer id string")
    if ts < (now - max_age) * 1000 or ts > (now + future_skew) * 1000:
        raise StaleAnnouncement(
            f"announcement from {shown(peer_id)} is stale or future-dated (ts {ts} ms, now {now * 1000:.0f})"
        )
    if canonical_json(doc) != bytes(data):
        raise AnnouncementError("announcement is not in canonical form (what was signed)")
    try:
        pub = ID.from_base58(peer_id).extract_public_key()
    except Exception as e:
        raise AnnouncementError(f"announcement peer id {peer_id!r} is not a valid peer id") from e
    if pub is None or not isinstance(sig_hex, str):
        raise AnnouncementError(f"peer id {peer_id} does not embed its public key (expected an Ed25519 peer id)")
    try:  # nacl raises (rather than answering False) for a signature of the wrong length
        genuine = len(sig) == 64 and pub.verify(DOMAIN + canonical_json(payload), sig)
    except Exception:
        genuine = False
    if not genuine:
        raise AnnouncementError(f"announcement signature does not match peer {peer_id} (forged or altered)")
    for a in addrs:  # a signed address that does not parse used to end every fetch that tried this peer
        try:
            Multiaddr(a)
        except Exception:
            raise AnnouncementError(f"announcement from {peer_id} lists {a[:64]!r}, which is not a multiaddr") from None
    return Announcement(peer_id, tuple(addrs), tuple(adapters), ts)


@dataclass(slots=True)
class _Entry:
    ann: Announcement
    first_seen: float


@dataclass(slots=True)
class ProviderBook:
    """Latest verified announcement per peer, bounded; answers who holds an adapter.

    `standing(peer_id)` says how far a peer is trusted (UNKNOWN, SERVED: a transfer from it
    succeeded, TRUSTED: registered or configured). When the book is over `max_peers` or `max_ids`,
    peers are evicted lowest standing first and, among equals, most recently first seen first:
    peers already known keep their place against any number of new ids.
    """

    max_age: float
    max_peers: int = 1024
    max_ids: int = 65536
    standing: Standing = lambda _peer: UNKNOWN
    _latest: dict[str, _Entry] = field(default_factory=dict)
    _ids: int = 0
    refused: int = 0  # announcements not kept because the book was full of peers with better standing

    def add(self, ann: Announcement, *, now: float | None = None) -> bool:
        """Keep `ann` unless an equal or newer one from the same peer is known or it would be evicted first."""
        now = time.time() if now is None else now
        old = self._latest.get(ann.peer_id)
        if old is not None and old.ann.ts_ms >= ann.ts_ms:
            return False
        full = self._over(ann, old)
        if full:
            self._expire(now)
            old = self._latest.get(ann.peer_id)
            full = self._over(ann, old)
        if full and old is None and self.standing(ann.peer_id) == UNKNOWN:
            self.refused += 1
            return False  # a new unknown peer is the first to go: refuse it without sorting the book
        if old is not None:
            self._ids -= len(old.ann.adapters)
        self._latest[ann.peer_id] = _Entry(ann, old.first_seen if old is not None else now)
        self._ids += len(ann.adapters)
        if full:
            self._evict()
        if ann.peer_id not in self._latest:
            self.refused += 1
            return False
        return True

    def holds(self, peer_id: str) -> bool:
        """Whether the book holds an announcement of this peer."""
        return peer_id in self._latest

    def knows(self, ann: Announcement) -> bool:
        """Whether the book holds this peer's announcement or a newer one (a replay: not relayed again)."""
        return self.knows_at(ann.peer_id, ann.ts_ms)

    def knows_at(self, peer_id: str, ts_ms: int) -> bool:
        """Whether the book holds an announcement of `peer_id` dated `ts_ms` or later."""
        old = self._latest.get(peer_id)
        return old is not None and old.ann.ts_ms >= ts_ms

    def _over(self, ann: Announcement, old: _Entry | None) -> bool:
        """Would keeping `ann` (replacing `old`) put the book over a bound?"""
        grows = len(ann.adapters) - (len(old.ann.adapters) if old is not None else 0)
        return len(self._latest) + (old is None) > self.max_peers or self._ids + grows > self.max_ids

    def _evict(self) -> None:
        if len(self._latest) <= self.max_peers and self._ids <= self.max_ids:
            return
        victims = sorted(self._latest.items(), key=lambda kv: (self.standing(kv[0]), -kv[1].first_seen))
        for peer, entry in victims:
            if len(self._latest) <= self.max_peers and self._ids <= self.max_ids:
                return
            del self._latest[peer]
            self._ids -= len(entry.ann.adapters)

    def _expire(self, now: float) -> None:
        for peer, entry in list(self._latest.items()):
            if entry.ann.ts_ms < (now - self.max_age) * 1000:
                del self._latest[peer]
                self._ids -= len(entry.ann.adapters)

    def providers(self, adapter_id: str, *, now: float | None = None) -> list[Announcement]:
        """Fresh announcements naming `adapter_id`, longest known peer first (a timestamp buys no place)."""
        self._expire(time.time() if now is None else now)
        hits = [e for e in self._latest.values() if adapter_id in e.ann.adapters]
        return [e.ann for e in sorted(hits, key=lambda e: e.first_seen)]

    def __len__(self) -> int:
        return len(self._latest)

    @property
    def id_count(self) -> int:
        """Adapter ids held over all peers (what the memory bound counts)."""
        return self._ids


# -- the mesh's side: announcing and finding providers ---------------------------------------------


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
    """Announces the adapters this node holds and finds peers that hold one (trio only).

    Built by Mesh with the host's GossipSub and DHT; `subscribe` then `start` once they run.
    """

    def __init__(
        self,
        *,
        config: P2PConfig,
        store: AdapterStore,
        host: IHost,
        key_pair: KeyPair,
        pubsub: Pubsub,
        dht: KadDHT,
        standing: PeerStanding,
    ) -> None:
        self.config = config
        self.store = store
        self.host = host
        self.peer_id = host.get_id().to_base58()
        self.pubsub = pubsub
        self.dht = dht
        self.standing = standing
        self._key = key_pair.private_key
        self.book = ProviderBook(
            max_age=config.announce_max_age,
            max_peers=config.book_max_peers,
            max_ids=config.book_max_ids,
            standing=standing.level,
        )
        # adapter ids this node holds, the one installed or announced last at the end (dict: an ordered set); it
        # announces the newest MAX_ADAPTERS of them, all it can sign into one announcement that peers accept
        self.held: dict[str, None] = {}
        self._provide_send, self._provide_recv = trio.open_memory_channel[str](1024)
        self._announce_now = trio.Event()
        # what a flood of announcements would log line by line (any peer id may send them), at most every 10 s
        self._log_dropped = Throttled(log, logging.INFO)
        self._log_book_full = Throttled(log, logging.WARNING)
        self._clock = time.monotonic  # the budget's and the paces' clock
        self._newcomers_budget, self._budget_at = float(NEWCOMERS_BURST), self._clock()
        self._publishing = trio.Lock()  # one announcement of its own at a time, ANNOUNCE_SPACING_S apart
        self._published_at = float("-inf")
        self._signed_at: OrderedDict[str, float] = OrderedDict()  # signer -> when its last one was taken
        self._checked: OrderedDict[bytes, Announcement] = OrderedDict()  # digest of the bytes -> announcement
        self._trio_token: trio.lowlevel.TrioToken | None = None  # the p2p loop's, once started (forget)

    async def subscribe(self):
        """Check every announcement GossipSub relays and join the topic (GossipSub must be ready)."""
        self.pubsub.set_topic_validator(TOPIC, self._validate_gossip, False)
        self.pubsub.precheck = self.worth_checking
        return await self.pubsub.subscribe(TOPIC)

    async def start(self, nursery: trio.Nursery, subscription) -> None:
        """Hold what the store holds and run the announce, DHT-provide and receive loops in `nursery`."""
        self._trio_token = trio.lowlevel.current_trio_token()  # forget's way back onto this loop, from any thread
        self.store.on_evicted.append(self.forget)
        held = await trio.to_thread.run_sync(_oldest_first, self.store)
        self.held.update(dict.fromkeys(held))
        if len(self.held) > MAX_ADAPTERS:
            log.warning(
                "this node holds %d adapters: its announcements name the %d installed last, and peers find the "
                "others through the DHT",
                len(self.held),
                MAX_ADAPTERS,
            )
        nursery.start_soon(self._provide_held, list(self.held))
        nursery.start_soon(self._receive_announcements, subscription)
        nursery.start_soon(self._announce_loop)
        nursery.start_soon(self._provide_loop)

    # -- announcing ------------------------------------------------------------------------

    async def announce(self, adapter_id: str) -> None:
        """Tell the mesh this node holds `adapter_id` (GossipSub now, DHT record paced)."""
        pkg = await trio.to_thread.run_sync(lambda: self.store.get(adapter_id, verify_hashes=False))
        if pkg is None:
            raise P2PError(f"cannot announce adapter {adapter_id}: this node's store does not hold it")
        self._hold(adapter_id)
        await self._publish_announcement()

    def announce_soon(self, adapter_id: str) -> None:
        """Hold `adapter_id` (a fetch just installed it) and wake the announce loop to say so."""
        self._hold(adapter_id)
        self._announce_now.set()

    def stop(self) -> None:
        """Stop hearing of the store's evictions (the mesh stops; a node started again builds a new Discovery)."""
        with contextlib.suppress(ValueError):
            self.store.on_evicted.remove(self.forget)

    def forget(self, adapter_id: str) -> None:
        """The store evicted `adapter_id` (AdapterStore.on_evicted, on the installing thread): its announcements
        stop naming it, the next one at once, so peers do not ask a node for what it no longer holds (a peer that
        asks is told so, and blames no one: fetcher.Fetcher). One dict operation, atomic under the GIL beside the
        p2p thread's own; DHT records already given out expire on their own."""
        self.held.pop(adapter_id, None)
        if self._trio_token is not None:
            with contextlib.suppress(trio.RunFinishedError):  # the mesh has stopped
                self._trio_token.run_sync_soon(lambda: self._announce_now.set())

    def _hold(self, adapter_id: str) -> None:
        self.held.pop(adapter_id, None)
        self.held[adapter_id] = None  # the newest now
        if len(self.held) == MAX_ADAPTERS + 1:
            log.warning(
                "this node holds more than %d adapters: its announcements name the %d held most recently, "
                "and peers find the others through the DHT",
                MAX_ADAPTERS,
                MAX_ADAPTERS,
            )
        try:
            self._provide_send.send_nowait(adapter_id)
        except trio.WouldBlock:
            log.warning("DHT provide queue full; %s will be provided on the next round", adapter_id)

    async def _publish_announcement(self) -> None:
        async with self._publishing:
            await trio.sleep_until(self._published_at + ANNOUNCE_SPACING_S)
            newest = list(self.held)[-MAX_ADAPTERS:]  # more would make peers refuse the whole announcement
            now_ms = int(time.time() * 1000)
            ann = Announcement(self.peer_id, tuple(full_addrs(self.host)), tuple(sorted(newest)), now_ms)
            await self.pubsub.publish(TOPIC, sign_announcement(ann, self._key))
            self._published_at = trio.current_time()

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

    async def _provide_held(self, adapter_ids: list[str]) -> None:
        # waits for room in the queue: a store can hold more than it (a node's start must not fail on that)
        for adapter_id in adapter_ids:
            await self._provide_send.send(adapter_id)

    async def _provide_loop(self) -> None:
        # Paced: a remote accepts 10 ADD_PROVIDER per 10 s per peer and drops the rest silently.
        async for adapter_id in self._provide_recv:
            try:
                with trio.move_on_after(10):
                    await self.dht.provide(dht_key(adapter_id))
            except Exception as e:
                log.info("DHT provide for %s failed (GossipSub still announces it): %s", adapter_id, e)
            await trio.sleep(self.config.dht_provide_interval)

    # -- receiving announcements -----------------------------------------------------------

    def _validate_gossip(self, forwarder: ID, msg) -> bool:
        """Whether GossipSub takes and relays `msg` (this node's own publish included): an announcement on the topic
        alone (py-libp2p runs the validator once per topic a message names), valid, newer than what the book holds
        of its signer, and within the signer's pace (SIGNER_GAP_S) or the newcomers' budget."""
        if list(msg.topicIDs) != [TOPIC]:
            return False
        try:
            ann = self._verify(msg.data)
        except AnnouncementError as e:
            self._log_dropped("dropped announcement: %s", e)
            if forwarder != self.pubsub.my_id and not isinstance(e, StaleAnnouncement):
                self.pubsub.strike(forwarder, f"an announcement that fails its checks ({e})")
            return False
        # its own publish always (its budget was spent by a stranger's flood, red team); by who forwards it, not who
        # signed it: a stranger relaying this node's old announcements again is held to the checks
        if forwarder != self.pubsub.my_id and (self.book.knows(ann) or not self._paced(ann.peer_id)):
            return False
        self._checked[hashlib.sha256(msg.data).digest()] = ann
        while len(self._checked) > CHECKED_KEPT:
            self._checked.popitem(last=False)
        return True

    def worth_checking(self, forwarder: ID, msg) -> bool:
        """Before any signature is checked (GuardedPubsub.precheck): False, charging nothing, for an announcement
        older than or as old as what the book holds of its signer, or one its signer's pace or the newcomers'
        budget would refuse now (a flood of fresh keys' announcements past the budget cost the node two pubsub
        signatures and the announcement's own checked each, 0.9 of a core; red team). What cannot be read here is
        left to the checks, which say what is wrong with it."""
        if forwarder == self.pubsub.my_id:
            return True
        try:
            payload = parse_json(msg.data, max_bytes=MAX_ANNOUNCEMENT_BYTES, max_depth=3, what="announcement")[
                "payload"
            ]
            signer, ts = payload["peer_id"], payload["ts"]
        except (UntrustedJSONError, KeyError, TypeError):
            return True
        if not isinstance(signer, str):
            return True
        # a replay of what the book holds, or of an older one (red team: one key's 100 older announcements cycled,
        # each checked whole, 0.89 of a core)
        if isinstance(ts, int) and self.book.knows_at(signer, ts):
            return False
        return self._paced(signer, charge=False)

    def _paced(self, signer: str, *, charge: bool = True) -> bool:
        """Take an announcement of `signer` now? Charged to it (SIGNER_GAP_S) and, for a newcomer with no standing,
        to the newcomers' budget (charge False: only asked)."""
        now = self._clock()
        last = self._signed_at.get(signer)
        if last is not None and now - last < SIGNER_GAP_S:
            return False
        # new: not in the book (a key the full book refused stays new) and no standing
        newcomer = not self.book.holds(signer) and self.standing.level(signer) == UNKNOWN
        if newcomer:
            refill = (now - self._budget_at) * NEWCOMERS_PER_S
            self._newcomers_budget, self._budget_at = min(NEWCOMERS_BURST, self._newcomers_budget + refill), now
            if self._newcomers_budget < 1:
                self._log_dropped("dropped announcement of %s: new signers' announcements over their budget", signer)
                return False
            if not charge:
                return True
            self._newcomers_budget -= 1
        elif not charge:
            return True
        self._signed_at[signer] = now
        self._signed_at.move_to_end(signer)
        while len(self._signed_at) > SIGNERS_KEPT:
            self._signed_at.popitem(last=False)
        return True

    def _verify(self, data: bytes) -> Announcement:
        return verify_announcement(
            data, now=time.time(), max_age=self.config.announce_max_age, future_skew=self.config.announce_future_skew
        )

    async def _receive_announcements(self, subscription) -> None:
        async for msg in subscription:
            ann = self._checked.pop(hashlib.sha256(msg.data).digest(), None)  # the validator's, checked already
            try:
                ann = ann or self._verify(msg.data)
            except AnnouncementError as e:
                self._log_dropped("dropped announcement: %s", e)
                continue
            refused = self.book.refused
            if ann.peer_id != self.peer_id and self.book.add(ann):
                log.debug("peer %s holds %d adapters", ann.peer_id, len(ann.adapters))
            elif self.book.refused != refused:
                self._log_book_full(
                    "announcement book is full (%d peers, %d adapter ids): %d announcements from "
                    "new peers refused so far",
                    len(self.book),
                    self.book.id_count,
                    self.book.refused,
                )

    # -- finding providers -----------------------------------------------------------------

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
                self.drop_dht_record(adapter_id, pid)
        infos = []
        try:
            with trio.move_on_after(self.config.dht_query_timeout):
                infos = await self.dht.find_providers(dht_key(adapter_id))
        except Exception as e:
            log.debug("DHT find_providers for %s failed: %s", adapter_id, e)
        out = []
        for info in infos:
            pid = info.peer_id.to_base58()
            out.append(Provider(pid, tuple(addr_str(a, pid) for a in info.addrs[:MAX_ADDRS]), "dht"))
        return out

    def _local_dht_providers(self, adapter_id: str) -> dict:
        """The DHT's local provider records for `adapter_id` (peer id string -> record), as the library keeps them."""
        return self.dht.provider_store.providers.get(_encode_key(dht_key(adapter_id)), {})

    def drop_dht_record(self, adapter_id: str, peer_id: str) -> None:
        """Forget a provider record of `adapter_id` in the DHT's local store (it failed us)."""
        records = self._local_dht_providers(adapter_id)
        for key in [k for k in records if k == peer_id or str(k) == peer_id]:
            del records[key]


def _oldest_first(store: AdapterStore) -> list[str]:
    """The store's adapter ids, the one installed last at the end (held's order across a restart)."""

    def installed_at(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:  # removed since it was listed
            return 0.0

    return [p.adapter_id for p in sorted(store.list(), key=lambda p: (installed_at(p.path), p.adapter_id))]
