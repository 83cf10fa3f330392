"""The explorer's FastAPI app: thin handlers that refresh the chain index, look up, and render HTML.

Handlers are plain `def`s: web3 and SQLAlchemy block, so Starlette runs them in its thread pool.
"""

from __future__ import annotations

import functools
import logging
from contextlib import asynccontextmanager
from typing import Annotated

from eth_utils import is_hex_address, to_checksum_address
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from devnet.explorer import pages_accounts as acc
from devnet.explorer import pages_ledger as led
from devnet.explorer import pages_registry as reg
from devnet.explorer.service import Explorer, ExplorerConfig
from ledger.errors import LedgerError
from ledger.types import to_id

log = logging.getLogger(__name__)


class NotFound(LookupError):
    """Nothing with this id on this chain or in this database."""


class BadId(ValueError):
    """A path or query value that is not the id it should be."""


def _id(value: str, what: str) -> str:
    try:
        return to_id(value)
    except ValueError as e:
        raise BadId(f"{what} must be 0x followed by 64 hex digits, got {value[:80]!r}") from e


def create_app(config: ExplorerConfig | None = None, *, explorer: Explorer | None = None) -> FastAPI:
    """The explorer app over `explorer`, or over one opened from `config` (checked now, not per request)."""
    if explorer is None:
        if config is None:
            raise ValueError("create_app needs an ExplorerConfig or an Explorer")
        explorer = Explorer.open(config)
    ex = explorer

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        ex.close()

    app = FastAPI(title="loramesh explorer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.explorer = ex

    def html(text: str, status: int = 200) -> HTMLResponse:
        return HTMLResponse(text, status_code=status)

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> HTMLResponse:
        return html(acc.error_page(404, str(exc)), 404)

    @app.exception_handler(BadId)
    async def _bad_id(request: Request, exc: BadId) -> HTMLResponse:
        return html(acc.error_page(400, str(exc)), 400)

    @app.exception_handler(LedgerError)
    async def _chain(request: Request, exc: LedgerError) -> HTMLResponse:
        log.warning("explorer: %s", exc)
        return html(acc.error_page(503, str(exc).splitlines()[0]), 503)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> HTMLResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "query")
        return html(acc.error_page(400, f"{where}: {first.get('msg', 'invalid value')}"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> HTMLResponse:
        return html(acc.error_page(exc.status_code, str(exc.detail)), exc.status_code)

    def fresh(fn):
        """Run a handler holding the explorer's lock on an index brought up to the chain's head first."""

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with ex.lock:
                ex.refresh()
                return fn(*args, **kwargs)

        return wrapper

    def lookup(table: dict, ident: str, what: str):
        key = _id(ident, f"{what} id")
        if key not in table:
            raise NotFound(f"no {what} {key} on this chain")
        return key

    @app.get("/", response_class=HTMLResponse)
    @fresh
    def overview():
        return led.overview_page(ex, ex.index.last_block)

    @app.get("/adapters", response_class=HTMLResponse)
    @fresh
    def adapters():
        return reg.adapters_page(ex)

    @app.get("/adapters/{adapter_id}", response_class=HTMLResponse)
    @fresh
    def adapter(adapter_id: str):
        return reg.adapter_page(ex, lookup(ex.index.adapters, adapter_id, "adapter"))

    @app.get("/datasets", response_class=HTMLResponse)
    @fresh
    def datasets():
        return reg.datasets_page(ex)

    @app.get("/datasets/{dataset_id}", response_class=HTMLResponse)
    @fresh
    def dataset(dataset_id: str):
        return reg.dataset_page(ex, lookup(ex.index.datasets, dataset_id, "dataset"))

    @app.get("/nodes", response_class=HTMLResponse)
    @fresh
    def nodes():
        return reg.nodes_page(ex)

    @app.get("/nodes/{node_id}", response_class=HTMLResponse)
    @fresh
    def node(node_id: str):
        return reg.node_page(ex, lookup(ex.index.nodes, node_id, "node"))

    @app.get("/batches", response_class=HTMLResponse)
    @fresh
    def batches():
        return led.batches_page(ex)

    @app.get("/batches/{batch_id}", response_class=HTMLResponse)
    @fresh
    def batch(batch_id: str):
        return led.batch_page(ex, lookup(ex.index.batches, batch_id, "settled batch"))

    @app.get("/records", response_class=HTMLResponse)
    @fresh
    def records(adapter: str | None = None, node: str | None = None, batch: str | None = None,
                page: Annotated[int, Query(ge=0)] = 0):  # fmt: skip
        ids = {k: _id(v, f"{k} id") if v else None for k, v in (("adapter", adapter), ("node", node), ("batch", batch))}
        return led.records_page(ex, **ids, page_no=page)

    @app.get("/records/{request_id}", response_class=HTMLResponse)
    @fresh
    def record(request_id: str):
        rid = _id(request_id, "request id")
        detail = ex.record_detail(rid)
        if detail is None:
            raise NotFound(f"no record with request id {rid} on this chain or in this ledger database")
        return led.record_page(ex, detail)

    @app.get("/disputes", response_class=HTMLResponse)
    @fresh
    def disputes():
        return led.disputes_page(ex)

    @app.get("/accounts", response_class=HTMLResponse)
    @fresh
    def accounts():
        return acc.accounts_page(ex)

    @app.get("/address/{address}", response_class=HTMLResponse)
    @fresh
    def address(address: str):
        if not is_hex_address(address):
            raise BadId(f"address must be 0x followed by 40 hex digits, got {address[:80]!r}")
        return acc.address_page(ex, to_checksum_address(address.lower()))

    @app.get("/tx/{tx_hash}", response_class=HTMLResponse)
    @fresh
    def tx(tx_hash: str):
        h = _id(tx_hash, "transaction hash")
        found = ex.transaction(h)
        if found is None:
            raise NotFound(f"no transaction {h} on this chain")
        return acc.tx_page(ex, h, *found)

    @app.get("/search")
    @fresh
    def search(q: str = ""):
        url, hits = ex.search(q)
        if url is not None:
            return RedirectResponse(url, status_code=303)
        return HTMLResponse(acc.search_page(q, hits), status_code=200 if hits or not q.strip() else 404)

    @app.get("/plots/tokens.svg")
    @fresh
    def tokens_svg():
        return Response(led.tokens_plot(ex), media_type="image/svg+xml")

    @app.get("/plots/rewards.svg")
    @fresh
    def rewards_svg():
        return Response(led.rewards_plot(ex), media_type="image/svg+xml")

    @app.get("/health")
    @fresh
    def health() -> dict:
        return {"ok": True, "head": ex.index.last_block, "records": len(ex.index.records)}

    return app
