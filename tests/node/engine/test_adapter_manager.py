"""Slot table, LRU eviction, pinning, the host tier, and refused adapters, asserted exactly."""

from __future__ import annotations

import asyncio

import pytest
from eth_account import Account

from node.adapters import AdapterStore
from node.engine import (
    AdapterBaseMismatchError,
    AdapterError,
    AdapterIncompatibleError,
    AdapterNotFoundError,
    AdapterSlotsBusyError,
    AsyncEngine,
)
from tests.utils.engine import PUBLISHER_KEY, greedy
from tests.utils.factories import make_base, make_package

PROMPT = [1, 40, 41, 42, 43]


def fetching_engine(world, fetcher) -> AsyncEngine:
    """The node's engine with an async fetcher (AsyncEngine runs it on the loop of its callers)."""
    return AsyncEngine(world.config(), store=world.store, fetcher=fetcher)


def peer_fetcher(world, local: AdapterStore, calls: list):
    """A fetcher standing in for a peer: it installs the adapter from the world's store into `local`."""

    async def fetcher(adapter_id):
        calls.append(adapter_id)
        return local.install(world.store.path_for(adapter_id)).path

    return fetcher


def _run(engine, aid, rid):
    done = engine.generate([greedy(rid, aid, PROMPT, 2)])
    assert done[rid].finish_reason == "length", done[rid].error


def test_slot_eviction_order_pinning_and_host_tier(llama_world):
    a, b, c, d = (x.adapter_id for x in llama_world.adapters)
    engine = llama_world.engine(num_slots=2, cpu_cache_size=3)
    m = engine.adapters
    try:
        _run(engine, a, "1")
        assert m.slots == [a, None] and m.cached() == [a] and m.counters["disk_loads"] == 1
        _run(engine, b, "2")
        assert m.slots == [a, b] and m.lru_order() == [a, b]
        _run(engine, a, "3")  # a slot hit makes b the least recently used
        assert m.lru_order() == [b, a] and m.counters["slot_hits"] == 1 and m.counters["disk_loads"] == 2
        _run(engine, c, "4")  # evicts b, the LRU
        assert m.slots == [a, c] and m.cached() == [a, b, c] and m.counters["evictions"] == 1
        _run(engine, b, "5")  # from the host tier, no disk read; evicts a
        assert m.slots == [b, c] and m.counters["disk_loads"] == 3 and m.counters["slot_loads"] == 4
        assert m.cached() == [a, c, b]
        assert m.make_resident(b, pin=True) == 0
        _run(engine, d, "6")  # b is pinned although least recent: c goes; the host tier drops a
        assert m.slots == [b, d] and m.cached() == [c, b, d] and m.counters["cpu_evictions"] == 1
        _run(engine, a, "7")  # a left the host tier: read from disk again; d is the only unpinned
        assert m.slots == [b, a] and m.counters["disk_loads"] == 5
        snap = m.snapshot()
        assert snap["resident_adapters"] == [
            {"adapter_id": b, "name": "test/ko-r8", "slot": 0, "pinned": True},
            {"adapter_id": a, "name": "test/qv-r4", "slot": 1, "pinned": False},
        ]
        assert snap["free_slots"] == 0 and snap["num_slots"] == 2
    finally:
        engine.close()


def test_adapter_in_use_is_not_evicted_and_waiting_request_runs_after(llama_world):
    a, b = llama_world.adapters[0].adapter_id, llama_world.adapters[1].adapter_id
    engine = llama_world.engine(num_slots=1)
    try:
        # both decoded in the host tier first, so only the one slot decides the order (not load timing)
        engine.adapters.load(a).result(30)
        engine.adapters.load(b).result(30)
        engine.add_request(greedy("first", a, PROMPT, 6))
        engine.add_request(greedy("second", b, PROMPT, 2))
        order = []
        while engine.has_work():
            events, _ = engine.step()
            order += [(e.request_id, type(e).__name__) for e in events]
            assert engine.adapters.slots in ([None], [a], [b])
        first_done = order.index(("first", "FinishEvent"))
        assert all(rid != "second" for rid, _ in order[:first_done])
        assert order[-1] == ("second", "FinishEvent")
    finally:
        engine.close()


def test_all_slots_pinned_refuses_a_new_resident(llama_world):
    a, b = llama_world.adapters[0].adapter_id, llama_world.adapters[1].adapter_id
    engine = llama_world.engine(num_slots=1)
    try:
        engine.adapters.load(a).result(30)
        engine.adapters.load(b).result(30)
        engine.adapters.make_resident(a, pin=True)
        with pytest.raises(AdapterSlotsBusyError, match="all 1 slots are pinned or in use"):
            engine.adapters.make_resident(b)
        engine.adapters.make_resident(a, pin=False)
        assert engine.adapters.make_resident(b) == 0 and engine.adapters.slots == [b]
    finally:
        engine.close()


def test_unknown_adapter_fails_its_request_and_others_keep_running(llama_world):
    engine = llama_world.engine()
    try:
        missing = "0x" + "ab" * 32
        done = engine.generate([greedy("bad", missing, PROMPT, 2), greedy("ok", None, PROMPT, 2)])
        assert done["bad"].finish_reason == "error" and "is not in this node's store" in done["bad"].error
        assert done["ok"].finish_reason == "length" and done["ok"].completion_tokens == 2
        with pytest.raises(AdapterNotFoundError):
            engine.adapters.load(missing).result(30)
    finally:
        engine.close()


def test_adapter_for_another_base_is_refused_at_load(llama_world, tmp_path):
    other = make_base(tmp_path / "other", seed=1)
    pkg = make_package(other, tmp_path / "pkg", account=Account.from_key(PUBLISHER_KEY), name="test/other")
    llama_world.store.install(pkg.path)
    engine = llama_world.engine()
    try:
        with pytest.raises(AdapterBaseMismatchError, match="not this node's base"):
            engine.adapters.load(pkg.adapter_id).result(30)
    finally:
        engine.close()
        llama_world.store.remove(pkg.adapter_id)


def test_adapter_above_max_rank_is_refused(llama_world):
    engine = llama_world.engine(max_lora_rank=8)
    try:
        with pytest.raises(AdapterIncompatibleError, match="rank 16, above this node's max_lora_rank 8"):
            engine.adapters.load(llama_world.adapters[2].adapter_id).result(30)
    finally:
        engine.close()


def test_fetcher_supplies_an_adapter_the_store_lacks(llama_world, tmp_path):
    wanted = llama_world.adapters[3]
    local = AdapterStore(tmp_path / "empty-store")
    calls = []
    engine = fetching_engine(llama_world, peer_fetcher(llama_world, local, calls))
    engine.core.adapters.store = local
    try:

        async def go():
            return await engine.prepare_adapter(wanted.adapter_id)

        loaded = asyncio.run(go())
        assert loaded.adapter_id == wanted.adapter_id and loaded.rank == 2 and calls == [wanted.adapter_id]
    finally:
        engine.close()


def test_a_copy_damaged_in_the_store_is_fetched_again(llama_world, tmp_path):
    # a power cut left the weights cut short: the node refused the adapter for good ("failed verification")
    # and never asked its peers, though a good copy was a fetch away
    import os

    wanted = llama_world.adapters[2]
    local = AdapterStore(tmp_path / "damaged-store")
    local.install(llama_world.store.path_for(wanted.adapter_id))
    weights = local.path_for(wanted.adapter_id) / "adapter_model.safetensors"
    os.chmod(weights, 0o644)
    weights.write_bytes(weights.read_bytes()[:100])
    calls = []
    engine = fetching_engine(llama_world, peer_fetcher(llama_world, local, calls))
    engine.core.adapters.store = local
    try:
        loaded = asyncio.run(engine.prepare_adapter(wanted.adapter_id))
        assert loaded.adapter_id == wanted.adapter_id and calls == [wanted.adapter_id]
        assert local.get(wanted.adapter_id) is not None
    finally:
        engine.close()


def test_a_stalled_peer_fetch_does_not_hold_up_loads_from_the_store(llama_world, tmp_path):
    missing, present = llama_world.adapters[3], llama_world.adapters[0]
    local = AdapterStore(tmp_path / "store")
    local.install(llama_world.store.path_for(present.adapter_id))

    async def go():
        release = asyncio.Event()

        async def slow_fetcher(adapter_id):
            await release.wait()  # a peer that has not sent a byte yet
            return local.install(llama_world.store.path_for(adapter_id)).path

        engine = fetching_engine(llama_world, slow_fetcher)
        engine.core.adapters.store = local
        try:
            stalled = asyncio.ensure_future(engine.prepare_adapter(missing.adapter_id))
            await asyncio.sleep(0.2)  # the fetch has started and holds nothing the store load needs
            loaded = await asyncio.wait_for(engine.prepare_adapter(present.adapter_id), 10)
            assert loaded.adapter_id == present.adapter_id and not stalled.done()
            assert engine.core.adapters.cached() == [present.adapter_id]
            release.set()
            assert (await asyncio.wait_for(stalled, 10)).adapter_id == missing.adapter_id
            assert engine.core.adapters.cached() == [present.adapter_id, missing.adapter_id]
        finally:
            engine.close()

    asyncio.run(go())


def test_a_fetch_past_its_timeout_is_a_clear_not_found(llama_world, tmp_path):
    async def go():
        async def silent_fetcher(adapter_id):
            await asyncio.sleep(60)

        engine = fetching_engine(llama_world, silent_fetcher)
        engine.core.adapters.store = AdapterStore(tmp_path / "empty")
        engine.core.adapters.fetch_timeout = 0.3
        try:
            aid = llama_world.adapters[1].adapter_id
            with pytest.raises(AdapterNotFoundError, match=r"no peer delivered it within 0\.3 s"):
                await engine.prepare_adapter(aid)
            assert aid not in engine.core.adapters.cached() and engine.core.adapters.loading() == []
        finally:
            engine.close()

    asyncio.run(go())


def test_a_failed_fetch_is_reported_and_the_next_load_tries_again(llama_world, tmp_path):
    wanted = llama_world.adapters[2]
    local = AdapterStore(tmp_path / "store")
    attempts = []

    async def flaky_fetcher(adapter_id):
        attempts.append(adapter_id)
        if len(attempts) == 1:
            raise RuntimeError("every provider dropped the stream")
        return local.install(llama_world.store.path_for(adapter_id)).path

    async def go():
        engine = fetching_engine(llama_world, flaky_fetcher)
        engine.core.adapters.store = local
        try:
            with pytest.raises(AdapterError, match="every provider dropped the stream"):
                await engine.prepare_adapter(wanted.adapter_id)
            assert engine.core.adapters.cached() == []
            loaded = await engine.prepare_adapter(wanted.adapter_id)  # a failure is not remembered as final
            assert loaded.adapter_id == wanted.adapter_id and len(attempts) == 2
        finally:
            engine.close()

    asyncio.run(go())


def test_what_the_manager_remembers_of_adapters_is_bounded(llama_world, monkeypatch):
    """Ids a client chooses (an ensemble per new weight) must not pile up: names are kept only for what the host
    cache or a slot holds, and failed loads no acquire ever collects only up to MAX_FAILED_LOADS."""
    import node.engine.lora.manager as manager

    monkeypatch.setattr(manager, "MAX_FAILED_LOADS", 8)
    ids = [x.adapter_id for x in llama_world.adapters]
    engine = llama_world.engine(num_slots=1, cpu_cache_size=1)
    m = engine.adapters
    try:
        for i, aid in enumerate(ids):
            _run(engine, aid, str(i))
        held = set(m.cached()) | {s for s in m.slots if s is not None}
        assert set(m._names) == held and len(held) <= 2  # not every adapter ever loaded
        missing = [f"0x{i:064x}" for i in range(50)]
        for aid in missing:  # loads that fail, never acquired (the node's API refuses before submitting)
            with pytest.raises(AdapterNotFoundError):
                m.load(aid).result(timeout=30)
        assert list(m._failed) == missing[-8:]
    finally:
        engine.close()
