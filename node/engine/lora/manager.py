"""Adapter residency in two LRU tiers: device slots (with pinning and in-use counts) <- decoded
adapters in host memory (with their slot images, pinned, on CUDA) <- the verified package store on
disk <- an optional fetcher (peers). Disk reads and decoding run on a loader thread, never inside
an engine step. A slot write may be asynchronous (CUDA: one copy on a side stream): the slot then
counts as loading, and its adapter becomes resident, and schedulable, once the copy has completed."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from node.engine.lora.ensemble import EnsembleSpec
from node.engine.lora.errors import (
    AdapterBaseMismatchError,
    AdapterError,
    AdapterIncompatibleError,
    AdapterNotFoundError,
    AdapterSlotsBusyError,
    AdapterStoreFullError,
)
from node.engine.lora.weights import LoadedAdapter

log = logging.getLogger(__name__)

# fetcher(adapter_id, timeout): start fetching an adapter the store lacks (from peers) and return at
# once; the future yields the path it was installed at (None: nobody had it), or raises TimeoutError
# once `timeout` seconds have passed. Called on the loader thread, so the fetch must run elsewhere
# (AsyncEngine runs the node's async fetcher on its event loop): a slow peer then holds up no other load.
Fetcher = Callable[[str, float], Future]
# combine(spec, [(component, weight)]) -> the ensemble as one adapter (lora/ensemble.py), on the loader thread
Combine = Callable[[EnsembleSpec, list[tuple[LoadedAdapter, float]]], LoadedAdapter]
# ensembles defined by requests: a spec is a few ids, but requests are untrusted, so the table is bounded
MAX_ENSEMBLE_SPECS = 4096
# failed loads remembered for the engine thread's next acquire (the requests waiting on a load get its error
# anyway); the oldest are forgotten past this many, so ids a client chooses (an ensemble per new weight) that
# never reach acquire do not pile up: a forgotten failure only means the next acquire loads again
MAX_FAILED_LOADS = 1024
# how long a fetch of an adapter the store lacks may take, from peers and the operator's sources together
FETCH_TIMEOUT_S = 300.0
USE_TOLD_S = 60.0  # the store hears of an adapter's use at most this often (a file's time set, on the engine thread)


class AdapterManager:
    """Owns the slot table (slot -> adapter id), the LRU orders and pins; tests assert them exactly."""

    def __init__(
        self,
        *,
        num_slots: int,
        cpu_cache_size: int,
        store,
        base_model_id: str,
        decode: Callable[[object], LoadedAdapter],
        write_slot: Callable[[int, LoadedAdapter | None], object],
        fetcher: Fetcher | None = None,
        fetch_timeout: float = FETCH_TIMEOUT_S,
        verify_hashes: bool = True,
        on_ready: Callable[[], None] | None = None,
        combine: Combine | None = None,
    ) -> None:
        if cpu_cache_size < 1:
            raise ValueError(f"cpu_cache_size must be >= 1, got {cpu_cache_size}")
        self.num_slots = num_slots
        self.cpu_cache_size = cpu_cache_size
        # ensembles' share of the slots and of the host cache: a client weighs an ensemble anew with every request,
        # and each weighting is an adapter of its own, so past its share a new one takes an ensemble's place
        # (never another adapter's); the node's API serves no more ensembles than this at once (book.py)
        self.max_ensembles = max(1, min(num_slots, cpu_cache_size) // 2)
        self.store = store
        self.base_model_id = base_model_id
        self.decode = decode
        self.write_slot = write_slot
        self.fetcher = fetcher
        self.fetch_timeout = fetch_timeout
        self.verify_hashes = verify_hashes
        # called (on a loader or copy thread) when a load or slot write ends: the engine's wake-up
        self.on_ready: Callable[[], None] = on_ready or (lambda: None)
        self.combine = combine
        self._ensembles: OrderedDict[str, EnsembleSpec] = OrderedDict()  # key -> spec, least recently defined first
        self.slots: list[str | None] = [None] * num_slots
        self._resident: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._pinned: set[str] = set()
        self._refs: dict[str, int] = {}
        self._cpu: OrderedDict[str, LoadedAdapter] = OrderedDict()  # least recently used first
        self._inflight: dict[str, Future] = {}
        # adapter id -> (slot, pending copy with .query()/.synchronize()) while its slot write runs
        self._loading: dict[str, tuple[int, object]] = {}
        self._waiter: ThreadPoolExecutor | None = None
        self._failed: OrderedDict[str, AdapterError] = OrderedDict()  # oldest first, at most MAX_FAILED_LOADS
        self._names: dict[str, str] = {}  # of the adapters in the host cache or a slot (status shows them)
        self._ensembles_held: set[str] = set()  # the ensembles in the host cache or a slot
        self._told: dict[str, float] = {}  # adapter id -> when the store was last told of its use (_used)
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-loader")
        self.counters = {"disk_loads": 0, "slot_loads": 0, "slot_hits": 0, "evictions": 0, "cpu_evictions": 0}

    # ---- ensembles (any thread) ----
    def define_ensemble(self, spec: EnsembleSpec) -> str:
        """Make `spec.key` loadable and acquirable like an adapter id; returns the key."""
        if self.combine is None:
            raise AdapterIncompatibleError("this engine does not serve adapter ensembles")
        with self._lock:
            nested = [aid for aid, _ in spec.components if aid in self._ensembles]
            if nested:  # one level only: an ensemble's rank is bounded by its listed parts
                raise AdapterIncompatibleError(f"ensemble {spec.name}: component {nested[0]} is itself an ensemble")
            self._ensembles[spec.key] = spec
            self._ensembles.move_to_end(spec.key)
            while len(self._ensembles) > MAX_ENSEMBLE_SPECS:
                self._ensembles.popitem(last=False)
        return spec.key

    def _load_ensemble(self, spec: EnsembleSpec, done: Future) -> None:
        """Load every component (each through its own path: store, else peers), then combine them on
        the loader thread. Never waits on the loader thread itself: the components' loads queue there."""
        parts = [self.load(aid) for aid, _ in spec.components]
        left = [len(parts)]

        def one_done(_f: Future) -> None:
            with self._lock:
                left[0] -= 1
                if left[0]:
                    return
            for f in parts:
                err = f.exception()
                if err is not None:  # keep the component's kind (not found, wrong base...): the API maps it
                    kind = type(err) if isinstance(err, AdapterError) else AdapterError
                    self._fail(spec.key, done, kind(f"ensemble {spec.name}: {err}"))
                    return
            loaded = [(f.result(), w) for f, (_, w) in zip(parts, spec.components)]
            self._submit(spec.key, done, self._from_parts, spec, loaded, done)

        for f in parts:
            f.add_done_callback(one_done)

    def _from_parts(self, spec: EnsembleSpec, parts: list[tuple[LoadedAdapter, float]], done: Future) -> None:
        self._finish(spec.key, done, self.combine(spec, parts), ensemble=True)

    # ---- host tier (any thread) ----
    def load(self, adapter_id: str) -> Future:
        """Start (or join) decoding the adapter (or building the defined ensemble) into the host
        cache; the future yields it."""
        with self._lock:
            if adapter_id in self._cpu:
                self._cpu.move_to_end(adapter_id)
                f: Future = Future()
                f.set_result(self._cpu[adapter_id])
                return f
            if adapter_id not in self._inflight:
                spec = self._ensembles.get(adapter_id)
                if spec is not None and sum(k in self._ensembles for k in self._inflight) >= self.max_ensembles:
                    # the loader thread combines at most this many at once: the API's cap counts running
                    # requests, and one whose client left frees its place while its combine still waits here
                    busy: Future = Future()
                    busy.set_exception(
                        AdapterSlotsBusyError(
                            f"this node is combining {self.max_ensembles} adapter ensembles already; try again soon"
                        )
                    )
                    return busy
                self._failed.pop(adapter_id, None)
                done: Future = Future()
                self._inflight[adapter_id] = done
                if spec is not None:
                    self._load_ensemble(spec, done)
                else:
                    self._pool.submit(self._guarded, adapter_id, done, self._from_local, adapter_id, done)
            return self._inflight[adapter_id]

    def _from_local(self, adapter_id: str, done: Future) -> None:
        """Loader thread: decode from the store, or hand a missing adapter to the fetcher. The fetch
        runs elsewhere, not here, so a slow peer never holds up other adapters' loads."""
        pkg = self._from_store(adapter_id)
        if pkg is not None:
            self._finish(adapter_id, done, self._decode_checked(adapter_id, pkg))
            return
        if self.fetcher is None:
            raise self._not_found(adapter_id)
        fetch = self.fetcher(adapter_id, self.fetch_timeout)
        fetch.add_done_callback(lambda f: self._submit(adapter_id, done, self._from_fetched, adapter_id, f, done))

    def _from_fetched(self, adapter_id: str, fetch: Future, done: Future) -> None:
        """Loader thread, once the fetch has ended: decode what it installed."""
        from node.adapters.errors import StoreFull

        try:
            path = fetch.result()
        except TimeoutError:
            raise AdapterNotFoundError(
                f"adapter {adapter_id}: no peer delivered it within {self.fetch_timeout:g} s"
            ) from None
        except StoreFull as e:
            raise AdapterStoreFullError(f"cannot fetch adapter {adapter_id}: {e}") from None
        pkg = self._from_store(adapter_id) if path is not None else None
        if pkg is None and path is not None:
            from node.adapters import verify_package

            pkg = verify_package(path)
            if pkg.adapter_id != adapter_id:
                raise AdapterIncompatibleError(f"fetched package is adapter {pkg.adapter_id}, not {adapter_id}")
        if pkg is None:
            raise self._not_found(adapter_id)
        self._finish(adapter_id, done, self._decode_checked(adapter_id, pkg))

    def _submit(self, adapter_id: str, done: Future, stage, *args) -> None:
        try:
            self._pool.submit(self._guarded, adapter_id, done, stage, *args)
        except RuntimeError as e:  # the manager was closed while a fetch ran
            self._fail(adapter_id, done, e)

    def _guarded(self, adapter_id: str, done: Future, stage, *args) -> None:
        try:
            stage(*args)
        except Exception as e:
            self._fail(adapter_id, done, e)

    def _fail(self, adapter_id: str, done: Future, e: Exception) -> None:
        err = e if isinstance(e, AdapterError) else AdapterError(f"adapter {adapter_id} failed to load: {e}")
        # remembered (and handed to waiters) by kind and message only: the traceback's frames hold what
        # the load read, up to a whole package or a pool buffer, for as long as the error is remembered
        err = type(err)(*err.args)
        log.warning("adapter %s failed to load: %s", adapter_id, err)
        with self._lock:
            self._inflight.pop(adapter_id, None)
            self._failed[adapter_id] = err
            while len(self._failed) > MAX_FAILED_LOADS:
                self._failed.popitem(last=False)
        self.on_ready()
        if not done.done():
            done.set_exception(err)

    def _finish(self, adapter_id: str, done: Future, loaded: LoadedAdapter, ensemble: bool = False) -> None:
        with self._lock:
            self._cpu[adapter_id] = loaded
            self._names[adapter_id] = loaded.name
            self.counters["disk_loads"] += 1
            if ensemble:
                self._ensembles_held.add(adapter_id)
                cached = [aid for aid in self._cpu if aid in self._ensembles_held]
                if len(cached) > self.max_ensembles:  # past their share: the least recently used ensemble goes
                    self._drop_cached(cached[0])
            while len(self._cpu) > self.cpu_cache_size:
                self._drop_cached(next(iter(self._cpu)))
            self._inflight.pop(adapter_id, None)
        log.info("adapter %s (%s, rank %d) decoded into the host cache", adapter_id, loaded.name, loaded.rank)
        self.on_ready()
        done.set_result(loaded)

    def _drop_cached(self, adapter_id: str) -> None:
        del self._cpu[adapter_id]
        self._forget(adapter_id)
        self.counters["cpu_evictions"] += 1
        log.info("adapter %s dropped from the host cache", adapter_id)

    def _not_found(self, adapter_id: str) -> AdapterNotFoundError:
        where = "this node's store" + (" or its peers" if self.fetcher is not None else "")
        return AdapterNotFoundError(f"adapter {adapter_id} is not in {where}")

    def _decode_checked(self, adapter_id: str, pkg) -> LoadedAdapter:
        base = pkg.manifest.base_model
        if base.id != self.base_model_id:
            raise AdapterBaseMismatchError(
                f"adapter {adapter_id} is for base model {base.name} ({base.id}), "
                f"not this node's base ({self.base_model_id})"
            )
        return self.decode(pkg)

    def stored_package(self, adapter_id: str):
        """The verified package of an adapter in the store (loader thread); AdapterNotFoundError if absent."""
        pkg = self._from_store(adapter_id)
        if pkg is None:
            raise self._not_found(adapter_id)
        return pkg

    def in_use(self) -> set[str]:
        """The adapter ids whose copies on disk this manager may read now (any thread; AdapterStore.protected): those
        it loads or fetches, and those it holds as a slot image alone (CUDA), which an ensemble reads again to
        combine them. Not what it holds decoded: a bound on disk below the host cache would then hold every new
        adapter out until one left the cache, which only a new adapter's load makes happen."""
        with self._lock:
            imaged = {aid for aid, a in self._cpu.items() if not a.weights}
            return set(self._inflight) | set(self._loading) | imaged

    def _used(self, adapter_id: str) -> None:
        """Tell the store an adapter served a request (its copy on disk is evicted least recently used first: a hot
        adapter, loaded once long ago and held since, went first; review), at most once a minute an adapter."""
        now = time.monotonic()
        if self.store is None or now - self._told.get(adapter_id, -USE_TOLD_S) < USE_TOLD_S:
            return
        self._told[adapter_id] = now
        while len(self._told) > 4 * (self.cpu_cache_size + self.num_slots):
            self._told.pop(next(iter(self._told)))
        self.store.touch(adapter_id)

    def _from_store(self, adapter_id: str):
        """The installed package, None when the store lacks it; a copy damaged in the store is dropped and
        fetched again when this node fetches (a node that does not keeps the error: its operator acts)."""
        from node.adapters import PackageError
        from node.adapters.errors import DamagedFiles

        self.store.touch(adapter_id)  # loaded now: a fetched copy is evicted last (before the read: its grace)
        try:
            if self.verify_hashes:
                return self.store.get(adapter_id)
            return self.store.get(adapter_id, verify_hashes=False)
        except DamagedFiles as e:
            if self.fetcher is None:
                raise AdapterIncompatibleError(f"adapter {adapter_id} failed verification: {e}") from e
            log.warning("adapter %s is damaged in the store (%s): dropping it to fetch it again", adapter_id, e)
            self.store.remove(adapter_id)
            return None
        except PackageError as e:
            raise AdapterIncompatibleError(f"adapter {adapter_id} failed verification: {e}") from e

    # ---- device slots (engine thread) ----
    def acquire(self, adapter_id: str) -> int | None:
        """The adapter's slot, taking a use reference; None while it loads or no slot can be freed.
        Raises the AdapterError of a failed load."""
        with self._lock:
            if adapter_id in self._resident:
                self._resident.move_to_end(adapter_id)
                self._refs[adapter_id] = self._refs.get(adapter_id, 0) + 1
                self.counters["slot_hits"] += 1
                self._used(adapter_id)
                return self._resident[adapter_id]
            if adapter_id in self._loading:
                slot, copy = self._loading[adapter_id]
                if not copy.query():
                    return None
                del self._loading[adapter_id]
                return self._make_resident(adapter_id, slot)
            err = self._failed.pop(adapter_id, None)
            if err is not None:
                raise err
            loaded = self._cpu.get(adapter_id)
            if loaded is None:
                self.load(adapter_id)
                return None
            self._cpu.move_to_end(adapter_id)
            self._used(adapter_id)
            slot = self._take_slot(adapter_id)
            if slot is None:
                return None
            copy = self.write_slot(slot, loaded)
            self.slots[slot] = adapter_id
            self.counters["slot_loads"] += 1
            if copy is not None and not copy.query():
                self._loading[adapter_id] = (slot, copy)
                self._watch(copy)
                log.info("adapter %s loading into slot %d", adapter_id, slot)
                return None
            return self._make_resident(adapter_id, slot)

    def _make_resident(self, adapter_id: str, slot: int) -> int:
        self._resident[adapter_id] = slot
        self._refs[adapter_id] = 1
        log.info("adapter %s loaded into slot %d", adapter_id, slot)
        return slot

    def _watch(self, copy) -> None:
        # wake the engine when the copy lands, so a waiting request is admitted on the next step
        if self._waiter is None:
            self._waiter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-copy")

        def wait() -> None:
            copy.synchronize()
            self.on_ready()

        self._waiter.submit(wait)

    def loading(self) -> list[str]:
        """Adapters whose slot write is still in flight."""
        with self._lock:
            return list(self._loading)

    def release(self, adapter_id: str) -> None:
        with self._lock:
            self._refs[adapter_id] -= 1
            assert self._refs[adapter_id] >= 0, adapter_id

    def _take_slot(self, adapter_id: str) -> int | None:
        # a never-used slot first, else the least recently used adapter nobody runs or pinned; an ensemble past
        # its share (max_ensembles) takes only another ensemble's slot
        held = self._ensembles_held
        if adapter_id in held and sum(aid in held for aid in self.slots) >= self.max_ensembles:
            might_go = held
        else:
            might_go = self._resident
            for i, occupant in enumerate(self.slots):
                if occupant is None:
                    return i
        for aid, slot in self._resident.items():
            if aid in might_go and aid not in self._pinned and self._refs.get(aid, 0) == 0:
                del self._resident[aid]
                self._refs.pop(aid, None)
                self.slots[slot] = None
                self.write_slot(slot, None)
                self._forget(aid)
                self.counters["evictions"] += 1
                log.info("adapter %s evicted from slot %d", aid, slot)
                return slot
        return None

    def _forget(self, adapter_id: str) -> None:
        """Forget the name of an adapter that left the host cache or a slot, and whether it is an ensemble, unless
        the other still holds it (each ensemble a client weighs anew is an adapter of its own: names kept grew
        without end)."""
        if adapter_id not in self._cpu and adapter_id not in self._resident and adapter_id not in self._loading:
            self._names.pop(adapter_id, None)
            self._ensembles_held.discard(adapter_id)

    def make_resident(self, adapter_id: str, pin: bool | None = None) -> int:
        """Put a host-cached adapter into a slot now (and pin/unpin it); raises if no slot is free."""
        with self._lock:
            slot = self.acquire(adapter_id)
            if slot is None and adapter_id in self._loading:
                self._loading[adapter_id][1].synchronize()
                slot = self.acquire(adapter_id)
            if slot is None:
                if adapter_id in self._cpu:
                    raise AdapterSlotsBusyError(
                        f"no free slot for adapter {adapter_id}: all {self.num_slots} slots are pinned or in use"
                    )
                raise AdapterNotFoundError(f"adapter {adapter_id} is not in the host cache")
            self.release(adapter_id)
            if pin is True:
                self._pinned.add(adapter_id)
                if self.store is not None:  # the operator's choice: its package is theirs on disk too, never evicted
                    self.store.keep(adapter_id)
            elif pin is False:
                self._pinned.discard(adapter_id)
            return slot

    def unpin(self, adapter_id: str) -> None:
        with self._lock:
            self._pinned.discard(adapter_id)

    def slot_of(self, adapter_id: str) -> int | None:
        with self._lock:
            return self._resident.get(adapter_id)

    def lru_order(self) -> list[str]:
        """Resident adapters, least recently used first."""
        with self._lock:
            return list(self._resident)

    def cached(self) -> list[str]:
        """Host-cached adapters, least recently used first."""
        with self._lock:
            return list(self._cpu)

    def snapshot(self) -> dict:
        """Slot table and host cache for /status."""
        with self._lock:
            resident = [
                {"adapter_id": aid, "name": self._names.get(aid, ""), "slot": s, "pinned": aid in self._pinned}
                for s, aid in enumerate(self.slots)
                if aid is not None
            ]
            cached = [{"adapter_id": aid, "name": self._names.get(aid, "")} for aid in self._cpu]
            return {
                "resident_adapters": resident,
                "cached_adapters": cached,
                "free_slots": self.slots.count(None),
                "num_slots": self.num_slots,
            }

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            unfinished = list(self._inflight.items())
        for adapter_id, done in unfinished:  # their queued stages were cancelled: nobody else ends them
            self._fail(adapter_id, done, AdapterError(f"adapter {adapter_id}: the engine closed before it loaded"))
        if self._waiter is not None:
            self._waiter.shutdown(wait=True)
