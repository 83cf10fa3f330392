"""The store's cache of fetched adapters (node/adapters/store.py): anyone who registers adapters and sends requests
decides what a node fetches, and without a bound its disk filled (a node's store had no quota: each fetched package
stayed for good). Fetched entries are held to `max_cache_bytes` and the disk to `min_free_bytes`, the least
recently loaded evicted first; what the operator put there is never evicted."""

from __future__ import annotations

import os
import shutil
import time

import pytest
from eth_account import Account

from node.adapters import AdapterStore
from node.adapters.errors import StoreFull
from node.adapters.store import CACHED_DIR, EVICT_GRACE_S
from tests.utils.factories import make_package


@pytest.fixture(scope="module")
def packages(tiny_base, tmp_path_factory):
    """Four signed packages of one size, each its own adapter."""
    root = tmp_path_factory.mktemp("cache-src")
    account = Account.create()
    return [make_package(tiny_base, root / f"p{i}", account=account, name=f"acme/p{i}", seed=i) for i in range(4)]


def size_of(pkg) -> int:
    return sum(p.stat().st_size for p in pkg.path.iterdir())


def fetched(store: AdapterStore, pkg) -> None:
    """Install as the fetcher does: a copy in the store's .tmp, installed as cached."""
    tmp = store.tmp_dir()
    for p in pkg.path.iterdir():
        shutil.copyfile(p, tmp / p.name)
    store.install_from_tmp(tmp, cached=True)


def loaded_ago(store: AdapterStore, pkg, seconds: float) -> None:
    """As if the engine last loaded it `seconds` ago."""
    t = time.time() - seconds
    os.utime(store.root / CACHED_DIR / pkg.adapter_id, (t, t))


def test_fetched_adapters_stay_within_the_bound_least_recently_loaded_going_first(packages, tiny_base, tmp_path):
    a, b, c, _ = packages
    store = AdapterStore(tmp_path / "store", base_dir=tiny_base, max_cache_bytes=2 * size_of(a) + 1000)
    evicted: list[str] = []
    store.on_evicted.append(evicted.append)
    fetched(store, a)
    fetched(store, b)
    loaded_ago(store, a, EVICT_GRACE_S + 100)
    loaded_ago(store, b, EVICT_GRACE_S + 200)  # loaded before a: it goes first
    fetched(store, c)
    assert evicted == [b.adapter_id]
    assert store.has(a.adapter_id) and store.has(c.adapter_id) and not store.has(b.adapter_id)
    assert store.cached_bytes() <= store.max_cache_bytes
    store.touch(a.adapter_id)  # the engine loads a: now c is the least recently loaded
    loaded_ago(store, c, EVICT_GRACE_S + 1)
    fetched(store, b)
    assert evicted == [b.adapter_id, c.adapter_id] and store.has(a.adapter_id) and store.has(b.adapter_id)


def test_nothing_loaded_within_the_grace_is_evicted_and_the_fetch_is_refused(packages, tiny_base, tmp_path):
    a, b, _, _ = packages
    store = AdapterStore(tmp_path / "store", base_dir=tiny_base, max_cache_bytes=size_of(a) + 1000)
    fetched(store, a)  # fetched just now: a load may be reading it
    with pytest.raises(StoreFull, match="what it could evict is in use .* used in the last 60 s"):
        fetched(store, b)
    assert store.has(a.adapter_id) and not store.has(b.adapter_id)
    assert not list((store.root / ".tmp").iterdir())  # the refused copy is gone too
    loaded_ago(store, a, EVICT_GRACE_S + 1)
    fetched(store, b)
    assert not store.has(a.adapter_id) and store.has(b.adapter_id)


def test_what_the_operator_put_there_is_never_evicted_nor_counted(packages, tiny_base, tmp_path):
    a, b, c, d = packages
    store = AdapterStore(tmp_path / "store", base_dir=tiny_base, max_cache_bytes=size_of(a) + 1000)
    store.install(a.path)  # an upload
    fetched(store, b)
    store.keep(b.adapter_id)  # pinned: the operator's now
    fetched(store, c)  # the cache holds c alone: a and b are not counted
    assert store.cached_bytes() == size_of(c)
    loaded_ago(store, c, EVICT_GRACE_S + 1)
    fetched(store, d)
    assert [store.has(p.adapter_id) for p in packages] == [True, True, False, True]
    # the operator's install of a cached entry makes it theirs; a fetch of theirs leaves it theirs
    store.install(d.path)
    fetched(store, a)
    assert store.cached_bytes() == 0


def test_a_fetch_keeps_the_disk_floor_or_is_refused(packages, tiny_base, tmp_path):
    a, b, _, _ = packages
    store = AdapterStore(tmp_path / "store", base_dir=tiny_base)
    fetched(store, a)
    loaded_ago(store, a, EVICT_GRACE_S + 1)
    store.min_free_bytes = shutil.disk_usage(tmp_path).free + 2**50  # a floor no eviction can reach
    with pytest.raises(StoreFull, match="bytes of its disk are free, under the"):
        fetched(store, b)
    assert store.has(a.adapter_id) and not store.has(b.adapter_id)  # all or nothing: a stays
    with pytest.raises(StoreFull):
        store.make_room()  # the look before a download says so at once
    store.min_free_bytes = 0
    fetched(store, b)


def test_a_store_over_its_bound_with_nothing_evictable_refuses_before_a_download(packages, tiny_base, tmp_path):
    a, _, _, _ = packages
    store = AdapterStore(tmp_path / "store", base_dir=tiny_base)
    fetched(store, a)
    store.max_cache_bytes = size_of(a) // 2  # the operator lowered the bound since
    with pytest.raises(StoreFull):
        store.make_room()
    loaded_ago(store, a, EVICT_GRACE_S + 1)
    store.make_room()
    assert not store.has(a.adapter_id)


def test_what_is_in_use_is_never_evicted_and_an_eviction_that_cannot_be_enough_removes_nothing(
    packages, tiny_base, tmp_path
):
    """Review: an install that could not fit even after evicting every entry it may removed them all first; and a
    load under way, or an upload to a peer, lost its files."""
    a, b, c, d = packages
    store = AdapterStore(tmp_path / "store", base_dir=tiny_base, max_cache_bytes=2 * size_of(a) + 1000)
    busy: set[str] = set()
    store.protected.append(lambda: busy)
    fetched(store, a)
    fetched(store, b)
    loaded_ago(store, a, EVICT_GRACE_S + 10)
    loaded_ago(store, b, EVICT_GRACE_S + 5)
    busy.add(a.adapter_id)  # the least recently used, but being read
    fetched(store, c)
    assert store.has(a.adapter_id) and not store.has(b.adapter_id) and store.has(c.adapter_id)
    busy.add(c.adapter_id)
    with pytest.raises(StoreFull, match="in use"):
        fetched(store, d)
    assert store.has(a.adapter_id) and store.has(c.adapter_id)
    huge = AdapterStore(tmp_path / "huge", base_dir=tiny_base, max_cache_bytes=size_of(a) + 1000)
    fetched(huge, a)
    loaded_ago(huge, a, EVICT_GRACE_S + 1)
    huge.max_cache_bytes = size_of(b) // 2  # no eviction makes room for b: a stays
    with pytest.raises(StoreFull, match="cannot take a fetched package of .* bytes"):
        fetched(huge, b)
    assert huge.has(a.adapter_id) and huge.evictions == 0


def test_downloads_under_way_hold_their_room(packages, tiny_base, tmp_path):
    """Review: fetches let in at once each by a look that counted none of the others overshot the bound by as many
    packages. A p2p fetch reserves its package's size once its manifest is read; the others count it."""
    a, b, _, _ = packages
    store = AdapterStore(tmp_path / "store", base_dir=tiny_base, max_cache_bytes=2 * size_of(a) + 1000)
    store.reserve(size_of(a))
    store.reserve(size_of(a))  # two downloads under way: the bound is taken
    with pytest.raises(StoreFull, match="no room"):
        store.reserve(size_of(a))
    with pytest.raises(StoreFull):
        fetched(store, b)  # an install is held to it too
    store.release(size_of(a))
    fetched(store, b)  # one download gave its room back
    assert store.has(b.adapter_id)


def test_a_store_without_bounds_makes_no_markers_of_its_own(packages, tiny_base, tmp_path):
    """`adapter fetch --store`'s store, and every store before this: nothing it holds is ever evicted."""
    a, _, _, _ = packages
    store = AdapterStore(tmp_path / "store", base_dir=tiny_base)
    store.install(a.path)
    assert not (store.root / CACHED_DIR).exists()
    store.make_room(10**15)  # no bound: nothing to say
