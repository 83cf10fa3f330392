"""What the routes share (`NodeApi`, on app.state.node) and who is calling: the auth dependencies.

GatewayKey        a call signed by a gateway key this node trusts (its key; 401/403/409 otherwise)
Operator          a call with the operator's bearer token (401 otherwise)
OperatorOrGateway None for the operator, else the trusted gateway key that signed the call
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Annotated

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import Depends, Request
from starlette.requests import ClientDisconnect

from common.wire import GENERATE_FEATURES
from node.api.book import RequestBook
from node.api.errors import ApiError
from node.engine import AsyncEngine
from node.health import NodeHealth
from node.metrics import NodeMetrics
from node.request_auth import (
    BODY_HASH_HEADER,
    MAX_SKEW_MS,
    SIG_HEADER,
    RequestAuthError,
    check_bearer,
    check_body,
    check_headers,
    verify_request,
)
from node.upload import PackageInstaller

TrustedKeys = Collection[str] | Callable[[], Collection[str]]

# A body is read before the signature of a call that does not carry its body's hash can be checked, and anyone can
# write a gateway's headers (its key is public, a timestamp is the time): such a call may bring at most
# LARGE_BODY_BYTES. A call that carries the hash (BODY_HASH_HEADER: every gateway of this release) is verified from
# its headers first, so a stranger gets no byte of its body read, and a gateway's large generate call (sized for the
# node's context: models.generate_body_bytes) is read only once it is known to be one
LARGE_BODY_BYTES = 1 << 20
# ...and within this many seconds: uvicorn bounds no body's time, and a stranger held 300 connections of almost a
# MiB each, unanswered, for as long as it liked (red team; an honest gateway sends 1 MiB in well under a second)
UNVERIFIED_BODY_S = 5.0
# ...and a body whose signed hash came first, within this many seconds: a signature is used up only by a body that
# matches it, so the read of one that never ends must end (a gateway sends the largest generate call in well under
# a second on any link a node could serve from)
SIGNED_BODY_S = 30.0


class ReplayGuard:
    """Signatures already used within the timestamp window: a captured signed call works only once."""

    def __init__(self, window_ms: int = 2 * MAX_SKEW_MS) -> None:
        self.window_ms = window_ms
        self._seen: OrderedDict[str, int] = OrderedDict()  # signature -> when first seen (ms), oldest first

    def used(self, signature: str, now_ms: int | None = None) -> bool:
        """Whether the signature was used within the window (nothing is taken)."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        while self._seen and next(iter(self._seen.values())) < now - self.window_ms:
            self._seen.popitem(last=False)  # older than any timestamp verify_request still accepts
        return signature in self._seen

    def first_use(self, signature: str, now_ms: int | None = None) -> bool:
        """Take the signature as used; False when it was. A check and a write with no await between: of two
        calls with one signature on the event loop, one wins."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        if self.used(signature, now):
            return False
        self._seen[signature] = now
        return True


@dataclass(eq=False)
class NodeApi:
    """Everything the routes of one node API use: its engine and key, whom it trusts, its requests."""

    engine: AsyncEngine
    node_key: Ed25519PrivateKey
    public_key: bytes
    node_id: str
    trusted: Callable[[], Collection[str]]  # read on every call: a gateway's new key counts at once
    operator_token: str
    book: RequestBook
    max_body_bytes: int
    # POST /v1/generate's own limit: what a gateway's call may need for this base (models.generate_body_bytes)
    generate_body_bytes: int
    extra_status: Callable[[], dict] | None = None
    health: NodeHealth | None = None  # GET /health's checks (None: the engine's only)
    metrics: NodeMetrics | None = None  # GET /metrics
    uploads: PackageInstaller | None = None
    # POST /internal/gateway-hello: checks a gateway's hello and answers the node's heartbeat (None: refused)
    on_hello: Callable[[object], Awaitable[dict]] | None = None
    replays: ReplayGuard = field(default_factory=ReplayGuard)
    # the prompt size (UTF-8 bytes) past which a prompt's length alone proves it too long for the context;
    # computed on first use (routes/generate.py): the tokenizer's vocabulary is not needed before
    prompt_bytes: int | None = None

    def status_doc(self) -> dict:
        """GET /status's document (also what the heartbeat sender reports)."""
        doc = {
            "node_id": self.node_id,
            "public_key": self.public_key.hex(),
            "base_model": {"name": self.engine.base_model_name, "id": self.engine.base_model_id},
            "features": list(GENERATE_FEATURES),
        }
        doc |= self.engine.status()
        return doc | (self.extra_status() if self.extra_status is not None else {})


def node_api(request: Request) -> NodeApi:
    return request.app.state.node


async def _node(request: Request) -> NodeApi:
    # async: FastAPI runs a plain `def` dependency on a worker thread, a thread hop on every request
    return node_api(request)


Node = Annotated[NodeApi, Depends(_node)]


async def signed_by_gateway(request: Request) -> str:
    """The trusted gateway key that signed this call (over its raw body); ApiError 401/403/409 otherwise."""
    node, headers = node_api(request), request.headers
    # the decoded path as sent (request.url.path re-parses it and drops \t, \r, \n a signer kept)
    verify = functools.partial(
        verify_request, headers, method=request.method, path=request.scope["path"], node_id=node.node_id
    )
    declared = headers.get("content-length", "")
    small = declared.isascii() and declared.isdigit() and int(declared) <= LARGE_BODY_BYTES
    try:
        if BODY_HASH_HEADER in headers:
            key = verify(body=None, trusted=node.trusted())  # from the headers: nothing of the body read yet
            # A signature is used up only by the body it signs: headers seen on the way and sent first with other
            # bytes, or with a body that never ends, must not make the call they came from a replay. A header set
            # already used gets no body read; one not used yet may get several read at once, each bounded in
            # size and time, and only the first that matches is served
            if node.replays.used(headers[SIG_HEADER].lower()):
                raise ApiError(409, REPLAYED, "replayed_request")
            try:
                body = await asyncio.wait_for(_body(request), SIGNED_BODY_S)
            except TimeoutError:
                raise ApiError(408, "the request body did not arrive in time", "request_timeout") from None
            if small:
                check_body(headers, body)
            else:  # hashing megabytes is not done on the event loop
                await asyncio.to_thread(check_body, headers, body)
            _first_use(node, headers)
            return key
        check_headers(headers)  # a call no gateway could have signed now is refused before its body is read
        if not small:
            raise RequestAuthError(
                401,
                f"a body past {LARGE_BODY_BYTES} bytes must come with its signed sha256 ({BODY_HASH_HEADER}); a "
                "gateway of an older release does not send it",
                "unauthenticated",
            )
        try:
            body = await asyncio.wait_for(_body(request), UNVERIFIED_BODY_S)
        except TimeoutError:
            raise ApiError(408, "the request body did not arrive in time", "request_timeout") from None
        key = verify(body=body, trusted=node.trusted())
    except RequestAuthError as e:
        raise ApiError(e.status, e.message, e.code) from None
    _first_use(node, headers)
    return key


REPLAYED = "this signed request was already received (replayed)"


def _first_use(node: NodeApi, headers) -> None:
    if not node.replays.first_use(headers[SIG_HEADER].lower()):
        raise ApiError(409, REPLAYED, "replayed_request")


async def _body(request: Request) -> bytes:
    try:
        return await request.body()
    except ClientDisconnect:  # not the node's error: no traceback in its log for every caller that hangs up
        raise ApiError(400, "the client went away while sending the body", "client_disconnected") from None


def _is_operator(request: Request) -> bool:
    """True for a call with the operator's token; False without an Authorization header; 401 for a wrong one."""
    authorization = request.headers.get("authorization")
    if authorization is None:
        return False
    try:
        check_bearer(authorization, node_api(request).operator_token)
    except RequestAuthError as e:
        raise ApiError(e.status, e.message, e.code) from None
    return True


async def operator(request: Request) -> None:
    """The operator's token, and nothing else (checked before a byte of the body is read)."""
    try:
        check_bearer(request.headers.get("authorization"), node_api(request).operator_token)
    except RequestAuthError as e:
        raise ApiError(e.status, e.message, e.code) from None


async def operator_or_gateway(request: Request) -> str | None:
    """None for the operator, else the trusted gateway key that signed the call."""
    return None if _is_operator(request) else await signed_by_gateway(request)


GatewayKey = Annotated[str, Depends(signed_by_gateway)]
Operator = Annotated[None, Depends(operator)]
OperatorOrGateway = Annotated[str | None, Depends(operator_or_gateway)]
