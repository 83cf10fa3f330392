"""The requests this node took and the receipts it keeps: one object owns a request's life on the node, from
the moment its id is taken (before the node waits for its adapter) to its signed receipt."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.adapters.ensemble import ensemble_key
from node.api.errors import ApiError
from node.engine import AsyncEngine, FinishEvent
from node.receipts import make_receipt, sign_receipt

RECENT_RECEIPTS = 16384  # signed receipts kept for GET /v1/requests/{id}/receipt (about 600 bytes each)


class RequestBook:
    """Request ids taken, who started them, and the last `recent` signed receipts."""

    def __init__(
        self, engine: AsyncEngine, node_key: Ed25519PrivateKey, node_id: str, *, recent: int = RECENT_RECEIPTS
    ) -> None:
        self.engine, self.node_key, self.node_id, self.recent = engine, node_key, node_id, recent
        # distinct ensembles running at once, at most the engine's share for them (a client could otherwise weigh
        # one anew with each of many concurrent requests: each weighting is combined on the one loader thread,
        # and those past the host cache's share are combined again before they run)
        self.max_ensembles = engine.max_ensembles
        self._live_ensembles: Counter[str] = Counter()  # ensemble id -> requests of it running here
        self._ensemble_of: dict[str, str] = {}  # running request id -> its ensemble's id
        self.receipts: OrderedDict[str, dict] = OrderedDict()  # request id -> {"receipt", "signature"}, newest last
        self.running: set[str] = set()  # request ids taken here whose receipt is not stored yet
        self.started_by: dict[str, str] = {}  # request id -> gateway key, while running or its receipt is kept
        # request id -> its ensemble's (adapter id, weight) pairs, while running or its receipt is kept
        self.ensembles: dict[str, tuple[tuple[str, float], ...]] = {}
        self.cold: dict[str, str] = {}  # request id -> adapter id: streams answered while their adapter is prepared
        self._tasks: set[asyncio.Task] = set()  # clean-ups spawned from responses that never started
        self.signed_count = 0  # receipts signed since start (the node's metrics)

    def known(self, rid: str) -> bool:
        """Whether this node runs the request or holds its receipt (a second request with its id is a duplicate)."""
        return rid in self.running or rid in self.receipts

    def take(self, rid: str, gateway: str, ensemble: tuple[tuple[str, float], ...] | None = None) -> None:
        """Take a request id for `gateway`: from here on a second request with it is a duplicate. A request for an
        ensemble not running here while `max_ensembles` others are is refused as busy (503: the gateway tries
        another node)."""
        if ensemble is not None:
            key = ensemble_key(ensemble)
            if key not in self._live_ensembles and len(self._live_ensembles) >= self.max_ensembles:
                raise ApiError(
                    503,
                    f"this node runs {self.max_ensembles} adapter ensembles (weightings) at once, all taken; "
                    "try again when one ends",
                    "slots_busy",
                )
            self._live_ensembles[key] += 1
            self._ensemble_of[rid] = key
            self.ensembles[rid] = ensemble
        self.running.add(rid)
        self.started_by[rid] = gateway

    def _end(self, rid: str) -> None:
        """The request no longer runs here (its receipt is kept, or it was refused)."""
        self.running.discard(rid)
        key = self._ensemble_of.pop(rid, None)
        if key is not None:
            self._live_ensembles[key] -= 1
            if not self._live_ensembles[key]:
                del self._live_ensembles[key]

    def release(self, rid: str) -> None:
        """Give back an id whose request was refused (or whose client left) before the engine saw it."""
        self._end(rid)
        self.started_by.pop(rid, None)
        self.ensembles.pop(rid, None)

    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def signed(self, ev: FinishEvent) -> dict:
        """The signed receipt of a finished request, kept for GET /v1/requests/{id}/receipt."""
        kept = self.receipts.get(ev.request_id)
        if kept is not None and kept["receipt"]["finished_at"] == ev.finished_at:
            return kept
        reason = ev.finish_reason if ev.finish_reason in ("stop", "length") else "abort"
        receipt = make_receipt(
            request_id=ev.request_id,
            adapter_id=ev.adapter_id,
            node_id=self.node_id,
            prompt_tokens=ev.prompt_tokens,
            completion_tokens=ev.completion_tokens,
            finish_reason=reason,
            started_at=ev.started_at,
            finished_at=ev.finished_at,
            ensemble=self.ensembles.get(ev.request_id),
        )
        out = {"receipt": receipt, "signature": sign_receipt(receipt, self.node_key)}
        self.signed_count += 1
        self.receipts[ev.request_id] = out
        self.receipts.move_to_end(ev.request_id)
        while len(self.receipts) > self.recent:
            old, _ = self.receipts.popitem(last=False)
            self.started_by.pop(old, None)
            self.ensembles.pop(old, None)
        self._end(ev.request_id)
        return out

    def unserved(self, rid: str, adapter_id: str | None, started_at: int) -> dict:
        """The signed receipt of a request that ended before the engine saw it: nothing was produced."""
        return self.signed(
            FinishEvent(rid, adapter_id, "abort", 0, 0, started_at, max(started_at, int(time.time() * 1000)))
        )

    async def abort_and_keep(self, stream) -> None:
        """Abort a request whose client went away and keep its receipt (shielded: it runs to its end)."""

        async def go() -> None:
            try:
                ev = await self.engine.abort(stream.request_id)
                if ev is not None:
                    self.signed(ev)
            finally:
                self._end(stream.request_id)

        try:
            await asyncio.shield(go())
        except asyncio.CancelledError:
            pass
