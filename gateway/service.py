"""The gateway's service object: every part wired together, used by the HTTP layer (app.py)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Coroutine

from sqlalchemy.engine import Engine

from gateway.chat import ChatTemplates
from gateway.directory import NodeDirectory
from gateway.errors import AuthError, ModelNotFound, OutboxUnavailable
from gateway.identity import load_or_create_gateway_key
from gateway.keys import KeyCache, KeyInfo
from gateway.metrics import GatewayMetrics
from gateway.node_client import NodeClient
from gateway.pricing import Prices, check_price, wei
from gateway.ratelimit import RateLimiter
from gateway.registry import RegistryView
from gateway.relay import Target
from gateway.router import Route, Router
from gateway.settings import GatewaySettings
from gateway.usage import RequestEnd, UsageError, UsageRecorder
from node.adapters.basemodel import base_model_name
from common.wire import is_id
from common.wire import node_id_of
from node.receipts import ReceiptError
from node.request_auth import gateway_public_key_hex

log = logging.getLogger(__name__)


def _secret(authorization: str | None) -> str:
    """The key of an `Authorization: Bearer <key>` header; AuthError when there is none."""
    if not authorization:
        raise AuthError("missing API key: send it as 'Authorization: Bearer <key>'")
    scheme, _, secret = authorization.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise AuthError("malformed Authorization header: expected 'Bearer <key>'")
    return secret.strip()


class Gateway:
    """Auth, model resolution, routing parts, usage recording and background tasks of one gateway."""

    def __init__(self, settings: GatewaySettings, engine: Engine, registry: RegistryView) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = registry
        self.directory = NodeDirectory(registry, ttl=settings.heartbeat_ttl_s, max_skew_s=settings.heartbeat_max_skew_s)
        self.router = Router(k=settings.owners_k, saturation=settings.saturation_queue_depth)
        self.gateway_key = load_or_create_gateway_key(settings.gateway_key_file)
        self.gateway_key_hex = gateway_public_key_hex(self.gateway_key)
        self.nodes = NodeClient(self.gateway_key, connect_timeout=settings.connect_timeout_s,
                                read_timeout=settings.node_timeout_s,
                                first_byte_timeout=settings.first_byte_timeout_s)  # fmt: skip
        self.instance_id = secrets.token_hex(16)
        self.recorder = UsageRecorder(engine, self.node_key, instance_id=self.instance_id)
        self._learned_keys: dict[str, bytes] = {}  # node id -> key, from reconciliation (checked against the id)
        self.prices = Prices(engine, registry.client)
        # None while the outbox takes writes; otherwise why not (new requests get 503 until a write succeeds)
        self.outbox_error: str | None = None
        self.unwritten: list[RequestEnd] = []  # request ends the outbox refused, written when it takes writes
        self.metrics = GatewayMetrics()
        self.limiter = RateLimiter()
        self.templates = ChatTemplates(settings.bases)
        # base model id -> name, of the bases this gateway was configured with (--base): the only base names it
        # resolves; a base a node announces is known by its id alone (a node's heartbeat names nothing here)
        self.base_names: dict[str, str] = {bid: base_model_name(d) for bid, d in self.templates.dirs.items()}
        self._tasks: set[asyncio.Task] = set()
        self._key_tpm: dict[int, int | None] = {}
        self.keys = KeyCache(engine, settings.key_cache_ttl_s)

    # ------------------------------------------------------------------ auth and limits

    def authenticate(self, authorization: str | None) -> tuple[KeyInfo, frozenset[str]]:
        """The key named by an `Authorization: Bearer` header and the private adapter names (blocking: DB
        unless `cached_auth` would have answered)."""
        secret = _secret(authorization)
        key, private = self.keys.get(secret) or self.keys.load(secret)
        if key is None:
            raise AuthError("invalid API key: unknown or revoked")
        self._key_tpm[key.id] = key.tokens_per_minute
        return key, private

    def cached_auth(self, authorization: str | None) -> tuple[KeyInfo, frozenset[str]] | None:
        """`authenticate` from the key cache, without blocking; None when the database must be asked."""
        hit = self.keys.get(_secret(authorization))
        if hit is not None:
            self._key_tpm[hit[0].id] = hit[0].tokens_per_minute
        return hit

    def admit(self, key: KeyInfo) -> None:
        self.limiter.admit(key.id, rpm=key.requests_per_minute, tpm=key.tokens_per_minute)

    def charge_tokens(self, key_id: int, tokens: int) -> None:
        self.limiter.charge_tokens(key_id, tokens, tpm=self._key_tpm.get(key_id))

    def max_price(self, key: KeyInfo) -> int:
        """The dearest price per 1,000 tokens (wei) this key may use."""
        if key.max_price_per_1k_tokens is not None:
            return key.max_price_per_1k_tokens
        return self.settings.default_max_price_per_1k_tokens

    def check_price(self, target: Target, key: KeyInfo) -> None:
        """PriceExceedsLimit (403) when the adapter (or the base price) is dearer than the key allows."""
        check_price(target.model, self.prices.of(target.adapter_id), self.max_price(key))

    # ------------------------------------------------------------------ models

    def _visible(self, name: str, key: KeyInfo, private: frozenset[str]) -> bool:
        return name not in private or name in key.adapters

    def resolve(self, model: str, key: KeyInfo, private: frozenset[str]) -> Target:
        """An adapter id, a base model's id or name, or an adapter name (its newest registration), in that
        order: a string shaped like an id ("0x...") resolves only as an id, and a base model's name or id
        only to the base model, so no adapter name shadows either (the registry refuses such names too).
        A base's name is the one in the gateway's configuration (--base), never one a node announced (a node
        could name its base after any adapter and take its requests); a base no --base names is known by its
        id alone."""
        not_found = ModelNotFound(f"The model '{model}' does not exist or you do not have access to it.",
                                  param="model")  # fmt: skip
        if model.startswith("0x"):  # never an adapter name
            if not is_id(model):
                raise not_found
            adapter = self.registry.adapters.get(model.lower())
            if adapter is not None and self._visible(adapter.name, key, private):
                return Target(model, adapter.adapter_id, adapter.base_model_id)
            if model.lower() in self.directory.base_models() or model.lower() in self.base_names:
                return Target(model, None, model.lower())
            raise not_found
        for base_id, name in self.base_names.items():  # configured names: an adapter name never shadows them
            if model == name:
                return Target(model, None, base_id)
        adapter = self.registry.adapter_by_name(model)
        if adapter is not None and self._visible(adapter.name, key, private):
            return Target(model, adapter.adapter_id, adapter.base_model_id)
        raise not_found

    def base_model_object(self, base_id: str) -> dict:
        """A base model as an OpenAI model object: its configured name, else its id."""
        name = self.base_names.get(base_id, base_id)
        return {"id": name, "object": "model", "created": 0, "owned_by": "loramesh", "adapter_id": None,
                "base_model": {"id": base_id, "name": name}, "private": False,
                "price_per_1k_tokens_wei": wei(self.prices.base)}  # fmt: skip

    def list_models(self, key: KeyInfo, private: frozenset[str]) -> list[dict]:
        """OpenAI model objects: visible adapters (newest of each name), then the live base models (by their
        configured names; a base no --base names by its id)."""
        live = set(self.directory.base_models())
        out = []
        for a in self.registry.newest_adapters():
            if not self._visible(a.name, key, private):
                continue
            base_name = self.base_names.get(a.base_model_id) or (a.base_model_id if a.base_model_id in live else None)
            out.append({"id": a.name, "object": "model", "created": a.registered_block, "owned_by": a.owner,
                        "adapter_id": a.adapter_id, "version": a.version,
                        "base_model": {"id": a.base_model_id, "name": base_name},
                        "private": a.name in private,
                        "price_per_1k_tokens_wei": wei(self.prices.of(a.adapter_id))})  # fmt: skip
        bases = [self.base_model_object(b) for b in live]
        return out + sorted(bases, key=lambda m: m["id"])

    # ------------------------------------------------------------------ routing helpers

    def prefetch(self, adapter_id: str, route: Route) -> None:
        """Ask the adapter's owners that do not hold it resident to load it (at most once per TTL)."""
        now = time.monotonic()
        for node in route.nodes:
            if node.node_id not in route.owners or adapter_id in node.resident:
                continue
            asked = node.local.prefetched.get(adapter_id)
            if asked is not None and now - asked < self.settings.prefetch_ttl_s:
                continue
            node.local.prefetched[adapter_id] = now
            self.spawn(self._prefetch_one(node, adapter_id))

    async def _prefetch_one(self, node, adapter_id: str) -> None:
        if await self.nodes.load(node.api_url, node.node_id, adapter_id):
            node.local.saw_loaded(adapter_id)

    # ------------------------------------------------------------------ usage

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

    def _outbox_failed(self, e: Exception) -> None:
        if self.outbox_error is None:
            log.error("the outbox cannot be written; refusing new requests until it can: %s", e)
        self.outbox_error = str(e)[:500]
        self.metrics.outbox_writable.set(0)

    def _outbox_ok(self) -> None:
        if self.outbox_error is not None:
            log.warning("the outbox takes writes again; serving")
        self.outbox_error = None
        self.metrics.outbox_writable.set(1)

    def check_outbox(self) -> None:
        if self.outbox_error is not None:
            raise OutboxUnavailable(f"this gateway cannot record usage right now, so it serves nothing: "
                                    f"{self.outbox_error}", headers={"Retry-After": "5"})  # fmt: skip

    async def open_request(self, relay, node_id: str) -> None:
        """Record a request as open before it is dispatched; OutboxUnavailable (503) when that fails."""
        self.check_outbox()
        try:
            await asyncio.to_thread(self.recorder.open, request_id=relay.rid, model=relay.target.model,
                                    adapter_id=relay.target.adapter_id, node_id=node_id, key_id=relay.key_id,
                                    prompt_tokens=relay.prompt_tokens, max_tokens=relay.max_tokens)  # fmt: skip
        except UsageError as e:
            self._outbox_failed(e)
            self.check_outbox()

    async def move_request(self, request_id: str, node_id: str) -> None:
        try:
            await asyncio.to_thread(self.recorder.move, request_id, node_id)
        except UsageError as e:
            self._outbox_failed(e)
            self.check_outbox()

    async def record(self, end: RequestEnd) -> str:
        """Close a request (see UsageRecorder.record). When the outbox refuses, the end is kept and written
        once it takes writes again (its open row is in the database, so a crash meanwhile loses nothing)."""
        try:
            result = await asyncio.to_thread(self.recorder.record, end)
        except UsageError as e:
            if _integrity(e):
                log.error("%s", e)
                result = "db_error"
            else:
                self._outbox_failed(e)
                self.unwritten.append(end)
                self.metrics.outbox_unwritten.set(len(self.unwritten))
                result = "unwritten"
        self._after_record(end, result)
        return result

    def _after_record(self, end: RequestEnd, result: str) -> None:
        self.metrics.usage_records.labels(result).inc()
        if result == "disputed" and end.node_id is not None:
            self.directory.mark_disputed(end.node_id, end.disputed or "disputed")
            self.metrics.disputed_nodes.labels(end.node_id).set(1)

    async def outbox_tick(self) -> None:
        """Write this instance's heartbeat row (the outbox write check), then the ends it refused before."""
        try:
            await asyncio.to_thread(self.recorder.beat)
        except UsageError as e:
            self._outbox_failed(e)
            return
        self._outbox_ok()
        while self.unwritten:
            end = self.unwritten[0]
            try:
                result = await asyncio.to_thread(self.recorder.record, end)
            except UsageError as e:
                if not _integrity(e):
                    self._outbox_failed(e)
                    break
                log.error("%s", e)
                result = "db_error"
            self.unwritten.pop(0)
            self.metrics.outbox_unwritten.set(len(self.unwritten))
            self._after_record(end, result)

    async def outbox_loop(self) -> None:
        """The outbox check (this instance's heartbeat row) every outbox_probe_s. Nothing else runs in this
        loop: a late heartbeat lets sibling gateways take this one for dead and close its live requests."""
        while True:
            try:
                await self.outbox_tick()
            except Exception:  # nothing may end the checks
                log.exception("outbox check failed")
            await asyncio.sleep(self.settings.outbox_probe_s)

    async def reconcile_loop(self) -> None:
        """Close the open requests of dead instances (gateway.reconcile), a pass every 2 x outbox_probe_s
        while the outbox takes writes; each pass is bounded by reconcile_pass_s."""
        from gateway import reconcile

        while True:
            await asyncio.sleep(self.settings.outbox_probe_s * 2)
            if self.outbox_error is not None:
                continue
            try:
                await reconcile.reconcile(self)
            except Exception:  # nothing may end reconciliation
                log.exception("reconciliation pass failed")

    async def load_disputes(self) -> None:
        try:
            disputed = await asyncio.to_thread(self.recorder.disputed_nodes)
        except Exception as e:
            log.error("could not read disputed nodes: %s", e)
            return
        for node_id, reason in disputed.items():
            self.directory.mark_disputed(node_id, reason)
            self.metrics.disputed_nodes.labels(node_id).set(1)

    def health(self) -> dict:
        """What /health answers: outbox state, live and disputed nodes."""
        writable = self.outbox_error is None
        return {"status": "ok" if writable else "unavailable", "live_nodes": len(self.directory.live()),
                "outbox": {"writable": writable, "error": self.outbox_error, "unwritten": len(self.unwritten)},
                "disputed_nodes": [{"node_id": n, "reason": r} for n, r in sorted(self.directory.disputed.items())]}

    # ------------------------------------------------------------------ background tasks

    def spawn(self, coro: Coroutine) -> asyncio.Task:
        """Run `coro` on a task of its own that nobody cancels; the app waits for it on shutdown."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait for background tasks (usage records of aborted requests above all)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    async def sync_loop(self) -> None:
        """Refresh the registry mirror every registry_sync_s seconds."""
        while True:
            try:
                await asyncio.to_thread(self._sync)
            except Exception:  # a bad answer from the chain must not end the refreshes
                log.exception("registry sync failed")
            self.metrics.live_nodes.set(len(self.directory.live()))
            await asyncio.sleep(self.settings.registry_sync_s)

    def _sync(self) -> None:
        self.registry.sync()
        self.prices.reload()
        self.prices.refresh_base()

    async def aclose(self) -> None:
        await self.drain()
        await self.nodes.aclose()


def _integrity(e: UsageError) -> bool:
    """A write refused for what it holds (a duplicate request id, a value the outbox or a column refuses),
    not for the database's state: it is never taken for the database being down."""
    from sqlalchemy.exc import IntegrityError

    from gateway.usage import VALUE_ERRORS

    return isinstance(e.__cause__, (IntegrityError, *VALUE_ERRORS))
