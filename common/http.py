"""HTTP limits every app we serve shares (node API, gateway, explorer): a request-body limit as pure ASGI
middleware, a streamed answer whose every write is bounded in time, bounded reads of the answers we fetch and
of downloads from strangers (plain bytes, at a pace: `download`), and the error and event schemas the OpenAPI
documents declare.

Starlette reads a request body whole before a handler sees it, so without a limit one client can make
a process buffer (and then parse) as much as it sends. The limit is checked against Content-Length
before anything is read, and again while a chunked body streams in; either way the answer is 413 in
the API's error shape and the connection's body is never buffered past the limit. The body must also keep
up: byte n by BODY_GRACE_S + n / MIN_BODY_RATE after the app first asks for it, else 408.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.wire import error_body

DEFAULT_MAX_BODY_BYTES = 1 << 20
# a request body past this many bytes is parsed and validated on a worker thread: 4 MB of small messages held the
# gateway's event loop over a second (attack review), and 16 prompts of a long context are megabytes of ids
INLINE_BODY_BYTES = 256 << 10
# A request body's pace: uvicorn bounds no body's time, and a stranger held connections to the gateway's heartbeat
# route, a node's hello route and (a key holder) the gateway's /v1 routes, each announcing a large body and sending
# 1 KiB of it, for as long as it liked (red team). A client sends its body at once; an operator's package upload
# streams at the pace of its link, which must keep 64 KiB/s on average.
BODY_GRACE_S = 10.0
MIN_BODY_RATE = 64 << 10  # bytes/s

log = logging.getLogger(__name__)


async def parse_off_loop(raw: bytes, parse: Callable, *args, **kwargs):
    """parse(*args, **kwargs) of the body `raw`: inline when it is small, on a worker thread past
    INLINE_BODY_BYTES (not on the loop that serves every other request's stream)."""
    if len(raw) <= INLINE_BODY_BYTES:
        return parse(*args, **kwargs)
    return await asyncio.to_thread(parse, *args, **kwargs)


class WriteBoundedStreamingResponse(StreamingResponse):
    """A streamed answer given up when one write waits longer than `write_timeout_s`: a client that stops
    reading (its receive window full) blocks a write with no end, and with it the generator behind the
    stream, which is what reads the upstream and checks its deadline (a stalled client held a node's request,
    its slot and its open record for as long as it kept the connection). The generator is closed, so its
    cleanup runs as for a client that left, and the connection is dropped by the server.

    `on_end` runs when the response ends, however it ends: a generator given up (or cancelled) before its
    first step runs no `finally` of its own, and a response that cannot even start (pipelined behind an answer
    its client never reads) never steps it."""

    def __init__(self, content, *, write_timeout_s: float, on_end: Callable[[], None] | None = None, **kw) -> None:
        super().__init__(content, **kw)
        self.write_timeout_s = write_timeout_s
        self.on_end = on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def bounded(message: Message) -> None:
            async with asyncio.timeout(self.write_timeout_s):
                await send(message)

        try:
            await super().__call__(scope, receive, bounded)
        except TimeoutError:
            log.warning(
                "%s: the client read nothing for %g s; its stream is given up", scope.get("path"), self.write_timeout_s
            )
            await self.body_iterator.aclose()
        finally:
            if self.on_end is not None:
                self.on_end()


class BodyLimitMiddleware:
    """Refuse request bodies above `max_bytes` (per path prefix in `overrides`, longest prefix wins)."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int = DEFAULT_MAX_BODY_BYTES,
        overrides: dict[str, int] | None = None,
        shape: Callable[[str, dict, int], dict] | None = None,
    ) -> None:
        """shape(path, body, status): the error body for a path whose API has an error shape of its own, from the
        usual one (the app's to say which paths those are)."""
        self.app, self.max_bytes, self.shape = app, max_bytes, shape
        self.overrides = sorted((overrides or {}).items(), key=lambda kv: -len(kv[0]))

    def limit_for(self, path: str) -> int:
        return next((n for prefix, n in self.overrides if path.startswith(prefix)), self.max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await self._refuse(scope, send, 400, "Content-Length is not a number")
                    return
                if declared > limit:
                    message = f"request body of {declared} bytes is over the limit of {limit}"
                    await self._refuse(scope, send, 413, message)
                    return
        seen = 0
        over = late = started = body_done = False
        begun: float | None = None

        async def limited_receive() -> Message:
            nonlocal seen, over, late, body_done, begun
            if body_done:  # past the body, a receive waits for the client leaving: as long as the answer runs
                return await receive()
            if begun is None:  # from the app's first ask: before it (a key looked up, a 100-continue not yet sent)
                begun = time.monotonic()  # the client may have been held back by the server itself
            try:
                async with asyncio.timeout(begun + BODY_GRACE_S + seen / MIN_BODY_RATE - time.monotonic()):
                    message = await receive()
            except TimeoutError:
                late = True  # the app sees its client go away; whatever it answers is replaced by the 408 below
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if seen > limit:
                    # the app sees its client go away; whatever it answers is replaced by the 413 below
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over or late:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not (over or late):
                raise
        if over and not started:
            await self._refuse(scope, send, 413, f"request body is over the limit of {limit} bytes")
        elif late and not started:
            message = f"the request body did not keep up ({seen} bytes in {time.monotonic() - begun:.0f} s)"
            await self._refuse(scope, send, 408, message, code="request_timeout")

    async def _refuse(
        self, scope: Scope, send: Send, status: int, message: str, code: str = "request_too_large"
    ) -> None:
        error = error_body(message, code=code)
        if self.shape is not None:
            error = self.shape(scope.get("path", ""), error, status)
        body = json.dumps(error).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


# ---- the client side: answers read within a limit ----------------------------------------------------


async def read_capped(chunks, limit: int) -> bytes:
    """At most `limit` + 1 bytes of a response body's chunks (one past the limit says it was longer): the
    other side cannot make us buffer more, whatever it sends. Give the bytes as sent (httpx's aiter_raw,
    aiohttp's iter_any without auto_decompress): a Content-Encoding is not undone (our services never
    compress), so a small gzip body cannot inflate past the limit in one read."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            break
    return bytes(body[: limit + 1])


# Downloads from strangers (a node's adapter sources, an import's http(s) folder) ask for the bytes as they are and
# refuse an encoded answer: httpx undoes every listed Content-Encoding of each network read in one call, with no
# cap, and 2.5 kB of "gzip, gzip" took a node to 2.2 GB before its size limit was looked at (red team)
PLAIN = {"Accept-Encoding": "identity"}
# and they must keep up, from the first byte of the answer: its headers within DOWNLOAD_GRACE_S, then
# MIN_DOWNLOAD_RATE bytes/s on average. A read timeout restarts with every byte: a source dripping a byte a second
# held an import for as long as it liked, and headers sent a byte at a time, endless 103 answers or a chunk-size
# line that never ends hold a download before any byte of its body (red team, review)
MIN_DOWNLOAD_RATE = 64 << 10  # bytes/s
DOWNLOAD_GRACE_S = 30.0


class DownloadError(ValueError):
    """A stranger's download refused (a status, an encoded answer, past its limit, too slow); one line."""


def refuse_encoded(headers, what: str) -> None:
    """DownloadError when an answer's body is encoded (gzip, br, ...): `what` sent it so though asked not to."""
    encoding = headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise DownloadError(
            f"{what} answered with Content-Encoding {encoding[:40]!r}; only plain bytes are taken (a server sends "
            "a file stored compressed so, as S3 does one whose metadata says it is)"
        )


async def download(client, url: str, write: Callable[[bytes], object], *, limit: int, what: str, redirects: int = 0):
    """GET `url` (an httpx.AsyncClient's) into `write`: the bytes as sent (PLAIN; an encoded answer refused), at
    most `limit`, at the pace above, one deadline for every wait from the request on (byte n of the body by
    DOWNLOAD_GRACE_S + n / MIN_DOWNLOAD_RATE). Up to `redirects` http(s) redirects are followed, their bodies never
    read. Returns the bytes written; DownloadError (one line) when refused, httpx.HTTPError when unreachable."""
    loop = asyncio.get_running_loop()
    start, received = loop.time(), 0
    try:
        async with asyncio.timeout(DOWNLOAD_GRACE_S) as deadline:
            for hop in range(redirects + 1):
                request = client.build_request("GET", url, headers=PLAIN)
                response = await client.send(request, stream=True, follow_redirects=False)
                if not response.has_redirect_location or hop == redirects:
                    break
                await response.aclose()  # a redirect's body is never read (httpx's own following reads it whole)
                target = response.url.join(response.headers["location"])
                if target.scheme not in ("http", "https") or target == response.url:
                    raise DownloadError(
                        f"{what} redirects to {str(target)[:200]!r}: only another http(s) URL is followed"
                    )
                url = str(target)
            try:
                if response.status_code != 200:
                    raise DownloadError(f"{what}: HTTP {response.status_code}")
                refuse_encoded(response.headers, what)
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise DownloadError(f"{what} is {int(declared)} bytes, more than the {limit} allowed")
                async for chunk in response.aiter_raw():  # as they arrive, as sent
                    received += len(chunk)
                    if received > limit:
                        raise DownloadError(f"{what} is more than the {limit} bytes allowed")
                    write(chunk)
                    deadline.reschedule(start + DOWNLOAD_GRACE_S + (received + 1) / MIN_DOWNLOAD_RATE)
            finally:
                await response.aclose()
    except TimeoutError:
        raise DownloadError(
            f"{what} sent {received} bytes in {loop.time() - start:.0f} s, slower than the {MIN_DOWNLOAD_RATE:g} "
            f"bytes/s a download must keep (after {DOWNLOAD_GRACE_S:g} s)"
        ) from None
    return received


async def bounded_call(client, method: str, url: str, limit: int, **kw) -> tuple[int, bytes]:
    """(status, body) of one httpx call, the body read with read_capped."""
    async with client.stream(method, url, **kw) as r:
        return r.status_code, await read_capped(r.aiter_raw(), limit)


# ---- what an error looks like (common.wire.error_body), for the OpenAPI schemas -----------------------------

ERROR_JSON = {
    "application/json": {
        "schema": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type", "param", "code"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "null"]},
                    },
                }
            },
        }
    }
}
# OpenAPI 3.1 reads an event stream's schema as each event's: a `data:` line holding one JSON event (the
# gateway's last is the OpenAI stream's literal [DONE])
EVENT_STREAM = {
    "text/event-stream": {
        "schema": {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
    }
}
# a route that answers JSON, or server-sent events when asked to stream
ANSWER_OR_EVENTS = {200: {"description": "the answer, or its events with stream=true", "content": EVENT_STREAM}}


def error_responses(statuses: dict[int, str], content: dict = ERROR_JSON) -> dict:
    """FastAPI `responses=` declaring each error status (with what it means) in the API's error shape, so a
    schema checker holds the app to the statuses and bodies it really answers."""
    return {status: {"description": what, "content": content} for status, what in statuses.items()}
