"""Signed GossipSub announcements of which adapters a node holds, and the book of providers they fill.

An announcement is canonical JSON {"payload": {...}, "sig": hex}; the signature is the node's
Ed25519 key over a domain tag plus the canonical payload, and the key is recovered from the peer id
in the payload, so a relay cannot forge or alter one. Stale or future-dated ones are dropped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from libp2p.crypto.keys import PrivateKey
from libp2p.peer.id import ID

from node.canonical import canonical_json, is_id

TOPIC = "/loramesh/adapters/1"
DOMAIN = b"loramesh-announce/1\n"
MAX_ADAPTERS = 1024
MAX_ADDRS = 16
FUTURE_SKEW_S = 60.0


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


def verify_announcement(data: bytes, *, now: float, max_age: float) -> Announcement:
    """Parse and check wire bytes; AnnouncementError names what was wrong."""
    try:
        doc = json.loads(data)
        payload, sig_hex = doc["payload"], doc["sig"]
        sig = bytes.fromhex(sig_hex)
        peer_id, addrs, adapters, ts = payload["peer_id"], payload["addrs"], payload["adapters"], payload["ts"]
    except (ValueError, KeyError, TypeError) as e:
        raise AnnouncementError(f"announcement is not {{payload: {{peer_id, addrs, adapters, ts}}, sig}}: {e!r}") from e
    if payload.get("v") != 1:
        raise AnnouncementError(f"announcement version {payload.get('v')!r}; expected 1")
    if not (isinstance(addrs, list) and len(addrs) <= MAX_ADDRS and all(isinstance(a, str) for a in addrs)):
        raise AnnouncementError(f"announcement addrs must be a list of at most {MAX_ADDRS} multiaddr strings")
    if not (isinstance(adapters, list) and len(adapters) <= MAX_ADAPTERS and all(is_id(a) for a in adapters)):
        raise AnnouncementError(f"announcement adapters must be a list of at most {MAX_ADAPTERS} 0x ids")
    if not isinstance(ts, int) or isinstance(ts, bool):
        raise AnnouncementError(f"announcement ts {ts!r} is not an integer of milliseconds")
    if ts < (now - max_age) * 1000 or ts > (now + FUTURE_SKEW_S) * 1000:
        raise AnnouncementError(f"announcement from {peer_id} is stale or future-dated (ts {ts} ms, now {now * 1000:.0f})")
    try:
        pub = ID.from_base58(peer_id).extract_public_key()
    except Exception as e:
        raise AnnouncementError(f"announcement peer id {peer_id!r} is not a valid peer id") from e
    if pub is None:
        raise AnnouncementError(f"peer id {peer_id} does not embed its public key (expected an Ed25519 peer id)")
    if not pub.verify(DOMAIN + canonical_json(payload), sig):
        raise AnnouncementError(f"announcement signature does not match peer {peer_id} (forged or altered)")
    return Announcement(peer_id, tuple(addrs), tuple(adapters), ts)


@dataclass(slots=True)
class ProviderBook:
    """Latest verified announcement per peer; answers who holds an adapter."""

    max_age: float
    _latest: dict[str, Announcement] = field(default_factory=dict)

    def add(self, ann: Announcement) -> bool:
        """Keep `ann` unless an equal or newer one from the same peer is known; True when kept."""
        old = self._latest.get(ann.peer_id)
        if old is not None and old.ts_ms >= ann.ts_ms:
            return False
        self._latest[ann.peer_id] = ann
        return True

    def providers(self, adapter_id: str, *, now: float | None = None) -> list[Announcement]:
        """Fresh announcements naming `adapter_id`, newest first."""
        now = time.time() if now is None else now
        for peer, ann in list(self._latest.items()):
            if ann.ts_ms < (now - self.max_age) * 1000:
                del self._latest[peer]
        hits = [a for a in self._latest.values() if adapter_id in a.adapters]
        return sorted(hits, key=lambda a: a.ts_ms, reverse=True)

    def forget(self, peer_id: str) -> None:
        self._latest.pop(peer_id, None)
