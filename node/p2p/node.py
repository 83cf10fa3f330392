"""The p2p node: P2PNode, the facade the daemon and CLI call from any thread; Mesh, the same node on
the p2p thread's trio loop; and TrioThread, the bridge between them.

py-libp2p is trio-only (a host under asyncio.run fails), while the node's HTTP API and engine are
asyncio: the libp2p host runs on its own trio loop in a thread, each P2PNode method sends one whole
flow to that loop and returns a small result. Sync methods block the calling thread, so call them
from plain threads, or the `a*` variants from asyncio code.

Mesh holds the libp2p host with the adapter server, GossipSub and Kademlia, and the peer standing
they share; its flows are two objects it builds: Discovery (announce, find providers) and Fetcher
(fetch, verify, install). A whole fetch (discover -> dial -> stream -> verify -> rename) is one
coroutine on the trio loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import trio
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12
from libp2p.pubsub.pubsub import get_content_addressed_msg_id
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from common.logs import Throttled
from common.wire import restore_recursion_limit
from node.adapters import AdapterStore, VerifiedPackage
from node.p2p.config import P2PConfig
from node.p2p.discovery import TOPIC, Discovery, Provider
from node.p2p.errors import P2PError
from node.p2p.fetcher import Fetcher, OwnerOf, Progress, TransferStatus
from node.p2p.gossip import GuardedPubsub, MeshGossipSub
from node.p2p.host import (
    answers_tcp,
    at_cap,
    block_dials,
    bound_dht_streams,
    bound_provider_store,
    build_host,
    connection_to_close,
    dial_blocked,
    full_addrs,
    guard_stream_handlers,
    pace_inbound,
    refuse_taken_port,
    route_libp2p_logging,
)
from node.p2p.protocol import PROTOCOL_ID
from node.p2p.server import AdapterServer
from node.p2p.standing import UNKNOWN, PeerStanding

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_EVICTED = 256  # strangers this node closed to make room, remembered to let its own dials reach them again
MAX_PARALLEL_DIALS = 16  # peers dialled at once by add_peers
LOGGED_DIAL_FAILURES = 3  # add_peers logs this many failed dials one by one, then one line for the rest
STATUS_LIST = 32  # adapters held and fetches shown in the status page (and heartbeats): the newest


class P2PNode:
    """One node's libp2p host: serves its store, announces, discovers and fetches adapters."""

    def __init__(
        self,
        *,
        seed: bytes,
        store: AdapterStore,
        owner_of: OwnerOf,
        config: P2PConfig | None = None,
        base_dir: str | Path | None = None,
        server_factory: type[AdapterServer] = AdapterServer,
        trusted_peer: Callable[[str], bool] | None = None,
    ) -> None:
        """`trusted_peer(peer_id)`: True for peers with standing (e.g. nodes registered on chain); they
        are tried first and never evicted for strangers. Called on the p2p thread: keep it quick."""
        if len(seed) != 32:
            raise ValueError(f"node seed must be 32 bytes (Identity.node_seed), got {len(seed)}")
        route_libp2p_logging()
        self.config = config or P2PConfig()
        self._args = dict(
            seed=seed,
            store=store,
            owner_of=owner_of,
            config=self.config,
            base_dir=Path(base_dir) if base_dir is not None else None,
            server_factory=server_factory,
            trusted_peer=trusted_peer,
        )
        self._mesh: Mesh | None = None
        self._thread = TrioThread("loramesh-p2p")

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, *, timeout: float = 30.0) -> None:
        """Start the host on its thread: listen, join the mesh, dial bootstrap peers; blocks until ready."""
        if self._mesh is not None:
            raise P2PError("the p2p node is already started")

        async def main(ready) -> None:
            mesh = Mesh(**self._args)  # built on the trio thread: libp2p objects belong to its loop
            async with mesh.running():
                self._mesh = mesh
                ready()
                await self._thread.wait_stopped()

        try:
            self._thread.start(main, timeout=timeout)
        except BaseException:
            self._thread.stop(timeout=5)
            self._mesh = None
            raise
        log.info("p2p node %s listening on %s", self.peer_id, ", ".join(self.listen_addrs))

    def stop(self, *, timeout: float = 10.0) -> None:
        """Leave the mesh and stop the host thread (idempotent)."""
        self._thread.stop(timeout=timeout)
        self._mesh = None

    def __enter__(self) -> P2PNode:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _m(self) -> Mesh:
        if self._mesh is None or not self._thread.running:
            raise P2PError("the p2p node is not started")
        return self._mesh

    # -- read-only state (safe from any thread) -------------------------------------------

    @property
    def peer_id(self) -> str:
        return self._m().peer_id

    @property
    def listen_addrs(self) -> list[str]:
        """Full multiaddrs (…/p2p/<peer id>) that peers can dial."""
        return list(self._m().listen_addrs)

    @property
    def held(self) -> list[str]:
        """Adapter ids this node announces."""
        return sorted(self._m().discovery.held)

    def transfers(self) -> list[TransferStatus]:
        """Snapshot of the fetches running and the last few finished, with their progress; the newest last."""
        return list(self._m().fetcher.transfers.values())

    def status(self) -> dict:
        """This node's p2p section of its status page, which every heartbeat carries, so bounded whatever the node
        holds or fetches: the STATUS_LIST adapters it installed last (and how many it holds), and its last
        STATUS_LIST fetches."""
        m = self._m()
        held = list(m.discovery.held)  # installed last at the end
        return {
            "peer_id": m.peer_id,
            "listen_addrs": list(m.listen_addrs),
            "held_count": len(held),
            "held": held[-STATUS_LIST:],
            "transfers": [dataclasses.asdict(t) for t in list(m.fetcher.transfers.values())[-STATUS_LIST:]],
        }

    def book_size(self) -> tuple[int, int]:
        """(announcing peers, adapter ids over all of them) this node remembers; both are bounded."""
        book = self._m().discovery.book
        return len(book), book.id_count

    def failures(self, peer_id: str) -> int:
        """The failed fetches from `peer_id` its standing counts (each backs it off), 0 once one succeeds."""
        return self._m().standing.failures(peer_id)

    def dht_key_count(self) -> int:
        """Content keys the DHT keeps provider records for (bounded: P2PConfig.dht_max_provider_keys)."""
        return len(self._m().dht.provider_store.providers)

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self._m().host.get_connected_peers()]

    # -- flows, sync (block the calling thread) -------------------------------------------

    def connect(self, multiaddr: str) -> str:
        """Dial a peer by full multiaddr; returns its peer id."""
        return self._thread.call(self._m().connect, multiaddr)

    def add_peers(self, multiaddrs: list[str]) -> None:
        """Dial more peers (e.g. from the chain's node registry) in the background, side by side; returns at
        once (anyone can register addresses that never answer). Unreachable ones are logged."""
        self._thread.call(self._m().dial_soon, list(multiaddrs))

    def announce(self, adapter_id: str) -> None:
        """Announce that this node holds `adapter_id` (it must be in the store)."""
        self._thread.call(self._m().discovery.announce, adapter_id)

    def find_providers(self, adapter_id: str, *, wait: float = 0.0) -> list[Provider]:
        """Peers said to hold `adapter_id` (gossip, then DHT hints), polling up to `wait` seconds."""
        return self._thread.call(self._find, adapter_id, wait)

    def fetch(
        self, adapter_id: str, *, providers: Sequence[str] = (), on_progress: Progress | None = None
    ) -> VerifiedPackage:
        """Fetch, verify against the registered owner and install `adapter_id`; returns the stored package.

        `providers`: full multiaddrs to try first, in order (then discovered peers).
        `on_progress(TransferStatus)` runs on the p2p thread after each 1 MiB frame: keep it quick.
        """
        return self._thread.call(self._fetch, adapter_id, tuple(providers), on_progress)

    # -- flows, asyncio -------------------------------------------------------------------

    async def aannounce(self, adapter_id: str) -> None:
        """asyncio variant of announce()."""
        await self._thread.acall(self._m().discovery.announce, adapter_id)

    async def afetch(
        self, adapter_id: str, *, providers: Sequence[str] = (), on_progress: Progress | None = None
    ) -> VerifiedPackage:
        """asyncio variant of fetch(); cancelling it cancels the transfer and discards its temp folder."""
        return await self._thread.acall(self._fetch, adapter_id, tuple(providers), on_progress)

    # the flows as the trio loop runs them: TrioThread passes positional arguments only

    async def _find(self, adapter_id: str, wait: float) -> list[Provider]:
        return await self._m().discovery.find_providers(adapter_id, wait=wait)

    async def _fetch(
        self, adapter_id: str, providers: tuple[str, ...], on_progress: Progress | None
    ) -> VerifiedPackage:
        return await self._m().fetcher.fetch(adapter_id, providers=providers, on_progress=on_progress)


# -- the trio side ---------------------------------------------------------------------------------


class Mesh:
    """One node's libp2p host and the flows that run on it (trio only; P2PNode builds it on the p2p thread)."""

    def __init__(
        self,
        *,
        seed: bytes,
        store: AdapterStore,
        owner_of: OwnerOf,
        config: P2PConfig,
        base_dir: Path | None = None,
        server_factory: type[AdapterServer] = AdapterServer,
        trusted_peer: Callable[[str], bool] | None = None,
    ) -> None:
        # Defence in depth: every peer's bytes go through common.wire.parse_json, and with py_ecc's
        # limit of 100,000 any other deep recursion would overflow the C stack instead of raising.
        restore_recursion_limit()
        self.config = config
        self._nursery: trio.Nursery | None = None  # the running host's (run), for work in the background
        key_pair, self.host = build_host(seed, config)
        self.peer_id = self.host.get_id().to_base58()
        self.server = server_factory(store, config=config)
        self.host.set_stream_handler(TProtocol(PROTOCOL_ID), self.server.handle)
        self.dht = KadDHT(self.host, DHTMode.SERVER)
        bound_provider_store(self.dht.provider_store, config.dht_max_provider_keys)
        bound_dht_streams(self.dht)
        self.gossipsub = MeshGossipSub(
            protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11],
            degree=6,
            degree_low=4,
            degree_high=12,
            heartbeat_initial_delay=0.1,
            heartbeat_interval=1,
            eclipse_protection_enabled=False,  # all peers of a small or local mesh share one IP
            # its 10 messages a second per forwarding peer let one stranger's flood mute an honest relay, all it
            # relayed dropped by its neighbour (red team); Discovery bounds strangers' announcements by signer
            spam_protection_enabled=False,
        )
        # a message is known by its bytes: one signed announcement wrapped again and again is one message
        self.pubsub = GuardedPubsub(
            self.host, self.gossipsub, topics=frozenset({TOPIC}), msg_id_constructor=get_content_addressed_msg_id
        )
        pace_inbound(self.host, self.pubsub.on_probation)  # its networks on probation: their connections paced
        guard_stream_handlers(self.host)  # adapter, Kademlia, GossipSub, identify: all registered by now
        self.standing = PeerStanding(
            base_backoff=config.backoff_base, max_backoff=config.backoff_max, trusted=trusted_peer or (lambda _p: False)
        )
        for addr in config.bootstrap:  # peers the operator named are trusted
            try:
                self.standing.trust(info_from_p2p_addr(Multiaddr(addr)).peer_id.to_base58())
            except Exception:  # an address without /p2p/<id> names no peer; dialing it reports that
                pass
        self.server.standing = self.standing.level
        self._log_room = Throttled(log, logging.INFO)  # strangers' connections can make it happen at every dial
        self._closing: set[str] = set()  # peers whose connection a dial is closing (Mesh._make_room)
        self._evicted: OrderedDict[str, None] = OrderedDict()  # strangers closed to make room, kept from the DHT
        self.discovery = Discovery(
            config=config,
            store=store,
            host=self.host,
            key_pair=key_pair,
            pubsub=self.pubsub,
            dht=self.dht,
            standing=self.standing,
        )
        self.fetcher = Fetcher(
            config=config,
            store=store,
            owner_of=owner_of,
            base_dir=base_dir,
            host=self.host,
            standing=self.standing,
            discovery=self.discovery,
            dial=self.dial,
        )

    # -- lifecycle -------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Mesh]:
        """Listen, join GossipSub and the DHT, dial bootstrap peers; stop everything on exit."""
        refuse_taken_port(self.config.listen)
        async with self.host.run(listen_addrs=[Multiaddr(self.config.listen)]):
            async with background_trio_service(self.pubsub), background_trio_service(self.gossipsub):
                await self.pubsub.wait_until_ready()
                subscription = await self.discovery.subscribe()
                async with background_trio_service(self.dht), trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self.server.store.protected.append(self.server.uploading)
                    await self.discovery.start(nursery, subscription)
                    nursery.start_soon(self._routing_table_loop)
                    if self.config.bootstrap:
                        nursery.start_soon(self.add_peers, list(self.config.bootstrap))
                    try:
                        yield self
                    finally:
                        self._nursery = None
                        self.discovery.stop()
                        with contextlib.suppress(ValueError):
                            self.server.store.protected.remove(self.server.uploading)
                        nursery.cancel_scope.cancel()

    @property
    def listen_addrs(self) -> list[str]:
        return full_addrs(self.host)

    # -- peers -----------------------------------------------------------------------------

    async def connect(self, multiaddr: str) -> str:
        """Dial a peer by full multiaddr (…/p2p/<peer id>); returns its peer id."""
        try:
            info = info_from_p2p_addr(Multiaddr(multiaddr))
        except Exception as e:
            raise P2PError(f"bad peer multiaddr {multiaddr!r}: expected /ip4/…/tcp/…/p2p/<peer id> ({e})") from e
        await self.dial(info)
        return info.peer_id.to_base58()

    async def add_peers(self, multiaddrs: list[str]) -> None:
        """Dial each address (bootstrap or chain registry), MAX_PARALLEL_DIALS at a time (an address that never
        answers costs its slot dial_timeout, not every address after it), a task started only when a slot is free
        (the chain's registry may list thousands); failures are logged, not raised: the first few each, then one
        line for the lot."""
        slots = trio.Semaphore(MAX_PARALLEL_DIALS)
        addrs = list(dict.fromkeys(multiaddrs))  # each address once, in order
        failed = 0

        async def one(addr: str) -> None:
            nonlocal failed
            try:
                await self.connect(addr)
            except P2PError as e:
                failed += 1
                (log.warning if failed <= LOGGED_DIAL_FAILURES else log.debug)("could not reach peer %s: %s", addr, e)
            finally:
                slots.release()

        async with trio.open_nursery() as nursery:
            for addr in addrs:
                await slots.acquire()
                nursery.start_soon(one, addr)
        if failed > LOGGED_DIAL_FAILURES:
            log.warning(
                "could not reach %d of %d peer addresses (the first %d named above)",
                failed,
                len(addrs),
                LOGGED_DIAL_FAILURES,
            )

    async def dial_soon(self, multiaddrs: list[str]) -> None:
        """Start add_peers in the background (it ends with the host)."""
        if self._nursery is None:
            raise P2PError("the p2p host is not running")
        self._nursery.start_soon(self.add_peers, multiaddrs)

    async def dial(self, info: PeerInfo) -> None:
        """Connect to a peer (within dial_timeout) and add it to the DHT routing table; when every connection slot
        is taken, a connection of lower standing is closed first (`connection_to_close`)."""
        if info.peer_id == self.host.get_id():
            return
        swarm = self.host.get_network()
        if info.peer_id.to_base58() in self._evicted:  # a stranger it closed, now dialled by the node itself
            del self._evicted[info.peer_id.to_base58()]
            swarm.unblock_peer(info.peer_id)
        try:
            # one timeout for all of it: an address that answered TCP only after seconds, then stalled the handshake,
            # doubled the dial (red team)
            with trio.fail_after(self.config.dial_timeout):
                if at_cap(swarm, info.peer_id) and not dial_blocked(swarm, info.peer_id):
                    # no address given (a DHT record without any): py-libp2p dials what its peerstore holds
                    if info.addrs and not await answers_tcp(info.addrs, self.config.dial_timeout):
                        raise P2PError(f"nothing answered at its {len(info.addrs)} address(es)")
                    await self._make_room(info)
                await self.host.connect(info)
        except trio.TooSlowError as e:
            raise P2PError(f"dialing {info.peer_id} timed out after {self.config.dial_timeout:g}s") from e
        except Exception as e:
            if at_cap(swarm, info.peer_id):  # refused for want of a slot, not for the peer's fault: dial it again later
                swarm.unblock_peer(info.peer_id)
            raise P2PError(f"cannot dial {info.peer_id}: {e}") from e
        await self.dht.add_peer(info.peer_id, skip_server_mode_check=True)

    async def _make_room(self, info: PeerInfo) -> None:
        """Close the connection `connection_to_close` names, if any."""
        swarm = self.host.get_network()
        spared = self.fetcher.downloading_from() | self._closing
        doomed = connection_to_close(
            swarm, self.standing.level, info.peer_id, spared, TProtocol(PROTOCOL_ID), self.server.uploading_to()
        )
        if doomed is None:
            return
        pid = doomed.to_base58()
        self._log_room("every connection slot is taken: closed %s's connection to dial %s", pid, info.peer_id)
        if self.standing.level(pid) == UNKNOWN:
            # kept from the DHT's upkeep for a while (py-libp2p's negative cache): it dialled the stranger straight
            # back into the freed slot. A peer with standing is not: its own fetches would be refused for a minute
            block_dials(swarm, doomed)
            self._evicted[pid] = None
            while len(self._evicted) > MAX_EVICTED:
                self._evicted.popitem(last=False)
        self._closing.add(pid)
        try:
            with trio.move_on_after(2):
                await self.host.disconnect(doomed)
        except Exception as e:  # gone meanwhile: the slot is free all the same
            log.debug("closing %s: %s", pid, e)
        finally:
            self._closing.discard(pid)

    async def _routing_table_loop(self) -> None:
        # Peers that dialed us (or that the mesh found) join the DHT routing table too.
        while True:
            for pid in self.host.get_connected_peers():
                try:
                    await self.dht.add_peer(pid, skip_server_mode_check=True)
                except Exception as e:  # a peer that vanished mid-update
                    log.debug("routing table add %s: %s", pid, e)
            await trio.sleep(2.0)


# -- the bridge: a trio loop on its own thread, callable from plain threads and from asyncio -------


class TrioThread:
    """Runs `main(ready)` on a fresh trio loop in a daemon thread until stop()."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, main: Callable[[Callable[[], None]], Awaitable[None]], *, timeout: float) -> None:
        """Start the thread and block until `main` calls ready() (or fails, which is re-raised)."""
        if self._thread is not None:
            raise P2PError("the p2p thread is already running")

        async def _root() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await main(self._ready.set)
                nursery.cancel_scope.cancel()

        async def _guarded() -> None:
            try:
                await _root()
            except BaseException as e:  # reported to start(); the thread ends quietly
                self._error = e
            finally:
                self._nursery = None
                self._ready.set()

        self._thread = threading.Thread(target=trio.run, args=(_guarded,), name=self._name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise P2PError(f"the p2p host did not start within {timeout:g}s")
        if self._error is not None:
            cause = _leaf(self._error)
            raise P2PError(f"the p2p host failed to start: {cause}") from cause
        if self._nursery is None:
            raise P2PError("the p2p host stopped right after starting")

    async def wait_stopped(self) -> None:
        """Inside `main`: returns when stop() was called."""
        assert self._stop is not None
        await self._stop.wait()

    def stop(self, *, timeout: float) -> None:
        """Ask `main` to return and join the thread."""
        thread = self._thread
        if thread is None:
            return
        if thread.is_alive() and self._token is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        thread.join(timeout)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._nursery is not None

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `fn(*args)` on the trio loop and block this (non-trio) thread for its result."""
        if not self.running:
            raise P2PError("the p2p node is not started")
        try:
            return trio.from_thread.run(fn, *args, trio_token=self._token)
        except trio.RunFinishedError as e:
            raise P2PError("the p2p host stopped") from e

    async def acall(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `fn(*args)` on the trio loop from asyncio; cancelling the await cancels the trio task."""
        if not self.running:
            raise P2PError("the p2p node is not started")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        scope = trio.CancelScope()

        def _deliver(ok: bool, value: Any) -> None:
            if fut.done():
                return
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

        def _send(ok: bool, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(_deliver, ok, value)
            except RuntimeError:  # the asyncio loop is already closed
                pass

        async def _job() -> None:
            sent = False
            try:
                with scope:
                    try:
                        result = await fn(*args)
                    except Exception as e:
                        sent = True
                        _send(False, e)
                        return
                    sent = True
                    _send(True, result)
            finally:
                if not sent:
                    _send(False, asyncio.CancelledError() if scope.cancel_called else P2PError("the p2p host stopped"))

        try:
            trio.from_thread.run_sync(self._nursery.start_soon, _job, trio_token=self._token)
        except trio.RunFinishedError as e:
            raise P2PError("the p2p host stopped") from e
        try:
            return await fut
        except asyncio.CancelledError:
            try:
                trio.from_thread.run_sync(scope.cancel, trio_token=self._token)
            except trio.RunFinishedError:
                pass
            raise


def _leaf(e: BaseException) -> BaseException:
    """The single exception inside nested one-member exception groups (trio nurseries wrap errors)."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e
