"""The explorer's FastAPI app: create_app, its lifespan and its error handlers. The routes are the table in
devnet/explorer/routes.py: thin handlers that look up in one snapshot of the index and render HTML, while the
index's refresher follows the chain in the background.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.http import ERROR_JSON, BodyLimitMiddleware
from common.wire import error_body
from devnet.explorer import pages_accounts as acc
from devnet.explorer.routes import HTML, BadId, NotFound, add_routes
from devnet.explorer.service import Explorer
from devnet.explorer.settings import ExplorerConfig
from ledger.errors import LedgerError

# The explorer takes no request bodies (every route is a GET): anything sent is refused before it is read.
MAX_BODY_BYTES = 64 * 1024
# Routes that answer JSON: their errors are in the API's error shape, every other route's are an HTML page.
JSON_ROUTES = ("/health", "/openapi.json")
ERROR_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    500: "internal_error",
    503: "unavailable",
}

# Every answer's headers. The pages show strings anyone can write on chain; each is escaped (layout.esc), and
# this policy is the second line: no script runs, nothing loads from elsewhere, no other site frames a page.
# The pages' one style sheet is inline; their charts are inline SVG.
SECURITY_HEADERS = (
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; "
        b"frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)

log = logging.getLogger(__name__)


class SecurityHeadersMiddleware:
    """Adds SECURITY_HEADERS to every HTTP answer (pure ASGI: nothing of the body is buffered)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers)


# Declared on every route, so the OpenAPI schema (/openapi.json) says what an error looks like: an HTML page,
# or on JSON routes the API's error shape.
ERROR_RESPONSES = {
    status: {"description": what, "content": {**HTML, **ERROR_JSON}}
    for status, what in (
        (400, "a bad id or query value"),
        (404, "nothing with this id"),
        (413, "a request body (none is taken)"),
        (503, "the chain or the ledger database cannot be read"),
    )
}


def create_app(config: ExplorerConfig | None = None, *, explorer: Explorer | None = None) -> FastAPI:
    """The explorer app over `explorer`, or over one opened from `config` (checked now, not per request)."""
    if explorer is None:
        if config is None:
            raise ValueError("create_app needs an ExplorerConfig or an Explorer")
        explorer = Explorer.open(config)
    ex = explorer

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ex.start()  # the index refresher: pages are served from the index meanwhile, never wait for it
        try:
            yield
        finally:
            ex.close()

    app = FastAPI(
        title="loramesh explorer", lifespan=lifespan, docs_url=None, redoc_url=None, responses=ERROR_RESPONSES
    )
    app.state.explorer = ex
    app.add_middleware(BodyLimitMiddleware, max_bytes=MAX_BODY_BYTES)
    app.add_middleware(SecurityHeadersMiddleware)

    def error(request: Request, status: int, message: str) -> Response:
        """One error answer: the API's JSON error shape on JSON routes, an HTML page on the others."""
        if request.url.path in JSON_ROUTES:
            kind = "invalid_request_error" if status < 500 else "server_error"
            return JSONResponse(
                error_body(message, type=kind, code=ERROR_CODES.get(status, "error")), status_code=status
            )
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
        log.warning(
            "explorer: ledger database error on %s: %s: %s",
            request.url.path,
            type(cause).__name__,
            str(cause).splitlines()[0] if str(cause) else "",
        )
        return error(
            request,
            503,
            f"the ledger database cannot be read ({type(cause).__name__}): "
            "check the --db the explorer was started with",
        )

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
        answer = error(request, 500, "the explorer failed on this page; the details are in its log")
        # ServerErrorMiddleware sends this answer from outside every added middleware, SecurityHeadersMiddleware
        # included: its headers are set here
        for name, value in SECURITY_HEADERS:
            answer.headers[name.decode()] = value.decode()
        return answer

    add_routes(app, ex)
    return app
