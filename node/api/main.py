"""The node API app: create_app builds it over an engine (lifespan, exception handlers, body limits, routes).
The contract is node/api/__init__.py's docstring."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from common.http import DEFAULT_MAX_BODY_BYTES, BodyLimitMiddleware, error_responses
from common.wire import error_body, node_id_of
from node.api.book import RECENT_RECEIPTS, RequestBook
from node.api.deps import NodeApi, TrustedKeys
from node.api.errors import ApiError, validation_message
from node.api.models import generate_body_bytes
from node.api.routes import adapters, generate, hello, status
from node.engine import AsyncEngine
from node.gateway_hello import HELLO_PATH, MAX_HELLO_BYTES
from node.health import NodeHealth
from node.metrics import NodeMetrics
from node.receipts import public_key_bytes
from node.upload import PackageInstaller

log = logging.getLogger(__name__)

# every error status the node answers, declared once for the OpenAPI document (in common.http.ERROR_JSON's shape)
ERRORS = {
    400: "a malformed body, a bad field, or a prompt longer than the context",
    401: "no, a malformed or a wrong signature or operator token",
    403: "a gateway key this node does not trust",
    404: "an adapter this node neither holds nor can fetch, or an unknown request",
    409: "a duplicate or replayed request, an adapter of another base, or a request still running",
    413: "a body over the limit",
    422: "an adapter whose weights do not fit",
    500: "an engine failure",
    503: "no free adapter slot",
}


def create_app(
    engine: AsyncEngine,
    node_key: Ed25519PrivateKey,
    *,
    trusted_gateways: TrustedKeys,
    operator_token: str,
    extra_status: Callable[[], dict] | None = None,
    uploads: PackageInstaller | None = None,
    services: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
    recent_receipts: int = RECENT_RECEIPTS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    health: NodeHealth | None = None,
    metrics_extra: Callable[[], dict[str, float]] | None = None,
    on_gateway_hello: Callable[[object], Awaitable[dict]] | None = None,
) -> FastAPI:
    """The node API over `engine`, which the app's lifespan starts and closes.

        `trusted_gateways`: the gateway public keys (hex) whose signed calls are accepted, as a live collection
        or a callable read on every call (the daemon's heartbeat sender learns keys while the node runs).
        `operator_token`: the bearer token of the operator endpoints. `max_body_bytes` caps every request body but
        an upload's and a generate call's (at least what a gateway's call may need for this base). `uploads`: serve
        POST /v1/adapters (package upload), its bodies capped at `uploads.max_bytes`.
        `services`: what else runs while the app serves (the daemon's p2p host, chain registration, heartbeats),
        entered after the engine started and left before it closes. `extra_status` adds sections (e.g. p2p
        transfers) to GET /status; `app.state.status_doc()` returns the same document for other users such as
        the heartbeat sender. `health`: GET /health's checks (default: the engine's loop only). `metrics_extra`:
    more counters for GET /metrics (the daemon's heartbeats). `on_gateway_hello`: takes a gateway's hello
    (node/gateway_hello.py) and answers the node's heartbeat; without it hellos are refused (404).
    """
    if not operator_token:
        raise ValueError("the node API needs an operator token: there is no unauthenticated mode")
    public_key = public_key_bytes(node_key)
    node_id = node_id_of(public_key)
    book = RequestBook(engine, node_key, node_id, recent=recent_receipts)

    def counters() -> dict[str, float]:
        return {"receipts_signed": book.signed_count} | (metrics_extra() if metrics_extra is not None else {})

    node = NodeApi(
        engine=engine,
        node_key=node_key,
        public_key=public_key,
        node_id=node_id,
        trusted=trusted_gateways if callable(trusted_gateways) else (lambda: trusted_gateways),
        operator_token=operator_token,
        book=book,
        max_body_bytes=max_body_bytes,
        generate_body_bytes=max(max_body_bytes, generate_body_bytes(engine.max_len, engine.vocab_size)),
        extra_status=extra_status,
        uploads=uploads,
        health=health or NodeHealth(engine),
        metrics=NodeMetrics(extra=counters),
        on_hello=on_gateway_hello,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            if services is None:
                yield
            else:
                async with services(app):
                    yield
        finally:
            engine.close()

    app = FastAPI(title="loramesh node", lifespan=lifespan, responses=error_responses(ERRORS))
    app.state.node = node
    app.state.status_doc = node.status_doc
    # a hello is small: a stranger's 1 MiB bodies, held while they trickled in, cost 1 MB of memory each
    overrides = {"/v1/generate": node.generate_body_bytes, HELLO_PATH: MAX_HELLO_BYTES}
    if uploads is not None:  # the upload route's own limit; the load route under it keeps the usual one
        overrides |= {"/v1/adapters": uploads.max_bytes, "/v1/adapters/": max_body_bytes}
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, overrides=overrides)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _crash)
    app.include_router(status.router)
    app.include_router(adapters.router)
    app.include_router(generate.router)
    app.include_router(hello.router)
    if uploads is not None:
        app.include_router(adapters.upload_router)
    return app


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    body = error_body(exc.message, type="server_error" if exc.status >= 500 else "invalid_request_error", code=exc.code)
    return JSONResponse(body | exc.extra, status_code=exc.status)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    message = validation_message(exc.errors(), located_in=("body", "path"))
    return JSONResponse(error_body(message, code="invalid_request"), status_code=400)


async def _client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
    # nothing went wrong here, and nobody is left to answer: a caller hanging up mid-body (any stranger, on a public
    # route) wrote two tracebacks, 15 kB, to the log each time (red team); answered quietly, outside the last resort
    return JSONResponse(error_body("the client went away", code="client_disconnected"), status_code=400)


async def _crash(request: Request, exc: Exception) -> JSONResponse:
    # the last resort: a bug must still answer in the API's shape, without its details
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse(
        error_body("internal error on this node", type="server_error", code="internal_error"), status_code=500
    )
