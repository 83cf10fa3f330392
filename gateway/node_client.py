"""HTTP client for the node API (node/api.py): streamed generate, abort, adapter prefetch, stored receipts.

Every call that makes a node work or stop (generate, load, abort) is signed with the gateway key for the one
node it is meant for (node.request_auth.sign_request); what a node answers is parsed with the bounded parser
(common.wire.parse_json), as any bytes from the network.

Every call goes over aiohttp, nodes' host names resolved on the lookup threads (gateway.dns.NODES): a node's
registered name in a zone that never answers holds those, never the threads the gateway's own work runs on
(httpx resolves on the event loop's default executor). The streamed generate, on every request's path
to its first token, went over aiohttp first: measured with bench/gateway.py (2026-12-04, four runs each,
alternating), the gateway added 1.8-3.6 ms (median 2.2) to TTFT p50 streaming over aiohttp against 3.5-5.4 ms
(median 4.1) over httpx, whose request and response handling costs more Python per call and per chunk."""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.http import parse_off_loop, read_capped
from common.serving import KEEP_ALIVE_S as SERVER_KEEP_ALIVE_S
from common.wire import UntrustedJSONError, parse_json, read_error
from gateway import dns
from node.request_auth import sign_request

log = logging.getLogger(__name__)

# Node error codes that are the client's fault: another node would refuse the same request.
CLIENT_ERROR_CODES = frozenset({"invalid_request", "context_length_exceeded"})
# how a node refuses a guided type it does not know (node.engine.grammar.GuidedSpec.from_wire, named by the node
# API): every release so far words it so
UNKNOWN_GUIDED_TYPE = "guided.type must be one of"
# idle pooled connections to nodes live this long: half what a node's server keeps them (common.serving), so
# the gateway always drops one first (a request sent down a connection the node is closing that instant
# fails, and the node is taken for dead); a request after a pause of a few seconds reuses its connection
# instead of paying a TCP handshake (a round trip to another machine) before its first token
KEEPALIVE_S = SERVER_KEEP_ALIVE_S / 2
# what a call that got no answer raises: no connection, a timeout, a broken answer, a URL aiohttp cannot use
CALL_FAILED = (aiohttp.ClientError, TimeoutError, ValueError)
DRAIN_TIMEOUT_S = 0.5  # how long a finished stream's end may take to arrive before we drop the connection
# the largest answers taken from a node: one SSE event (a token, or the done event with its receipt), an error
# body, an abort's or a stored receipt
MAX_EVENT_BYTES = 64 << 10
# A prompt_logprobs event holds one entry per prompt token: token id, log-probability, rank and `k` top pairs;
# this bounds an entry's JSON (ids and ranks < 2^32, floats written in full), so the event's bound follows the
# request.
PROMPT_ENTRY_BYTES, TOP_PAIR_BYTES = 112, 48


def event_limit(body: dict) -> int:
    """The largest event a node may send for this generate body: MAX_EVENT_BYTES, or more when the body asks
    for prompt log-probabilities (an event for the longest prompt)."""
    k = body.get("prompt_logprobs")
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        return MAX_EVENT_BYTES
    ids = body.get("prompt_token_ids") or []
    prompts = ids if ids and isinstance(ids[0], list) else [ids]
    longest = max((len(p) for p in prompts), default=0)
    return MAX_EVENT_BYTES + longest * (PROMPT_ENTRY_BYTES + TOP_PAIR_BYTES * (k + 1))


MAX_ANSWER_BYTES = 64 << 10


class NodeUnavailable(RuntimeError):
    """The node could not serve this request (down, failing, busy, lacks the adapter): try another.
    `dead` is True when the node did not answer at all (route around it until it heartbeats again);
    `faulty` when it failed of its own (by default when dead; a 5xx other than busy): a strike against it when
    another node then serves the request; `excused` when an honest node could not serve it (an older release
    that lacks a guided type), so that nothing is held against it; `maybe_running` when the request may have
    reached it all the same (worth an abort)."""

    def __init__(
        self,
        message: str,
        *,
        dead: bool = False,
        faulty: bool | None = None,
        excused: bool = False,
        maybe_running: bool = False,
    ) -> None:
        super().__init__(message)
        self.dead, self.excused, self.maybe_running = dead, excused, maybe_running
        self.faulty = dead if faulty is None else faulty


class NodeRejected(ValueError):
    """The node refused the request itself as invalid; `status`, `code` and `reason` (the node's own words) say
    why. Its message is what a client may be shown: the reason quoted as the node's (_quoted)."""

    def __init__(self, reason: str, *, status: int, code: str | None) -> None:
        super().__init__(f"the node refused the request: {_quoted(reason)}")
        self.status, self.code, self.reason = status, code, reason


# a link in a node's words: scheme://..., or www.... Matched only from the start of a run of a scheme's letters
# (with what precedes it in the run): tried from every letter of a run of letters without "://", the scheme's part
# cost time growing with the square of the run (1.1 ms for 500 letters, 113 ms for 5,000; 0.02 and 0.2 now)
_LINK = re.compile(r"(?<![a-z0-9+.-])[a-z0-9+.-]*+://\S*|www\.\S*", re.IGNORECASE)


def _quoted(reason: str) -> str:
    """A node's reason for refusing a request, as a client may be shown it (a grammar's error names what in a
    schema to change): the node's words, quoted as its, on one line of printable ASCII, links taken out, at most
    300 characters. A node is a stranger: its text must not read as the gateway's, nor send a client anywhere."""
    text = _LINK.sub("[link removed]", "".join(c if " " <= c <= "~" else " " for c in reason))
    return json.dumps(text[:300])


def _error_of(status: int, text: str) -> tuple[str, str | None]:
    got = read_error(text, max_bytes=MAX_ANSWER_BYTES)
    if got is None:
        return text[:300] or f"HTTP {status}", None
    message, code = got
    return str(message or text)[:500], code


def _object(body: bytes, what: str) -> dict | None:
    """A node's JSON object answer, or None (too big, malformed, not an object)."""
    try:
        got = parse_json(body, max_bytes=MAX_ANSWER_BYTES, what=what)
    except UntrustedJSONError:
        return None
    return got if isinstance(got, dict) else None


def _snippet(body: bytes) -> str:
    return body[:200].decode("utf-8", "replace")


class UpstreamStream:
    """One node's SSE generate stream: its body's byte chunks in, `events()` yields its JSON events. A read
    that fails (the connection broke, no byte within the read timeout) is NodeUnavailable, and so is a stream
    whose lines go on without an event for `idle_s` (comments, or the data lines of an event that never ends,
    each keeping the read timeout from firing; a line dripped byte by byte is bounded by the request's
    deadline, and before the first event by ServedRequest._try's); `close` gives the connection back (to
    the pool when the body was read to its end)."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        close: Callable[[], object] | None = None,
        max_event_bytes: int = MAX_EVENT_BYTES,
        idle_s: float | None = None,
    ) -> None:
        self._close = close
        self.max_event_bytes = max_event_bytes
        self.idle_s = idle_s
        self._lines = _bounded_lines(_text(chunks), max_event_bytes)

    async def events(self) -> AsyncIterator[dict]:
        data: list[str] = []
        size = 0
        # the clock is read per line (no timer is set per token), and restarted when the reader asks for the
        # next event: a client slow to take the last one is not the node's wait
        since = time.monotonic()
        async for line in self._lines:
            if line == "" and data:
                payload, data, size = "\n".join(data), [], 0
                yield await parse_off_loop(payload, _event, payload, self.max_event_bytes)
                since = time.monotonic()
                continue
            if self.idle_s is not None and time.monotonic() - since > self.idle_s:
                raise NodeUnavailable(f"the node's stream went on with no event within {self.idle_s:g} s", dead=True)
            if line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
                size += len(line)
                if size > self.max_event_bytes:  # one event without end: refused before it is buffered further
                    raise UntrustedJSONError(f"node event is more than {self.max_event_bytes} bytes")
        if data:
            payload = "\n".join(data)
            yield await parse_off_loop(payload, _event, payload, self.max_event_bytes)

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
            except (TimeoutError, RuntimeError, ValueError):
                pass  # the connection is closed instead of reused
        if self._close is not None:
            self._close()


async def _text(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """UTF-8 text of a node's body (a character split over two chunks decoded whole; bytes that are not UTF-8
    become U+FFFD, which the event parser then refuses or passes on as text); a failed read is NodeUnavailable."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        async for chunk in chunks:
            if text := decoder.decode(chunk):
                yield text
    except (aiohttp.ClientError, TimeoutError) as e:
        # the client is told the kind of break; the library's own words (addresses, protocol states) go to the log
        log.info("a node's stream broke: %r", e)
        # a read timeout is not its own fault for sure: a node fetching a cold adapter is silent until it is ready
        raise NodeUnavailable(
            f"the node's stream broke ({type(e).__name__})", dead=True, faulty=not isinstance(e, TimeoutError)
        ) from e
    if tail := decoder.decode(b"", final=True):
        yield tail


async def _bounded_lines(texts: AsyncIterator[str], max_bytes: int) -> AsyncIterator[str]:
    """The stream's lines; a line longer than `max_bytes` is refused before it is buffered further (a line
    reader that keeps a line without end whole in memory is how a node would make the gateway buffer more)."""
    pending: list[str] = []  # the pieces of the line not ended yet: only new chunks are searched for its end
    size = 0
    async for chunk in texts:
        *ends, rest = chunk.split("\n")
        for end in ends:
            yield ("".join(pending) + end).removesuffix("\r")
            pending, size = [], 0
        pending.append(rest)
        size += len(rest)
        if size > max_bytes:
            raise UntrustedJSONError(f"node sent a line of more than {max_bytes} bytes")
    if tail := "".join(pending):
        yield tail.removesuffix("\r")


def _event(payload: str, max_bytes: int) -> dict:
    """One SSE event from a node: a JSON object, or ValueError (the relay treats that as a failed node)."""
    # Python's own integer bound: an event's fields are read one by one (gateway.choices takes what it can, a
    # logprob no float holds is shown as the floor), and none reaches anything that breaks on a long integer
    try:
        event = parse_json(payload, max_bytes=max_bytes, max_int_digits=None, what="node event")
    except UntrustedJSONError as e:
        # the parser's words may quote the node's bytes (a duplicate key): the client is told the kind only
        log.info("a node sent a malformed event: %.300r", str(e))
        raise UntrustedJSONError("node sent an event that is not a JSON object within the limits") from None
    if not isinstance(event, dict):
        raise ValueError(f"node sent a {type(event).__name__} where an event object was expected")
    return event


class NodeClient:
    """The gateway's connections to every node: two aiohttp sessions, the streams' and the other calls' (see the
    module docstring); one instance per gateway app."""

    def __init__(
        self,
        key: Ed25519PrivateKey | None = None,
        *,
        connect_timeout: float = 3.0,
        read_timeout: float = 60.0,
        first_byte_timeout: float | None = None,
    ) -> None:
        self.key = key or Ed25519PrivateKey.generate()
        self.first_byte_timeout = first_byte_timeout
        self._timeouts = (connect_timeout, read_timeout)
        # made on first use, on the event loop that uses them: the generate streams, and the other calls (abort,
        # stored receipt, load) on connections of their own, so an abort never waits behind the streams for one
        # (sharing a pool, a request's abort waited for a slot while its own stream held one: review)
        self._streams: aiohttp.ClientSession | None = None
        self._calls: aiohttp.ClientSession | None = None

    def _session(self, streams: bool) -> aiohttp.ClientSession:
        session = self._streams if streams else self._calls
        if session is None:
            connect, read = self._timeouts
            session = aiohttp.ClientSession(
                # a node's host name resolved on the gateway's lookup threads (gateway.dns.NODES)
                connector=aiohttp.TCPConnector(
                    limit=512 if streams else 128,
                    limit_per_host=0,
                    keepalive_timeout=KEEPALIVE_S,
                    resolver=dns.LookupThreadsResolver(),
                ),
                # sock_read: at most this long between two chunks of a stream
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read),
                # a node's body is taken as sent: no compression is asked for or undone, so a node cannot
                # make the gateway inflate a small compressed body into gigabytes (it reads as garbage)
                auto_decompress=False,
                skip_auto_headers=("Accept-Encoding",),
            )
            if streams:
                self._streams = session
            else:
                self._calls = session
        return session

    async def open_stream(self, api_url: str, node_id: str, body: dict) -> UpstreamStream:
        """POST /v1/generate with stream=true; NodeUnavailable or NodeRejected when it is not a 200. A node
        that has not answered within first_byte_timeout is NodeUnavailable(dead=True): hung, not slow."""
        url = api_url + "/v1/generate"
        # UTF-8, not \u escapes: a choice of astral characters is 4 bytes a character, not 12 (the node's limit)
        data = json.dumps(body | {"stream": True}, separators=(",", ":"), ensure_ascii=False).encode()
        # signed over these very bytes and the path as sent (a prefix in api_url included)
        signed = sign_request(self.key, method="POST", path=urlsplit(url).path, node_id=node_id, body=data)
        try:
            async with asyncio.timeout(self.first_byte_timeout):
                # a redirect is a failed node: followed, it would carry this signed request (and, for a 307,
                # the prompt) to whatever host the node names
                r = await self._session(streams=True).post(
                    url, data=data, headers={"Content-Type": "application/json", **signed}, allow_redirects=False
                )
        # What reaches the client (through the gateway's 503) is in our words and names the node by its id: its
        # registered URL, the bytes it answered (in the HTTP library's repr, beside our signed headers) and its
        # error texts are a stranger's, and go to the log
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:  # no connection: not running
            log.info("node %s at %r is unreachable: %r", node_id[:10], api_url, e)
            raise NodeUnavailable(f"node {node_id[:10]} is unreachable ({type(e).__name__})", dead=True) from e
        except TimeoutError as e:
            within = f"{self.first_byte_timeout:g}" if self.first_byte_timeout is not None else f"{self._timeouts[1]:g}"
            raise NodeUnavailable(
                f"node {node_id[:10]} sent nothing within {within} s", dead=True, maybe_running=True
            ) from e
        except (aiohttp.ClientError, ValueError) as e:  # ValueError: a URL aiohttp cannot use
            log.info("node %s at %r failed to answer: %.300r", node_id[:10], api_url, e)
            raise NodeUnavailable(
                f"node {node_id[:10]} is unreachable ({type(e).__name__})", dead=True, maybe_running=True
            ) from e
        if r.status == 200:
            return UpstreamStream(r.content.iter_any(), r.release, event_limit(body), idle_s=self._timeouts[1])
        try:
            text = (await read_capped(r.content.iter_any(), MAX_ANSWER_BYTES))[:MAX_ANSWER_BYTES].decode(
                "utf-8", "replace"
            )
        except (aiohttp.ClientError, TimeoutError):
            text = ""
        finally:
            r.release()
        message, code = _error_of(r.status, text)
        if r.status == 400 and message.startswith(UNKNOWN_GUIDED_TYPE):
            # a node of an older release, which knows fewer guided types (regex and choice came later): not the
            # client's mistake, another node may serve it (operators upgrade at their own pace)
            log.info("node %s at %r does not serve this guided type: %.300r", node_id[:10], api_url, message)
            raise NodeUnavailable(f"node {node_id[:10]} does not serve this guided type", excused=True)
        if r.status == 400 and code in CLIENT_ERROR_CODES:
            raise NodeRejected(message, status=r.status, code=code)
        # the answer stays in this log: the client is told the status only, so a URL registered at a service
        # that is no node cannot read that service's answers back through the gateway's errors
        log.warning("node %s at %r answered %d: %.300r", node_id[:10], api_url, r.status, message)
        # a node's API never redirects: one that does is a failed node, routed around until it heartbeats again
        raise NodeUnavailable(
            f"node {node_id[:10]} answered {r.status}",
            dead=300 <= r.status < 400,
            faulty=r.status >= 500 and r.status != 503,  # 503: busy (engine_busy, slots_busy), an honest answer
        )

    async def _call(
        self, method: str, url: str, *, timeout: float, node_id: str | None = None, body: dict | None = None
    ) -> tuple[int, bytes]:
        """(status, body) of one call, the body read up to one byte past MAX_ANSWER_BYTES (a node cannot make
        the gateway buffer more); signed for `node_id` when given. CALL_FAILED when it fails."""
        data = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if node_id is not None:
            headers |= sign_request(self.key, method=method, path=urlsplit(url).path, node_id=node_id, body=data)
        connect, _ = self._timeouts
        async with self._session(streams=False).request(
            method,
            url,
            data=data or None,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=connect),
        ) as r:
            return r.status, await read_capped(r.content.iter_any(), MAX_ANSWER_BYTES)

    async def abort(self, api_url: str, node_id: str, request_id: str) -> dict | None:
        """Abort a request; the node's {"receipt", "signature"} for what it produced, or None."""
        try:
            status, body = await self._call(
                "POST", f"{api_url}/v1/requests/{request_id}/abort", timeout=5.0, node_id=node_id
            )
        except CALL_FAILED as e:
            log.warning("abort of %s at %s failed: %r", request_id[:10], api_url, e)
            return None
        got = _object(body, "abort receipt") if status == 200 else None
        if got is None:
            log.warning("abort of %s at %r answered %d: %r", request_id[:10], api_url, status, _snippet(body))
        return got

    async def receipt(self, api_url: str, request_id: str) -> tuple[str, dict | None]:
        """The node's stored receipt of a request: ("ok", {"receipt", "signature", "public_key"}), ("running",
        None) while it still runs there, ("unknown", None) when the node has none, ("unreachable", None)."""
        try:
            status, body = await self._call("GET", f"{api_url}/v1/requests/{request_id}/receipt", timeout=5.0)
        except CALL_FAILED as e:
            log.info("receipt of %s at %s: %r", request_id[:10], api_url, e)
            return "unreachable", None
        if status == 404:
            return "unknown", None
        if status == 409:
            return "running", None
        got = _object(body, "stored receipt") if status == 200 else None
        if got is None:
            log.warning("receipt of %s at %r answered %d: %r", request_id[:10], api_url, status, _snippet(body))
            return "unreachable", None
        return "ok", got

    async def load(self, api_url: str, node_id: str, adapter_id: str) -> bool:
        """Ask a node to make an adapter resident (prefetch); False when it could not."""
        try:
            status, body = await self._call(
                "POST", f"{api_url}/v1/adapters/{adapter_id}/load", body={}, timeout=30.0, node_id=node_id
            )
        except CALL_FAILED as e:
            log.info("prefetch of %s at %s failed: %r", adapter_id[:10], api_url, e)
            return False
        if status != 200:
            log.info("prefetch of %s at %r answered %d: %r", adapter_id[:10], api_url, status, _snippet(body))
        return status == 200

    async def aclose(self) -> None:
        for session in (self._streams, self._calls):
            if session is not None:
                await session.close()
