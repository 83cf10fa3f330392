"""A chain node's public POST /internal/gateway-hello against strangers' bodies (red team): one past a hello's 4 KiB is
refused before it is read (it was held up to the node's 1 MiB default, 160 MB for 150 unfinished ones), and a caller
hanging up mid-body writes no traceback (two, 15 kB, were logged each time). A real node app under uvicorn."""

from __future__ import annotations

import logging
import secrets
import socket
import time

import httpx
import pytest

from common.identity import Identity
from node.gateway_hello import HELLO_PATH, MAX_HELLO_BYTES
from tests.utils.servers import ServerThread

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def node(tiny_base):
    from node.api import create_app
    from node.engine import AsyncEngine, EngineConfig

    engine = AsyncEngine(EngineConfig(model_dir=tiny_base, num_kv_blocks=64, block_size=8, num_slots=2))

    async def on_hello(doc):  # what a chain node's daemon answers; these bodies never reach it
        raise AssertionError("a refused body reached the hello's check")

    app = create_app(
        engine,
        Identity.generate().node_key,
        trusted_gateways=set(),
        operator_token=secrets.token_urlsafe(16),
        on_gateway_hello=on_hello,
    )
    with ServerThread(app) as server:
        yield server


def test_a_hello_body_past_its_bound_is_refused_unread(node):
    r = httpx.post(node.url + HELLO_PATH, content=b" " * (MAX_HELLO_BYTES + 1), timeout=10)
    assert r.status_code == 413, r.text
    with socket.create_connection(("127.0.0.1", node.port)) as s:  # declared, never sent: answered at once
        s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (HELLO_PATH.encode(), 1 << 20))
        s.settimeout(5)
        assert s.recv(4096).startswith(b"HTTP/1.1 413")


def test_a_caller_hanging_up_mid_body_leaves_no_traceback(node, caplog):
    caplog.set_level(logging.INFO)
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", node.port)) as s:
            s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\n{{{{" % HELLO_PATH.encode())
            time.sleep(0.05)
    assert httpx.get(node.url + "/health", timeout=10).status_code in (200, 503)  # the node answers on
    time.sleep(0.5)
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
