"""P2PNode: the p2p layer as the daemon and CLI see it, sync-callable and asyncio-callable.

The libp2p host runs on its own trio loop in a thread (see bridge.py); each method here sends one
whole flow to that loop and returns a small result. Sync methods block the calling thread, so call
them from plain threads or through the `a*` variants from asyncio code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from node.adapters import AdapterStore, VerifiedPackage
from node.p2p.bridge import TrioThread
from node.p2p.config import P2PConfig
from node.p2p.discovery import Provider
from node.p2p.errors import P2PError
from node.p2p.fetcher import OwnerOf, Progress, TransferStatus
from node.p2p.logs import route_libp2p_logging
from node.p2p.mesh import Mesh
from node.p2p.server import AdapterServer

log = logging.getLogger(__name__)


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
            seed=seed, store=store, owner_of=owner_of, config=self.config,
            base_dir=Path(base_dir) if base_dir is not None else None, server_factory=server_factory,
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
        return sorted(self._m().held)

    def transfers(self) -> list[TransferStatus]:
        """Snapshot of recent fetches and their progress, for the node's status."""
        return list(self._m().transfers.values())

    def book_size(self) -> tuple[int, int]:
        """(announcing peers, adapter ids over all of them) this node remembers; both are bounded."""
        book = self._m().book
        return len(book), book.id_count

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self._m().host.get_connected_peers()]

    # -- flows, sync (block the calling thread) -------------------------------------------

    def connect(self, multiaddr: str) -> str:
        """Dial a peer by full multiaddr; returns its peer id."""
        return self._thread.call(self._m().connect, multiaddr)

    def add_peers(self, multiaddrs: list[str]) -> None:
        """Dial more peers (e.g. from the chain's node registry); unreachable ones are logged."""
        self._thread.call(self._m().add_peers, list(multiaddrs))

    def announce(self, adapter_id: str) -> None:
        """Announce that this node holds `adapter_id` (it must be in the store)."""
        self._thread.call(self._m().announce, adapter_id)

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

    async def aconnect(self, multiaddr: str) -> str:
        return await self._thread.acall(self._m().connect, multiaddr)

    async def aadd_peers(self, multiaddrs: list[str]) -> None:
        await self._thread.acall(self._m().add_peers, list(multiaddrs))

    async def aannounce(self, adapter_id: str) -> None:
        await self._thread.acall(self._m().announce, adapter_id)

    async def afind_providers(self, adapter_id: str, *, wait: float = 0.0) -> list[Provider]:
        return await self._thread.acall(self._find, adapter_id, wait)

    async def afetch(
        self, adapter_id: str, *, providers: Sequence[str] = (), on_progress: Progress | None = None
    ) -> VerifiedPackage:
        """asyncio variant of fetch(); cancelling it cancels the transfer and discards its temp folder."""
        return await self._thread.acall(self._fetch, adapter_id, tuple(providers), on_progress)

    async def _find(self, adapter_id: str, wait: float) -> list[Provider]:
        return await self._m().find_providers(adapter_id, wait=wait)

    async def _fetch(self, adapter_id: str, providers: tuple[str, ...], on_progress: Progress | None) -> VerifiedPackage:
        return await self._m().fetch(adapter_id, providers=providers, on_progress=on_progress)
