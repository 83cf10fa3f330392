"""FastAPI dependencies of the gateway's routes: the gateway instance, and the authenticated (and admitted)
API key of a request."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Depends, Request

from gateway.keys import AuthContext
from gateway.service import Gateway


async def get_gateway(request: Request) -> Gateway:
    # async, as every dependency here: FastAPI runs a plain `def` dependency on a worker thread, a thread hop
    # on every request (about 0.3 ms of each request's time to first token on a 2-core machine)
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


async def identify(request: Request, gw: GatewayDep) -> AuthContext:
    """The request's API key (AuthError, 401)."""
    header = request.headers.get("authorization")
    admission = gw.admission
    # a cached key answers on the event loop; only a miss pays the worker thread and the database
    return admission.cached_auth(header) or await asyncio.to_thread(admission.authenticate, header)


async def authenticate(request: Request, gw: GatewayDep) -> AuthContext:
    """The request's API key (AuthError, 401) within its rate limits (RateLimited, 429)."""
    auth = await identify(request, gw)
    if gw.admission.limited(auth.key):  # the key's buckets are in the database the gateways share
        # where they stand goes out on the answer (gateway.main._AnswerHeaders)
        request.state.ratelimit = await asyncio.to_thread(gw.admission.admit, auth.key)
    return auth


async def list_reader(request: Request, gw: GatewayDep) -> AuthContext:
    """The request's API key (AuthError, 401) for a model-list read: not counted against its requests per minute
    (UIs such as Open WebUI ask on every page, and a key of 4 requests a minute had one chat left after three
    lists; compat audit), but held to Admission.admit_listing's bound (RateLimited, 429)."""
    auth = await identify(request, gw)
    gw.admission.admit_listing(auth.key)
    return auth


ListingDep = Annotated[AuthContext, Depends(list_reader)]
AuthDep = Annotated[AuthContext, Depends(authenticate)]
