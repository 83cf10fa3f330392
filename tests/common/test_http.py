"""common.http.bounded_call: what another service answers is read up to a limit, whatever it sends."""

from __future__ import annotations

import asyncio
import gzip

import httpx

from common.http import bounded_call

LIMIT = 1 << 10


def _answer(body: bytes, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=httpx.ByteStream(body), headers=headers or {})

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def _call(client: httpx.AsyncClient) -> tuple[int, bytes]:
    async def go() -> tuple[int, bytes]:
        async with client:
            return await bounded_call(client, "GET", "http://peer.test/x", LIMIT)

    return asyncio.run(go())


def test_a_long_answer_is_cut_one_byte_past_the_limit():
    assert _call(_answer(b"x" * (LIMIT * 8))) == (200, b"x" * (LIMIT + 1))


def test_a_compressed_answer_is_not_inflated():
    bomb = gzip.compress(b"{" * (32 << 20), mtime=0)  # 32 MiB inflated, about 32 KiB as sent
    status, body = _call(_answer(bomb, {"Content-Encoding": "gzip"}))
    assert status == 200 and body == bomb[: LIMIT + 1]
