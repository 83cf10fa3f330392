"""A real small stack in this process: tiny-model nodes (the node API over the real engine) and a gateway,
each under a real uvicorn on 127.0.0.1, wired as in production: the gateway signs its calls to the nodes
with its gateway key, and the nodes trust the keys their heartbeat sender learns from the gateway.

    gw = start_gateway(root, tiny_base)
    node = start_node(tiny_base, gateway=gw)      # registered in the gateway's directory, heartbeating
    ...
    node.stop(); gw.stop()
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.identity import Identity
from node.adapters.basemodel import base_model_id
from node.heartbeat import HeartbeatSender
from tests.utils.gateway import add_adapter, add_node, make_db, poll
from tests.utils.servers import ServerThread


@dataclass
class GatewayServer:
    url: str
    db: object  # the gateway's database engine (ledger outbox + the gateway's own tables)
    api_key: str
    server: ServerThread
    gateway_key: str = ""  # the public key (hex) it signs node calls with, as GET /internal/gateway-key says

    def stop(self) -> None:
        self.server.stop()
        self.db.dispose()


@dataclass
class NodeServer:
    identity: Identity
    engine: object
    server: ServerThread
    operator_token: str
    trusted: set[str] = field(default_factory=set)  # gateway keys trusted whatever the heartbeats say
    beats: Heartbeats | None = None

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    def trusted_keys(self) -> frozenset[str]:
        learned = self.beats.sender.trusted_keys() if self.beats is not None else frozenset()
        return frozenset(self.trusted) | learned

    def stop(self) -> None:
        if self.beats is not None:
            self.beats.close()
        self.server.stop()


class Heartbeats:
    """A node's heartbeats to one gateway from a thread of their own, every `interval` seconds."""

    def __init__(self, sender: HeartbeatSender, interval: float) -> None:
        self.sender, self.interval = sender, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> Heartbeats:
        self._thread.start()
        return self

    async def _run(self) -> None:
        while not self._stop.is_set():
            await self.sender.send_once()
            await asyncio.sleep(self.interval)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def start_gateway(root: Path, tiny_base: Path, *, rpm: int | None = None, **settings) -> GatewayServer:
    """The gateway app (SQLite database in `root`, no settling) under uvicorn, with one API key."""
    from gateway.keys import create_key
    from gateway.main import create_app
    from gateway.settings import GatewaySettings

    root.mkdir(parents=True, exist_ok=True)
    db = make_db(root / "gateway.db")
    key, _ = create_key(db, name="stack", rpm=rpm)
    settings.setdefault("heartbeat_ttl_s", 120)
    app = create_app(
        GatewaySettings(db_url=f"sqlite:///{root / 'gateway.db'}", bases=[tiny_base], settle=False, **settings)
    )
    server = ServerThread(app).start()
    gw = GatewayServer(server.url, db, key, server)
    gw.gateway_key = httpx.get(gw.url + "/internal/gateway-key", timeout=10).json()["gateway_key"]
    return gw


def start_node(
    tiny_base: Path,
    *,
    gateway: GatewayServer | None = None,
    trusted: Collection[str] = (),
    store=None,
    num_slots: int = 4,
    num_kv_blocks: int = 256,
    heartbeat_s: float = 0.5,
) -> NodeServer:
    """A node API over the real engine on `tiny_base`. With `gateway`: registered in its directory and
    heartbeating to it (it learns the gateway's key from there, as the daemon does), and live there on return."""
    from node.api import create_app
    from node.engine import AsyncEngine, EngineConfig

    identity = Identity.generate()
    engine = AsyncEngine(
        EngineConfig(model_dir=tiny_base, num_kv_blocks=num_kv_blocks, block_size=8, num_slots=num_slots), store=store
    )
    token = secrets.token_urlsafe(24)
    node = NodeServer(identity, engine, None, token, set(trusted))  # type: ignore[arg-type]
    app = create_app(engine, identity.node_key, trusted_gateways=node.trusted_keys, operator_token=token)
    node.server = ServerThread(app).start()
    if gateway is not None:
        base = base_model_id(tiny_base)
        add_node(gateway.db, node_id=identity.node_id, base_model=base, api_url=node.url)
        sender = HeartbeatSender(
            identity,
            [gateway.url],
            api_url=node.url,
            base_model_id=base,
            status_fn=app.state.status_doc,
            interval=heartbeat_s,
        )
        node.beats = Heartbeats(sender, heartbeat_s).start()
        poll(lambda: gateway.gateway_key in node.trusted_keys() and sender.sent > 0, timeout=30)
    return node


def register_adapter(gateway: GatewayServer, *, adapter_id: str, name: str, tiny_base: Path) -> None:
    """The adapter in the gateway's registry mirror (as the chain sync would write it), free of charge."""
    add_adapter(gateway.db, adapter_id=adapter_id, name=name, base_model=base_model_id(tiny_base))


def gateway_key() -> Ed25519PrivateKey:
    """A fresh gateway signing key (for tests that sign node calls themselves)."""
    return Ed25519PrivateKey.generate()


@dataclass
class DaemonServer:
    """The node daemon's app (node API + package upload), without chain or p2p, under uvicorn."""

    daemon: object  # node.daemon.NodeDaemon
    server: ServerThread

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def node_id(self) -> str:
        return self.daemon.identity.node_id

    @property
    def operator_token(self) -> str:
        return self.daemon.operator_token

    def stop(self) -> None:
        self.server.stop()


def start_daemon(
    root: Path,
    tiny_base: Path,
    *,
    gateway: GatewayServer | None = None,
    trusted: Collection[str] = (),
    num_slots: int = 2,
    num_kv_blocks: int = 128,
    **config: object,
) -> DaemonServer:
    """`loramesh node run` in this process, without chain or p2p: the daemon's own app (its upload route and
    body limits included). It trusts `trusted` and, with `gateway`, that gateway's key; it heartbeats to it
    and is live there on return. `config`: more DaemonConfig fields (adapter_sources, ...)."""
    from devnet.anvil import free_port
    from node.daemon import DaemonConfig, NodeDaemon
    from node.engine import EngineConfig

    port = free_port()
    keys = tuple(trusted) + ((gateway.gateway_key,) if gateway is not None else ())
    config = DaemonConfig(
        base=tiny_base,
        store=root / "store",
        port=port,
        data_dir=root / "data",
        gateways=(gateway.url,) if gateway is not None else (),
        trusted_gateway_keys=keys,
        heartbeat_interval=0.5,
        **config,
    )
    identity = Identity.generate()
    daemon = NodeDaemon(
        config,
        EngineConfig(model_dir=tiny_base, num_kv_blocks=num_kv_blocks, block_size=8, num_slots=num_slots),
        identity,
    )
    if gateway is not None:
        add_node(gateway.db, node_id=identity.node_id, base_model=base_model_id(tiny_base), api_url=config.public_url)
    node = DaemonServer(daemon, ServerThread(daemon.app, port=port).start())
    if gateway is not None:
        poll(lambda: httpx.get(gateway.url + "/health", timeout=5).json().get("live_nodes", 0) >= 1, timeout=30)
    return node
