"""The gateway's FastAPI app: create_app builds the gateway (gateway.service.Gateway), its lifespan
(registry sync, outbox check, reconciliation, the in-process settler), the error handlers and middleware,
and includes the routes (gateway/routes/). A request's own life is gateway.request.ServedRequest's."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from common.http import BodyLimitMiddleware, error_responses
from common.wire import error_body, hex0x, restore_recursion_limit
from gateway.chain_registry import RegistryView
from gateway.errors import ERROR_STATUSES, BadRequest, GatewayError
from gateway.lorax_api import LORAX_PATHS, LoraxRequest
from gateway.lorax_api import error_body as lorax_error_body
from gateway.openai_api import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from gateway.routes import internal, lorax, openai
from gateway.service import Gateway
from gateway.settings import GatewaySettings
from gateway.settlement import InProcessSettler
from gateway.storage import tighten_sqlite_file

log = logging.getLogger(__name__)


def _settler(settings: GatewaySettings, client, account) -> InProcessSettler:
    from ledger.db import make_engine
    from ledger.settler import Settler
    from ledger.settler_config import SettlerConfig

    engine = make_engine(settings.db_url, immediate=True)
    fees = client.tx.fee_policy.capped(settings.settle_max_fee_gwei, settings.settle_max_tip_gwei)
    return InProcessSettler(
        Settler(
            engine,
            client.with_account(account, fee_policy=fees),
            SettlerConfig(
                batch_size=settings.settle_batch_size,
                interval=settings.settle_interval_s,
                max_in_flight=settings.settle_max_in_flight,
                confirmations=settings.settle_confirmations,
                replace_after=settings.settle_replace_after_s,
            ),
        )
    )


INTERNAL_ERROR = error_body("internal gateway error", type="server_error", code="internal_error")


class _AnswerUnhandled:
    """An exception no handler took becomes the 500 error answer here, inside the app, and the connection stays
    usable: Starlette's outermost handler answers too, but then re-raises, and uvicorn closes the client's
    keep-alive connection (a client's next request on it failed)."""

    def __init__(self, app, on_error=None) -> None:
        self.app, self.on_error = app, on_error

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except ClientDisconnect:  # nothing went wrong, and there is no one to answer (or, for a body that did not
            if started:  # keep up, common.http.BodyLimitMiddleware answers 408)
                raise
            return
        except Exception:
            if started:  # too late for an answer: the stream is cut, as it would be anyway
                raise
            log.exception("unhandled error on %s", scope.get("path"))
            if self.on_error is not None:
                self.on_error(scope.get("path", ""))
            await JSONResponse(_error(scope.get("path", ""), INTERNAL_ERROR, 500), status_code=500)(
                scope, receive, send
            )


class _AnswerHeaders:
    """Every answer carries an `X-Request-Id`, as OpenAI's do (users quote it when they report a problem): the id
    ServedRequest gave the request, once it has one (its completion record carries it, and its usage record where
    it was served); for an answer before that, a new id. (Only answers served had one, and the openai SDK's
    `e.request_id` was None on every error; compat audit.) And a key with limits gets OpenAI's x-ratelimit headers:
    where its buckets stand after the request was admitted and its tokens reserved (a 429 carries its own). And
    OpenAI's `openai-processing-ms`: the milliseconds from the request's arrival to its answer's first byte (for a
    stream, to its headers; the SDK logs it)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrived = time.perf_counter()

        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                state = scope.get("state", {})
                if b"x-request-id" not in present:
                    rid = state.get("rid") or hex0x(secrets.token_bytes(32))
                    headers.append((b"x-request-id", rid.encode()))
                for name, value in (state.get("ratelimit") or {}).items():
                    if name.encode() not in present:
                        headers.append((name.encode(), value.encode()))
                headers.append((b"openai-processing-ms", str(round((time.perf_counter() - arrived) * 1000)).encode()))
                message = message | {"headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


def _error(path: str, body: dict, status: int) -> dict:
    """An error body (OpenAI's shape) in the shape of the API `path` belongs to: LoRAX's on its routes."""
    if path not in LORAX_PATHS:
        return body
    return lorax_error_body(body["error"], status)


def _declare_bodies(app: FastAPI) -> None:
    """Declare the OpenAI routes' JSON bodies in the OpenAPI schema: the handlers read their bodies themselves
    (through the bounded parser), so FastAPI cannot see them, and clients and schema fuzzers would not either."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = generate()
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for path, model in (
            ("/v1/completions", CompletionRequest),
            ("/v1/chat/completions", ChatRequest),
            ("/tokenize", TokenizeRequest),
            ("/detokenize", DetokenizeRequest),
            ("/generate", LoraxRequest),
            ("/generate_stream", LoraxRequest),
            ("/", LoraxRequest),
        ):
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(body.pop("$defs", {}))
            schemas[model.__name__] = body
            ref = {"$ref": f"#/components/schemas/{model.__name__}"}
            doc["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref}},
            }
        return doc

    app.openapi = openapi


def create_app(settings: GatewaySettings | None = None, *, chain_client=None, settler_account=None) -> FastAPI:
    """A gateway app. The chain client defaults to one built from settings.deployment (registry mirror
    sync); the settler runs in-process when a settler account (or settings.key_file) is given."""
    import gateway.tables  # noqa: F401 - registers the gateway's tables
    from gateway.usage import set_busy_timeout
    from ledger.db import init_db, make_engine, redact_url

    settings = settings or GatewaySettings()
    tighten_sqlite_file(settings.db_url)  # 0600: it holds key hashes and usage
    engine = make_engine(settings.db_url)
    set_busy_timeout(engine, settings.db_busy_timeout_s)
    init_db(engine)  # creates every registered table and adds missing columns, the gateway's included
    if chain_client is None and settings.deployment is not None:
        from ledger.chain import ChainClient

        chain_client = ChainClient.from_deployment(settings.deployment, rpc_url=settings.rpc_url, check=False)
    if settler_account is None and settings.key_file is not None:
        from ledger.keys import load_account

        settler_account = load_account(settings.key_file)  # settles (unless --no-settle) and signs hellos
    gw = Gateway(
        settings,
        engine,
        RegistryView(engine, chain_client, confirmations=settings.settle_confirmations),
        account=settler_account,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        restore_recursion_limit()  # after every import (py_ecc raises it at import time)
        log.info(
            "gateway key %s (nodes trust this gateway's calls by it); database %s",
            gw.gateway_key_hex,
            redact_url(settings.db_url),
        )
        # tokenizers and chat templates load before the first request: loading them on concurrent first
        # requests raced in transformers' lazy imports (500s)
        await asyncio.to_thread(gw.templates.warm)
        await gw.book.sync_disputes()
        # a gateway with a chain refuses a model whose price it has not read (503 price_unavailable): the base
        # price is read before the port opens, not by the first sync, which runs beside the first requests
        await asyncio.to_thread(gw.prices.refresh_base)
        loop = asyncio.get_running_loop()
        loops = [loop.create_task(coro, name=name) for name, coro in gw.loops()]
        if settler_account is not None and chain_client is not None and settings.settle:
            app.state.settler = _settler(settings, chain_client, settler_account)
            app.state.settler.start()
        try:
            yield
        finally:
            for task in loops:
                task.cancel()
            await gw.aclose()
            if app.state.settler is not None:
                await app.state.settler.stop()

    app = FastAPI(title="loramesh gateway", lifespan=lifespan, responses=error_responses(ERROR_STATUSES))

    def _unhandled(path: str) -> None:
        if path.startswith("/v1/") or path in LORAX_PATHS:
            gw.metrics.requests.labels("-", "500").inc()

    app.add_middleware(_AnswerUnhandled, on_error=_unhandled)
    # no body is read past its limit; a heartbeat is small, a prompt may be large (a context's worth of text)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        overrides={"/internal/": settings.max_heartbeat_bytes},
        shape=_error,
    )
    app.add_middleware(_AnswerHeaders)  # outermost: the body limit's and the last resort's answers get an id too
    _add_error_handlers(app, gw)
    app.include_router(internal.router)
    app.include_router(openai.router)
    app.include_router(lorax.router)
    _declare_bodies(app)
    app.state.gateway = gw
    app.state.settler = None  # the in-process settler, when this gateway settles
    return app


def _add_error_handlers(app: FastAPI, gw: Gateway) -> None:
    """Every error answers in the OpenAI error shape (LoRAX's on its routes); errors on the APIs' routes (/v1/,
    LoRAX's) count in the request metrics, as their answers do."""

    def _count_error(request: Request, status: int) -> None:
        model = getattr(request.state, "model", None) or "-"
        if request.url.path.startswith("/v1/") or request.url.path in LORAX_PATHS:
            gw.metrics.requests.labels(model, str(status)).inc()

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        _count_error(request, exc.status)
        if request.url.path in LORAX_PATHS:
            return JSONResponse(_error(request.url.path, exc.body(), exc.status), exc.status, exc.headers)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {}
        error = BadRequest(f"{'.'.join(map(str, err.get('loc', ())))}: {err.get('msg', 'invalid')}")
        return JSONResponse(_error(request.url.path, error.body(), 400), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        body = _error(request.url.path, error_body(str(exc.detail), type=kind, code=None), exc.status_code)
        # a 405's Allow names the methods the route takes (it was dropped here)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        # the last resort, for errors outside _AnswerUnhandled (in the middleware above it): still JSON
        log.exception("unhandled error on %s", request.url.path)
        _count_error(request, 500)
        return JSONResponse(_error(request.url.path, INTERNAL_ERROR, 500), status_code=500)
