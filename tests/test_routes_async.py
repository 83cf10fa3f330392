"""The gateway's and the node's routes run on the event loop: FastAPI runs a plain `def` endpoint or
dependency on a worker thread, a thread hop on every request (a sync `get_gateway` cost each streamed request
about 0.3 ms of its time to first token). The explorer's page handlers are plain `def` on purpose: they
query SQLite, which blocks."""

from __future__ import annotations

import inspect

import pytest
from fastapi.routing import APIRoute

from gateway.routes import internal, openai
from node.api.routes import adapters, generate, hello, status

ROUTERS = {
    "gateway internal": internal.router,
    "gateway openai": openai.router,
    "node adapters": adapters.router,
    "node upload": adapters.upload_router,
    "node generate": generate.router,
    "node hello": hello.router,
    "node status": status.router,
}


def _calls(dependant) -> list:
    out = [dependant.call]
    for sub in dependant.dependencies:
        out += _calls(sub)
    return out


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_endpoint_and_dependency_is_a_coroutine(name: str) -> None:
    routes = [r for r in ROUTERS[name].routes if isinstance(r, APIRoute)]
    assert routes
    sync = [
        f"{r.path}: {call.__qualname__}"
        for r in routes
        for call in _calls(r.dependant)
        if not inspect.iscoroutinefunction(call)
    ]
    assert not sync, f"run on a worker thread per request: {sync}"
