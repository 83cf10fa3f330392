"""The node daemon: engine + HTTP API, p2p host, chain registration and heartbeats, wired together.

Start-up order matters: the engine and the p2p host come up first, so the node can register its
real peer id and addresses on chain; then it dials the registry's other nodes and starts telling
its gateways it is alive. Shutdown runs the other way round.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI

from common.http import DEFAULT_MAX_BODY_BYTES
from common.identity import Identity
from common.wire import is_id, restore_recursion_limit
from ledger.types import api_url_problem
from node.adapters import AdapterStore
from node.api import create_app
from node.engine import AsyncEngine, EngineConfig
from node.engine.lora.manager import FETCH_TIMEOUT_S
from node.gateway_hello import HelloError, SettlerRoster, SettlerUnknown, verify_hello
from node.health import NodeHealth
from node.heartbeat import HeartbeatSender, TooManyGateways
from node.operator_token import DEFAULT_DATA_DIR, ensure_operator_token
from node.request_auth import is_gateway_key
from node.sources import HttpRegistry, Sources
from node.upload import MAX_PACKAGE_BYTES, PackageInstaller

log = logging.getLogger(__name__)

# Anyone who registers adapters and sends requests decides what a node fetches: without a bound its disk fills.
MAX_CACHE_BYTES = 64 * 2**30  # ~380 adapters of rank 16 on all targets of an 8B base (168 MB each)
MIN_FREE_DISK_BYTES = 2**30  # the node's database, logs and downloads in progress share the disk

# how often a node reads the registry's nodes again, to know the ones registered after it started
REGISTRY_PEERS_S = 300.0


@dataclass(slots=True)
class DaemonConfig:
    """Where the node serves, which chain it registers on, how it joins the mesh and whom it tells."""

    base: Path
    store: Path
    host: str = "127.0.0.1"
    port: int = 8101
    api_url: str | None = None  # what gateways should call; default http://host:port
    deployment: Path | None = None
    rpc: str | None = None
    listen: str | None = None  # libp2p listen multiaddr; None = no p2p
    bootstrap: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    pins: tuple[str, ...] = ()
    adapter_sources: tuple[str, ...] = ()  # HTTP registries (node/sources.py), tried in order after the peers
    heartbeat_interval: float = 2.0
    data_dir: Path = DEFAULT_DATA_DIR  # holds operator.token
    trusted_gateway_keys: tuple[str, ...] = ()  # empty: trust the keys the --gateway URLs announce
    max_package_bytes: int = MAX_PACKAGE_BYTES
    # the adapters it fetched for requests, together (the least recently used evicted first: AdapterStore)
    max_cache_bytes: int = MAX_CACHE_BYTES
    min_free_disk_bytes: int = MIN_FREE_DISK_BYTES  # what a fetch leaves free of the store's disk
    # every body but an upload's and a generate call's (node/api/models.py:generate_body_bytes)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self) -> None:
        self.trusted_gateway_keys = tuple(k.strip().lower() for k in self.trusted_gateway_keys)
        for k in self.trusted_gateway_keys:
            if not is_gateway_key(k):
                raise ValueError(f"trusted gateway key {k[:80]!r} is not 64 hex digits (a raw Ed25519 public key)")
        if self.max_package_bytes <= 0 or self.max_body_bytes <= 0 or self.max_cache_bytes <= 0:
            raise ValueError("size limits must be > 0 bytes")
        if self.min_free_disk_bytes < 0:
            raise ValueError(f"free disk to keep must be >= 0 bytes, got {self.min_free_disk_bytes}")
        if self.bootstrap and self.listen is None:
            raise ValueError("--bootstrap needs --listen: a node without a p2p host cannot join the mesh")
        if self.heartbeat_interval <= 0:
            raise ValueError(f"heartbeat interval must be > 0, got {self.heartbeat_interval}")
        for url in self.gateways:  # each beat would fail, logged, while the node looked up
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"gateway URL {url[:80]!r} is not http:// or https://")
        for aid in self.pins:  # each would fail, logged, while the node served without it
            if not is_id(aid):
                raise ValueError(f"pinned adapter {aid[:80]!r} is not 0x followed by 64 lowercase hex digits")
        if self.api_url is None and (self.port == 0 or self.host in ("0.0.0.0", "::")):
            # the URL the node registers on chain and puts in its heartbeats: nobody could reach it there
            raise ValueError(
                f"a node on --host {self.host} --port {self.port} has no URL gateways can reach it at: give "
                "--api-url (the URL they call it at) or a fixed port on an address they reach"
            )
        if (why := api_url_problem(self.public_url)) is not None:
            raise ValueError(f"API URL {self.public_url[:80]!r} {why}: the node registry refuses it")

    @property
    def public_url(self) -> str:
        return self.api_url or f"http://{self.host}:{self.port}"


class NodeDaemon:
    """One operator node; `app` is the ASGI app whose lifespan runs everything else."""

    def __init__(self, config: DaemonConfig, engine_config: EngineConfig, identity: Identity) -> None:
        self.config = config
        self.identity = identity
        self.store = AdapterStore(
            config.store,
            base_dir=config.base,
            max_cache_bytes=config.max_cache_bytes,
            min_free_bytes=config.min_free_disk_bytes,
        )
        if n := self.store.clean_tmp():
            log.info("removed %d unfinished package writes from the store", n)
        self.chain = None
        self.owner_of = lambda _adapter_id: None
        if config.deployment is not None:
            from ledger.chain import ChainClient
            from node.registration import owner_lookup

            self.chain = ChainClient.from_deployment(config.deployment, identity.account, rpc_url=config.rpc)
            self.owner_of = owner_lookup(self.chain)
            self.store.domain = self.chain.domain  # only packages signed for this chain's registry
        self.p2p = None
        # peer ids of the nodes registered on chain: the mesh tries them first and never evicts them for strangers
        self.registered_peers: set[str] = set()
        if config.listen is not None:
            from node.p2p import P2PConfig, P2PNode

            self.p2p = P2PNode(
                seed=identity.node_seed,
                store=self.store,
                owner_of=self.owner_of,
                config=P2PConfig(listen=config.listen, bootstrap=config.bootstrap),
                base_dir=config.base,
                trusted_peer=self.registered_peers.__contains__,
            )
        self.sources = Sources([HttpRegistry(u) for u in config.adapter_sources], budget_s=FETCH_TIMEOUT_S)
        fetches = self.p2p is not None or bool(self.sources)
        self.engine = AsyncEngine(engine_config, store=self.store, fetcher=self._fetch if fetches else None)
        self.store.protected.append(self.engine.adapters_in_use)  # never evicted from under a load
        self.operator_token, self.operator_token_path = ensure_operator_token(config.data_dir)
        self.uploads = PackageInstaller(
            self.store,
            base_dir=config.base,
            owner_of=self.owner_of,
            on_chain=self.chain is not None,
            max_package_bytes=config.max_package_bytes,
            announce=self.p2p.aannounce if self.p2p is not None else None,
        )
        self.app: FastAPI = create_app(
            self.engine,
            identity.node_key,
            services=self._services,
            extra_status=self._extra_status,
            trusted_gateways=self.trusted_gateways,
            operator_token=self.operator_token,
            max_body_bytes=config.max_body_bytes,
            uploads=self.uploads,
            metrics_extra=self._counters,
            on_gateway_hello=self._gateway_hello if self.chain is not None else None,
            health=NodeHealth(
                self.engine,
                store_dir=self.store.root,
                block_number=self.chain.block_number if self.chain is not None else None,
            ),
        )
        self.heartbeat: HeartbeatSender | None = None
        self.fetched = self.fetched_bytes = 0  # adapters fetched through the mesh, and their package bytes
        self.source_fetches = 0  # adapters fetched from the operator's sources
        # the ledger's settlers, whose gateways may say hello: none when the operator lists the gateways to trust
        takes_hellos = self.chain is not None and not config.trusted_gateway_keys
        self.settlers = SettlerRoster(self.chain.settler_changes) if takes_hellos else None
        restore_recursion_limit()  # the chain libraries imported above raise it to 100,000 (py_ecc)

    def trusted_gateways(self) -> frozenset[str]:
        """Gateway keys whose signed calls the API accepts: the operator's list, else what the gateways
        this node heartbeats to announce (read on every call: a gateway's new key counts at once)."""
        if self.config.trusted_gateway_keys:
            return frozenset(self.config.trusted_gateway_keys)
        return self.heartbeat.trusted_keys() if self.heartbeat is not None else frozenset()

    # ---- lifecycle ----
    @asynccontextmanager
    async def _services(self, app: FastAPI) -> AsyncIterator[None]:
        """What runs beside the API while it serves; the app's lifespan enters it once the engine started
        and leaves it before the engine closes."""
        restore_recursion_limit()
        try:
            if self.p2p is not None:
                await asyncio.to_thread(self.p2p.start)
            if self.chain is not None:
                await asyncio.to_thread(self._join_chain)
            if self.config.gateways or self.chain is not None:  # on chain, gateways may say hello
                self.heartbeat = HeartbeatSender(
                    self.identity,
                    self.config.gateways,
                    api_url=self.config.public_url,
                    base_model_id=self.engine.base_model_id,
                    status_fn=app.state.status_doc,
                    interval=self.config.heartbeat_interval,
                )
                self.heartbeat.start()
            tasks = [asyncio.create_task(self._pin(a)) for a in self.config.pins]
            if self.settlers is not None:
                tasks.append(asyncio.create_task(self._recheck_settlers(), name="recheck-settlers"))
            if self.chain is not None and self.p2p is not None:
                tasks.append(asyncio.create_task(self._refresh_peers(), name="refresh-peers"))
            log.info("node %s ready at %s", self.identity.node_id, self.config.public_url)
            yield
            for t in tasks:
                t.cancel()
        finally:
            if self.heartbeat is not None:
                await self.heartbeat.stop()
            if self.p2p is not None:
                await asyncio.to_thread(self.p2p.stop)

    def _join_chain(self) -> None:
        from node.registration import ensure_registered, registry_peers

        addrs = self.p2p.listen_addrs if self.p2p is not None else []
        peer_id = self.p2p.peer_id if self.p2p is not None else ""
        ensure_registered(
            self.chain,
            self.identity.node_key,
            peer_id=peer_id,
            multiaddrs=addrs,
            api_url=self.config.public_url,
            base_model=self.engine.base_model_id,
        )
        if self.p2p is not None:
            peer_ids, peers = registry_peers(
                self.chain, base_model=self.engine.base_model_id, exclude_node=self.identity.node_id
            )
            self.registered_peers.update(peer_ids)
            if peers:
                self.p2p.add_peers(peers)
                log.info("dialling %d peer addresses from the node registry", len(peers))

    async def _gateway_hello(self, doc: object) -> dict:
        """A gateway that found this node on chain introduces itself (node/gateway_hello.py): heartbeat to it
        and trust its key when a settler signed the hello; the answer is this node's signed heartbeat."""
        from node.api.errors import ApiError

        if self.config.trusted_gateway_keys:
            raise ApiError(
                403,
                "this node trusts only the gateway keys its operator lists (--trust-gateway-key)",
                "gateways_pinned",
            )
        if self.heartbeat is None:
            raise ApiError(503, "this node is starting; say hello again shortly", "starting")
        try:
            body = verify_hello(doc, node_id=self.identity.node_id)
        except HelloError as e:
            raise ApiError(400, str(e), "invalid_hello") from None
        try:
            settler = await self.settlers.check(body["settler"])
        except SettlerUnknown as e:
            raise ApiError(503, str(e), "settlers_unknown") from None
        if not settler:
            raise ApiError(403, f"{body['settler']} is not a settler on the ledger: no node serves it", "not_settler")
        try:
            self.heartbeat.add_gateway(body["gateway_url"], body["gateway_key"], body["settler"])
        except TooManyGateways as e:
            raise ApiError(503, str(e), "too_many_gateways") from None
        # meant for the key this node trusts at that URL: a hello naming a new key for a known URL does not make
        # the node take it (the URL is asked), and the gateway must not be told otherwise
        url = body["gateway_url"].rstrip("/")
        if url not in self.heartbeat.gateway_keys:  # the operator's gateway, its key not learned yet
            raise ApiError(
                409, "this node has not learned this gateway's key yet: it asks the URL itself", "gateway_key_unknown"
            )
        return await self.heartbeat.heartbeat_doc(self.heartbeat.gateway_keys[url])

    async def _recheck_settlers(self, every_s: float = 60.0, whole_every: int = 60) -> None:
        """Read the ledger's settlers at start, then what changed every minute and the whole list every hour (a
        grant a reorganisation undid is put right then), and drop a gateway that said hello once its settler
        has lost the role. A chain that does not answer keeps every gateway, and is asked again in 5 s."""
        rounds = 0
        while True:
            try:
                await self.settlers.sync(from_start=rounds % whole_every == 0)
            except SettlerUnknown as e:
                log.warning("%s", e)
                await asyncio.sleep(min(every_s, 5.0))
                continue
            rounds += 1
            for url, settler in list(self.heartbeat.greeted.items()) if self.heartbeat is not None else ():
                if settler.lower() not in self.settlers.settlers:
                    self.heartbeat.forget(url, f"its settler {settler} is no longer a settler on the ledger")
            await asyncio.sleep(every_s)

    async def _refresh_peers(self, every_s: float = REGISTRY_PEERS_S) -> None:
        """Read the registry's nodes again every few minutes (node.registration.refresh_registry_peers): the mesh
        gives a node registered since this one started its standing, and dials it; a chain that does not answer
        keeps the peers as they were."""
        from node.registration import refresh_registry_peers

        while True:
            await asyncio.sleep(every_s)
            try:
                joined = await asyncio.to_thread(
                    refresh_registry_peers,
                    self.chain,
                    self.registered_peers,
                    base_model=self.engine.base_model_id,
                    exclude_node=self.identity.node_id,
                )
            except Exception as e:  # the chain down, a node that cannot be read: the next round tries again
                log.warning("could not read the node registry again: %s", str(e).splitlines()[0] if str(e) else e)
                continue
            if joined:
                await asyncio.to_thread(self.p2p.add_peers, joined)  # a call into the mesh's thread
                log.info("dialling %d addresses of nodes registered since the last look", len(joined))

    async def _pin(self, adapter_id: str) -> None:
        try:
            slot = await self.engine.load_adapter(adapter_id, True)
            log.info("pinned adapter %s in slot %d", adapter_id, slot)
        except Exception as e:  # a pin that fails must not take the node down; the log says why
            log.error("cannot pin adapter %s: %s", adapter_id, e)

    # ---- p2p ----
    async def _fetch(self, adapter_id: str) -> Path | None:
        """The engine's last resort for an adapter the store lacks: fetch it through the mesh, then from the
        operator's adapter sources in order. StoreFull, before any download, when the store has no room (a fetch over
        p2p holds its package's room from its manifest on: AdapterStore.reserve; a source's, at most 2 at once, is
        counted as it is installed)."""
        await asyncio.to_thread(self.store.make_room)
        if self.p2p is not None:
            from node.p2p import FetchError, P2PError

            try:
                pkg = await self.p2p.afetch(adapter_id)
            except (FetchError, P2PError) as e:
                log.warning("cannot fetch adapter %s from peers: %s", adapter_id, e)
            else:
                self.fetched += 1
                self.fetched_bytes += _package_bytes(pkg.path)
                log.info("fetched adapter %s (%s) from the mesh", adapter_id, pkg.name)
                return pkg.path
        got = await self.sources.fetch(adapter_id, self.uploads) if self.sources else None
        if got is None:
            return None
        pkg, source = got
        self.source_fetches += 1
        log.info("fetched adapter %s (%s) from %s", adapter_id, pkg.name, source)
        if self.p2p is not None:  # offered to the mesh as an upload is
            await self.p2p.aannounce(adapter_id)
        return pkg.path

    def _counters(self) -> dict[str, float]:
        """The daemon's own counters for GET /metrics: heartbeats, and adapters fetched from peers (the p2p tier)."""
        out = {
            "p2p_fetches": self.fetched,
            "p2p_fetched_bytes": self.fetched_bytes,
            "source_fetches": self.source_fetches,
            "store_evictions": self.store.evictions,  # fetched packages deleted to make room
            "store_full_refusals": self.store.refusals,
        }
        hb = self.heartbeat
        return out if hb is None else out | {"heartbeats_sent": hb.sent, "heartbeats_failed": hb.failed}

    def _extra_status(self) -> dict:
        if self.p2p is None:
            return {"p2p": None}
        try:
            return {"p2p": self.p2p.status()}
        except Exception:  # the host is starting or stopping: status must still answer
            return {"p2p": {"state": "not running"}}


def _package_bytes(path: Path) -> int:
    """A package folder's size on disk (0 when it is gone already: evicted)."""
    try:
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    except OSError:
        return 0
