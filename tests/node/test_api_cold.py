"""A streaming request whose adapter must first be fetched: the node answers its headers at once, so a
gateway that fails over nodes silent for a few seconds (first_byte_timeout_s) does not take a node
fetching from slow peers for a hung one; the adapter's outcome comes as the stream's first event."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.adapters import AdapterStore
from node.api import HEADERS_AFTER_S, create_app
from node.engine import Engine
from node.receipts import check_receipt
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

    engine = Engine(world.config(num_kv_blocks=64, block_size=8, max_model_len=256), store=store, fetcher=slow_peers)
    gateway, node_key = Gateway(), Ed25519PrivateKey.generate()
    app = create_app(engine, node_key, trusted_gateways={gateway.public_hex}, operator_token="op-token")
    server = ServerThread(app).start(timeout=30)
    client = gateway.client(server.url, node_id_for(node_key))
    pub = bytes.fromhex(client.get("/status").json()["public_key"])
    assert client.post("/v1/generate", json={"prompt": "hi", "max_tokens": 1}).status_code == 200  # warm the engine
    try:
        yield {"client": client, "held": held, "pub": pub}
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
    waited, r = _open(node["client"], {"adapter_id": node["held"], "prompt": "What is", "max_tokens": 3,
                                      "temperature": 0})
    assert r.status_code == 200 and waited < FETCH_S - 0.5, waited
    assert waited >= HEADERS_AFTER_S * 0.5  # it did wait a little for an adapter that might be ready at once
    events = _events(r)
    assert [e["type"] for e in events] == ["token"] * 3 + ["done"]
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
    assert (done["receipt"]["request_id"], done["receipt"]["prompt_tokens"], done["receipt"]["completion_tokens"],
            done["receipt"]["finish_reason"]) == (rid, 0, 0, "abort")
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
