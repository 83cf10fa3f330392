"""The explorer's routes: one table of (path, handler), every one a GET that answers a page.

A handler takes the Explorer first, then its path and query values, and returns the page (HTML, an SVG, or
on /health a dict). `add_routes` mounts each one so that it runs holding the explorer's lock on an index
brought up to the chain's head first. Handlers are plain `def`s: web3 and SQLAlchemy block, so Starlette
runs them in its thread pool.
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
from devnet.explorer.service import Explorer


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


def _lookup(table: dict, ident: str, what: str) -> str:
    key = _id(ident, f"{what} id")
    if key not in table:
        raise NotFound(f"no {what} {key} on this chain")
    return key


# ---- handlers --------------------------------------------------------------------------------------------


def overview(ex: Explorer):
    return led.overview_page(ex, ex.index.last_block)


def adapters(ex: Explorer):
    return reg.adapters_page(ex)


def adapter(ex: Explorer, adapter_id: str):
    return reg.adapter_page(ex, _lookup(ex.index.adapters, adapter_id, "adapter"))


def datasets(ex: Explorer):
    return reg.datasets_page(ex)


def dataset(ex: Explorer, dataset_id: str):
    return reg.dataset_page(ex, _lookup(ex.index.datasets, dataset_id, "dataset"))


def nodes(ex: Explorer):
    return reg.nodes_page(ex)


def node(ex: Explorer, node_id: str):
    return reg.node_page(ex, _lookup(ex.index.nodes, node_id, "node"))


def batches(ex: Explorer):
    return led.batches_page(ex)


def batch(ex: Explorer, batch_id: str):
    return led.batch_page(ex, _lookup(ex.index.batches, batch_id, "settled batch"))


def records(
    ex: Explorer,
    adapter: str | None = None,
    node: str | None = None,
    batch: str | None = None,
    page: Annotated[int, Query(ge=0)] = 0,
):
    ids = {k: _id(v, f"{k} id") if v else None for k, v in (("adapter", adapter), ("node", node), ("batch", batch))}
    return led.records_page(ex, **ids, page_no=page)


def record(ex: Explorer, request_id: str):
    rid = _id(request_id, "request id")
    detail = ex.record_detail(rid)
    if detail is None:
        raise NotFound(f"no record with request id {rid} on this chain or in this ledger database")
    return led.record_page(ex, detail)


def disputes(ex: Explorer):
    return led.disputes_page(ex)


def accounts(ex: Explorer):
    return acc.accounts_page(ex)


def address(ex: Explorer, address: str):
    if not is_hex_address(address):
        raise BadId(f"address must be 0x followed by 40 hex digits, got {address[:80]!r}")
    return acc.address_page(ex, to_checksum_address(address.lower()))


def tx(ex: Explorer, tx_hash: str):
    h = _id(tx_hash, "transaction hash")
    found = ex.transaction(h)
    if found is None:
        raise NotFound(f"no transaction {h} on this chain")
    return acc.tx_page(ex, h, *found)


def search(ex: Explorer, q: str = ""):
    url, hits = ex.search(q)
    if url is not None:
        return RedirectResponse(url, status_code=303)
    return HTMLResponse(acc.search_page(q, hits), status_code=200 if hits or not q.strip() else 404)


def tokens_svg(ex: Explorer):
    return Response(led.tokens_plot(ex), media_type="image/svg+xml")


def rewards_svg(ex: Explorer):
    return Response(led.rewards_plot(ex), media_type="image/svg+xml")


def health(ex: Explorer) -> dict:
    """Deliberately public: the chain head, settled records, and that the ledger database is readable."""
    ex.store.counts()  # raises on a database that cannot be read: 503 in the JSON error shape
    return {"ok": True, "head": ex.index.last_block, "records": len(ex.index.records)}


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


def fresh(ex: Explorer, handler: Callable[..., Any]) -> Callable[..., Any]:
    """The endpoint of `handler`: takes the request's values (the handler's parameters after the Explorer)
    and runs it holding the explorer's lock, on an index brought up to the chain's head first."""

    @functools.wraps(handler)
    def endpoint(*args, **kwargs):
        with ex.lock:
            ex.refresh()
            return handler(ex, *args, **kwargs)

    signature = inspect.signature(handler)
    endpoint.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
    return endpoint


def add_routes(app: FastAPI, ex: Explorer) -> None:
    for page in ROUTES:
        kwargs = {"response_class": page.response_class} if page.response_class is not None else {}
        app.add_api_route(
            page.path, fresh(ex, page.handler), methods=["GET"], responses=page.responses or None, **kwargs
        )
