"""The explorer's routes: one table of (path, handler), every one a GET that answers a page.

A handler takes a View first (one snapshot of the index), then its path and query values, and returns the
page (HTML, an SVG, or on /health a dict). Every list is paginated (`page`, and a second page number where a
page holds two lists). Handlers are plain `def`s: web3 and SQLAlchemy block, so Starlette runs them in its
thread pool.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from eth_utils import is_hex_address, to_checksum_address
from fastapi import FastAPI, Query
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from common.wire import to_id
from devnet.explorer import pages_accounts as acc
from devnet.explorer import pages_ledger as led
from devnet.explorer import pages_registry as reg
from devnet.explorer.service import Explorer, View


class NotFound(LookupError):
    """Nothing with this id on this chain or in this database."""


class BadId(ValueError):
    """A path or query value that is not the id it should be."""


def _id(value: str, what: str) -> str:
    """`value` as an id (common.wire.to_id: any case, with or without 0x), else BadId naming `what`."""
    try:
        return to_id(value)
    except ValueError as e:
        raise BadId(f"{what} must be 0x followed by 64 hex digits, got {value[:80]!r}") from e


def _found(value, what: str, key: str):
    if value is None:
        raise NotFound(f"no {what} {key} on this chain")
    return key


PageNo = Annotated[int, Query(ge=0, le=10**9)]


# ---- handlers --------------------------------------------------------------------------------------------


def overview(ex: View):
    return led.overview_page(ex)


def adapters(ex: View, page: PageNo = 0, names_page: PageNo = 0):
    return reg.adapters_page(ex, page_no=page, names_page=names_page)


def adapter(ex: View, adapter_id: str, history_page: PageNo = 0):
    key = _id(adapter_id, "adapter id")
    return reg.adapter_page(ex, _found(ex.q.adapter(key), "adapter", key), history_page=history_page)


def datasets(ex: View, page: PageNo = 0):
    return reg.datasets_page(ex, page_no=page)


def dataset(ex: View, dataset_id: str, history_page: PageNo = 0, adapters_page: PageNo = 0):
    key = _id(dataset_id, "dataset id")
    found = _found(ex.q.dataset(key), "dataset", key)
    return reg.dataset_page(ex, found, history_page=history_page, adapters_page=adapters_page)


def nodes(ex: View, page: PageNo = 0):
    return reg.nodes_page(ex, page_no=page)


def node(ex: View, node_id: str, history_page: PageNo = 0):
    key = _id(node_id, "node id")
    return reg.node_page(ex, _found(ex.q.node(key), "node", key), history_page=history_page)


def batches(ex: View, page: PageNo = 0):
    return led.batches_page(ex, page_no=page)


def batch(ex: View, batch_id: str, page: PageNo = 0):
    key = _id(batch_id, "settled batch id")
    return led.batch_page(ex, _found(ex.q.batch(key), "settled batch", key), page_no=page)


def records(
    ex: View,
    adapter: str | None = None,
    node: str | None = None,
    batch: str | None = None,
    page: PageNo = 0,
):
    ids = {k: _id(v, f"{k} id") if v else None for k, v in (("adapter", adapter), ("node", node), ("batch", batch))}
    return led.records_page(ex, **ids, page_no=page)


def record(ex: View, request_id: str):
    rid = _id(request_id, "request id")
    detail = ex.record_detail(rid)
    if detail is None:
        raise NotFound(f"no record with request id {rid} on this chain or in this ledger database")
    return led.record_page(ex, detail)


def disputes(ex: View, page: PageNo = 0):
    return led.disputes_page(ex, page_no=page)


def accounts(ex: View, page: PageNo = 0):
    return acc.accounts_page(ex, page_no=page)


def address(ex: View, address: str, page: PageNo = 0, money_page: PageNo = 0, owned_page: PageNo = 0):
    if not is_hex_address(address):
        raise BadId(f"address must be 0x followed by 40 hex digits, got {address[:80]!r}")
    checksummed = to_checksum_address(address.lower())
    return acc.address_page(ex, checksummed, page_no=page, money_page=money_page, owned_page=owned_page)


def tx(ex: View, tx_hash: str, page: PageNo = 0):
    h = _id(tx_hash, "transaction hash")
    found = ex.transaction(h, page=page)
    if found is None:
        raise NotFound(f"no transaction {h} on this chain")
    return acc.tx_page(ex, h, *found)


def search(ex: View, q: str = ""):
    url, hits, cut = ex.search(q)
    if url is not None:
        return RedirectResponse(url, status_code=303)
    return HTMLResponse(acc.search_page(q, hits, cut), status_code=200 if hits or not q.strip() else 404)


def tokens_svg(ex: View):
    return Response(led.tokens_plot(ex), media_type="image/svg+xml")


def rewards_svg(ex: View):
    return Response(led.rewards_plot(ex), media_type="image/svg+xml")


def health(ex: View) -> dict:
    """Deliberately public: the chain head, how far the index got, settled records, and that the ledger database
    is readable."""
    ex.store.counts()  # raises on a database that cannot be read: 503 in the JSON error shape
    cursor = ex.q.cursor()
    indexed = cursor.block if cursor else None
    head = cursor.head if cursor else None
    return {
        "ok": True,
        "head": head,
        "indexed_block": indexed,
        "synced": cursor is not None and head > 0 and indexed >= head - ex.confirmations,
        "records": ex.q.usage("all").records,
        "index_error": ex.refresh_error,
    }


# ---- the table -------------------------------------------------------------------------------------------

HTML = {"text/html": {"schema": {"type": "string"}}}
_SVG = {200: {"description": "an SVG plot", "content": {"image/svg+xml": {"schema": {"type": "string"}}}}}
_SEARCH = {
    303: {"description": "exactly one match: its page"},
    404: {"description": "nothing matches (the search page)", "content": HTML},
}


@dataclass(frozen=True, slots=True)
class Page:
    path: str
    handler: Callable[..., Any]
    response_class: type[Response] | None = HTMLResponse  # None: FastAPI's JSON
    responses: dict = field(default_factory=dict)


ROUTES = (
    Page("/", overview),
    Page("/adapters", adapters),
    Page("/adapters/{adapter_id}", adapter),
    Page("/datasets", datasets),
    Page("/datasets/{dataset_id}", dataset),
    Page("/nodes", nodes),
    Page("/nodes/{node_id}", node),
    Page("/batches", batches),
    Page("/batches/{batch_id}", batch),
    Page("/records", records),
    Page("/records/{request_id}", record),
    Page("/disputes", disputes),
    Page("/accounts", accounts),
    Page("/address/{address}", address),
    Page("/tx/{tx_hash}", tx),
    Page("/search", search, responses=_SEARCH),
    Page("/plots/tokens.svg", tokens_svg, Response, _SVG),
    Page("/plots/rewards.svg", rewards_svg, Response, _SVG),
    Page("/health", health, None),
)


def on_snapshot(ex: Explorer, handler: Callable[..., Any]) -> Callable[..., Any]:
    """The endpoint of `handler`: takes the request's values (the handler's parameters after the View) and
    runs it on one snapshot of the index (Explorer.view); the index is never refreshed while a page waits."""

    @functools.wraps(handler)
    def endpoint(*args, **kwargs):
        with ex.view() as view:
            return handler(view, *args, **kwargs)

    signature = inspect.signature(handler)
    endpoint.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
    return endpoint


def add_routes(app: FastAPI, ex: Explorer) -> None:
    for page in ROUTES:
        kwargs = {"response_class": page.response_class} if page.response_class is not None else {}
        app.add_api_route(
            page.path, on_snapshot(ex, page.handler), methods=["GET"], responses=page.responses or None, **kwargs
        )
