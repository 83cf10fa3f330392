"""One request's trip through the network: route, fail over before the first token, relay tokens (and
count them: the gateway bills what it delivered, the tokens it relayed before the client left or the
node's stream broke), then abort if needed and record the end with the node's receipt."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from gateway.directory import NodeEntry
from gateway.errors import BadRequest, GatewayError, NoNodeAvailable, OutboxUnavailable
from gateway.models import RequestStatus
from gateway.node_client import NodeRejected, NodeUnavailable, UpstreamStream
from gateway.usage import RequestEnd

log = logging.getLogger(__name__)

# after aborting a request, how long the gateway reads the node's stream on to its done event (for the
# receipt it carries; the tokens read meanwhile reach nobody and are not paid) before it settles for the
# abort's own receipt
ABORT_DRAIN_TIMEOUT_S = 5.0
# events other than tokens a node may send in one request (a real node sends an error and a done event at
# most): a node that sends more is cut off, so it cannot hold a request open with events that never end
MAX_OTHER_EVENTS = 64
_READ_ERRORS = (StopAsyncIteration, httpx.HTTPError, ValueError, RuntimeError)


class DeadlinePassed(Exception):
    """The request ran past its deadline (settings.request_deadline_s after dispatch)."""


async def _written(opening: asyncio.Future) -> bool:
    """Whether the open record was written (waits for the write; the waiter's cancellation leaves it be)."""
    try:
        await asyncio.shield(opening)
    except GatewayError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Target:
    """What a request's `model` resolved to."""

    model: str
    adapter_id: str | None  # None: the bare base model
    base_model_id: str


class Relay:
    """Lifecycle: `await start()` (records the request as open, then raises before anything was sent to the
    client), iterate `tokens()`, then `await finish()` (idempotent; also the path for a client that went
    away). `usage` is the gateway's own count: the prompt ids it sent, the token events it relayed."""

    def __init__(self, gw, target: Target, *, request_id: str, node_body: dict, key_id: int | None, endpoint: str,
                 prompt_tokens: int, max_tokens: int, context_len: int | None = None) -> None:  # fmt: skip
        self.gw, self.target, self.rid, self.body = gw, target, request_id, node_body
        self.key_id, self.endpoint = key_id, endpoint
        self.prompt_tokens, self.max_tokens, self.context_len = prompt_tokens, max_tokens, context_len
        # the most tokens this request can produce: max_tokens, and what the context leaves after the prompt
        self.limit = max_tokens if context_len is None else max(0, min(max_tokens, context_len - prompt_tokens))
        self.node: NodeEntry | None = None
        self.up: UpstreamStream | None = None
        self._it: AsyncIterator[dict] | None = None
        self._first: dict | None = None
        self._next: asyncio.Future | None = None  # the read in progress (it survives a cancelled reader)
        self.stream_ok = True  # the node's stream can still be read
        self.attempts = 0
        self.started = time.monotonic()
        self.deadline = self.started + gw.settings.request_deadline_s
        self.ttft: float | None = None
        self.n_tokens = 0  # token events relayed to the client, up to `limit`: what is billed
        self.overrun = 0  # token events past `limit` (not relayed, not counted)
        self.drained = 0  # token events read after the abort: they reached nobody (logged, not billed)
        self.other_events = 0  # events that are not tokens (at most MAX_OTHER_EVENTS)
        self.text: list[str] = []
        self.done: dict | None = None  # the node's done event
        self.engine_error: str | None = None
        self.failure: str | None = None  # the node broke off after the first token
        self.aborted = False
        self.node_lost = False
        self.finished = False
        self.result: str | None = None
        # the client gets the text only once the request ended well (a non-streaming answer): set by the caller
        self.buffered = False

    # ------------------------------------------------------------------ before the first token

    async def start(self) -> None:
        gw, t = self.gw, self.target
        route = gw.router.route(t.adapter_id, gw.directory.live(t.base_model_id))
        if route is None:
            raise NoNodeAvailable(f"no live node serves the base model of {t.model!r} right now; retry later")
        gw.check_outbox()
        # the open record is written while the first node starts on the request (its write is off the
        # time to first token), and nothing reaches the client before it is written: whatever the client
        # is served, a record of it exists
        opening = asyncio.ensure_future(gw.open_request(self, route.nodes[0].node_id))
        try:
            await self._start(route, opening)
        except BaseException as e:  # no node took it: close the open record (cancelled too: the client left)
            if await _written(opening):
                error = e.message if isinstance(e, GatewayError) else f"{type(e).__name__}: {e}"
                self.gw.spawn(self.gw.record(self._end(RequestStatus.NOT_SERVED, served=False, error=error[:500])))
            raise
        if not await _written(opening):  # the outbox refused the record: the node's work goes unserved
            await self._release()
            gw.check_outbox()
            raise OutboxUnavailable("this gateway cannot record usage right now, so it serves nothing")

    async def _release(self) -> None:
        """Give up a request a node has started on (before anything reached the client)."""
        node, up = self.node, self.up
        self.node = None
        if node is None:
            return
        node.local.inflight = max(0, node.local.inflight - 1)
        self.gw.spawn(self.gw.nodes.abort(node.api_url, node.node_id, self.rid))
        if self._next is not None:
            self._next.cancel()
        try:
            await up.aclose()
        except (httpx.HTTPError, RuntimeError):
            pass

    async def _start(self, route, opening: asyncio.Future) -> None:
        gw, t = self.gw, self.target
        gw.metrics.routing.labels(route.decision).inc()
        if t.adapter_id is not None:
            gw.prefetch(t.adapter_id, route)
        errors = []
        for i, node in enumerate(route.nodes[: gw.settings.max_attempts]):
            if i:
                await opening  # the record is written before it is moved (OutboxUnavailable if it was not)
                await gw.move_request(self.rid, node.node_id)
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
            up = await self.gw.nodes.open_stream(node.api_url, node.node_id, self.body | {"request_id": self.rid})
        except NodeRejected as e:
            node.local.inflight -= 1
            param = "prompt" if e.code == "context_length_exceeded" else None
            raise BadRequest(str(e), code=e.code, param=param) from e
        except NodeUnavailable as e:
            node.local.inflight -= 1
            errors.append(str(e))
            if e.dead:
                self.gw.directory.mark_failed(node.node_id)
            if e.maybe_running:  # a hung node may wake up and run it: tell it not to (the request moved on)
                self.gw.spawn(self.gw.nodes.abort(node.api_url, node.node_id, self.rid))
            return False
        it = up.events().__aiter__()
        try:
            first = await it.__anext__()
            if first.get("type") == "error":  # the engine failed before any token: read on to done, bounded
                msg = first.get("message")
                await self._error_end(it, node)
                raise NodeUnavailable(f"node {node.node_id[:10]} failed before the first token: {msg}")
        except (NodeUnavailable, StopAsyncIteration, httpx.HTTPError, ValueError) as e:
            await up.aclose()
            node.local.inflight -= 1
            errors.append(str(e) or f"node {node.node_id[:10]} closed the stream")
            if not isinstance(e, NodeUnavailable) or e.dead:
                self.gw.directory.mark_failed(node.node_id)
            return False
        if self.target.adapter_id is not None:
            node.local.saw_loaded(self.target.adapter_id)
        self.node, self.up, self._it, self._first = node, up, it, first
        return True

    @staticmethod
    async def _error_end(it: AsyncIterator[dict], node: NodeEntry) -> None:
        """After an error event before the first token: read on to the done event, at most MAX_OTHER_EVENTS
        events within ABORT_DRAIN_TIMEOUT_S (NodeUnavailable, the node marked failed, past either)."""
        try:
            async with asyncio.timeout(ABORT_DRAIN_TIMEOUT_S):
                for _ in range(MAX_OTHER_EVENTS):
                    if (await it.__anext__()).get("type") == "done":
                        return
        except TimeoutError:
            pass
        raise NodeUnavailable(f"node {node.node_id[:10]} failed before the first token and did not end its "
                              f"stream (at most {MAX_OTHER_EVENTS} events in {ABORT_DRAIN_TIMEOUT_S:.0f} s)",
                              dead=True)  # fmt: skip

    # ------------------------------------------------------------------ relaying

    async def _read(self, *, deadline: bool = True) -> dict:
        """The node's next event. The read runs on a future of its own, so a reader cancelled mid-read (the
        client went away), or one past the request's deadline (DeadlinePassed), leaves it to `finish`, which
        reads on to the done event."""
        if self._next is None:
            self._next = asyncio.ensure_future(self._it.__anext__())
        left = self.deadline - time.monotonic() if deadline else None
        try:
            if left is not None and left < self.gw.settings.node_timeout_s:
                # (further off, the node client's read timeout ends a read first: no timer per token)
                async with asyncio.timeout(max(0.0, left)):
                    await asyncio.shield(self._next)
            else:
                await asyncio.shield(self._next)
        except asyncio.CancelledError:
            raise  # the read stays in _next, also when it completed at this very moment: its event is not lost
        except TimeoutError:
            if not self._next.done():
                raise DeadlinePassed() from None  # the read stays in _next
            # it completed as the deadline passed: its outcome is taken as usual
        except BaseException:
            self._next = None
            raise
        done, self._next = self._next, None
        return done.result()

    def _count(self, ev: dict) -> str | None:
        """Count one token event as relayed; its text (None past the limit: not relayed, not counted)."""
        if self.n_tokens >= self.limit:
            self.overrun += 1
            return None
        self.n_tokens += 1
        text = ev.get("text")
        text = text if isinstance(text, str) else ""
        self.text.append(text)
        return text

    async def tokens(self) -> AsyncIterator[str]:
        """Token texts as the node streams them, at most `limit`; afterwards `done` or `failure` says how it
        ended (neither: the node went past the limit, and `finish` aborts it)."""
        ev, self._first = self._first, None
        while True:
            kind = ev.get("type")
            if kind == "token":
                if self.ttft is None:
                    self.ttft = time.monotonic() - self.started
                text = self._count(ev)
                if text is None:  # more tokens than the request allows: stop relaying, finish() aborts
                    log.warning("node %s streamed past the %d tokens request %s allows", self.node.node_id[:10],
                                self.limit, self.rid[:10])  # fmt: skip
                    return
                yield text
            elif kind == "done":
                self.done = ev
                if self.engine_error:
                    self.failure = f"the node's engine failed after {self.n_tokens} tokens: {self.engine_error}"
                return
            else:
                if kind == "error":
                    self.engine_error = str(ev.get("message") or "engine error")[:500]
                self.other_events += 1
                if self.other_events > MAX_OTHER_EVENTS:  # a node that never ends its stream: cut it off
                    self.failure = (f"node {self.node.node_id[:10]} sent more than {MAX_OTHER_EVENTS} events "
                                    f"that are not tokens after {self.n_tokens} tokens")  # fmt: skip
                    self.gw.directory.mark_failed(self.node.node_id)
                    return
            try:
                ev = await self._read()
            except DeadlinePassed:
                self.failure = (f"node {self.node.node_id[:10]} did not finish within "
                                f"{self.gw.settings.request_deadline_s:.0f} s ({self.n_tokens} tokens)")  # fmt: skip
                return
            except StopAsyncIteration:
                self.stream_ok = False
                self.failure = f"node {self.node.node_id[:10]} closed the stream after {self.n_tokens} tokens"
                return
            except (httpx.HTTPError, ValueError, RuntimeError) as e:
                self.stream_ok = False
                self.failure = f"node {self.node.node_id[:10]} failed after {self.n_tokens} tokens: {e!r}"
                return

    @property
    def usage(self) -> tuple[int, int]:
        """(prompt, completion) tokens as the gateway counted them, sent and relayed: what the client is
        shown and billed."""
        return self.prompt_tokens, self.n_tokens

    @property
    def finish_reason(self) -> str | None:
        if self.done:
            return self.done.get("finish_reason")
        return "length" if self.overrun else None

    # ------------------------------------------------------------------ the end

    async def _drain(self) -> None:
        """After an abort: read the node's stream on to its done event, for the receipt it carries (and so
        that the connection can be reused). The tokens read meanwhile reached nobody: they are counted in
        `drained`, not billed. Bounded in time and in events."""
        try:
            async with asyncio.timeout(ABORT_DRAIN_TIMEOUT_S):
                for _ in range(self.limit + MAX_OTHER_EVENTS + 1):
                    ev = await self._read(deadline=False)
                    if ev.get("type") == "token":
                        self.drained += 1
                    elif ev.get("type") == "done":
                        self.done = ev
                        return
            self.stream_ok = False  # more events than the request can have: it is not read further
        except (TimeoutError, *_READ_ERRORS):
            self.stream_ok = False

    def _end(self, status: str, *, served: bool = True, error: str | None = None, **kw) -> RequestEnd:
        prompt, completion = self.usage
        return RequestEnd(request_id=self.rid, model=self.target.model, adapter_id=self.target.adapter_id,
                          node_id=self.node.node_id if self.node else None, status=status, key_id=self.key_id,
                          prompt_tokens=prompt, completion_tokens=completion, attempts=max(1, self.attempts),
                          max_tokens=self.max_tokens, context_len=self.context_len, served=served, error=error,
                          **kw)  # fmt: skip

    async def finish(self, *, client_gone: bool = False) -> str:
        """Get the receipt (aborting the request when it did not end on its own), record, release."""
        if self.finished or self.node is None:
            return self.result or "none"
        self.finished = True
        gw, node = self.gw, self.node
        receipt = signature = None
        if self.done is not None:
            status = RequestStatus.NODE_FAILED if self.failure else RequestStatus.OK
        else:
            self.aborted = True
            got = await gw.nodes.abort(node.api_url, node.node_id, self.rid)
            if self.stream_ok:
                await self._drain()
            if self.done is None and got is not None:
                receipt, signature = got.get("receipt"), got.get("signature")
            if self.overrun and not client_gone:
                status = RequestStatus.OK
            else:
                status = RequestStatus.CLIENT_CLOSED if client_gone else RequestStatus.NODE_FAILED
            if self.done is None and got is None:
                self.node_lost = True  # no receipt will come: the tokens relayed are billed at our count
                if not client_gone:
                    gw.directory.mark_failed(node.node_id)
        if self.done is not None:
            receipt, signature = self.done.get("receipt"), self.done.get("signature")
        try:
            await self.up.aclose(drain=self.done is not None)  # a finished stream keeps its connection
        except (httpx.HTTPError, RuntimeError):
            pass
        node.local.inflight = max(0, node.local.inflight - 1)
        if self.drained:
            log.info("request %s: %d token(s) read from node %s after the abort reached nobody (not billed)",
                     self.rid[:10], self.drained, node.node_id[:10])  # fmt: skip
        latency = time.monotonic() - self.started
        reason = "abort" if client_gone else self.finish_reason
        end = self._end(status, finish_reason=reason if isinstance(reason, str) else None, receipt=receipt,
                        signature=signature, ttft_ms=None if self.ttft is None else self.ttft * 1000,
                        latency_ms=latency * 1000, error=self.failure, aborted=self.aborted,
                        node_lost=self.node_lost,
                        withheld=self.buffered and bool(self.failure or client_gone))  # fmt: skip
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
