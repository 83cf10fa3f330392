"""The node's HTTP API for gateways (FastAPI). Contract (stable; the gateway depends on it):

Who may call what (401 unauthenticated / 403 not allowed, in the error shape below):
    gateway-signed   headers of node.request_auth.sign_request (X-Loramesh-Gateway-Key, -Timestamp, -Signature)
                     over method, path, this node's id and the raw body, from a key the node trusts (the
                     operator's --trust-gateway-key list, else the keys its --gateway URLs announce);
                     a timestamp more than 60 s off, or a signature already used, is refused.
    operator         `Authorization: Bearer <token>`, the token in <data dir>/operator.token.
    public           no credentials.

POST /v1/generate                            gateway-signed
    body (unknown fields -> 400): {"request_id": "0x"+64hex (optional; made if absent),
      "adapter_id": "0x"+64hex | null (base model), "prompt": str | "prompt_token_ids": [int],
      "max_tokens": int >= 1 = 16, "temperature": float >= 0 = 1.0 (0 = greedy), "top_p": (0, 1] = 1,
      "top_k": int >= 0 = 0 (off), "seed": int in [0, 2^64) | null, "stop": [str] (<= 4), "stream": bool = false}
    A request id this node already runs or holds a receipt for: 409 "duplicate_request".
    non-stream 200: {"request_id", "adapter_id", "text", "token_ids", "finish_reason": "stop"|"length"|"abort",
      "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}, "receipt": {...}, "signature": hex}
    (an engine failure: 500 {"error": {...}, "receipt", "signature"} for the tokens produced)
    stream (text/event-stream): `data: {"type":"token","text":str,"token_id":int}` per token (text holds
      only complete characters, possibly ""), then `data: {"type":"done","finish_reason","usage","receipt",
      "signature"}`; an engine failure sends `data: {"type":"error","message"}` before the done event.
      A client that disconnects aborts its request. A streaming request whose adapter is not ready within
      HEADERS_AFTER_S (fetched from peers) is answered 200 at once; an adapter or engine refusal then comes as
      `{"type":"error","message","code"}` and a done event with a signed 0-token receipt (so a slow fetch is
      not mistaken for a hung node by a gateway's first-byte timeout).
POST /v1/requests/{request_id}/abort         operator, or signed by the gateway key that started the request
      (another trusted gateway: 403 "not_request_owner")
      -> {"receipt", "signature"} for what was produced (404 if unknown).
GET  /v1/requests/{request_id}/receipt       public
      -> {"receipt", "signature", "public_key"}: the signed receipt of a
      recent request (the node keeps the last RECENT_RECEIPTS, also of requests whose client went away, so a
      gateway that died mid-request can still close it); 409 "request_running" while it runs, 404
      "receipt_not_found" for one this node does not know (or has forgotten). Public: request ids are
      unguessable and a receipt holds only counts.
POST /v1/adapters/{adapter_id}/load          operator, or gateway-signed (gateways prefetch)
      body optional {"pin": bool} -> {"adapter_id", "slot", "pinned"}.
GET  /health -> {"status": "ok"}             public
GET  /status -> {"node_id", "public_key", "base_model": {"name", "id"}, "resident_adapters": [{"adapter_id",
      "name", "slot", "pinned"}], "cached_adapters": [{"adapter_id", "name"}], "free_slots", "num_slots",
      "queue_depth", "running", "tokens_per_s", "device", "usage": {"requests", "prompt_tokens",
      "completion_tokens"}}                  public
Bodies are read whole only up to a limit (413 "request_too_large"; generate 1 MiB by default) and parsed by
common.wire.parse_json (size, nesting depth, duplicate keys), never by FastAPI's own JSON decoding.
Errors: {"error": {"message", "type", "code"}}: 400 bad body / malformed JSON / unknown field / prompt longer
than the context (code "context_length_exceeded"); 401/403 as above; 404 adapter the node neither holds nor
can fetch ("adapter_not_found"); 409 adapter for another base model ("adapter_base_mismatch"), duplicate
request id or replayed signature; 422 adapter whose weights do not fit ("adapter_incompatible"); 503 no free
slot ("slots_busy").
Receipts: see node/receipts.py (Ed25519 over canonical JSON; node_id = sha256(public_key)).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from contextlib import asynccontextmanager
from typing import Annotated

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.wire import UntrustedJSONError, parse_json
from node.engine import (
    AdapterBaseMismatchError,
    AdapterError,
    AdapterIncompatibleError,
    AdapterNotFoundError,
    AdapterSlotsBusyError,
    DuplicateRequestError,
    AsyncEngine,
    FinishEvent,
    GenerationRequest,
    PromptTooLongError,
    RequestError,
    SamplingParams,
)
from common.http import ANSWER_OR_EVENTS, DEFAULT_MAX_BODY_BYTES, BodyLimitMiddleware, error_responses
from common.wire import node_id_of
from node.receipts import make_receipt, public_key_bytes, sign_receipt
from node.request_auth import MAX_SKEW_MS, SIG_HEADER, RequestAuthError, check_bearer, verify_request

log = logging.getLogger(__name__)

HEX_ID = r"^0x[0-9a-f]{64}$"
RECENT_RECEIPTS = 16384  # signed receipts kept for GET /v1/requests/{id}/receipt (about 600 bytes each)
MAX_LOAD_BODY_BYTES = 4096
# A streaming request whose adapter is not ready within this long (fetched from peers, decoded) gets its
# response headers at once and its adapter's outcome as the stream's first event: the gateway fails a
# node over when it sends nothing for a few seconds, and a node fetching an adapter is slow, not hung.
HEADERS_AFTER_S = 1.0
SEED_LIMIT = 1 << 64  # seeds are unsigned 64-bit: the device sampler hashes both 32-bit halves
IdPath = Annotated[str, Path(pattern=HEX_ID)]
TrustedKeys = Collection[str] | Callable[[], Collection[str]]


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, code: str, extra: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


class GenerateBody(BaseModel):
    # strict: a string max_tokens or a bool seed is a client's mistake to hear about, not to guess at
    model_config = ConfigDict(extra="forbid", strict=True)

    request_id: Annotated[str | None, Field(pattern=HEX_ID)] = None
    adapter_id: Annotated[str | None, Field(pattern=HEX_ID)] = None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    max_tokens: Annotated[int, Field(ge=1)] = 16
    temperature: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    seed: Annotated[int | None, Field(ge=0, lt=SEED_LIMIT)] = None
    stop: Annotated[list[str], Field(max_length=4)] = []
    stream: bool = False

    @model_validator(mode="after")
    def _one_prompt(self) -> "GenerateBody":
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("give exactly one of prompt or prompt_token_ids")
        return self


class LoadBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    pin: bool | None = None


def _error_message(errors: list[dict], *, located_in: tuple[str, ...] = ()) -> str:
    """One line for the first of pydantic's errors (a RequestValidationError's or a ValidationError's)."""
    err = errors[0]
    if err.get("type") == "json_invalid":
        return f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}"
    loc = ".".join(str(p) for p in err.get("loc", ()) if p not in located_in)
    if err.get("type") == "extra_forbidden":
        return f"unknown field {loc!r}"
    if err.get("type") == "missing" and not loc:
        return "request body is missing; expected a JSON object"
    if err.get("type") == "model_type":
        return "request body must be a JSON object"
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def _parse_body(raw: bytes, model: type[BaseModel], *, max_bytes: int, optional: bool = False):
    """A request body through the one bounded JSON parser, then the pydantic model; ApiError 400 otherwise."""
    if not raw.strip():
        if optional:
            return None
        raise ApiError(400, "request body is missing; expected a JSON object", "invalid_request")
    try:
        return model.model_validate(parse_json(raw, max_bytes=max_bytes, what="request body"))
    except UntrustedJSONError as e:
        raise ApiError(400, str(e), "invalid_request") from None
    except ValidationError as e:
        raise ApiError(400, _error_message(e.errors()), "invalid_request") from None


def _error_body(message: str, code: str, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "code": code}}


def _adapter_error(e: AdapterError) -> ApiError:
    if isinstance(e, AdapterNotFoundError):
        return ApiError(404, str(e), "adapter_not_found")
    if isinstance(e, AdapterBaseMismatchError):
        return ApiError(409, str(e), "adapter_base_mismatch")
    if isinstance(e, AdapterSlotsBusyError):
        return ApiError(503, str(e), "slots_busy")
    if isinstance(e, AdapterIncompatibleError):
        return ApiError(422, str(e), "adapter_incompatible")
    return ApiError(500, str(e), "adapter_error")


def _json_schema_body(model: type[BaseModel], *, required: bool = True) -> dict:
    # the handlers read their bodies themselves (parse_json), so the OpenAPI document is told the schema here
    return {"requestBody": {"required": required,
                            "content": {"application/json": {"schema": model.model_json_schema()}}}}


class ReplayGuard:
    """Signatures already used within the timestamp window: a captured signed call works only once."""

    def __init__(self, window_ms: int = 2 * MAX_SKEW_MS) -> None:
        self.window_ms = window_ms
        self._seen: OrderedDict[str, int] = OrderedDict()  # signature -> when first seen (ms), oldest first

    def first_use(self, signature: str, now_ms: int | None = None) -> bool:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        while self._seen and next(iter(self._seen.values())) < now - self.window_ms:
            self._seen.popitem(last=False)  # older than any timestamp verify_request still accepts
        if signature in self._seen:
            return False
        self._seen[signature] = now
        return True


def max_token_bytes(tokenizer) -> int:
    """The most UTF-8 bytes any one token stands for (an upper bound: byte-level pieces count 2 per byte)."""
    pieces = list(tokenizer.get_vocab())
    pieces += [str(t) for t in getattr(tokenizer, "all_special_tokens", ())]
    return max((len(p.encode("utf-8", "surrogatepass")) for p in pieces), default=1) or 1


def create_app(engine: AsyncEngine, node_key: Ed25519PrivateKey, *, trusted_gateways: TrustedKeys, operator_token: str,
               manage_engine: bool = True, extra_status: Callable[[], dict] | None = None,
               recent_receipts: int = RECENT_RECEIPTS, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               body_limits: dict[str, int] | None = None) -> FastAPI:
    """The node API over a (started or, with manage_engine, to-be-started) engine.

    `trusted_gateways`: the gateway public keys (hex) whose signed calls are accepted, as a live collection
    or a callable read on every call (the daemon's heartbeat sender learns keys while the node runs).
    `operator_token`: the bearer token of the operator endpoints. `max_body_bytes` caps every request body,
    `body_limits` per path prefix (the daemon's upload route). `extra_status` adds sections (e.g. p2p
    transfers) to GET /status; `app.state.status_doc()` returns the same document for other users such as
    the heartbeat sender.
    """
    if not operator_token:
        raise ValueError("the node API needs an operator token: there is no unauthenticated mode")
    public_key = public_key_bytes(node_key)
    node_id = node_id_of(public_key)
    trusted = trusted_gateways if callable(trusted_gateways) else (lambda: trusted_gateways)
    replays = ReplayGuard()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                engine.close()

    app = FastAPI(title="loramesh node", lifespan=lifespan, responses=error_responses({
        400: "a malformed body, a bad field, or a prompt longer than the context",
        401: "no, a malformed or a wrong signature or operator token", 403: "a gateway key this node does not trust",
        404: "an adapter this node neither holds nor can fetch, or an unknown request",
        409: "a duplicate or replayed request, an adapter of another base, or a request still running",
        413: "a body over the limit", 422: "an adapter whose weights do not fit", 500: "an engine failure",
        503: "no free adapter slot"}))
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, overrides=body_limits)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        body = _error_body(exc.message, exc.code, "server_error" if exc.status >= 500 else "invalid_request_error")
        return JSONResponse(body | exc.extra, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message = _error_message(exc.errors(), located_in=("body", "path"))
        return JSONResponse(_error_body(message, "invalid_request"), status_code=400)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        # the last resort: a bug must still answer in the API's shape, without its details
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(_error_body("internal error on this node", "internal_error", "server_error"),
                            status_code=500)

    # ---- who is calling ----
    async def signed_by_gateway(request: Request) -> str:
        """The trusted gateway key that signed this call (over its raw body); ApiError 401/403/409 otherwise."""
        body = await request.body()
        try:
            # the decoded path as sent (request.url.path re-parses it and drops \t, \r, \n a signer kept)
            key = verify_request(request.headers, method=request.method, path=request.scope["path"],
                                 node_id=node_id, body=body, trusted=trusted())
        except RequestAuthError as e:
            raise ApiError(e.status, e.message, e.code) from None
        if not replays.first_use(request.headers[SIG_HEADER].lower()):
            raise ApiError(409, "this signed request was already received (replayed)", "replayed_request")
        return key

    def is_operator(request: Request) -> bool:
        """True for a call with the operator's token; False without an Authorization header; 401 for a wrong one."""
        authorization = request.headers.get("authorization")
        if authorization is None:
            return False
        try:
            check_bearer(authorization, operator_token)
        except RequestAuthError as e:
            raise ApiError(e.status, e.message, e.code) from None
        return True

    async def operator_or_gateway(request: Request) -> str | None:
        """None for the operator, else the trusted gateway key that signed the call."""
        return None if is_operator(request) else await signed_by_gateway(request)

    receipts: OrderedDict[str, dict] = OrderedDict()  # request id -> {"receipt", "signature"}, newest last
    running: set[str] = set()  # request ids taken here whose receipt is not stored yet
    tasks: set[asyncio.Task] = set()  # clean-ups spawned from responses that never started

    def spawn(coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    started_by: dict[str, str] = {}  # request id -> gateway key, while running or its receipt is kept
    cold: dict[str, str] = {}  # request id -> adapter id: streams answered while their adapter is prepared

    def signed(ev: FinishEvent) -> dict:
        """The signed receipt of a finished request, kept for GET /v1/requests/{id}/receipt."""
        kept = receipts.get(ev.request_id)
        if kept is not None and kept["receipt"]["finished_at"] == ev.finished_at:
            return kept
        reason = ev.finish_reason if ev.finish_reason in ("stop", "length") else "abort"
        receipt = make_receipt(request_id=ev.request_id, adapter_id=ev.adapter_id, node_id=node_id,
                               prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens,
                               finish_reason=reason, started_at=ev.started_at, finished_at=ev.finished_at)
        out = {"receipt": receipt, "signature": sign_receipt(receipt, node_key)}
        receipts[ev.request_id] = out
        receipts.move_to_end(ev.request_id)
        while len(receipts) > recent_receipts:
            old, _ = receipts.popitem(last=False)
            started_by.pop(old, None)
        running.discard(ev.request_id)
        return out

    async def abort_and_keep(stream) -> None:
        """Abort a request whose client went away and keep its receipt (shielded: it runs to its end)."""
        async def go() -> None:
            try:
                ev = await engine.abort(stream.request_id)
                if ev is not None:
                    signed(ev)
            finally:
                running.discard(stream.request_id)
        try:
            await asyncio.shield(go())
        except asyncio.CancelledError:
            pass

    def usage(ev: FinishEvent) -> dict:
        return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                "total_tokens": ev.prompt_tokens + ev.completion_tokens}

    prompt_bytes: list[int] = []  # computed on first use: the tokenizer's vocabulary is not needed before

    def check_prompt_size(body: GenerateBody) -> None:
        """Refuse a prompt that cannot fit the context before the engine tokenizes it (~1.5 us a byte on
        one core, on the event loop: 20 MB held the node 38 s), when its length alone proves it."""
        max_len = engine.core.max_len
        if body.prompt_token_ids is not None:
            n = len(body.prompt_token_ids)
        else:
            if engine.tokenizer is None:
                return
            if not prompt_bytes:
                # x4: a normalizer may compose characters into fewer bytes (NFC, at most 3:1) before splitting
                prompt_bytes.append(4 * max_token_bytes(engine.tokenizer) * max_len)
            size = len(body.prompt.encode("utf-8", "surrogatepass"))
            if size <= prompt_bytes[0]:
                return
            n = size // (prompt_bytes[0] // max_len)  # a lower bound on its tokens
        if n >= max_len:
            raise ApiError(400, f"the prompt has at least {n} tokens; this node's context holds {max_len} "
                                "(prompt + at least one generated token)", "context_length_exceeded")

    @app.get("/health")
    async def health() -> dict:
        """Public."""
        return {"status": "ok"}

    def status_doc() -> dict:
        doc = {"node_id": node_id, "public_key": public_key.hex(),
               "base_model": {"name": engine.base_model_name, "id": engine.base_model_id}} | engine.status()
        return doc | (extra_status() if extra_status is not None else {})

    app.state.status_doc = status_doc

    @app.get("/status")
    async def status() -> dict:
        """Public: what a gateway's router and the explorer show."""
        return status_doc()

    @app.post("/v1/adapters/{adapter_id}/load", openapi_extra=_json_schema_body(LoadBody, required=False))
    # Depends as a default, not inside Annotated: these dependencies are closures, which the postponed
    # annotations of this module cannot name
    async def load_adapter(adapter_id: IdPath, request: Request, _caller: str | None = Depends(operator_or_gateway)
                           ) -> dict:
        """Operator, or a trusted gateway (it prefetches the adapters it routes)."""
        body = _parse_body(await request.body(), LoadBody, max_bytes=MAX_LOAD_BODY_BYTES, optional=True)
        pin = body.pin if body is not None else None
        try:
            slot = await engine.load_adapter(adapter_id, pin)
        except AdapterError as e:
            raise _adapter_error(e) from e
        pinned = any(a["adapter_id"] == adapter_id and a["pinned"] for a in engine.status()["resident_adapters"])
        return {"adapter_id": adapter_id, "slot": slot, "pinned": pinned}

    @app.post("/v1/requests/{request_id}/abort")
    async def abort(request_id: IdPath, caller: str | None = Depends(operator_or_gateway)) -> dict:
        """Operator, or the gateway whose key started the request: nobody else may cut a client's stream."""
        if caller is not None and started_by.get(request_id, caller) != caller:
            raise ApiError(403, f"request {request_id} was started by another gateway: only it may abort it",
                           "not_request_owner")
        if request_id in cold:  # still waiting for its adapter: it will not start
            return unserved(request_id, cold.pop(request_id), int(time.time() * 1000))
        if caller is not None and request_id not in started_by:
            ev = None  # never started by a gateway here (or long forgotten): nothing this caller may touch
        else:
            ev = await engine.abort(request_id)
        if ev is None:
            raise ApiError(404, f"request {request_id} is not running or recently finished on this node",
                           "request_not_found")
        return signed(ev)

    @app.get("/v1/requests/{request_id}/receipt")
    async def receipt(request_id: IdPath) -> dict:
        """Public: request ids are unguessable and a receipt holds only counts."""
        kept = receipts.get(request_id)
        if kept is not None:
            return kept | {"public_key": public_key.hex()}
        if request_id in running:
            # finished in the engine, but nobody read its end (its client left before the stream began)?
            ev = await asyncio.wrap_future(engine.call(lambda: engine.core.recent.get(request_id)))
            if ev is not None:
                return signed(ev) | {"public_key": public_key.hex()}
            raise ApiError(409, f"request {request_id} is still running on this node", "request_running")
        raise ApiError(404, f"this node has no receipt for request {request_id} (unknown, or long finished)",
                       "receipt_not_found")

    @app.post("/v1/generate", openapi_extra=_json_schema_body(GenerateBody), responses=ANSWER_OR_EVENTS)
    async def generate(request: Request, gateway: str = Depends(signed_by_gateway)):
        """Trusted gateways only (signed)."""
        body = _parse_body(await request.body(), GenerateBody, max_bytes=max_body_bytes)
        rid = body.request_id or "0x" + secrets.token_hex(32)
        if rid in running or rid in receipts:
            raise ApiError(409, f"request {rid} was already received by this node", "duplicate_request")
        check_prompt_size(body)
        # the id is taken before the first await: a second request with it is a duplicate from here on
        running.add(rid)
        started_by[rid] = gateway
        try:
            if body.adapter_id is not None:
                prep = asyncio.ensure_future(engine.prepare_adapter(body.adapter_id))
                prep.add_done_callback(lambda f: f.cancelled() or f.exception())  # seen, whoever waits on it
                await asyncio.wait({prep}, timeout=HEADERS_AFTER_S if body.stream else None)
                if not prep.done():
                    cold[rid] = body.adapter_id
                    started_at = int(time.time() * 1000)

                    def never_started() -> None:
                        if cold.pop(rid, None) is not None and rid not in receipts:
                            unserved(rid, body.adapter_id, started_at)
                    return _GuardedStream(_cold_sse(rid, body, prep, started_at), never_started, rid)
                try:
                    prep.result()
                except AdapterError as e:
                    raise _adapter_error(e) from e
            stream = submit(rid, body)
        except BaseException:  # refused, or the client left while the adapter was prepared
            running.discard(rid)
            started_by.pop(rid, None)
            raise
        if body.stream:
            return _GuardedStream(_sse(stream), lambda: spawn(abort_and_keep(stream)), rid)
        try:
            async for ev in stream:
                pass
        finally:
            if not stream.finished:  # the client went away mid-request
                await abort_and_keep(stream)
        final = stream.final
        s = signed(final)
        out = {"request_id": rid, "adapter_id": body.adapter_id, "text": final.text,
               "token_ids": list(final.token_ids), "finish_reason": s["receipt"]["finish_reason"],
               "usage": usage(final)} | s
        if final.error is not None:
            return JSONResponse(_error_body(final.error, "engine_error", "server_error") | out, status_code=500)
        return out

    def submit(rid: str, body: GenerateBody):
        """Queue the request in the engine (ApiError 400/409 for one it refuses)."""
        try:
            params = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                                    top_k=body.top_k, seed=body.seed, stop=tuple(body.stop))
            req = GenerationRequest(rid, body.adapter_id, prompt=body.prompt,
                                    prompt_token_ids=body.prompt_token_ids, params=params)
            stream = engine.submit(req)
        except PromptTooLongError as e:
            raise ApiError(400, str(e), "context_length_exceeded") from e
        except DuplicateRequestError as e:
            raise ApiError(409, str(e), "duplicate_request") from e
        except RequestError as e:
            raise ApiError(400, str(e), "invalid_request") from e
        return stream

    def unserved(rid: str, adapter_id: str | None, started_at: int) -> dict:
        """The signed receipt of a request that ended before the engine saw it: nothing was produced."""
        return signed(FinishEvent(rid, adapter_id, "abort", 0, 0, started_at, max(started_at, int(time.time() * 1000))))

    async def _cold_sse(rid: str, body: GenerateBody, prep: asyncio.Future, started_at: int):
        """A streaming request whose adapter was not ready at once: the adapter's outcome (and the engine's
        refusal, if any) comes as an error event and a done event with a 0-token receipt, as for an engine
        failure before the first token; then the stream as usual."""
        err = stream = None
        try:
            try:
                await asyncio.shield(prep)  # shielded: a client that leaves does not stop a fetch others may await
            except AdapterError as e:
                err = _adapter_error(e)
            if rid not in cold:  # aborted while its adapter was prepared
                err = ApiError(409, f"request {rid} was aborted before it started", "request_aborted")
            if err is None:
                stream = submit(rid, body)
        except ApiError as e:
            err = e
        except asyncio.CancelledError:  # the client left while the adapter was prepared
            if rid not in receipts:
                unserved(rid, body.adapter_id, started_at)
            raise
        finally:
            cold.pop(rid, None)
        if err is not None:
            log.info("request %s ended before it started: %s", rid, err.message)
            kept = receipts.get(rid) or unserved(rid, body.adapter_id, started_at)
            yield _event({"type": "error", "message": err.message, "code": err.code})
            yield _event({"type": "done", "finish_reason": "abort",
                          "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}} | kept)
            return
        async for chunk in _sse(stream):
            yield chunk

    async def _sse(stream):
        try:
            async for ev in stream:
                if isinstance(ev, FinishEvent):
                    if ev.error is not None:
                        yield _event({"type": "error", "message": ev.error})
                    s = signed(ev)
                    if ev.finish_reason == "abort":
                        log.info("request %s aborted: receipt %s", ev.request_id, s["receipt"])
                    yield _event({"type": "done", "finish_reason": s["receipt"]["finish_reason"],
                                  "usage": usage(ev)} | s)
                else:
                    yield _event({"type": "token", "text": ev.text, "token_id": ev.token_id})
        finally:
            if not stream.finished:  # client disconnected: stop generating for it, keep the receipt
                log.info("client of %s disconnected; aborting", stream.request_id)
                await abort_and_keep(stream)

    return app


class _GuardedStream(StreamingResponse):
    """An SSE response that calls `never_started()` when it ends before its body took a step: Starlette
    cancels a response whose client left before it began, and then no finally of the body's generator
    runs, so a request would stay running (and generating) for nobody."""

    def __init__(self, body, never_started: Callable[[], None], request_id: str) -> None:
        self._started = False
        self._never_started = never_started

        async def tracked():
            self._started = True
            async for chunk in body:
                yield chunk
        super().__init__(tracked(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Request-Id": request_id})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._started:
                self._never_started()


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
