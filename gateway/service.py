"""The gateway: its parts built once and wired together (the app's state), and its background loops.

Requests do not go through this object: each is a gateway.request.ServedRequest over the typed parts in
`deps`. What is left here is what belongs to the gateway as a whole: its key, the registry sync, the
outbox check and the reconciliation of dead instances' requests, /health, and shutdown."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Coroutine

from sqlalchemy.engine import Engine

from common.logs import Throttled
from common.wire import node_id_of
from gateway.catalog import ModelCatalog, Prices
from gateway.chain_registry import RegistryView
from gateway.chat import ChatTemplates
from gateway.directory import NodeDirectory
from gateway.greeter import NodeGreeter
from gateway.identity import load_or_create_gateway_key
from gateway.keys import Admission, KeyCache
from gateway.metrics import GatewayMetrics
from gateway.node_client import NodeClient
from gateway.ratelimit import RateLimiter
from gateway.request import Background, RequestDeps
from gateway.router import Router
from gateway.settings import GatewaySettings
from gateway.usage import UsageRecorder, set_busy_timeout
from gateway.usage_book import UsageBook
from ledger.db import make_engine
from node.adapters.basemodel import base_model_name
from node.receipts import ReceiptError
from node.request_auth import gateway_public_key_hex

log = logging.getLogger(__name__)


class Gateway:
    """One gateway instance: settings, database engine, chain registry view and every part built from them."""

    def __init__(self, settings: GatewaySettings, engine: Engine, registry: RegistryView, *, account=None) -> None:
        """`account`: the settler's EVM account, which signs this gateway's hellos to nodes (gateway.greeter)."""
        self.settings = settings
        self.engine = engine
        self.registry = registry
        self.gateway_key = load_or_create_gateway_key(settings.gateway_key_file)
        self.gateway_key_hex = gateway_public_key_hex(self.gateway_key)
        self.directory = NodeDirectory(
            registry,
            ttl=settings.heartbeat_ttl_s,
            max_skew_s=settings.heartbeat_max_skew_s,
            holdoff_max_s=settings.node_holdoff_max_s,
            gateway_key=self.gateway_key_hex,
        )
        self.router = Router(k=settings.owners_k, saturation=settings.saturation_queue_depth)
        self.nodes = NodeClient(
            self.gateway_key,
            connect_timeout=settings.connect_timeout_s,
            read_timeout=settings.node_timeout_s,
            first_byte_timeout=settings.first_byte_timeout_s,
        )
        self.instance_id = secrets.token_hex(16)
        self._learned_keys: dict[str, bytes] = {}  # node id -> key, from reconciliation (checked against the id)
        self.metrics = GatewayMetrics()
        self.book = UsageBook(
            UsageRecorder(engine, self.node_key, instance_id=self.instance_id),
            self.directory,
            self.metrics,
            probe_s=settings.outbox_probe_s,
        )
        self.prices = Prices(engine, registry.client)
        self.templates = ChatTemplates(settings.bases)
        self.catalog = ModelCatalog(
            registry,
            self.directory,
            {bid: base_model_name(d) for bid, d in self.templates.dirs.items()},
            self.prices,
            default_max_price=settings.default_max_price_per_1k_tokens,
            contexts=self.templates.context,
        )
        self.admission = Admission(
            KeyCache(engine, settings.key_cache_ttl_s), RateLimiter(_limits_engine(engine, settings.db_busy_timeout_s))
        )
        self.background = Background()
        self.deps = RequestDeps(
            settings=settings,
            catalog=self.catalog,
            templates=self.templates,
            router=self.router,
            directory=self.directory,
            nodes=self.nodes,
            book=self.book,
            admission=self.admission,
            metrics=self.metrics,
            background=self.background,
        )
        self.greeter = self._greeter(account)

    def _greeter(self, account) -> NodeGreeter | None:
        """Hellos to the registered nodes that do not heartbeat here, when this gateway can sign them and the
        nodes can call it back."""
        s = self.settings
        if not s.greet_nodes or account is None or self.registry.client is None:
            log.info("not greeting nodes (needs --key and --deployment): only nodes started with --gateway find it")
            return None
        url = s.public_url or f"http://{s.host}:{s.port}"
        if s.public_url is None and (s.host in ("0.0.0.0", "::", "") or s.port == 0):
            log.warning("not greeting nodes: set public_url, the URL nodes can reach this gateway at")
            return None
        return NodeGreeter(
            account,
            registry=self.registry,
            directory=self.directory,
            gateway_url=url,
            gateway_key=self.gateway_key_hex,
            interval=s.registry_sync_s,
            max_answer_bytes=s.max_heartbeat_bytes,
        )

    def loops(self) -> list[tuple[str, Coroutine]]:
        """The background loops the app's lifespan runs (name, coroutine)."""
        out = [
            ("registry-sync", self.sync_loop()),
            ("outbox-check", self.book.outbox_loop()),
            ("reconcile", self.reconcile_loop()),
            ("revoked-keys", self.revoked_loop()),
        ]
        if self.settings.request_log_days > 0:
            out.append(("request-log", self.book.prune_loop(self.settings.request_log_days)))
        if self.greeter is not None:
            out.append(("greet-nodes", self.greeter.run()))
        return out

    # ------------------------------------------------------------------ node keys

    def node_key(self, node_id: str) -> bytes | None:
        """A node's Ed25519 key: from its heartbeats, or learnt while reconciling (checked against its id)."""
        return self.directory.public_key(node_id) or self._learned_keys.get(node_id)

    def learn_key(self, node_id: str, public_key_hex: object) -> None:
        try:
            key = bytes.fromhex(public_key_hex) if isinstance(public_key_hex, str) else b""
            if node_id_of(key) == node_id:
                self._learned_keys[node_id] = key
        except (ValueError, ReceiptError):
            pass

    # ------------------------------------------------------------------ the gateway as a whole

    def health(self) -> dict:
        """What /health answers: outbox state, live and disputed nodes."""
        book = self.book
        writable = book.outbox_error is None
        return {
            "status": "ok" if writable else "unavailable",
            "live_nodes": len(self.directory.live()),
            "outbox": {"writable": writable, "error": book.outbox_error, "unwritten": len(book.unwritten)},
            "disputed_nodes": [{"node_id": n, "reason": r} for n, r in sorted(self.directory.disputed.items())],
        }

    async def reconcile_loop(self) -> None:
        """Close the open requests of dead instances (gateway.reconcile), a pass every 2 x outbox_probe_s
        while the outbox takes writes; each pass is bounded by reconcile_pass_s."""
        from gateway import reconcile

        while True:
            await asyncio.sleep(self.settings.outbox_probe_s * 2)
            if self.book.outbox_error is not None:
                continue
            try:
                await reconcile.reconcile(self)
            except Exception:  # nothing may end reconciliation
                log.exception("reconciliation pass failed")

    async def revoked_loop(self) -> None:
        """Read the keys revoked lately every key_cache_ttl_s (every 0.5 s with the cache off), so that a revoked
        key's running requests end within about the time its new ones are refused."""
        from gateway.reconcile import OVERDUE_MARGIN_S

        within = self.settings.request_deadline_s + OVERDUE_MARGIN_S  # as long as a request of the key may run
        failed = Throttled(log, logging.WARNING, interval=60.0)  # the outbox check says the database is down too
        while True:
            try:
                await asyncio.to_thread(self.admission.refresh_revoked, within)
            except Exception as e:  # the last set read holds until the database answers
                failed("revoked keys not read: %s", e)
            await asyncio.sleep(max(self.settings.key_cache_ttl_s, 0.5))

    async def sync_loop(self) -> None:
        """Refresh the registry mirror and the disputed nodes every registry_sync_s seconds."""
        while True:
            try:
                await asyncio.to_thread(self._sync)
            except Exception:  # a bad answer from the chain must not end the refreshes
                log.exception("registry sync failed")
            await self.book.sync_disputes()  # disputes other gateways recorded, readmissions by the operator
            self.metrics.live_nodes.set(len(self.directory.live()))
            await asyncio.sleep(self.settings.registry_sync_s)

    def _sync(self) -> None:
        self.registry.sync()
        self.prices.reload()
        self.prices.refresh_base()

    async def aclose(self) -> None:
        await self.background.drain()
        await self.nodes.aclose()
        await asyncio.to_thread(self.admission.close)
        if self.admission.limiter.engine is not self.engine:  # the limiter's own (SQLite)
            self.admission.limiter.engine.dispose()


def _limits_engine(engine: Engine, busy_timeout_s: float) -> Engine:
    """The rate limiter's engine: on SQLite one of its own whose transactions take the write lock at BEGIN (a
    bucket is read, then written: begun deferred, as the gateway's engine begins, concurrent admissions read
    one level and each wrote its own, and a burst ran past the limit), waiting as long as the gateway's."""
    if engine.dialect.name != "sqlite":
        return engine  # PostgreSQL: the limiter locks the rows (SELECT ... FOR UPDATE)
    limits = make_engine(engine.url.render_as_string(hide_password=False), immediate=True)
    set_busy_timeout(limits, busy_timeout_s)
    return limits
