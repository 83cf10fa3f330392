"""The gateway's service object: every part wired together, used by the HTTP layer (app.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine

from sqlalchemy.engine import Engine

from gateway.chat import ChatTemplates
from gateway.directory import NodeDirectory
from gateway.errors import AuthError, ModelNotFound
from gateway.keys import KeyCache, KeyInfo
from gateway.metrics import GatewayMetrics
from gateway.node_client import NodeClient
from gateway.ratelimit import RateLimiter
from gateway.registry import RegistryView
from gateway.relay import Target
from gateway.router import Route, Router
from gateway.settings import GatewaySettings
from gateway.usage import RequestEnd, UsageError, UsageRecorder
from node.canonical import is_id

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
        self.nodes = NodeClient(connect_timeout=settings.connect_timeout_s, read_timeout=settings.node_timeout_s)
        self.recorder = UsageRecorder(engine, self.directory.public_key)
        self.metrics = GatewayMetrics()
        self.limiter = RateLimiter()
        self.templates = ChatTemplates(settings.bases)
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

    # ------------------------------------------------------------------ models

    def _visible(self, name: str, key: KeyInfo, private: frozenset[str]) -> bool:
        return name not in private or name in key.adapters

    def resolve(self, model: str, key: KeyInfo, private: frozenset[str]) -> Target:
        """An adapter name (its newest registration), an adapter id, or a base model's name."""
        adapter = self.registry.adapter_by_name(model)
        if adapter is None and is_id(model):
            adapter = self.registry.adapters.get(model)
        if adapter is not None and self._visible(adapter.name, key, private):
            return Target(model, adapter.adapter_id, adapter.base_model_id)
        for base_id, name in self.directory.base_models().items():
            if model in (name, base_id):
                return Target(model, None, base_id)
        raise ModelNotFound(f"The model '{model}' does not exist or you do not have access to it.", param="model")

    def list_models(self, key: KeyInfo, private: frozenset[str]) -> list[dict]:
        """OpenAI model objects: visible adapters (newest of each name), then the live base models."""
        bases = self.directory.base_models()
        out = []
        for a in self.registry.newest_adapters():
            if not self._visible(a.name, key, private):
                continue
            out.append({"id": a.name, "object": "model", "created": a.registered_block, "owned_by": a.owner,
                        "adapter_id": a.adapter_id, "version": a.version,
                        "base_model": {"id": a.base_model_id, "name": bases.get(a.base_model_id)},
                        "private": a.name in private})  # fmt: skip
        for base_id, name in sorted(bases.items(), key=lambda kv: kv[1]):
            out.append({"id": name, "object": "model", "created": 0, "owned_by": "loramesh", "adapter_id": None,
                        "base_model": {"id": base_id, "name": name}, "private": False})  # fmt: skip
        return out

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
        if await self.nodes.load(node.api_url, adapter_id):
            node.local.saw_loaded(adapter_id)

    # ------------------------------------------------------------------ usage

    async def record(self, end: RequestEnd) -> str:
        try:
            result = await asyncio.to_thread(self.recorder.record, end)
        except UsageError as e:
            log.error("%s", e)
            result = "db_error"
        self.metrics.usage_records.labels(result).inc()
        return result

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
                await asyncio.to_thread(self.registry.sync)
            except Exception:  # a bad answer from the chain must not end the refreshes
                log.exception("registry sync failed")
            self.metrics.live_nodes.set(len(self.directory.live()))
            await asyncio.sleep(self.settings.registry_sync_s)

    async def aclose(self) -> None:
        await self.drain()
        await self.nodes.aclose()
