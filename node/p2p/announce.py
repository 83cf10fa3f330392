"""Signed GossipSub announcements of which adapters a node holds, and the book of providers they fill.

An announcement is canonical JSON {"payload": {...}, "sig": hex}; the signature is the node's
Ed25519 key over a domain tag plus the canonical payload, and the key is recovered from the peer id
in the payload, so a relay cannot forge or alter one. Stale or future-dated ones are dropped.
The bytes are size-checked and parsed by the bounded parser (depth 3 is all the format needs)
before anything else, and must be the canonical form that was signed.

A peer id costs nothing, so the book of providers is bounded (peers and ids over all peers) and
evicts by standing: peers this node has reason to trust (registered, bootstrap, a transfer that
succeeded) last, then the longest known; a flood of new ids only ever pushes out its own kind.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from libp2p.crypto.keys import PrivateKey
from libp2p.peer.id import ID

from common.wire import UntrustedJSONError, canonical_json, is_id, parse_json

TOPIC = "/loramesh/adapters/1"
DOMAIN = b"loramesh-announce/1\n"
MAX_ADAPTERS = 1024
MAX_ADDRS = 16
FUTURE_SKEW_S = 5.0
# 1,024 ids of 66 characters plus quotes and commas, 16 addresses and the signature fit in ~76 KB.
MAX_ANNOUNCEMENT_BYTES = 96 * 1024


class AnnouncementError(ValueError):
    """An announcement that is malformed, unsigned, forged or stale."""


@dataclass(frozen=True, slots=True)
class Announcement:
    peer_id: str
    addrs: tuple[str, ...]
    adapters: tuple[str, ...]
    ts_ms: int  # unix time in milliseconds (an int keeps the canonical bytes unambiguous)

    def payload(self) -> dict:
        return {"v": 1, "peer_id": self.peer_id, "addrs": list(self.addrs), "adapters": list(self.adapters), "ts": self.ts_ms}


def sign_announcement(ann: Announcement, key: PrivateKey) -> bytes:
    """The wire bytes of `ann`, signed with the node key."""
    sig = key.sign(DOMAIN + canonical_json(ann.payload()))
    return canonical_json({"payload": ann.payload(), "sig": sig.hex()})


def verify_announcement(data: bytes, *, now: float, max_age: float,
                        future_skew: float = FUTURE_SKEW_S) -> Announcement:
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
        raise AnnouncementError(f"announcement is not {{payload: {{peer_id, addrs, adapters, ts}}, sig}} "
                                f"({type(e).__name__})") from e
    if not isinstance(payload, dict) or payload.get("v") != 1:
        raise AnnouncementError(f"announcement version {payload.get('v')!r}; expected 1")
    if not (isinstance(addrs, list) and len(addrs) <= MAX_ADDRS and all(isinstance(a, str) for a in addrs)):
        raise AnnouncementError(f"announcement addrs must be a list of at most {MAX_ADDRS} multiaddr strings")
    if not (isinstance(adapters, list) and len(adapters) <= MAX_ADAPTERS and all(is_id(a) for a in adapters)):
        raise AnnouncementError(f"announcement adapters must be a list of at most {MAX_ADAPTERS} 0x ids")
    if not isinstance(ts, int) or isinstance(ts, bool):
        raise AnnouncementError(f"announcement ts {ts!r} is not an integer of milliseconds")
    if not isinstance(peer_id, str) or len(peer_id) > 128:
        raise AnnouncementError("announcement peer_id must be a base58 peer id string")
    if ts < (now - max_age) * 1000 or ts > (now + future_skew) * 1000:
        raise AnnouncementError(f"announcement from {peer_id} is stale or future-dated (ts {ts} ms, now {now * 1000:.0f})")
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
    return Announcement(peer_id, tuple(addrs), tuple(adapters), ts)


# Standing of an announcing peer: the book evicts the lowest first, and among equals the newest.
UNKNOWN, SERVED, TRUSTED = 0, 1, 2
Standing = Callable[[str], int]


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

    def forget(self, peer_id: str) -> None:
        entry = self._latest.pop(peer_id, None)
        if entry is not None:
            self._ids -= len(entry.ann.adapters)
