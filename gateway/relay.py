"""One request's trip through the network: route, fail over before the first token, relay tokens,
then abort if needed and record the end with the node's receipt."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from gateway.directory import NodeEntry
from gateway.errors import BadRequest, NoNodeAvailable
from gateway.models import RequestStatus
from gateway.node_client import NodeRejected, NodeUnavailable, UpstreamStream
from gateway.usage import RequestEnd

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Target:
    """What a request's `model` resolved to."""

    model: str
    adapter_id: str | None  # None: the bare base model
    base_model_id: str


class Relay:
    """Lifecycle: `await start()` (raises before anything was sent to the client), iterate `tokens()`,
    then `await finish()` (idempotent; also the path for a client that went away)."""

    def __init__(self, gw, target: Target, *, request_id: str, node_body: dict, key_id: int | None,
                 endpoint: str) -> None:  # fmt: skip
        self.gw, self.target, self.rid, self.body = gw, target, request_id, node_body
        self.key_id, self.endpoint = key_id, endpoint
        self.node: NodeEntry | None = None
        self.up: UpstreamStream | None = None
        self._it: AsyncIterator[dict] | None = None
        self._first: dict | None = None
        self.attempts = 0
        self.started = time.monotonic()
        self.ttft: float | None = None
        self.n_tokens = 0
        self.text: list[str] = []
        self.done: dict | None = None  # the node's done event
        self.engine_error: str | None = None
        self.failure: str | None = None  # the node broke off after the first token
        self.finished = False
        self.result: str | None = None

    # ------------------------------------------------------------------ before the first token

    async def start(self) -> None:
        gw, t = self.gw, self.target
        route = gw.router.route(t.adapter_id, gw.directory.live(t.base_model_id))
        if route is None:
            raise NoNodeAvailable(f"no live node serves the base model of {t.model!r} right now; retry later")
        gw.metrics.routing.labels(route.decision).inc()
        if t.adapter_id is not None:
            gw.prefetch(t.adapter_id, route)
        errors = []
        for node in route.nodes[: gw.settings.max_attempts]:
            self.attempts += 1
            hit = t.adapter_id is not None and t.adapter_id in node.resident  # before this request loads it
            if await self._try(node, errors):
                if t.adapter_id is not None:
                    gw.metrics.residency.labels(t.model, "hit" if hit else "miss").inc()
                return
            gw.metrics.failovers.inc()
        raise NoNodeAvailable(f"{len(errors)} node(s) failed before the first token: {'; '.join(errors)}")

    async def _try(self, node: NodeEntry, errors: list[str]) -> bool:
        node.local.inflight += 1
        try:
            up = await self.gw.nodes.open_stream(node.api_url, self.body | {"request_id": self.rid})
        except NodeRejected as e:
            node.local.inflight -= 1
            param = "prompt" if e.code == "context_length_exceeded" else None
            raise BadRequest(str(e), code=e.code, param=param) from e
        except NodeUnavailable as e:
            node.local.inflight -= 1
            errors.append(str(e))
            if e.dead:
                self.gw.directory.mark_failed(node.node_id)
            return False
        it = up.events().__aiter__()
        try:
            first = await it.__anext__()
            while first.get("type") == "error":  # the engine failed before any token: drain to done
                msg = first.get("message")
                while first.get("type") != "done":
                    first = await it.__anext__()
                raise NodeUnavailable(f"node {node.node_id[:10]} failed before the first token: {msg}")
        except (NodeUnavailable, StopAsyncIteration, httpx.HTTPError, ValueError) as e:
            await up.aclose()
            node.local.inflight -= 1
            errors.append(str(e) or f"node {node.node_id[:10]} closed the stream")
            if not isinstance(e, NodeUnavailable):
                self.gw.directory.mark_failed(node.node_id)
            return False
        if self.target.adapter_id is not None:
            node.local.saw_loaded(self.target.adapter_id)
        self.node, self.up, self._it, self._first = node, up, it, first
        return True

    # ------------------------------------------------------------------ relaying

    async def tokens(self) -> AsyncIterator[str]:
        """Token texts as the node streams them; afterwards `done` or `failure` says how it ended."""
        ev = self._first
        while True:
            kind = ev.get("type")
            if kind == "token":
                if self.ttft is None:
                    self.ttft = time.monotonic() - self.started
                self.n_tokens += 1
                text = ev.get("text") or ""
                self.text.append(text)
                yield text
            elif kind == "error":
                self.engine_error = str(ev.get("message") or "engine error")
            elif kind == "done":
                self.done = ev
                if self.engine_error:
                    self.failure = f"the node's engine failed after {self.n_tokens} tokens: {self.engine_error}"
                return
            try:
                ev = await self._it.__anext__()
            except StopAsyncIteration:
                self.failure = f"node {self.node.node_id[:10]} closed the stream after {self.n_tokens} tokens"
                return
            except (httpx.HTTPError, ValueError) as e:
                self.failure = f"node {self.node.node_id[:10]} failed after {self.n_tokens} tokens: {e!r}"
                return

    @property
    def usage(self) -> tuple[int, int]:
        """(prompt, completion) tokens as the node reported them (its receipt decides what is recorded)."""
        if self.done and isinstance(self.done.get("usage"), dict):
            u = self.done["usage"]
            return int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", self.n_tokens))
        return 0, self.n_tokens

    @property
    def finish_reason(self) -> str | None:
        return self.done.get("finish_reason") if self.done else None

    # ------------------------------------------------------------------ the end

    async def finish(self, *, client_gone: bool = False) -> str:
        """Get the receipt (aborting the request when it did not end on its own), record, release."""
        if self.finished or self.node is None:
            return self.result or "none"
        self.finished = True
        gw, node = self.gw, self.node
        receipt = signature = None
        if self.done is not None:
            receipt, signature = self.done.get("receipt"), self.done.get("signature")
            status = RequestStatus.NODE_FAILED if self.failure else RequestStatus.OK
        else:
            got = await gw.nodes.abort(node.api_url, self.rid)
            if got is not None:
                receipt, signature = got.get("receipt"), got.get("signature")
            status = RequestStatus.CLIENT_CLOSED if client_gone else RequestStatus.NODE_FAILED
            if self.failure and not client_gone and got is None:
                gw.directory.mark_failed(node.node_id)
        try:
            await self.up.aclose(drain=self.done is not None)  # a finished stream keeps its connection
        except (httpx.HTTPError, RuntimeError):
            pass
        node.local.inflight = max(0, node.local.inflight - 1)
        prompt, completion = self.usage
        if receipt is not None and isinstance(receipt, dict):
            prompt = receipt.get("prompt_tokens", prompt)
        latency = time.monotonic() - self.started
        end = RequestEnd(request_id=self.rid, model=self.target.model, adapter_id=self.target.adapter_id,
                         node_id=node.node_id, status=status, key_id=self.key_id,
                         finish_reason="abort" if client_gone else self.finish_reason, receipt=receipt,
                         signature=signature, prompt_tokens=prompt if isinstance(prompt, int) else 0,
                         completion_tokens=completion, attempts=self.attempts,
                         ttft_ms=None if self.ttft is None else self.ttft * 1000, latency_ms=latency * 1000,
                         error=self.failure)  # fmt: skip
        self.result = await gw.record(end)
        m = gw.metrics
        m.requests.labels(self.target.model, status).inc()
        m.latency.labels(self.endpoint).observe(latency)
        if self.ttft is not None:
            m.ttft.labels(self.endpoint).observe(self.ttft)
        m.tokens.labels(self.target.model, "prompt").inc(end.prompt_tokens)
        m.tokens.labels(self.target.model, "completion").inc(end.completion_tokens)
        if self.key_id is not None:
            gw.charge_tokens(self.key_id, end.prompt_tokens + end.completion_tokens)
        return self.result

    def finish_detached(self, *, client_gone: bool) -> None:
        """Finish on a task of its own: the caller is being cancelled (the client went away)."""
        if not self.finished and self.node is not None:
            self.gw.spawn(self.finish(client_gone=client_gone))
