"""A streaming request whose adapter must first be fetched: the node answers its headers at once, so a
gateway that fails over nodes silent for a few seconds (first_byte_timeout_s) does not take a node
fetching from slow peers for a hung one; the adapter's outcome comes as the stream's first event."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.adapters import AdapterStore
from node.api import create_app
from node.api.routes.generate import HEADERS_AFTER_S
from node.engine import AsyncEngine
from node.receipts import check_receipt
from node.request_auth import sign_request
from tests.utils.engine import ADAPTER_SPECS, make_world
from tests.utils.node_auth import Gateway, node_id_for
from tests.utils.servers import ServerThread

pytestmark = pytest.mark.integration
FETCH_S = 3.0  # how long the "peers" take: longer than HEADERS_AFTER_S


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    world = make_world(tmp_path_factory.mktemp("cold-world"), specs=ADAPTER_SPECS[:1])
    store = AdapterStore(tmp_path_factory.mktemp("cold") / "store")  # empty: every adapter comes from "peers"
    held = world.adapters[0].adapter_id

    async def slow_peers(adapter_id: str):
        await asyncio.sleep(FETCH_S)
        if adapter_id != held:
            return None
        return store.install(world.store.path_for(adapter_id)).path

    engine = AsyncEngine(
        world.config(num_kv_blocks=64, block_size=8, max_model_len=256), store=store, fetcher=slow_peers
    )
    gateway, node_key = Gateway(), Ed25519PrivateKey.generate()
    app = create_app(engine, node_key, trusted_gateways={gateway.public_hex}, operator_token="op-token")
    server = ServerThread(app).start(timeout=30)
    client = gateway.client(server.url, node_id_for(node_key))
    pub = bytes.fromhex(client.get("/status").json()["public_key"])
    assert client.post("/v1/generate", json={"prompt": "hi", "max_tokens": 1}).status_code == 200  # warm the engine
    try:
        yield {
            "client": client,
            "held": held,
            "pub": pub,
            "gateway": gateway,
            "node_id": node_id_for(node_key),
            "host": "127.0.0.1",
            "port": server.port,
        }
    finally:
        client.close()
        server.stop()


def _open(client, body):
    """(seconds to the response headers, response) of a streaming generate."""
    t0 = time.monotonic()
    r = client.send(client.build_request("POST", "/v1/generate", json=body | {"stream": True}), stream=True)
    return time.monotonic() - t0, r


def _events(r) -> list[dict]:
    try:
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    finally:
        r.close()


def test_headers_come_before_a_slow_fetch_and_the_tokens_after_it(node):
    waited, r = _open(
        node["client"], {"adapter_id": node["held"], "prompt": "What is", "max_tokens": 3, "temperature": 0}
    )
    assert r.status_code == 200 and waited < FETCH_S - 0.5, waited
    assert waited >= HEADERS_AFTER_S * 0.5  # it did wait a little for an adapter that might be ready at once
    events = _events(r)
    assert [e["type"] for e in events] == ["token"] * 3 + ["finish", "done"]
    check_receipt(events[-1]["receipt"], events[-1]["signature"], node["pub"])
    assert events[-1]["receipt"]["completion_tokens"] == 3
    # now resident: the next request gets no cold treatment and no wait
    waited, r = _open(node["client"], {"adapter_id": node["held"], "prompt": "What is", "max_tokens": 1})
    assert r.status_code == 200 and waited < HEADERS_AFTER_S
    _events(r)


def test_an_adapter_no_peer_has_is_an_error_event_and_a_zero_receipt(node):
    rid = "0x" + "c1" * 32
    waited, r = _open(node["client"], {"request_id": rid, "adapter_id": "0x" + "5a" * 32, "prompt": "hi"})
    assert r.status_code == 200 and waited < FETCH_S - 0.5
    events = _events(r)
    assert [e["type"] for e in events] == ["error", "done"]
    assert events[0]["code"] == "adapter_not_found"
    done = events[1]
    check_receipt(done["receipt"], done["signature"], node["pub"])
    assert (
        done["receipt"]["request_id"],
        done["receipt"]["prompt_tokens"],
        done["receipt"]["completion_tokens"],
        done["receipt"]["finish_reason"],
    ) == (rid, 0, 0, "abort")
    assert node["client"].get(f"/v1/requests/{rid}/receipt").json()["receipt"] == done["receipt"]


def test_a_request_aborted_while_its_adapter_is_fetched_never_starts(node):
    rid = "0x" + "c2" * 32
    _, r = _open(node["client"], {"request_id": rid, "adapter_id": "0x" + "5b" * 32, "prompt": "hi"})
    assert r.status_code == 200
    aborted = node["client"].post(f"/v1/requests/{rid}/abort")
    assert aborted.status_code == 200 and aborted.json()["receipt"]["completion_tokens"] == 0
    events = _events(r)
    assert [e["type"] for e in events] == ["error", "done"] and events[0]["code"] == "request_aborted"
    assert events[1]["receipt"] == aborted.json()["receipt"]


def test_a_client_gone_before_the_stream_began_leaves_no_request_running(node):
    """A client that leaves while its adapter is fetched: the request must still end (a receipt, no longer
    running) instead of staying taken for good, whether Starlette cancels the response before its body
    took a step (no generator's finally runs; the response's guard ends it) or after (the body's own)."""
    rid = "0x" + "c3" * 32
    body = json.dumps({"request_id": rid, "adapter_id": "0x" + "5c" * 32, "prompt": "hi", "stream": True}).encode()
    headers = sign_request(node["gateway"].key, method="POST", path="/v1/generate", node_id=node["node_id"], body=body)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection((node["host"], node["port"])) as sock:
        sock.sendall(
            f"POST /v1/generate HTTP/1.1\r\nhost: {node['host']}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{head}\r\n".encode()
            + body
        )
        time.sleep(0.2)  # the node is waiting for the adapter (up to HEADERS_AFTER_S) when the client leaves
    deadline = time.monotonic() + FETCH_S + 10
    while True:
        r = node["client"].get(f"/v1/requests/{rid}/receipt")
        if r.status_code == 200:
            break
        assert r.status_code == 409 and time.monotonic() < deadline, r.text  # running, for now
        time.sleep(0.2)
    assert r.json()["receipt"]["completion_tokens"] == 0


def test_a_second_request_with_the_same_id_while_the_adapter_loads_is_a_duplicate(node):
    """The id is taken before the node waits for the adapter: a second request with it within that wait was
    let through and later overwrote who may abort it, and its refusal stored a false 0-token receipt."""
    rid = "0x" + "c4" * 32
    body = {"request_id": rid, "adapter_id": "0x" + "5d" * 32, "prompt": "hi"}
    first: list = []
    t = threading.Thread(target=lambda: first.append(_events(_open(node["client"], body)[1])))
    t.start()
    deadline = time.monotonic() + 10
    while node["client"].get(f"/v1/requests/{rid}/receipt").status_code != 409:  # the first holds its id
        assert time.monotonic() < deadline, "the first request did not take its id"
        time.sleep(0.02)
    # the first is waiting for its adapter now (HEADERS_AFTER_S, then the fetch)
    again = node["client"].post("/v1/generate", json=body | {"stream": True})
    t.join(FETCH_S + 10)
    assert again.status_code == 409 and again.json()["error"]["code"] == "duplicate_request", again.text
    assert [e["type"] for e in first[0]] == ["error", "done"] and first[0][0]["code"] == "adapter_not_found"
