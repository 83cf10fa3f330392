"""The node client: a finished stream gives its connection back to the pool; one that stays open after
its done event is dropped after a bounded wait."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from gateway import node_client
from gateway.node_client import NodeClient
from node.keys import Identity
from tests.utils.gateway import StandInNode
from tests.utils.servers import ServerThread

pytestmark = pytest.mark.integration

BASE = "0x" + "b0" * 32


def _body(i: int) -> dict:
    return {"adapter_id": None, "prompt": "x", "max_tokens": 3, "request_id": "0x" + f"{i:064x}"}


async def _until_done(up) -> dict:
    async for ev in up.events():
        if ev["type"] == "done":
            return ev
    raise AssertionError("no done event")


def test_finished_stream_reuses_its_connection():
    with ServerThread(StandInNode(Identity.generate(), BASE).app()) as srv:

        async def go() -> list:
            nc = NodeClient()
            streams = []
            try:
                for i in range(3):
                    up = await nc.open_stream(srv.url, "0x" + "00" * 32, _body(i))
                    await _until_done(up)
                    streams.append(up.response.extensions["network_stream"])
                    await up.aclose(drain=True)
            finally:
                await nc.aclose()
            return streams

        streams = asyncio.run(go())
    assert streams[0] is streams[1] is streams[2]


def test_stream_left_open_after_done_is_dropped_in_bounded_time(monkeypatch):
    monkeypatch.setattr(node_client, "DRAIN_TIMEOUT_S", 0.2)
    app = FastAPI()

    @app.post("/v1/generate")
    async def generate():
        async def events():
            yield b"data: " + json.dumps({"type": "done", "finish_reason": "stop"}).encode() + b"\n\n"
            await asyncio.sleep(30)  # a node that never ends its body

        return StreamingResponse(events(), media_type="text/event-stream")

    with ServerThread(app) as srv:

        async def go() -> float:
            nc = NodeClient()
            try:
                up = await nc.open_stream(srv.url, "0x" + "00" * 32, _body(1))
                await _until_done(up)
                t0 = time.monotonic()
                await up.aclose(drain=True)
                return time.monotonic() - t0
            finally:
                await nc.aclose()

        assert asyncio.run(go()) < 2.0
