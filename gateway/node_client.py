"""HTTP client for the node API (node/api.py): streamed generate, abort, adapter prefetch."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import httpx

log = logging.getLogger(__name__)

# Node error codes that are the client's fault: another node would refuse the same request.
CLIENT_ERROR_CODES = frozenset({"invalid_request", "context_length_exceeded"})
KEEPALIVE_S = 2.0  # idle pooled connections to nodes live this long
DRAIN_TIMEOUT_S = 0.5  # how long a finished stream's end may take to arrive before we drop the connection


class NodeUnavailable(RuntimeError):
    """The node could not serve this request (down, failing, busy, lacks the adapter): try another.
    `dead` is True when the node did not answer at all (route around it until it heartbeats again)."""

    def __init__(self, message: str, *, dead: bool = False) -> None:
        super().__init__(message)
        self.dead = dead


class NodeRejected(ValueError):
    """The node refused the request itself as invalid; `status`, `code` and message say why."""

    def __init__(self, message: str, *, status: int, code: str | None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def _error_of(r: httpx.Response, text: str) -> tuple[str, str | None]:
    try:
        err = json.loads(text)["error"]
        return str(err.get("message") or text), err.get("code")
    except (ValueError, KeyError, TypeError):
        return text[:300] or f"HTTP {r.status_code}", None


class UpstreamStream:
    """One node's SSE generate stream; `events()` yields its JSON events."""

    def __init__(self, response: httpx.Response, ctx) -> None:
        self.response = response
        self._ctx = ctx
        self._lines = response.aiter_lines()

    async def events(self) -> AsyncIterator[dict]:
        data: list[str] = []
        async for line in self._lines:
            if line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
            elif line == "" and data:
                payload, data = "\n".join(data), []
                yield _event(payload)
        if data:
            yield _event("\n".join(data))

    async def aclose(self, *, drain: bool = False) -> None:
        """Close the stream. drain=True (the node sent its done event) first reads the rest, the end of
        the chunked body: only a response read to its end lets the connection back into the pool, and a
        new connection per request costs both processes a TCP handshake and teardown. Bounded in time,
        so a node that keeps the stream open after done only costs its connection."""
        if drain:
            try:
                async with asyncio.timeout(DRAIN_TIMEOUT_S):
                    async for _ in self._lines:
                        pass
            except (TimeoutError, httpx.HTTPError, RuntimeError):
                pass  # the connection is closed instead of reused
        await self._ctx.__aexit__(None, None, None)


def _event(payload: str) -> dict:
    """One SSE event from a node: a JSON object, or ValueError (the relay treats that as a failed node)."""
    event = json.loads(payload)
    if not isinstance(event, dict):
        raise ValueError(f"node sent a {type(event).__name__} where an event object was expected")
    return event


class NodeClient:
    """A shared httpx client for every node; one instance per gateway app."""

    def __init__(self, *, connect_timeout: float = 3.0, read_timeout: float = 60.0) -> None:
        # idle connections are dropped well before a node's server would close them (uvicorn: after 5 s), so
        # a request is never sent down a connection the node is closing at that moment (it would fail)
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=64, keepalive_expiry=KEEPALIVE_S)
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(read_timeout, connect=connect_timeout), limits=limits)

    async def open_stream(self, api_url: str, body: dict) -> UpstreamStream:
        """POST /v1/generate with stream=true; NodeUnavailable or NodeRejected when it is not a 200."""
        ctx = self.http.stream("POST", api_url + "/v1/generate", json=body | {"stream": True})
        try:
            r = await ctx.__aenter__()
        except httpx.HTTPError as e:
            raise NodeUnavailable(f"node at {api_url} is unreachable: {e!r}", dead=True) from e
        if r.status_code == 200:
            return UpstreamStream(r, ctx)
        try:
            text = (await r.aread()).decode("utf-8", "replace")
        except httpx.HTTPError:
            text = ""
        finally:
            await ctx.__aexit__(None, None, None)
        message, code = _error_of(r, text)
        if r.status_code == 400 and code in CLIENT_ERROR_CODES:
            raise NodeRejected(message, status=r.status_code, code=code)
        raise NodeUnavailable(f"node at {api_url} answered {r.status_code}: {message}")

    async def abort(self, api_url: str, request_id: str) -> dict | None:
        """Abort a request; the node's {"receipt", "signature"} for what it produced, or None."""
        try:
            r = await self.http.post(f"{api_url}/v1/requests/{request_id}/abort", timeout=5.0)
        except httpx.HTTPError as e:
            log.warning("abort of %s at %s failed: %r", request_id[:10], api_url, e)
            return None
        if r.status_code != 200:
            log.warning("abort of %s at %s answered %d: %s", request_id[:10], api_url, r.status_code, r.text[:200])
            return None
        try:
            got = r.json()
        except ValueError:
            got = None
        if not isinstance(got, dict):
            log.warning("abort of %s at %s answered something other than a JSON object", request_id[:10], api_url)
            return None
        return got

    async def receipt(self, api_url: str, request_id: str) -> tuple[str, dict | None]:
        """The node's stored receipt of a request: ("ok", {"receipt", "signature", "public_key"}), ("running",
        None) while it still runs there, ("unknown", None) when the node has none, ("unreachable", None)."""
        try:
            r = await self.http.get(f"{api_url}/v1/requests/{request_id}/receipt", timeout=5.0)
        except httpx.HTTPError as e:
            log.info("receipt of %s at %s: %r", request_id[:10], api_url, e)
            return "unreachable", None
        if r.status_code == 404:
            return "unknown", None
        if r.status_code == 409:
            return "running", None
        try:
            got = r.json() if r.status_code == 200 else None
        except ValueError:
            got = None
        if not isinstance(got, dict):
            log.warning("receipt of %s at %s answered %d: %s", request_id[:10], api_url, r.status_code, r.text[:200])
            return "unreachable", None
        return "ok", got

    async def load(self, api_url: str, adapter_id: str) -> bool:
        """Ask a node to make an adapter resident (prefetch); False when it could not."""
        try:
            r = await self.http.post(f"{api_url}/v1/adapters/{adapter_id}/load", json={}, timeout=30.0)
        except httpx.HTTPError as e:
            log.info("prefetch of %s at %s failed: %r", adapter_id[:10], api_url, e)
            return False
        if r.status_code != 200:
            log.info("prefetch of %s at %s answered %d: %s", adapter_id[:10], api_url, r.status_code, r.text[:200])
        return r.status_code == 200

    async def aclose(self) -> None:
        await self.http.aclose()
