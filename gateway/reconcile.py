"""Closing the open requests of a gateway that died mid-request (kill -9, power loss), from the receipts the
nodes keep (node API: GET /v1/requests/{request_id}/receipt).

The dead gateway's own completion count is gone; what is billed is the receipt's completion count capped at
the request's max_tokens (and the context), with the prompt count the gateway stored when it dispatched the
request. A receipt over those bounds, or with another prompt count, is disputed as usual. A node that does
not know the request (it never got it, or restarted and lost its receipts) or stays unreachable for
reconcile_give_up_s leaves it closed as "lost", with nothing billed; so does one the node still says is
running after that long.

A pass runs on a task of its own (Gateway.reconcile_loop), never in the loop that writes the instance
heartbeat: slow nodes cannot make sibling gateways think this one dead. It asks the nodes in parallel
(RECONCILE_CONCURRENCY at a time) and stops after reconcile_pass_s; requests it could not close yet go to
the back of the queue (UsageRecorder.tried), so they do not hold back the ones after them. A request is
closed only while it is open: a sibling that closed it first, or its own gateway that was alive after
all, wins, and this pass writes nothing for it."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC
from typing import TYPE_CHECKING

from gateway.tables import CompletionRecord, RequestStatus
from gateway.usage import RequestEnd, quote_of
from ledger.models import utcnow

if TYPE_CHECKING:  # it is called by Gateway.reconcile_loop
    from gateway.service import Gateway

log = logging.getLogger(__name__)

RECONCILE_BATCH = 100  # open requests taken per pass
RECONCILE_CONCURRENCY = 16  # nodes asked at once
# this gateway's own open request is reconciled when it has not ended this long after its deadline and the
# process no longer holds it: an end lost to a bug (a stream given up before it started was one) still bills
OVERDUE_MARGIN_S = 60.0


async def reconcile(gw: Gateway) -> int:
    """One pass over the orphaned open requests, within reconcile_pass_s; returns how many were closed."""
    rows = await asyncio.to_thread(
        gw.book.recorder.orphaned,
        gw.settings.instance_lease_s,
        RECONCILE_BATCH,
        overdue_s=gw.settings.request_deadline_s + OVERDUE_MARGIN_S,
        holding=gw.book.holding(),
    )
    if not rows:
        return 0
    gate = asyncio.Semaphore(RECONCILE_CONCURRENCY)
    closed: set[str] = set()

    async def one(row: CompletionRecord) -> None:
        async with gate:
            end = await _end_of(gw, row)
        if end is None:
            return  # still running on its node, or the node cannot be asked yet: a later pass tries again
        result = await gw.book.record(end)
        if result != "already_closed":
            log.warning("request %s of a gateway that died: closed as %s (%s)", row.request_id[:10], end.status, result)
            if row.key_id is not None and row.reserved_tokens:
                # what the dead gateway would have settled at the end: the key's reservation less what is billed
                used = end.prompt_tokens + end.completion_tokens if end.served else 0
                gw.admission.charge_tokens(row.key_id, used - row.reserved_tokens)
        closed.add(row.request_id)

    tasks = [asyncio.ensure_future(one(row)) for row in rows]
    done, pending = await asyncio.wait(tasks, timeout=gw.settings.reconcile_pass_s)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for t in done:
        if not t.cancelled() and t.exception() is not None:
            log.error("reconciliation of a request failed", exc_info=t.exception())
    if pending:
        log.warning(
            "reconciliation pass stopped after %.0f s with %d request(s) unanswered",
            gw.settings.reconcile_pass_s,
            len(pending),
        )
    await asyncio.to_thread(gw.book.recorder.tried, [r.request_id for r in rows if r.request_id not in closed])
    return len(closed)


async def _end_of(gw: Gateway, row: CompletionRecord) -> RequestEnd | None:
    # no context bound: the row's max_tokens is the request's bound already (the sum over its sequences, each
    # within the context: a prompt leaving less room was refused), and the context, counted for one sequence,
    # cut an honest receipt of several sequences short and disputed its node
    end = RequestEnd(
        request_id=row.request_id,
        model=row.model,
        adapter_id=row.adapter_id,
        node_id=row.node_id,
        status=RequestStatus.RECONCILED,
        key_id=row.key_id,
        prompt_tokens=row.prompt_tokens,
        attempts=row.attempts,
        max_tokens=row.max_tokens,
        quote=quote_of(row.quote_json),
        reconciled=True,
    )
    if row.node_id is None:
        end.status, end.served, end.error = RequestStatus.LOST, False, "its gateway died before dispatching it"
        return end
    reg = gw.registry.node(row.node_id)
    entry = gw.directory.get(row.node_id)
    url = (reg.api_url.rstrip("/") if reg and reg.api_url else None) or (entry.api_url if entry else None)
    what, doc = ("unreachable", None) if url is None else await gw.nodes.receipt(url, row.request_id)
    if what == "ok":
        gw.learn_key(row.node_id, doc.get("public_key"))
        end.receipt, end.signature = doc.get("receipt"), doc.get("signature")
        if isinstance(end.receipt, dict):
            end.finish_reason = (
                end.receipt.get("finish_reason") if isinstance(end.receipt.get("finish_reason"), str) else None
            )
        return end
    age = utcnow() - (row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC))
    if what == "unknown" or age.total_seconds() > gw.settings.reconcile_give_up_s:
        end.status, end.served = RequestStatus.LOST, False
        end.error = f"its gateway died mid-request and node {row.node_id[:10]} " + (
            "has no receipt for it (it never ran it, or restarted since)"
            if what == "unknown"
            else f"still says it is running after {int(age.total_seconds())} s"
            if what == "running"
            else f"did not answer for {int(age.total_seconds())} s"
        )
        return end
    return None  # running, or unreachable: a later pass asks again
