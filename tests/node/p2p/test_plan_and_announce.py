"""What a fetcher trusts before the package check: the manifest's file plan and signed announcements."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from common.wire import canonical_json
from node.adapters.manifest import BaseModelRef, FileEntry, LoraInfo, Manifest
from node.p2p.config import P2PConfig
from node.p2p.discovery import Announcement, ProviderBook, sign_announcement, verify_announcement
from node.p2p.errors import AnnouncementError, BadBytes, UnfitAdapter
from node.p2p.protocol import FileHasher, PlannedFile, plan_transfer


def _manifest(**files: bytes) -> Manifest:
    return Manifest(
        name="t",
        version="1",
        base_model=BaseModelRef(name="b", id="0x" + "11" * 32),
        files=tuple(
            FileEntry(path=k.replace("_", "."), sha256=hashlib.sha256(v).hexdigest(), size=len(v))
            for k, v in files.items()
        ),
        lora=LoraInfo(rank=4, alpha=8, targets=("q_proj",)),
    )


def test_plan_lists_the_manifest_files():
    m = _manifest(a_json=b"{}", w_bin=b"1234")
    plan = plan_transfer(m.canonical_bytes(), m.adapter_id, max_bytes=100)
    assert [(f.path, f.size) for f in plan.files] == [("a.json", 2), ("w.bin", 4)]
    assert plan.total_bytes == 6


def test_plan_refuses_a_manifest_for_another_id():
    m = _manifest(a_json=b"{}")
    other = "0x" + "22" * 32
    with pytest.raises(BadBytes, match=f"manifest hashes to {m.adapter_id}, not the requested adapter id {other}"):
        plan_transfer(m.canonical_bytes(), other, max_bytes=100)


def test_plan_refuses_a_path_escape_before_anything_is_written():
    doc = json.loads(_manifest(a_json=b"{}").canonical_bytes())
    doc["files"][0]["path"] = "../../etc/passwd"
    raw = canonical_json(doc)
    with pytest.raises(UnfitAdapter, match="escapes the package folder"):  # its own bytes: no provider's fault
        plan_transfer(raw, "0x" + hashlib.sha256(raw).hexdigest(), max_bytes=100)


def test_plan_refuses_non_json():
    with pytest.raises(BadBytes, match="provider sent an invalid manifest"):
        plan_transfer(b"\xff not json", "0x" + "33" * 32, max_bytes=100)


def test_plan_refuses_a_package_over_the_size_limit():
    m = _manifest(w_bin=b"x" * 50)
    # the manifest's own word (its bytes are the id), as every provider sends it: no provider's fault
    with pytest.raises(UnfitAdapter, match="package is 50 bytes; this node accepts at most 10"):
        plan_transfer(m.canonical_bytes(), m.adapter_id, max_bytes=10)


def test_hasher_refuses_extra_bytes_at_once():
    h = FileHasher(PlannedFile("w.bin", 3, hashlib.sha256(b"abc").hexdigest()))
    h.reserve(2)
    with pytest.raises(BadBytes, match="w.bin: peer sent more than the manifest's 3 bytes"):
        h.reserve(2)


@pytest.mark.parametrize(
    "received, message",
    [(b"abd", "w.bin: sha256 differs from the manifest"), (b"ab", "w.bin: 1 bytes missing")],
    ids=["changed", "missing"],
)
def test_hasher_refuses_changed_or_missing_bytes(received, message):
    h = FileHasher(PlannedFile("w.bin", 3, hashlib.sha256(b"abc").hexdigest()))
    h.reserve(len(received))
    h.update(received)
    with pytest.raises(BadBytes, match=message):
        h.finish()


# -- announcements ---------------------------------------------------------------------------

ADAPTER = "0x" + "aa" * 32


def _signed(ts_ms: int | None = None, key=None):
    kp = key or create_new_key_pair(os.urandom(32))
    pid = ID.from_pubkey(kp.public_key).to_base58()
    ts = int(time.time() * 1000) if ts_ms is None else ts_ms
    ann = Announcement(pid, (f"/ip4/127.0.0.1/tcp/1/p2p/{pid}",), (ADAPTER,), ts)
    return ann, sign_announcement(ann, kp.private_key), kp


def test_announcement_round_trip():
    ann, data, _ = _signed()
    assert verify_announcement(data, now=time.time(), max_age=60) == ann


def test_announcement_with_altered_payload_refused():
    _, data, _ = _signed()
    doc = json.loads(data)
    doc["payload"]["adapters"] = ["0x" + "bb" * 32]
    with pytest.raises(AnnouncementError, match="signature does not match peer"):
        verify_announcement(canonical_json(doc), now=time.time(), max_age=60)


def test_announcement_signed_by_another_key_refused():
    ann, _, _ = _signed()
    forged = sign_announcement(ann, create_new_key_pair(os.urandom(32)).private_key)
    with pytest.raises(AnnouncementError, match=f"signature does not match peer {ann.peer_id}"):
        verify_announcement(forged, now=time.time(), max_age=60)


def test_unsigned_announcement_refused():
    ann, _, _ = _signed()
    with pytest.raises(AnnouncementError, match="announcement is not"):
        verify_announcement(canonical_json({"payload": ann.payload()}), now=time.time(), max_age=60)


def test_stale_announcement_refused():
    _, data, _ = _signed(ts_ms=int((time.time() - 120) * 1000))
    with pytest.raises(AnnouncementError, match="stale or future-dated"):
        verify_announcement(data, now=time.time(), max_age=60)


def test_future_dated_announcement_refused():
    _, data, _ = _signed(ts_ms=int((time.time() + 3600) * 1000))
    with pytest.raises(AnnouncementError, match="stale or future-dated"):
        verify_announcement(data, now=time.time(), max_age=60)


def test_announcement_with_a_bad_adapter_id_refused():
    ann, _, kp = _signed()
    bad = Announcement(ann.peer_id, ann.addrs, ("not-an-id",), ann.ts_ms)
    with pytest.raises(AnnouncementError, match="adapters must be a list"):
        verify_announcement(sign_announcement(bad, kp.private_key), now=time.time(), max_age=60)


@pytest.mark.parametrize("addr", ["not-a-multiaddr", "/ip4/1.2.3.4/tcp/x", "/dns4/"])
def test_announcement_with_an_address_that_is_not_a_multiaddr_refused(addr):
    # signed and well-formed otherwise: the fetcher used to meet the address first, and its ValueError ended the
    # whole fetch, the honest providers after it untried
    ann, _, kp = _signed()
    bad = Announcement(ann.peer_id, (*ann.addrs, addr), ann.adapters, ann.ts_ms)
    with pytest.raises(AnnouncementError, match="which is not a multiaddr"):
        verify_announcement(sign_announcement(bad, kp.private_key), now=time.time(), max_age=60)


def test_a_provider_whose_address_does_not_parse_fails_alone():
    from node.p2p.discovery import Provider
    from node.p2p.errors import ProviderError
    from node.p2p.fetcher import _peer_info

    ann, _, _ = _signed()
    assert _peer_info(Provider(ann.peer_id, ann.addrs, "dht")).peer_id.to_base58() == ann.peer_id
    for prov in (Provider(ann.peer_id, ("not-a-multiaddr",), "dht"), Provider("not-a-peer-id", ann.addrs, "dht")):
        with pytest.raises(ProviderError, match="does not parse"):  # the fetcher's loop moves on past a ProviderError
            _peer_info(prov)


def test_provider_book_keeps_the_newest_and_expires():
    kp = create_new_key_pair(os.urandom(32))
    now = time.time()
    old, _, _ = _signed(ts_ms=int((now - 30) * 1000), key=kp)
    new, _, _ = _signed(ts_ms=int(now * 1000), key=kp)
    book = ProviderBook(max_age=60)
    assert book.add(new) and not book.add(old)
    assert book.providers(ADAPTER, now=now) == [new]
    assert book.providers(ADAPTER, now=now + 61) == []


def test_config_checks_values():
    with pytest.raises(ValueError, match="bad multiaddr in p2p config"):
        P2PConfig(listen="127.0.0.1:4001")
    with pytest.raises(ValueError, match="read_timeout must be > 0"):
        P2PConfig(read_timeout=0)
    with pytest.raises(ValueError, match="max_inbound_streams must be >= 1"):
        P2PConfig(max_inbound_streams=0)


def _discovery(store=None):
    """A Discovery over a host and pubsub that only record (what these tests read), with no DHT."""
    from multiaddr import Multiaddr

    from node.p2p.discovery import Discovery
    from node.p2p.standing import PeerStanding

    kp = create_new_key_pair(os.urandom(32))

    class Host:
        def get_id(self):
            return ID.from_pubkey(kp.public_key)

        def get_addrs(self):
            return [Multiaddr("/ip4/127.0.0.1/tcp/4001")]

        def get_connected_peers(self):
            return []

    class PubSub:
        def __init__(self):
            self.sent: list[bytes] = []

        async def publish(self, topic, data):
            self.sent.append(data)

    return Discovery(
        config=P2PConfig(listen="/ip4/127.0.0.1/tcp/0"),
        store=store,
        host=Host(),
        key_pair=kp,
        pubsub=PubSub(),
        dht=None,
        standing=PeerStanding(base_backoff=1, max_backoff=2),
    )


def test_a_node_holding_more_adapters_than_one_announcement_names_announces_the_newest():
    """Peers refuse an announcement of more than MAX_ADAPTERS ids: a node pushed past that (anyone can register
    adapters and ask for each once) signed only announcements nobody took, and vanished from GossipSub for the
    adapters it held before too. It names the ones it held most recently; the DHT has the rest."""
    import trio

    from node.p2p.discovery import MAX_ADAPTERS

    d = _discovery()
    ids = ["0x" + os.urandom(32).hex() for _ in range(MAX_ADAPTERS + 1)]
    for adapter_id in ids:
        d.announce_soon(adapter_id)
    d.announce_soon(ids[0])  # asked for again: the newest, and ids[1] the oldest

    def announced() -> set[str]:
        trio.run(d._publish_announcement)
        return set(verify_announcement(d.pubsub.sent[-1], now=time.time(), max_age=600).adapters)

    assert announced() == {ids[0], *ids[2:]}
    assert len(d.held) == MAX_ADAPTERS + 1  # still held, and provided on the DHT


def test_a_node_whose_store_holds_more_adapters_than_one_announcement_starts_its_mesh(tmp_path):
    """Its start queued every held id for the DHT at once, into a queue of MAX_ADAPTERS: the next one raised, and
    the node did not start. The ids wait for room now; after a restart the ones installed last are announced."""
    from types import SimpleNamespace

    import trio

    from node.p2p.discovery import MAX_ADAPTERS

    ids = ["0x" + os.urandom(32).hex() for _ in range(MAX_ADAPTERS + 1)]
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    os.utime(old, (1, 1))
    paths = {a: new if a == ids[0] else old for a in ids}  # ids[0] installed last
    store = SimpleNamespace(
        list=lambda: [SimpleNamespace(adapter_id=a, path=paths[a]) for a in sorted(ids)], on_evicted=[]
    )
    d = _discovery(store)

    class Quiet:  # a subscription nobody publishes on
        def __aiter__(self):
            return self

        async def __anext__(self):
            await trio.sleep_forever()

    async def main():
        async with trio.open_nursery() as nursery:
            await d.start(nursery, subscription=Quiet())
            await trio.sleep(0.1)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert len(d.held) == MAX_ADAPTERS + 1 and list(d.held)[-1] == ids[0]
