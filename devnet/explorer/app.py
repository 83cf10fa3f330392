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
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from devnet.explorer import pages_accounts as acc
from devnet.explorer import pages_ledger as led
from devnet.explorer import pages_registry as reg
from devnet.explorer.service import Explorer, ExplorerConfig
from ledger.errors import LedgerError
from ledger.types import to_id
from common.http import ERROR_JSON, BodyLimitMiddleware

# The explorer takes no request bodies (every route is a GET): anything sent is refused before it is read.
MAX_BODY_BYTES = 64 * 1024
# Routes that answer JSON: their errors are in the API's error shape, every other route's are an HTML page.
JSON_ROUTES = ("/health", "/openapi.json")
ERROR_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 500: "internal_error",
               503: "unavailable"}

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


_HTML = {"text/html": {"schema": {"type": "string"}}}
_SVG = {200: {"description": "an SVG plot", "content": {"image/svg+xml": {"schema": {"type": "string"}}}}}
# Declared on every route, so the OpenAPI schema (/openapi.json) says what an error looks like: an HTML page,
# or on JSON routes the API's error shape.
ERROR_RESPONSES = {status: {"description": what, "content": {**_HTML, **ERROR_JSON}}
                   for status, what in ((400, "a bad id or query value"), (404, "nothing with this id"),
                                        (413, "a request body (none is taken)"),
                                        (503, "the chain or the ledger database cannot be read"))}


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

    app = FastAPI(title="loramesh explorer", lifespan=lifespan, docs_url=None, redoc_url=None,
                  responses=ERROR_RESPONSES)
    app.state.explorer = ex
    app.add_middleware(BodyLimitMiddleware, max_bytes=MAX_BODY_BYTES)

    def error(request: Request, status: int, message: str) -> Response:
        """One error answer: the API's JSON error shape on JSON routes, an HTML page on the others."""
        if request.url.path in JSON_ROUTES:
            return JSONResponse({"error": {"message": message, "type": "invalid_request_error" if status < 500
                                           else "server_error", "code": ERROR_CODES.get(status, "error")}},
                                status_code=status)
        return HTMLResponse(acc.error_page(status, message), status_code=status)

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> Response:
        return error(request, 404, str(exc))

    @app.exception_handler(BadId)
    async def _bad_id(request: Request, exc: BadId) -> Response:
        return error(request, 400, str(exc))

    @app.exception_handler(LedgerError)
    async def _chain(request: Request, exc: LedgerError) -> Response:
        log.warning("explorer: %s", exc)
        return error(request, 503, str(exc).splitlines()[0])

    @app.exception_handler(SQLAlchemyError)
    async def _database(request: Request, exc: SQLAlchemyError) -> Response:
        # a corrupt, replaced or half-migrated database: the page says so in one line (no SQL, no path);
        # the log keeps the driver's own message
        cause = getattr(exc, "orig", None) or exc
        log.warning("explorer: ledger database error on %s: %s: %s", request.url.path, type(cause).__name__,
                    str(cause).splitlines()[0] if str(cause) else "")
        return error(request, 503, f"the ledger database cannot be read ({type(cause).__name__}): "
                                   "check the --db the explorer was started with")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "query")
        return error(request, 400, f"{where}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        return error(request, exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # the last resort (Starlette's ServerErrorMiddleware calls it): a page in our shape, never the
        # plain-text 500; the traceback goes to the log and the explorer keeps serving
        log.error("explorer: unexpected error on %s", request.url.path, exc_info=exc)
        return error(request, 500, "the explorer failed on this page; the details are in its log")

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

    @app.get("/search", response_class=HTMLResponse,
             responses={303: {"description": "exactly one match: its page"},
                        404: {"description": "nothing matches (the search page)", "content": _HTML}})
    @fresh
    def search(q: str = ""):
        url, hits = ex.search(q)
        if url is not None:
            return RedirectResponse(url, status_code=303)
        return HTMLResponse(acc.search_page(q, hits), status_code=200 if hits or not q.strip() else 404)

    @app.get("/plots/tokens.svg", response_class=Response, responses=_SVG)
    @fresh
    def tokens_svg():
        return Response(led.tokens_plot(ex), media_type="image/svg+xml")

    @app.get("/plots/rewards.svg", response_class=Response, responses=_SVG)
    @fresh
    def rewards_svg():
        return Response(led.rewards_plot(ex), media_type="image/svg+xml")

    @app.get("/health")
    @fresh
    def health() -> dict:
        """Deliberately public: the chain head, settled records, and that the ledger database is readable."""
        ex.store.counts()  # raises on a database that cannot be read: 503 in the JSON error shape
        return {"ok": True, "head": ex.index.last_block, "records": len(ex.index.records)}

    return app
