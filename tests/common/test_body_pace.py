"""A request body must keep up (common/http.py:BodyLimitMiddleware): byte n by BODY_GRACE_S + n / MIN_BODY_RATE
after the request's headers, else 408 and the connection closed. uvicorn bounds no body's time: a stranger held the
gateway's heartbeat route, a node's hello route (public on every node on chain) and a key holder the gateway's
/v1 routes, each connection announcing a large body and sending 1 KiB of it, for as long as it liked (red team).
Past the body, nothing is timed: a streamed answer listens for its client leaving for as long as it runs."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI, Request
from starlette.responses import StreamingResponse

from common import http as common_http
from common.http import BodyLimitMiddleware
from common.identity import Identity
from node.adapters.basemodel import base_model_id
from tests.utils.gateway import StandInNode, gateway_over
from tests.utils.servers import ServerThread

GRACE_S = 1.0


@pytest.fixture
def short_grace(monkeypatch):
    monkeypatch.setattr(common_http, "BODY_GRACE_S", GRACE_S)


def _hold(url: str, path: str, declared: int, n: int = 5, headers: str = "") -> list[socket.socket]:
    """n connections, each announcing `declared` bytes of body and sending 1 KiB of it, then nothing."""
    port = int(url.rsplit(":", 1)[1])
    out = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {declared}\r\n\r\n"
        s.sendall(head.encode() + b" " * 1024)
        out.append(s)
    return out


def _answers(socks: list[socket.socket]) -> list[bytes]:
    """Each connection's status line, once the server answers (within 10 s), then its close."""
    lines = []
    for s in socks:
        s.settimeout(10)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        lines.append(got.split(b"\r\n", 1)[0])
        s.close()
    return lines


@pytest.mark.integration
def test_a_body_that_stops_coming_is_408_on_the_gateways_public_and_keyed_routes(
    short_grace, tmp_path, tiny_base, caplog
):
    node = StandInNode(Identity.generate(), base_model_id(tiny_base))
    with gateway_over(node, tmp_path, tiny_base, heartbeat_ttl_s=600) as (gw, _, key):
        started = time.monotonic()
        socks = _hold(gw.url, "/internal/heartbeat", 200_000)
        socks += _hold(gw.url, "/v1/completions", 900_000, headers=f"Authorization: Bearer {key}\r\n")
        assert _answers(socks) == [b"HTTP/1.1 408 Request Timeout"] * len(socks)
        assert time.monotonic() - started < GRACE_S + 5
        assert "unhandled error" not in caplog.text  # a client that did not keep up is no error of the gateway's
        r = httpx.post(
            gw.url + "/v1/completions",
            json={"model": "nope", "prompt": "x"},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert r.status_code == 404  # a body that comes at once is read as ever


@pytest.mark.integration
def test_a_body_that_stops_coming_is_408_on_a_nodes_hello_route(short_grace, tmp_path):
    from node.api import create_app
    from node.engine import AsyncEngine
    from tests.utils.engine import make_world

    world = make_world(tmp_path / "w", specs=())
    engine = AsyncEngine(world.config(num_kv_blocks=64, block_size=8, max_model_len=128))

    async def on_hello(doc):  # the daemon's, on a node on chain (node/daemon.py)
        return {}

    app = create_app(
        engine, Ed25519PrivateKey.generate(), trusted_gateways=set(), operator_token="t", on_gateway_hello=on_hello
    )
    with ServerThread(app) as server:
        socks = _hold(server.url, "/internal/gateway-hello", 4096)  # a hello's most (node.gateway_hello)
        assert _answers(socks) == [b"HTTP/1.1 408 Request Timeout"] * len(socks)


def test_a_body_that_keeps_pace_and_an_answer_longer_than_the_grace_are_untouched(short_grace):
    """A body sent slowly but at the pace is read whole; a streamed answer that runs past the grace, listening for
    its client leaving all along, is not cut; a body sent at once that the app asks for only after the grace (a key
    looked up on a busy database) is read whole: the clock runs from the app's first ask (uvicorn stops reading a
    body it holds 64 KiB of until then)."""
    app = FastAPI()

    @app.post("/late")
    async def late(request: Request):
        await asyncio.sleep(4 * GRACE_S)
        return {"bytes": len(await request.body())}

    @app.post("/echo")
    async def echo(request: Request):
        body = await request.body()

        async def slow():
            for _ in range(4):
                yield b"."
                await asyncio.sleep(GRACE_S / 2)
            yield str(len(body)).encode()

        return StreamingResponse(slow())

    def paced():
        for _ in range(8):  # 2 GRACE_S in all, keeping to the pace: each piece in half the time it adds
            time.sleep(GRACE_S / 4)
            yield b"x" * (common_http.MIN_BODY_RATE // 2)

    with ServerThread(BodyLimitMiddleware(app, max_bytes=1 << 30)) as server:
        r = httpx.post(server.url + "/echo", content=paced(), timeout=30)
        assert r.status_code == 200 and r.text == "...." + str(4 * common_http.MIN_BODY_RATE)
        r = httpx.post(server.url + "/late", content=b"x" * 900_000, timeout=30)
        assert r.status_code == 200 and r.json() == {"bytes": 900_000}
