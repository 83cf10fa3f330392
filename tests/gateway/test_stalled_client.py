"""A streaming client that sends its request and then reads nothing: the gateway's next write to it waits on
a full receive window, and with it the relay, which is what reads the node and checks the request's deadline.
Before the bound, the request stayed in flight for as long as the client kept the connection (the node's
in-flight count taken, its record open, the node's stream to the gateway stuck); now a write waiting longer
than client_write_timeout_s gives the stream up as if the client had left.

A real gateway and a real tiny-model node under uvicorn; the client is a raw socket with a small receive
buffer that never calls recv. The answer asked for (16 choices of 2,000 tokens with 5 logprobs each, ~14 MB of
events) is far more than loopback's socket buffers hold (4 MB at most)."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from sqlmodel import Session

from gateway.tables import CompletionRecord, RequestStatus
from tests.gateway import TINY
from tests.utils.factories import make_base
from tests.utils.gateway import poll
from tests.utils.stack import start_gateway, start_node

pytestmark = pytest.mark.integration

WRITE_TIMEOUT_S = 1.0
BODY = {"model": TINY, "prompt": "hello", "max_tokens": 2000, "n": 16, "logprobs": 5, "ignore_eos": True}


def _stalled_client(port: int, key: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # before connect: the window follows it
    s.connect(("127.0.0.1", port))
    data = json.dumps(BODY | {"stream": True}).encode()
    s.sendall(
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return s


def test_a_client_that_reads_nothing_is_given_up_and_the_node_released(tmp_path):
    base = make_base(tmp_path / "base", seed=0, max_positions=2048)  # room for 2,000 tokens
    # the deadline far off: what ends the request is the write bound
    gw = start_gateway(tmp_path / "gw", base, request_deadline_s=600, client_write_timeout_s=WRITE_TIMEOUT_S)
    node = start_node(base, gateway=gw, num_slots=16, num_kv_blocks=4400)
    book = node.server.server.config.app.state.node.book
    s = None
    try:
        poll(lambda: httpx.get(gw.url + "/health", timeout=5).json().get("live_nodes") == 1, timeout=30)
        (entry,) = gw.server.server.config.app.state.gateway.directory.live()
        s = _stalled_client(gw.server.port, gw.api_key)
        sent = time.monotonic()
        poll(lambda: entry.inflight == 1, timeout=10)
        poll(lambda: entry.inflight == 0, timeout=60)  # held until the client closed, before
        released = time.monotonic() - sent

        def closed():
            with Session(gw.db) as sess:
                recs = [r for r in sess.query(CompletionRecord).all() if r.status != RequestStatus.OPEN]
                return recs or None

        (rec,) = poll(closed, timeout=20)
        assert rec.status == RequestStatus.CLIENT_CLOSED and 0 < rec.completion_tokens < 16 * 2000, rec
        poll(lambda: not book.running, timeout=20)  # the node was aborted and its receipt stored
        assert node.engine.status()["running"] == 0
        print(f"released {released:.1f} s after dispatch; {rec.completion_tokens} tokens relayed and billed")
    finally:
        if s is not None:
            s.close()
        node.stop()
        gw.stop()


def test_a_stream_that_cannot_start_still_ends_its_request(tiny_base, tmp_path):
    """A streamed request pipelined behind a large answer its client never reads: its response cannot even
    start, the write bound gave it up before its generator took a step, and no `finally` ran: the request stayed
    open, never aborted or recorded, while the node made all its tokens. It is ended as a client that left."""
    from sqlmodel import select

    from ledger.models import UsageRecord

    gw = start_gateway(tmp_path / "gw", tiny_base, client_write_timeout_s=WRITE_TIMEOUT_S)
    node = start_node(tiny_base, gateway=gw, num_slots=4, num_kv_blocks=512)
    big = {"model": TINY, "prompt": ["hello " * 120] * 4, "max_tokens": 1, "n": 16, "logprobs": 5, "echo": True}
    stream = {"model": TINY, "prompt": "The capital of France is", "max_tokens": 200, "stream": True}
    s = None
    try:
        poll(lambda: httpx.get(gw.url + "/health", timeout=5).json().get("live_nodes") == 1, timeout=30)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        s.connect(("127.0.0.1", gw.server.port))
        s.sendall(b"".join(_request(gw.server.port, gw.api_key, body) for body in (big, stream)))

        def closed():
            with Session(gw.db) as sess:
                recs = sess.exec(select(CompletionRecord).where(CompletionRecord.max_tokens == 200)).all()
                if not recs or recs[0].status == RequestStatus.OPEN:
                    return None
                usage = sess.exec(select(UsageRecord).where(UsageRecord.request_id == recs[0].request_id)).first()
                return (recs[0], usage) if usage is not None else None

        rec, usage = poll(closed, timeout=30)
        assert rec.status == RequestStatus.CLIENT_CLOSED and usage.node_completion_tokens is not None
    finally:
        if s is not None:
            s.close()
        node.stop()
        gw.stop()


def _request(port: int, key: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
