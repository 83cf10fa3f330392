"""The node client: a finished stream gives its connection back to the pool; one that stays open after
its done event is dropped after a bounded wait."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from hypothesis import given, settings
from hypothesis import strategies as st

from common.identity import Identity
from gateway import node_client
from gateway.node_client import NodeClient
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


def _client_ports(app, ports: list[int]):
    """`app`, noting the client port of every HTTP request: one port, one connection."""

    async def noted(scope, receive, send):
        if scope["type"] == "http":
            ports.append(scope["client"][1])
        await app(scope, receive, send)

    return noted


def test_finished_stream_reuses_its_connection():
    ports: list[int] = []
    with ServerThread(_client_ports(StandInNode(Identity.generate(), BASE).app(), ports)) as srv:

        async def go() -> None:
            nc = NodeClient()
            try:
                for i in range(3):
                    up = await nc.open_stream(srv.url, "0x" + "00" * 32, _body(i))
                    await _until_done(up)
                    await up.aclose(drain=True)
            finally:
                await nc.aclose()

        asyncio.run(go())
    assert len(ports) == 3 and len(set(ports)) == 1, ports


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


# ---- what a hostile node answers ----------------------------------------------------------------------------
# A node's answers are untrusted bytes: nested brackets (which crashed the C JSON decoder), lines without end,
# oversize error bodies. Each ends in ValueError or NodeUnavailable for the relay (a failed node), never a crash.

NODE_ID = "0x" + "00" * 32


def _hostile_node(chunks: list[bytes], status: int = 200) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/generate")
    async def generate():
        async def body():
            for c in chunks:
                yield c

        return StreamingResponse(body(), status_code=status, media_type="text/event-stream")

    return app


async def _events(url: str) -> list[dict]:
    nc = NodeClient()
    try:
        up = await nc.open_stream(url, NODE_ID, _body(1))
        try:
            return [ev async for ev in up.events()]
        finally:
            await up.aclose()
    finally:
        await nc.aclose()


@pytest.mark.parametrize(
    "chunks",
    [
        [b"data: " + b"[" * 200_000 + b"\n\n"],  # nested: refused before the decoder recurses
        [b"data: " + b"x" * 65536] * 32,  # one line of 2 MiB without end: refused at the cap, not buffered whole
        [b"data: 1\ndata: " + b"1" * 40000 + b"\n" + b"data: " + b"1" * 40000 + b"\n\n"],  # one event over the cap
        [b'data: {"type": "token", "type": "done"}\n\n'],  # duplicate keys
        [b"data: [1, 2]\n\n"],  # not an event object
    ],
)
def test_hostile_events_are_refused_as_value_errors(chunks):
    with ServerThread(_hostile_node(chunks)) as srv:
        with pytest.raises(ValueError):
            asyncio.run(_events(srv.url))


def test_a_hostile_error_body_is_a_failed_node():
    with ServerThread(_hostile_node([b'{"error": ' + b"[" * 200_000], status=500)) as srv:
        with pytest.raises(node_client.NodeUnavailable, match="answered 500"):
            asyncio.run(_events(srv.url))


def test_a_nodes_failure_body_stays_in_the_log(caplog):
    """A registered URL may reach a service that is no node: what it answers is not read back to the client
    through the gateway's error (the status is), only logged."""
    secret = b'{"error": {"message": "db_password=hunter2"}}'
    with ServerThread(_hostile_node([secret], status=403)) as srv:
        with caplog.at_level("WARNING", logger="gateway.node_client"):
            with pytest.raises(node_client.NodeUnavailable, match="answered 403") as err:
                asyncio.run(_events(srv.url))
    assert "hunter2" not in str(err.value)
    assert any("hunter2" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("status", [301, 303, 307, 308])
def test_a_nodes_redirect_is_not_followed(status):
    """A node's redirect would carry the gateway's signed request (307: the prompt too) to any host it names."""
    reached: list[str] = []
    target = FastAPI()

    @target.api_route("/{path:path}", methods=["GET", "POST"])
    async def anything(path: str):
        reached.append(path)
        return {"ok": True}

    redirector = FastAPI()
    with ServerThread(target) as inner:

        @redirector.post("/v1/generate")
        async def generate():
            from fastapi.responses import RedirectResponse

            return RedirectResponse(inner.url + "/latest/meta-data", status_code=status)

        with ServerThread(redirector) as srv:
            with pytest.raises(node_client.NodeUnavailable, match=f"answered {status}") as err:
                asyncio.run(_events(srv.url))
    assert reached == [] and err.value.dead  # a failed node: no traffic until its next heartbeat


PIECES = [
    b"data: ",
    b"\n",
    b"\r\n",
    b"{",
    b"}",
    b"[",
    b"]",
    b'"type"',
    b":",
    b'"token"',
    b",",
    b"1e999",
    b"\\ud800",
    b'"',
    b"\xff",
]


async def _chunks(data: bytes, size: int):
    for i in range(0, len(data), size):
        yield data[i : i + size]


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=2048) | st.lists(st.sampled_from(PIECES), max_size=200).map(b"".join),
    size=st.integers(1, 64),  # where the network cuts the body: inside a line, a character, anywhere
)
def test_fuzzed_streams_give_events_or_a_value_error(data, size):
    async def go() -> None:
        up = node_client.UpstreamStream(_chunks(data, size))
        try:
            async for ev in up.events():
                assert isinstance(ev, dict)
        except ValueError:  # UntrustedJSONError included: the relay fails the node over
            pass

    asyncio.run(go())


def test_characters_cut_between_chunks_arrive_whole():
    event = {"type": "token", "text": "é€😀 ok"}
    data = b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"

    async def go() -> list[dict]:
        return [ev async for ev in node_client.UpstreamStream(_chunks(data, 1)).events()]

    assert asyncio.run(go()) == [event]


def test_a_stream_the_node_breaks_off_is_a_failed_node():
    app = FastAPI()

    @app.post("/v1/generate")
    async def generate():
        async def events():
            yield b"data: " + json.dumps({"type": "token", "text": "a"}).encode() + b"\n\n"
            raise RuntimeError("the node died mid-stream")  # uvicorn drops the connection: the body has no end

        return StreamingResponse(events(), media_type="text/event-stream")

    with ServerThread(app) as srv:

        async def go() -> tuple[list[dict], Exception]:
            nc = NodeClient()
            got = []
            try:
                up = await nc.open_stream(srv.url, NODE_ID, _body(1))
                try:
                    async for ev in up.events():
                        got.append(ev)
                except Exception as e:  # noqa: BLE001 - the test looks at which
                    return got, e
                finally:
                    await up.aclose()
            finally:
                await nc.aclose()
            raise AssertionError("the broken stream ended as if whole")

        got, err = asyncio.run(go())
    assert got == [{"type": "token", "text": "a"}]
    assert isinstance(err, node_client.NodeUnavailable) and err.dead, repr(err)


def test_a_node_that_is_not_listening_is_dead_and_not_running_the_request():
    from devnet.anvil import free_port

    async def go() -> node_client.NodeUnavailable:
        nc = NodeClient(connect_timeout=2.0)
        try:
            with pytest.raises(node_client.NodeUnavailable) as e:
                await nc.open_stream(f"http://127.0.0.1:{free_port()}", NODE_ID, _body(1))
            return e.value
        finally:
            await nc.aclose()

    err = asyncio.run(go())
    assert err.dead and not err.maybe_running and "is unreachable" in str(err)


def test_a_compressed_body_is_not_inflated():
    """A node answering gzip (never asked for) with a body that inflates to 64 MiB: the gateway reads the
    compressed bytes as they are (no events), so the node fails over instead of filling the gateway's memory."""
    import gzip

    bomb = gzip.compress(b"data: " + b"1" * (64 << 20) + b"\n\n", mtime=0)
    seen: list[str | None] = []

    app = FastAPI()

    @app.post("/v1/generate")
    async def generate(request: Request):
        seen.append(request.headers.get("accept-encoding"))

        async def body():
            yield bomb

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Content-Encoding": "gzip"})

    with ServerThread(app) as srv:
        # inflated, it would be one 64 MiB line, refused as a ValueError after the inflating; as sent, it
        # holds no event line at all, and the relay takes the stream's end without a done event for a failure
        assert asyncio.run(_events(srv.url)) == []
    assert seen == [None] and len(bomb) < 1 << 20


def test_a_node_that_is_not_there_fails_its_calls_as_unreachable():
    """abort, receipt and load (aiohttp since their host names are resolved on the lookup threads, gateway.dns;
    under httpx, a node killed while the connection opened raised an AttributeError out of them)."""

    async def go():
        nc = NodeClient()
        try:
            with socket.socket() as s:  # a port nothing listens on
                s.bind(("127.0.0.1", 0))
                url = f"http://127.0.0.1:{s.getsockname()[1]}"
            return (
                await nc.abort(url, NODE_ID, "0x" + "ab" * 32),
                await nc.receipt(url, "0x" + "ab" * 32),
                await nc.load(url, NODE_ID, "0x" + "cd" * 32),
                await nc.abort("http://[::1", NODE_ID, "0x" + "ab" * 32),  # a URL aiohttp cannot use
            )
        finally:
            await nc.aclose()

    assert asyncio.run(go()) == (None, ("unreachable", None), False, None)


def test_a_node_of_an_older_release_refusing_a_guided_type_is_a_node_that_cannot_serve_it():
    """A node from before regex and choice refuses them as an unknown guided type: not the client's mistake (a
    400 to it) but NodeUnavailable, on which the gateway tries the next node (ServedRequest._try), and not dead."""
    old = json.dumps(
        {
            "error": {
                "message": "guided.type must be one of json_object, json_schema, got 'regex'",
                "code": "invalid_request",
            }
        }
    ).encode()
    with ServerThread(_hostile_node([old], status=400)) as srv:
        with pytest.raises(node_client.NodeUnavailable, match="does not serve this guided type") as err:
            asyncio.run(_events(srv.url))
    assert not err.value.dead
    bad_schema = json.dumps({"error": {"message": "guided.schema cannot be compiled: x", "code": "invalid_request"}})
    with ServerThread(_hostile_node([bad_schema.encode()], status=400)) as srv:
        with pytest.raises(node_client.NodeRejected):  # the client's own mistake stays a 400
            asyncio.run(_events(srv.url))


def test_an_abort_is_not_held_behind_the_open_streams(monkeypatch):
    """Review: abort, receipt and load shared the streams' connection pool, and a request aborts while its own
    stream is open: with the pool full of streams the abort waited for a connection until its 5 s were up, and the
    request lost its receipt. They have connections of their own (each pool held to 2 here, as 512 busy streams)."""
    real = aiohttp.TCPConnector
    monkeypatch.setattr(aiohttp, "TCPConnector", lambda **kw: real(**(kw | {"limit": 2})))
    app = FastAPI()

    @app.post("/v1/generate")
    async def generate():
        async def events():
            for i in range(600):
                yield b"data: " + json.dumps({"type": "token", "text": "x", "index": i}).encode() + b"\n\n"
                await asyncio.sleep(0.1)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/requests/{rid}/abort")
    async def abort(rid: str):
        return {"receipt": {"request_id": rid}, "signature": "00"}

    with ServerThread(app) as srv:

        async def run():
            nc = NodeClient()
            body = {"adapter_id": None, "prompt": "x", "max_tokens": 3}
            ups = [await nc.open_stream(srv.url, NODE_ID, body | {"request_id": f"0x{i:064x}"}) for i in range(2)]
            try:
                return await asyncio.wait_for(nc.abort(srv.url, NODE_ID, "0x" + "00" * 32), 4.0)
            finally:
                for up in ups:
                    await up.aclose()
                await nc.aclose()

        got = asyncio.run(run())
    assert got == {"receipt": {"request_id": "0x" + "00" * 32}, "signature": "00"}
