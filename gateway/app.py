"""The gateway's HTTP layer: OpenAI-compatible routes, node heartbeats, metrics. Thin handlers over
gateway.service.Gateway."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.errors import (
    ERROR_STATUSES,
    OPENAI_ERROR_JSON,
    BadRequest,
    GatewayError,
    ModelNotFound,
    NoNodeAvailable,
    UpstreamError,
    error_body,
)
from gateway.openai_api import (
    DONE,
    ChatRequest,
    ChunkBuilder,
    CompletionRequest,
    chat_response,
    completion_response,
    finish_reason,
    parse_body,
    sse,
    usage_dict,
)
from gateway.registry import RegistryView
from gateway.relay import Relay
from gateway.service import Gateway
from gateway.settlement import InProcessSettler
from gateway.settings import GatewaySettings
from gateway.storage import tighten_sqlite_file
from common.wire import UntrustedJSONError, parse_json, restore_recursion_limit
from common.http import ANSWER_OR_EVENTS, BodyLimitMiddleware, error_responses

log = logging.getLogger(__name__)


def _settler(settings: GatewaySettings, client, account) -> InProcessSettler:
    from ledger.db import make_engine
    from ledger.settler import Settler
    from ledger.settler_config import SettlerConfig

    engine = make_engine(settings.db_url, immediate=True)
    return InProcessSettler(Settler(engine, client.with_account(account),
                                    SettlerConfig(batch_size=settings.settle_batch_size,
                                                  interval=settings.settle_interval_s,
                                                  max_in_flight=settings.settle_max_in_flight)))  # fmt: skip


# prompts up to this many characters are tokenized on the event loop (tens of microseconds: less than a
# worker thread's round trip); longer ones, and a base's first use (it loads the tokenizer), in a thread
INLINE_TOKENIZE_CHARS = 4096


async def _blocking(size: int, fn, *args):
    if size <= INLINE_TOKENIZE_CHARS and getattr(fn, "__self__", None) is not None and fn.__self__.loaded(args[0]):
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


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
        except Exception:
            if started:  # too late for an answer: the stream is cut, as it would be anyway
                raise
            log.exception("unhandled error on %s", scope.get("path"))
            if self.on_error is not None:
                self.on_error(scope.get("path", ""))
            await JSONResponse(INTERNAL_ERROR, status_code=500)(scope, receive, send)


def _declare_bodies(app: FastAPI) -> None:
    """Declare the OpenAI routes' JSON bodies in the OpenAPI schema: the handlers read their bodies themselves
    (through the bounded parser), so FastAPI cannot see them, and clients and schema fuzzers would not either."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = generate()
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for path, model in (("/v1/completions", CompletionRequest), ("/v1/chat/completions", ChatRequest)):
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(body.pop("$defs", {}))
            schemas[model.__name__] = body
            ref = {"$ref": f"#/components/schemas/{model.__name__}"}
            doc["paths"][path]["post"]["requestBody"] = {"required": True,
                                                         "content": {"application/json": {"schema": ref}}}
        return doc

    app.openapi = openapi


def create_app(settings: GatewaySettings | None = None, *, chain_client=None, settler_account=None) -> FastAPI:
    """A gateway app. The chain client defaults to one built from settings.deployment (registry mirror
    sync); the settler runs in-process when a settler account (or settings.key_file) is given."""
    import gateway.models  # noqa: F401 - registers the gateway's tables
    from ledger.db import init_db, make_engine, redact_url

    from gateway.usage import set_busy_timeout

    settings = settings or GatewaySettings()
    tighten_sqlite_file(settings.db_url)  # 0600: it holds key hashes and usage
    engine = make_engine(settings.db_url)
    set_busy_timeout(engine, settings.db_busy_timeout_s)
    init_db(engine)  # creates every registered table and adds missing columns, the gateway's included
    if chain_client is None and settings.deployment is not None:
        from ledger.chain import ChainClient

        chain_client = ChainClient.from_deployment(settings.deployment, rpc_url=settings.rpc_url, check=False)
    if settler_account is None and settings.key_file is not None and settings.settle:
        from ledger.keys import load_account

        settler_account = load_account(settings.key_file)
    gw = Gateway(settings, engine, RegistryView(engine, chain_client))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        restore_recursion_limit()  # after every import (py_ecc raises it at import time)
        log.info("gateway key %s (nodes trust this gateway's calls by it); database %s", gw.gateway_key_hex,
                 redact_url(settings.db_url))  # fmt: skip
        # tokenizers and chat templates load before the first request: loading them on concurrent first
        # requests raced in transformers' lazy imports (500s)
        await asyncio.to_thread(gw.templates.warm)
        await gw.load_disputes()
        sync = asyncio.get_running_loop().create_task(gw.sync_loop(), name="registry-sync")
        outbox = asyncio.get_running_loop().create_task(gw.outbox_loop(), name="outbox-check")
        reconciling = asyncio.get_running_loop().create_task(gw.reconcile_loop(), name="reconcile")
        if settler_account is not None and chain_client is not None and settings.settle:
            app.state.settler = _settler(settings, chain_client, settler_account)
            app.state.settler.start()
        try:
            yield
        finally:
            sync.cancel()
            outbox.cancel()
            reconciling.cancel()
            await gw.aclose()
            if app.state.settler is not None:
                await app.state.settler.stop()

    app = FastAPI(title="loramesh gateway", lifespan=lifespan,
                  responses=error_responses(ERROR_STATUSES, OPENAI_ERROR_JSON))

    def _unhandled(path: str) -> None:
        if path.startswith("/v1/"):
            gw.metrics.requests.labels("-", "500").inc()

    app.add_middleware(_AnswerUnhandled, on_error=_unhandled)
    # no body is read past its limit; a heartbeat is small, a prompt may be large (a context's worth of text)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       overrides={"/internal/": settings.max_heartbeat_bytes})  # fmt: skip
    _declare_bodies(app)
    app.state.gateway = gw
    app.state.settler = None  # the in-process settler, when this gateway settles

    def _count_error(request: Request, status: int) -> None:
        model = getattr(request.state, "model", None) or "-"
        if request.url.path.startswith("/v1/"):
            gw.metrics.requests.labels(model, str(status)).inc()

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        _count_error(request, exc.status)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {}
        return BadRequest(f"{'.'.join(map(str, err.get('loc', ())))}: {err.get('msg', 'invalid')}").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), type=kind, code=None), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        # the last resort, for errors outside _AnswerUnhandled (in the middleware above it): still JSON
        log.exception("unhandled error on %s", request.url.path)
        _count_error(request, 500)
        return JSONResponse(INTERNAL_ERROR, status_code=500)

    async def _auth(request: Request):
        header = request.headers.get("authorization")
        # a cached key answers on the event loop; only a miss pays the worker thread and the database
        key, private = gw.cached_auth(header) or await asyncio.to_thread(gw.authenticate, header)
        gw.admit(key)
        return key, private

    @app.get("/health")
    async def health() -> JSONResponse:
        """Public: liveness, live nodes, outbox and settlement state."""
        # 503 while the outbox cannot be written: this gateway serves nothing then, and says why
        body = gw.health()
        if app.state.settler is not None:  # a low deposit is a warning here, not a reason to refuse requests
            body["settlement"] = await app.state.settler.status()
        return JSONResponse(body, status_code=200 if body["outbox"]["writable"] else 503)

    @app.get("/metrics", response_class=Response, responses={
        200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        """Public: Prometheus metrics."""
        gw.metrics.live_nodes.set(len(gw.directory.live()))
        for node_id in list(gw.directory.disputed):
            gw.metrics.disputed_nodes.labels(node_id).set(1)
        if app.state.settler is not None:
            gw.metrics.set_settlement(await app.state.settler.status())
        return Response(gw.metrics.render(), media_type=gw.metrics.content_type)

    @app.get("/internal/gateway-key")
    async def gateway_key() -> dict:
        """Public: the key this gateway signs its calls to nodes with (a node operator's allow-list takes it)."""
        return {"gateway_key": gw.gateway_key_hex}

    @app.post("/internal/heartbeat")
    async def heartbeat(request: Request) -> dict:
        """Public: a node's signed heartbeat (the signature and the chain's registry are the authentication).
        The answer names this gateway's key, so a node learns whose signed calls to accept."""
        try:
            doc = parse_json(await request.body(), max_bytes=settings.max_heartbeat_bytes, what="heartbeat")
        except UntrustedJSONError as e:
            gw.metrics.heartbeats.labels("refused").inc()
            raise BadRequest(str(e), param="heartbeat") from e
        try:
            entry = await asyncio.to_thread(gw.directory.accept_heartbeat, doc)
        except GatewayError:
            gw.metrics.heartbeats.labels("refused").inc()
            raise
        gw.metrics.heartbeats.labels("accepted").inc()
        return {"accepted": True, "node_id": entry.node_id, "ttl_s": gw.directory.ttl,
                "gateway_key": gw.gateway_key_hex}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        """API key: the models this key may use."""
        key, private = await _auth(request)
        return {"object": "list", "data": gw.list_models(key, private)}

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str) -> dict:
        """API key: one model this key may use."""
        key, private = await _auth(request)
        request.state.model = model
        target = gw.resolve(model, key, private)
        if target.adapter_id is None:  # by its name or id, live or not
            return gw.base_model_object(target.base_model_id)
        for m in gw.list_models(key, private):
            if m["adapter_id"] == target.adapter_id:
                return m
        raise ModelNotFound(f"The model '{model}' does not exist or you do not have access to it.",
                            param="model")  # an older version of an adapter: not listed  # fmt: skip

    @app.post("/v1/completions", responses=ANSWER_OR_EVENTS)
    async def completions(request: Request):
        """API key: an OpenAI completion (body: CompletionRequest)."""
        return await _serve(request, chat=False)

    @app.post("/v1/chat/completions", responses=ANSWER_OR_EVENTS)
    async def chat_completions(request: Request):
        """API key: an OpenAI chat completion (body: ChatRequest)."""
        return await _serve(request, chat=True)

    async def _serve(request: Request, *, chat: bool):
        key, private = await _auth(request)
        gw.check_outbox()  # nothing is served that could not be recorded
        req = parse_body(ChatRequest if chat else CompletionRequest, await request.body(),
                         max_bytes=settings.max_body_bytes)  # fmt: skip
        request.state.model = req.model
        target = gw.resolve(req.model, key, private)
        gw.check_price(target, key)
        wanted = req.wanted_tokens() if chat else req.max_tokens
        max_tokens = wanted or settings.default_max_tokens
        if max_tokens > settings.max_max_tokens:
            raise BadRequest(f"max_tokens {max_tokens} is more than this gateway allows ({settings.max_max_tokens})",
                             param="max_tokens")  # fmt: skip
        # the prompt goes to the node as token ids the gateway made itself: their number is the prompt count
        base = target.base_model_id
        if not gw.directory.live(base):
            raise NoNodeAvailable(f"no live node serves the base model of {req.model!r} right now; retry later")
        context = gw.templates.context_len(base)
        if chat:
            messages = req.chat_messages()
            chars = sum(len(m["content"]) for m in messages)
            gw.templates.check_length(base, chars)  # a prompt that cannot fit is refused before it is tokenized
            ids = await _blocking(chars, gw.templates.render, base, messages)
        elif isinstance(req.prompt, list) and isinstance(req.prompt[0], int):
            ids = list(req.prompt)
            gw.templates.check_ids(base, ids)
        else:
            text = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
            gw.templates.check_length(base, len(text))
            ids = await _blocking(len(text), gw.templates.encode, base, text)
        if not ids:
            raise BadRequest("the prompt is empty; expected at least one token", param="prompt")
        if context is not None and len(ids) >= context:
            raise BadRequest(f"the prompt has {len(ids)} tokens; the model's context holds {context} (prompt + at "
                             "least one generated token)", code="context_length_exceeded", param="prompt")  # fmt: skip
        node_body = {"adapter_id": target.adapter_id, "prompt_token_ids": ids, "max_tokens": max_tokens,
                     "temperature": 1.0 if req.temperature is None else req.temperature,
                     "top_p": 1.0 if req.top_p is None else req.top_p, "seed": req.seed, "stop": req.stop_list()}
        rid = "0x" + secrets.token_hex(32)
        endpoint = "chat" if chat else "completions"
        relay = Relay(gw, target, request_id=rid, node_body=node_body, key_id=key.id, endpoint=endpoint,
                      prompt_tokens=len(ids), max_tokens=max_tokens, context_len=context)  # fmt: skip
        await relay.start()
        created = int(time.time())
        headers = {"X-Request-Id": rid, "X-Loramesh-Node": relay.node.node_id}
        if req.stream:
            builder = ChunkBuilder(chat=chat, rid=rid, created=created, model=req.model,
                                   include_usage=req.include_usage)  # fmt: skip
            return StreamingResponse(_stream(relay, builder), media_type="text/event-stream",
                                     headers=headers | {"Cache-Control": "no-cache"})  # fmt: skip
        relay.buffered = True  # an error answer delivers none of the text: then nothing is billed
        try:
            async for _ in relay.tokens():
                pass
        except BaseException:
            relay.finish_detached(client_gone=True)
            raise
        await asyncio.shield(gw.spawn(relay.finish()))
        if relay.failure:
            raise UpstreamError(f"{relay.failure}; the completion is incomplete", code="node_failed",
                                headers=headers)  # fmt: skip
        usage = usage_dict(*relay.usage)
        build = chat_response if chat else completion_response
        body = build(rid, created, req.model, "".join(relay.text), finish_reason(relay.finish_reason), usage)
        return JSONResponse(body, headers=headers)

    async def _stream(relay: Relay, b: ChunkBuilder):
        # chunks that are ready together go out in one write: each write is a send through the whole
        # ASGI stack and a wake-up of the client, and the bytes on the wire are the same
        opening = b.role() if b.chat else b""
        try:
            async for text in relay.tokens():
                yield opening + b.token(text)
                opening = b""
            await asyncio.shield(gw.spawn(relay.finish()))
            if relay.failure:
                yield opening + sse(error_body(f"{relay.failure}; the response is incomplete",
                                               type="upstream_error", code="node_failed"))  # fmt: skip
                return
            usage = b.usage(usage_dict(*relay.usage)) if b.include_usage else b""
            yield opening + b.finish(finish_reason(relay.finish_reason)) + usage + DONE
        finally:
            relay.finish_detached(client_gone=True)

    return app
