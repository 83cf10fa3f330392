"""The node daemon: engine + HTTP API, p2p host, chain registration and heartbeats, wired together.

Start-up order matters: the engine and the p2p host come up first, so the node can register its
real peer id and addresses on chain; then it dials the registry's other nodes and starts telling
its gateways it is alive. Shutdown runs the other way round.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from node.adapters import AdapterStore, PackageError, VerifiedPackage
from node.adapters.manifest import read_manifest
from node.api import create_app
from node.engine import Engine, EngineConfig
from node.heartbeat import HeartbeatSender
from node.keys import Identity
from node.upload import MAX_UPLOAD_BYTES, untar_package

log = logging.getLogger(__name__)


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
    heartbeat_interval: float = 2.0

    def __post_init__(self) -> None:
        if self.bootstrap and self.listen is None:
            raise ValueError("--bootstrap needs --listen: a node without a p2p host cannot join the mesh")
        if self.heartbeat_interval <= 0:
            raise ValueError(f"heartbeat interval must be > 0, got {self.heartbeat_interval}")

    @property
    def public_url(self) -> str:
        return self.api_url or f"http://{self.host}:{self.port}"


class UploadRefused(RuntimeError):
    """An uploaded package that the chain does not vouch for."""


class NodeDaemon:
    """One operator node; `app` is the ASGI app whose lifespan runs everything else."""

    def __init__(self, config: DaemonConfig, engine_config: EngineConfig, identity: Identity) -> None:
        self.config = config
        self.identity = identity
        self.store = AdapterStore(config.store)
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
        if config.listen is not None:
            from node.p2p import P2PConfig, P2PNode

            self.p2p = P2PNode(seed=identity.node_seed, store=self.store, owner_of=self.owner_of,
                               config=P2PConfig(listen=config.listen, bootstrap=config.bootstrap),
                               base_dir=config.base)
        self.engine = Engine(engine_config, store=self.store, fetcher=self._fetch if self.p2p else None)
        self.app: FastAPI = create_app(self.engine, identity.node_key, manage_engine=False,
                                       extra_status=self._extra_status)
        self.app.router.lifespan_context = self._lifespan
        self.app.include_router(self._routes())
        self.heartbeat: HeartbeatSender | None = None

    # ---- lifecycle ----
    @asynccontextmanager
    async def _lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        self.engine.start()
        try:
            if self.p2p is not None:
                await asyncio.to_thread(self.p2p.start)
            if self.chain is not None:
                await asyncio.to_thread(self._join_chain)
            if self.config.gateways:
                self.heartbeat = HeartbeatSender(self.identity, self.config.gateways, api_url=self.config.public_url,
                                                 base_model_id=self.engine.base_model_id,
                                                 status_fn=app.state.status_doc, interval=self.config.heartbeat_interval)
                self.heartbeat.start()
            pins = [asyncio.create_task(self._pin(a)) for a in self.config.pins]
            log.info("node %s ready at %s", self.identity.node_id, self.config.public_url)
            yield
            for t in pins:
                t.cancel()
        finally:
            if self.heartbeat is not None:
                await self.heartbeat.stop()
            if self.p2p is not None:
                await asyncio.to_thread(self.p2p.stop)
            self.engine.close()

    def _join_chain(self) -> None:
        from node.registration import ensure_registered, registry_peers

        addrs = self.p2p.listen_addrs if self.p2p is not None else []
        peer_id = self.p2p.peer_id if self.p2p is not None else ""
        ensure_registered(self.chain, self.identity.node_key, peer_id=peer_id, multiaddrs=addrs,
                          api_url=self.config.public_url, base_model=self.engine.base_model_id)
        if self.p2p is not None:
            peers = registry_peers(self.chain, base_model=self.engine.base_model_id, exclude_node=self.identity.node_id)
            if peers:
                self.p2p.add_peers(peers)
                log.info("added %d peer addresses from the node registry", len(peers))

    async def _pin(self, adapter_id: str) -> None:
        try:
            slot = await self.engine.load_adapter(adapter_id, True)
            log.info("pinned adapter %s in slot %d", adapter_id, slot)
        except Exception as e:  # a pin that fails must not take the node down; the log says why
            log.error("cannot pin adapter %s: %s", adapter_id, e)

    # ---- p2p ----
    async def _fetch(self, adapter_id: str) -> Path | None:
        """The engine's last resort for an adapter the store lacks: fetch it through the mesh."""
        from node.p2p import FetchError, P2PError

        try:
            pkg = await self.p2p.afetch(adapter_id)
        except (FetchError, P2PError) as e:
            log.warning("cannot fetch adapter %s from peers: %s", adapter_id, e)
            return None
        log.info("fetched adapter %s (%s) from the mesh", adapter_id, pkg.name)
        return pkg.path

    def _extra_status(self) -> dict:
        if self.p2p is None:
            return {"p2p": None}
        try:
            transfers = [dataclasses.asdict(t) for t in self.p2p.transfers()]
            return {"p2p": {"peer_id": self.p2p.peer_id, "listen_addrs": self.p2p.listen_addrs,
                            "held": self.p2p.held, "transfers": transfers}}
        except Exception:  # the host is starting or stopping: status must still answer
            return {"p2p": {"state": "not running"}}

    # ---- package upload (publishers hand packages to a node) ----
    def _install_upload(self, data: BinaryIO) -> VerifiedPackage:
        tmp = self.store.tmp_dir()
        try:
            untar_package(data, tmp)
            adapter_id = read_manifest(tmp).adapter_id
            owner = self.owner_of(adapter_id)
            if self.chain is not None and owner is None:
                raise UploadRefused(f"adapter {adapter_id} is not registered on chain: publish it first")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.store.install_from_tmp(tmp, expected_owner=owner, base_dir=self.config.base)

    def _routes(self) -> APIRouter:
        router = APIRouter()

        @router.post("/v1/adapters")
        async def upload(request: Request):
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES:
                return _error(413, f"upload of {declared} bytes is over the {MAX_UPLOAD_BYTES}-byte limit",
                              "upload_too_large")
            # spooled to disk past 64 MiB and capped while it arrives: an upload never sits whole in memory
            data = tempfile.SpooledTemporaryFile(max_size=64 << 20, dir=self.store.root / ".tmp")
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_UPLOAD_BYTES:
                    data.close()
                    return _error(413, f"upload is over the {MAX_UPLOAD_BYTES}-byte limit", "upload_too_large")
                data.write(chunk)
            data.seek(0)
            try:
                pkg = await asyncio.to_thread(self._install_upload, data)
            except PackageError as e:
                return _error(400, str(e), "package_refused")
            except UploadRefused as e:
                return _error(403, str(e), "adapter_unregistered")
            finally:
                data.close()
            if self.p2p is not None:
                await self.p2p.aannounce(pkg.adapter_id)
            log.info("accepted package %s (%s) from a publisher", pkg.adapter_id, pkg.name)
            return {"adapter_id": pkg.adapter_id, "name": pkg.name, "signer": pkg.signer,
                    "announced": self.p2p is not None}

        return router


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": code}},
                        status_code=status)
