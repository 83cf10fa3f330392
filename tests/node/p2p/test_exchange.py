"""Adapters move between real libp2p hosts in separate processes, and only verified bytes land in a store."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from node.adapters import AdapterStore, verify_package

pytestmark = pytest.mark.integration


def _nothing_half_written(store_dir: Path, adapter_id: str) -> None:
    assert not (store_dir / adapter_id).exists()
    assert list((store_dir / ".tmp").iterdir()) == []


def test_c_fetches_a_adapter_through_b(mesh, packages):
    pkg = packages.main
    # C was only told about B; A's address reaches it through the mesh (gossip / DHT).
    found = mesh.c.call("providers", adapter_id=pkg.adapter_id, wait=8)
    assert found["ok"], found
    assert mesh.a.peer_id in [p["peer_id"] for p in found["providers"]]

    got = mesh.c.call("fetch", adapter_id=pkg.adapter_id)

    assert got["ok"], got
    assert got["peer_id"] == mesh.a.peer_id and got["attempts"] == 1
    installed = Path(got["path"])
    assert installed == mesh.c_store / pkg.adapter_id
    assert sorted(os.listdir(installed)) == sorted(os.listdir(pkg.path))
    for name in os.listdir(pkg.path):
        assert (installed / name).read_bytes() == (pkg.path / name).read_bytes()
    verified = verify_package(installed, base_dir=packages.base, expected_owner=packages.owner)
    assert verified.adapter_id == pkg.adapter_id and verified.signer == packages.owner
    assert AdapterStore(mesh.c_store).get(pkg.adapter_id) is not None


def test_c_announces_what_it_fetched(mesh, packages):
    adapter_id = packages.main.adapter_id
    assert adapter_id in mesh.c.call("status")["held"]
    for _ in range(40):  # C re-announces every second; B learns C is now a provider too
        peers = [p["peer_id"] for p in mesh.b.call("providers", adapter_id=adapter_id, wait=1)["providers"]]
        if mesh.c.peer_id in peers:
            break
    assert mesh.c.peer_id in peers and mesh.a.peer_id in peers


@pytest.mark.parametrize(
    ("which", "reason"),
    [
        # on a loaded machine the tampering server may give up writing (its write timeout) before the
        # flipped file is whole: then its stream breaks first; either way it fails and A delivers
        ("tampered", "sha256 differs from the manifest|BrokenResourceError"),
        ("stalled", "sent nothing for"),
        ("dropped", "reset the stream|stream ended after"),  # a reset may surface as EOF first
    ],
)
def test_bad_provider_then_good_one(mesh, packages, which, reason):
    pkg = getattr(packages, which)
    got = mesh.c.call("fetch", adapter_id=pkg.adapter_id, providers=[mesh.f.addrs[0], mesh.a.addrs[0]])

    assert got["ok"], got
    assert got["peer_id"] == mesh.a.peer_id and got["attempts"] == 2
    assert len(got["failures"]) == 1 and got["failures"][0].startswith(mesh.f.peer_id)
    assert re.search(reason, got["failures"][0])
    installed = Path(got["path"])
    assert (installed / "adapter_model.safetensors").read_bytes() == (
        pkg.path / "adapter_model.safetensors"
    ).read_bytes()
    assert list((mesh.c_store / ".tmp").iterdir()) == []


def test_a_provider_saying_late_that_it_does_not_hold_it_is_held_to_its_wait(mesh, packages):
    """Re-attack: a peer that does not hold an adapter is excused (ProviderLacks) only when it says so at once; one
    that answers so after a wait cost the fetch that wait (10 s each fetch, never backed off) and is held to it."""
    before = mesh.c.call("status", failures_of=[mesh.f.peer_id])["failures"][mesh.f.peer_id]
    got = mesh.c.call("fetch", adapter_id=packages.late.adapter_id, providers=[mesh.f.addrs[0], mesh.a.addrs[0]])
    assert got["ok"] and got["attempts"] == 2 and got["peer_id"] == mesh.a.peer_id, got
    assert "does not hold adapter" in got["failures"][0]
    assert mesh.c.call("status", failures_of=[mesh.f.peer_id])["failures"][mesh.f.peer_id] == before + 1


def test_oversized_frame_refused(mesh, packages):
    pkg = packages.oversized
    got = mesh.c.call("fetch", adapter_id=pkg.adapter_id, providers=[mesh.f.addrs[0]])

    assert not got["ok"] and got["type"] == "FetchError"
    assert "DATA frame announces 67108864 bytes; the cap is 1048576" in got["error"]
    _nothing_half_written(mesh.c_store, pkg.adapter_id)


def test_package_signed_by_someone_else_refused(mesh, packages):
    pkg = packages.foreign
    got = mesh.c.call("fetch", adapter_id=pkg.adapter_id)

    assert not got["ok"] and got["type"] == "FetchError"
    assert f"signed by {packages.stranger}, but the adapter's registered owner is {packages.owner}" in got["error"]
    _nothing_half_written(mesh.c_store, pkg.adapter_id)


def test_unregistered_adapter_refused(mesh):
    adapter_id = "0x" + "ab" * 32
    got = mesh.c.call("fetch", adapter_id=adapter_id)

    assert not got["ok"] and got["type"] == "UnregisteredAdapter"
    assert f"adapter {adapter_id} has no registered owner" in got["error"]
    _nothing_half_written(mesh.c_store, adapter_id)


def test_registered_adapter_nobody_holds(mesh, packages):
    adapter_id = "0x" + "cd" * 32
    owners = json.loads(mesh.owners.read_text())
    mesh.owners.write_text(json.dumps({**owners, adapter_id: packages.owner}))

    got = mesh.c.call("fetch", adapter_id=adapter_id)

    assert not got["ok"] and got["type"] == "NoProviders"
    assert f"no peer announced adapter {adapter_id}" in got["error"]
    _nothing_half_written(mesh.c_store, adapter_id)


def test_a_fetcher_over_its_cache_bound_evicts_stops_announcing_and_blames_nobody(mesh, packages, tmp_path):
    """A node's fetches are held to its cache bound (node/adapters/store.py): what it loaded least recently goes,
    its announcements stop naming it (peers would ask for it, and mark the node failed), and a fetch with no room
    ends with StoreFull, no provider tried after the first nor blamed."""
    import time

    from node.adapters.store import CACHED_DIR, EVICT_GRACE_S
    from tests.utils.p2p import PeerProcess

    first, second = packages.main, packages.stalled  # A holds both honestly
    size = max(sum(p.stat().st_size for p in pkg.path.iterdir()) for pkg in (first, second))  # room for one
    d = PeerProcess(
        store=tmp_path / "d", owners=mesh.owners, base=packages.base, bootstrap=mesh.a.addrs, max_cache_bytes=size
    )
    try:
        got = d.call("fetch", adapter_id=first.adapter_id, providers=[mesh.a.addrs[0]])
        assert got["ok"], got
        assert first.adapter_id in d.call("status")["held"]
        got = d.call("fetch", adapter_id=second.adapter_id, providers=[mesh.a.addrs[0], mesh.b.addrs[0]])
        assert not got["ok"] and got["type"] == "StoreFull", got  # the first was fetched just now
        transfer = next(t for t in d.call("status")["transfers"] if t["adapter_id"] == second.adapter_id)
        assert transfer["attempts"] == 1 and transfer["failures"] == [], transfer
        _nothing_half_written(tmp_path / "d", second.adapter_id)

        old = time.time() - EVICT_GRACE_S - 1
        os.utime(tmp_path / "d" / CACHED_DIR / first.adapter_id, (old, old))
        got = d.call("fetch", adapter_id=second.adapter_id, providers=[mesh.a.addrs[0]])
        assert got["ok"], got
        held = d.call("status")["held"]
        assert second.adapter_id in held and first.adapter_id not in held
        assert not (tmp_path / "d" / first.adapter_id).exists()
        # a peer that asks D for what it evicted is told so, and holds nothing against D (it tries the next)
        e = PeerProcess(store=tmp_path / "e", owners=mesh.owners, base=packages.base, bootstrap=mesh.a.addrs)
        try:
            got = e.call("fetch", adapter_id=first.adapter_id, providers=[d.addrs[0], mesh.a.addrs[0]])
            assert got["ok"] and got["attempts"] == 2 and got["peer_id"] == mesh.a.peer_id, got
            assert "does not hold adapter" in got["failures"][0]
            assert e.call("status", failures_of=[d.peer_id])["failures"] == {d.peer_id: 0}
        finally:
            e.stop()
    finally:
        d.stop()
