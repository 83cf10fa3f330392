"""The gateway's books on the event loop: requests written open, moved and closed through the
UsageRecorder (gateway.usage) in worker threads, and the outbox's health. While the outbox cannot be
written the gateway serves nothing (OutboxUnavailable, 503); the ends it refused are kept and written
once it takes writes again."""

from __future__ import annotations

import asyncio
import logging
import weakref
from datetime import timedelta

from gateway.directory import NodeDirectory
from gateway.disputes import kept_out
from gateway.errors import OutboxUnavailable
from gateway.metrics import GatewayMetrics
from gateway.router import Target
from gateway.usage import PRUNE_CHUNK, VALUE_ERRORS, RequestEnd, UsageError, UsageRecorder
from ledger.models import utcnow

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 3600.0  # seconds between passes over the request log (one at start)


def _integrity(e: UsageError) -> bool:
    """A write refused for what it holds (a duplicate request id, a value the outbox or a column refuses),
    not for the database's state: it is never taken for the database being down."""
    from sqlalchemy.exc import IntegrityError

    return isinstance(e.__cause__, (IntegrityError, *VALUE_ERRORS))


class UsageBook:
    """Open, move and close requests; watch the outbox (this instance's heartbeat row)."""

    def __init__(
        self, recorder: UsageRecorder, directory: NodeDirectory, metrics: GatewayMetrics, *, probe_s: float
    ) -> None:
        self.recorder, self.directory, self.metrics, self.probe_s = recorder, directory, metrics, probe_s
        # None while the outbox takes writes; otherwise why not (new requests get 503 until a write succeeds)
        self.outbox_error: str | None = None
        self.unwritten: list[RequestEnd] = []  # request ends the outbox refused, written when it takes writes
        # request id -> the object serving it, held weakly: a request whose object is gone (or never had
        # one here) and whose end was not written, nor waits in `unwritten`, lost its end to a bug, and
        # reconciliation closes its open row once overdue (gateway.reconcile)
        self._serving: weakref.WeakValueDictionary[str, object] = weakref.WeakValueDictionary()
        self._disputes_unread = False  # the last read of the disputed nodes failed (logged once)

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
            raise OutboxUnavailable(
                f"this gateway cannot record usage right now, so it serves nothing: {self.outbox_error}",
                headers={"Retry-After": "5"},
            )

    async def open_request(
        self,
        request_id: str,
        target: Target,
        node_id: str,
        *,
        key_id: int | None,
        prompt_tokens: int,
        max_tokens: int,
        quote: dict[str, int],
        owner: object,
        reserved_tokens: int = 0,
    ) -> None:
        """Record a request as open before it is dispatched; OutboxUnavailable (503) when that fails. `owner`
        (the object serving it) holds the request while it lives (`holding`)."""
        self.check_outbox()
        self._serving[request_id] = owner
        try:
            await asyncio.to_thread(
                self.recorder.open,
                request_id=request_id,
                model=target.model,
                adapter_id=target.adapter_id,
                node_id=node_id,
                key_id=key_id,
                prompt_tokens=prompt_tokens,
                max_tokens=max_tokens,
                quote=quote,
                reserved_tokens=reserved_tokens,
            )
        except UsageError as e:
            self._outbox_failed(e)
            self.check_outbox()

    def holding(self) -> frozenset[str]:
        """The requests this process still serves or has an end to write for."""
        return frozenset(self._serving.keys()) | {e.request_id for e in self.unwritten}

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
        """The outbox check (this instance's heartbeat row) every probe_s. Nothing else runs in this loop: a
        late heartbeat lets sibling gateways take this one for dead and close its live requests."""
        while True:
            try:
                await self.outbox_tick()
            except Exception:  # nothing may end the checks
                log.exception("outbox check failed")
            await asyncio.sleep(self.probe_s)

    async def prune_loop(self, days: float) -> None:
        """Delete the request log's rows of closed requests made more than `days` ago: a pass at start and
        every PRUNE_EVERY_S, one bounded transaction at a time, each in a worker thread."""
        while True:
            n = 0
            try:
                before = utcnow() - timedelta(days=days)
                while (k := await asyncio.to_thread(self.recorder.prune, before)) > 0:
                    n += k
                    if k < PRUNE_CHUNK:
                        break
            except UsageError as e:  # the database is down: the outbox check says so; the next pass tries again
                log.warning("%s", e)
            except Exception:  # nothing may end the pruning
                log.exception("request log pruning failed")
            if n:
                log.info("request log: deleted the rows of %d requests made more than %g days ago", n, days)
            await asyncio.sleep(PRUNE_EVERY_S)

    async def sync_disputes(self) -> None:
        """Follow the database's disputed nodes (gateway.disputes): those any gateway on it disputed are kept
        out here too; those their operator readmitted are routed to again. At start and every registry_sync_s."""
        read_from = self.directory.clock()
        try:
            disputed = await asyncio.to_thread(kept_out, self.recorder.engine)
        except Exception as e:  # the database is down: the outbox check says so; this says it once
            if not self._disputes_unread:
                log.error("could not read disputed nodes (keeping those known): %s", e)
            self._disputes_unread = True
            return
        self._disputes_unread = False
        for node_id in self.directory.sync_disputed(disputed, read_from):
            self.metrics.disputed_nodes.remove(node_id)
        for node_id in disputed:
            self.metrics.disputed_nodes.labels(node_id).set(1)
