"""Closing the open requests of a gateway that died mid-request (kill -9, power loss), from the receipts the
nodes keep (node API: GET /v1/requests/{request_id}/receipt).

The dead gateway's own completion count is gone; what is billed is the receipt's completion count capped at
the request's max_tokens (and the context), with the prompt count the gateway stored when it dispatched the
request. A receipt over those bounds, or with another prompt count, is disputed as usual. A node that does
not know the request (it never got it, or restarted and lost its receipts) or stays unreachable for
reconcile_give_up_s leaves it closed as "lost", with nothing billed."""

from __future__ import annotations

import logging
from datetime import UTC

from gateway.models import CompletionRecord, RequestStatus
from gateway.usage import RequestEnd
from ledger.models import utcnow

log = logging.getLogger(__name__)


async def reconcile(gw) -> int:
    """One pass over the orphaned open requests; returns how many were closed."""
    import asyncio

    rows = await asyncio.to_thread(gw.recorder.orphaned, gw.settings.instance_lease_s)
    closed = 0
    for row in rows:
        end = await _end_of(gw, row)
        if end is None:
            continue  # still running on its node, or the node cannot be asked yet: the next pass tries again
        result = await gw.record(end)
        log.warning("request %s of a gateway that died: closed as %s (%s)", row.request_id[:10], end.status, result)
        closed += 1
    return closed


def _base_of(gw, row: CompletionRecord) -> str | None:
    if row.adapter_id is not None:
        a = gw.registry.adapters.get(row.adapter_id)
        return a.base_model_id if a else None
    n = gw.registry.node(row.node_id) if row.node_id else None
    return n.base_model_id if n else None


async def _end_of(gw, row: CompletionRecord) -> RequestEnd | None:
    base = _base_of(gw, row)
    end = RequestEnd(request_id=row.request_id, model=row.model, adapter_id=row.adapter_id, node_id=row.node_id,
                     status=RequestStatus.RECONCILED, key_id=row.key_id, prompt_tokens=row.prompt_tokens,
                     attempts=row.attempts, max_tokens=row.max_tokens, reconciled=True,
                     context_len=gw.templates.context_len(base) if base else None)  # fmt: skip
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
            end.finish_reason = end.receipt.get("finish_reason") if isinstance(end.receipt.get("finish_reason"),
                                                                                str) else None  # fmt: skip
        return end
    if what == "running":
        return None
    age = (utcnow() - (row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)))
    if what == "unknown" or age.total_seconds() > gw.settings.reconcile_give_up_s:
        end.status, end.served = RequestStatus.LOST, False
        end.error = (f"its gateway died mid-request and node {row.node_id[:10]} "
                     + ("has no receipt for it (it never ran it, or restarted since)" if what == "unknown"
                        else f"did not answer for {int(age.total_seconds())} s"))  # fmt: skip
        return end
    return None
