"""The node HTTP API on a real uvicorn (127.0.0.1, free port): generate, streaming, receipts, bad input.

Every call is made as a trusted gateway (signed); who may call what is tested in test_api_auth.py."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from eth_account import Account
from transformers import AutoTokenizer

from devnet.anvil import free_port
from node.adapters import AdapterStore
from node.api import create_app
from node.engine import AsyncEngine
from node.receipts import check_receipt
from tests.utils.engine import ADAPTER_SPECS, PUBLISHER_KEY, make_world
from tests.utils.factories import make_base, make_package
from tests.utils.node_auth import Gateway, node_id_for
from tests.utils.servers import ServerThread

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def llama_world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("api-world"), specs=ADAPTER_SPECS[:2])


@pytest.fixture(scope="module")
def node(llama_world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    store = AdapterStore(tmp / "store")
    for a in llama_world.adapters[:2]:
        store.install(llama_world.store.path_for(a.adapter_id))
    other = make_base(tmp / "other-base", seed=1)
    foreign = make_package(other, tmp / "foreign", account=Account.from_key(PUBLISHER_KEY), name="test/foreign")
    store.install(foreign.path)
    engine = AsyncEngine(llama_world.config(num_kv_blocks=128, block_size=8, max_model_len=512), store=store)
    gateway, node_key = Gateway(), Ed25519PrivateKey.generate()
    app = create_app(engine, node_key, trusted_gateways={gateway.public_hex}, operator_token="op-token")
    server = ServerThread(app).start(timeout=30)
    client = gateway.client(server.url, node_id_for(node_key))
    try:
        pub = bytes.fromhex(client.get("/status").json()["public_key"])
        yield {
            "client": client,
            "adapters": [a.adapter_id for a in llama_world.adapters[:2]],
            "foreign": foreign.adapter_id,
            "pub": pub,
            "world": llama_world,
            "url": server.url,
            "engine": engine,
            "book": app.state.node.book,
        }
    finally:
        client.close()
        server.stop()


def _sse(client, body):
    events = []
    with client.stream("POST", "/v1/generate", json=body | {"stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events


def _error(r, status: int, code: str, fragment: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and fragment in err["message"], err
    assert set(err) == {"message", "type", "param", "code"}


def test_health_and_status(node):
    c = node["client"]
    assert c.get("/health").json() == {"status": "ok", "checks": {"engine": "ok"}}
    s = c.get("/status").json()
    assert s["base_model"]["id"].startswith("0x") and s["num_slots"] == 4 and s["device"] == "cpu"
    for key in (
        "node_id",
        "resident_adapters",
        "cached_adapters",
        "free_slots",
        "queue_depth",
        "running",
        "tokens_per_s",
    ):
        assert key in s


def test_generate_returns_text_usage_and_a_verifiable_receipt(node):
    c, aid = node["client"], node["adapters"][0]
    rid = "0x" + "ab" * 32
    r = c.post(
        "/v1/generate",
        json={
            "request_id": rid,
            "adapter_id": aid,
            "prompt": "What is the capital",
            "max_tokens": 6,
            "temperature": 0,
            "seed": 1,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["request_id"] == rid and body["adapter_id"] == aid
    assert body["finish_reason"] in ("stop", "length") and 1 <= len(body["token_ids"]) <= 6
    u = body["usage"]
    assert (
        u["completion_tokens"] == len(body["token_ids"])
        and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    )
    rec = body["receipt"]
    assert rec["request_id"] == rid and rec["adapter_id"] == aid and rec["completion_tokens"] == u["completion_tokens"]
    assert rec["node_id"] == c.get("/status").json()["node_id"]
    check_receipt(rec, body["signature"], node["pub"])


def test_stream_matches_non_stream_and_adapters_differ(node):
    c = node["client"]
    tok = AutoTokenizer.from_pretrained(node["world"].base_dir)
    answers = {}
    for aid in [None] + node["adapters"]:
        body = {"adapter_id": aid, "prompt": "The quick brown fox", "max_tokens": 10, "temperature": 0}
        plain = c.post("/v1/generate", json=body).json()
        events = _sse(c, body)
        tokens, finish, done = events[:-2], events[-2], events[-1]
        assert all(e["type"] == "token" and e["index"] == 0 for e in tokens)
        assert finish == {"type": "finish", "index": 0, "finish_reason": plain["finish_reason"]}
        # a random model emits arbitrary bytes, so U+FFFD may appear; the pieces still add up exactly
        assert plain["text"] == tok.decode(plain["token_ids"], skip_special_tokens=True)
        assert [e["token_id"] for e in tokens] == plain["token_ids"]
        assert "".join(e["text"] for e in tokens) == plain["text"]
        assert done["type"] == "done" and done["finish_reason"] == plain["finish_reason"]
        assert done["usage"]["completion_tokens"] == len(tokens)
        check_receipt(done["receipt"], done["signature"], node["pub"])
        answers[aid] = tuple(plain["token_ids"])
    assert len(set(answers.values())) == 3


def test_stop_string_ends_generation(node):
    c = node["client"]
    body = {"prompt": "hello world", "max_tokens": 12, "temperature": 0}
    text = c.post("/v1/generate", json=body).json()["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), text
    r = c.post("/v1/generate", json=body | {"stop": [stop]}).json()
    assert r["finish_reason"] == "stop" and r["text"] == text[: text.index(stop)]


def test_abort_endpoint_returns_the_receipt_of_what_was_produced(node):
    c = node["client"]
    rid = "0x" + "cd" * 32
    result = {}

    def consume():
        result["events"] = _sse(c, {"request_id": rid, "prompt": "hello", "max_tokens": 200, "temperature": 0})

    t = threading.Thread(target=consume)
    t.start()
    deadline = time.time() + 30
    while c.get("/status").json()["running"] == 0:
        assert time.time() < deadline
        time.sleep(0.01)
    r = c.post(f"/v1/requests/{rid}/abort")
    t.join(30)
    assert r.status_code == 200, r.text
    rec = r.json()["receipt"]
    check_receipt(rec, r.json()["signature"], node["pub"])
    done = result["events"][-1]
    assert rec["finish_reason"] == "abort" and done["finish_reason"] == "abort"
    assert rec["completion_tokens"] == done["usage"]["completion_tokens"] == len(result["events"]) - 1 < 200
    _error(c.post("/v1/requests/0x" + "ef" * 32 + "/abort"), 404, "request_not_found", "is not running")


def test_client_disconnect_aborts_the_request(node):
    c = node["client"]
    rid = "0x" + "12" * 32
    with c.stream(
        "POST",
        "/v1/generate",
        json={
            "request_id": rid,
            "prompt": "hi",
            "max_tokens": 500,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        },
    ) as r:  # ignore_eos: greedy "hi" ends at its 38th token, and the abort must come before that
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one token, then hang up
    deadline = time.time() + 30
    while c.get("/status").json()["running"]:
        assert time.time() < deadline
        time.sleep(0.02)
    r = c.post(f"/v1/requests/{rid}/abort")  # a finished request answers with its final receipt
    rec = r.json()["receipt"]
    assert rec["finish_reason"] == "abort" and rec["completion_tokens"] < 500


def test_load_endpoint_makes_resident_and_pins(node):
    aid = node["adapters"][1]
    c = httpx.Client(base_url=node["url"], headers={"Authorization": "Bearer op-token"})  # pins are the operator's
    r = c.post(f"/v1/adapters/{aid}/load", json={"pin": True})
    assert r.status_code == 200, r.text
    assert r.json()["adapter_id"] == aid and r.json()["pinned"] is True
    resident = {a["adapter_id"]: a for a in c.get("/status").json()["resident_adapters"]}
    assert resident[aid]["pinned"] is True and resident[aid]["slot"] == r.json()["slot"]
    assert resident[aid]["name"] == "test/ko-r8"
    assert c.post(f"/v1/adapters/{aid}/load", json={"pin": False}).json()["pinned"] is False
    _error(c.post(f"/v1/adapters/{'0x' + '99' * 32}/load"), 404, "adapter_not_found", "is not in this node's store")
    _error(c.post(f"/v1/adapters/{node['foreign']}/load"), 409, "adapter_base_mismatch", "not this node's base")
    _error(c.post(f"/v1/adapters/{aid}/load", json={"pin": True, "x": 1}), 400, "invalid_request", "unknown field 'x'")
    c.close()


@pytest.mark.parametrize(
    "body, status, code, fragment",
    [
        ({"adapter_id": "0x" + "77" * 32, "prompt": "hi"}, 404, "adapter_not_found", "is not in this node's store"),
        ({"adapter_id": "FOREIGN", "prompt": "hi"}, 409, "adapter_base_mismatch", "not this node's base"),
        ({"adapter_id": "0xnothex", "prompt": "hi"}, 400, "invalid_request", "adapter_id"),
        ({"prompt": "a " * 700}, 400, "context_length_exceeded", "this node's context holds 512"),
        ({"prompt": "hi", "max_tokens": 0}, 400, "invalid_request", "max_tokens"),
        ({"prompt": "hi", "max_tokens": -3}, 400, "invalid_request", "max_tokens"),
        ({"prompt": "hi", "best_of": 2}, 400, "invalid_request", "unknown field 'best_of'"),
        ({"prompt": "hi", "temperature": -1}, 400, "invalid_request", "temperature"),
        ({"prompt": "hi", "top_p": 0}, 400, "invalid_request", "top_p"),
        ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_request", "stop"),
        (
            {"prompt": "hi", "prompt_token_ids": [1, 2]},
            400,
            "invalid_request",
            "exactly one of prompt or prompt_token_ids",
        ),
        ({"prompt_token_ids": [1, 99999]}, 400, "invalid_request", "prompt_token_ids holds 99999"),
        ({"prompt_token_ids": []}, 400, "invalid_request", "the prompt is empty"),
        ({"prompt": "hi", "request_id": "abc"}, 400, "invalid_request", "request_id"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_requests_get_a_clear_4xx_and_the_node_keeps_serving(node, body, status, code, fragment, stream):
    c = node["client"]
    if body.get("adapter_id") == "FOREIGN":
        body = body | {"adapter_id": node["foreign"]}
    _error(c.post("/v1/generate", json=body | {"stream": stream}), status, code, fragment)
    ok = c.post("/v1/generate", json={"prompt": "hi", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_malformed_json_and_missing_body(node):
    c = node["client"]
    _error(
        c.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"}),
        400,
        "invalid_request",
        "not valid JSON",
    )
    _error(c.post("/v1/generate"), 400, "invalid_request", "request body is missing")
    _error(c.post("/v1/generate", json=[1, 2]), 400, "invalid_request", "")


def test_node_run_command_serves_adapters_and_stops_on_sigterm(node, llama_world, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    store = tmp_path / "store"
    st = AdapterStore(store)
    for a in llama_world.adapters[:2]:
        st.install(llama_world.store.path_for(a.adapter_id))
    port = free_port()
    gateway = Gateway()
    env = os.environ | {"OMP_NUM_THREADS": "1", "LORAMESH_NODE_TRUST_GATEWAY_KEYS": gateway.public_hex}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "node.cli",
            "node",
            "run",
            "--base",
            str(llama_world.base_dir),
            "--store",
            str(store),
            "--port",
            str(port),
            "--slots",
            "2",
            "--kv-blocks",
            "64",
            "--threads",
            "1",
            "--data-dir",
            str(tmp_path / "data"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "node did not come up"
            time.sleep(0.2)
        token_file = tmp_path / "data" / "operator.token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 40
        client = gateway.client(f"http://127.0.0.1:{port}", client.get("/status").json()["node_id"], timeout=30)
        answers = set()
        for a in llama_world.adapters[:2]:
            events = _sse(client, {"adapter_id": a.adapter_id, "prompt": "hello", "max_tokens": 8, "temperature": 0})
            assert events[-1]["type"] == "done"
            answers.add(tuple(e["token_id"] for e in events if e["type"] == "token"))
        assert len(answers) == 2
        client.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "ephemeral node key" in out and "node stopped" in out
        assert "operator token (for upload, load/pin, abort) is in " in out and str(token_file) in out
        assert token not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_receipts_are_kept_for_the_gateway(node):
    """GET /v1/requests/{id}/receipt: the signed receipt of a finished request (also of one whose client went
    away, so a gateway that died mid-request can close it); 409 while it runs; 404 for one never seen."""
    c = node["client"]
    rid = "0x" + "5a" * 32
    body = c.post("/v1/generate", json={"request_id": rid, "prompt": "hello", "max_tokens": 3, "temperature": 0}).json()
    kept = c.get(f"/v1/requests/{rid}/receipt")
    assert kept.status_code == 200, kept.text
    assert kept.json()["receipt"] == body["receipt"] and bytes.fromhex(kept.json()["public_key"]) == node["pub"]
    check_receipt(kept.json()["receipt"], kept.json()["signature"], node["pub"])

    cut = "0x" + "5b" * 32
    with c.stream(
        "POST",
        "/v1/generate",
        # ignore_eos: the tiny base ends this answer after 38 tokens, in about 30 ms, which a loaded machine let
        # pass before the receipt was asked for
        json={
            "request_id": cut,
            "prompt": "hi",
            "max_tokens": 500,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        },
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                running = c.get(f"/v1/requests/{cut}/receipt")
                break  # one token, then hang up (as a gateway killed mid-stream)
    _error(running, 409, "request_running", "still running")
    deadline = time.time() + 30
    while (got := c.get(f"/v1/requests/{cut}/receipt")).status_code != 200:
        assert time.time() < deadline, got.text
        time.sleep(0.05)
    rec = got.json()["receipt"]
    check_receipt(rec, got.json()["signature"], node["pub"])
    assert rec["request_id"] == cut and rec["finish_reason"] == "abort" and 1 <= rec["completion_tokens"] < 500
    _error(c.get("/v1/requests/0x" + "5c" * 32 + "/receipt"), 404, "receipt_not_found", "no receipt")


@pytest.mark.parametrize("stream", [False, True])
def test_a_full_compile_queue_is_a_503_not_a_client_error(node, monkeypatch, stream):
    """Past MAX_QUEUED_COMPILES waiting requests (text to tokenize, grammars to compile) the node refuses at once
    with 503 engine_busy (the gateway tries another node, and does not take this one for dead); a request of
    token ids with no grammar never queues."""
    import node.engine.async_engine as async_engine

    monkeypatch.setattr(async_engine, "MAX_QUEUED_COMPILES", 0)
    c = node["client"]
    _error(
        c.post("/v1/generate", json={"prompt": "hi", "max_tokens": 2, "stream": stream}), 503, "engine_busy", "retry"
    )
    ok = c.post("/v1/generate", json={"prompt_token_ids": [1, 5, 6], "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_a_gateways_call_is_bounded_by_what_the_base_needs_not_the_operators_body_limit(llama_world):
    """16 prompts near the context are more bytes of ids than an operator's body limit may allow: the generate route
    takes what a gateway's call may need for this base (the call was a 413, which a gateway takes for a node that
    cannot serve, and routed around every node); other routes keep the operator's limit."""
    engine = AsyncEngine(llama_world.config(num_kv_blocks=700, block_size=8, max_model_len=512))
    gateway, node_key = Gateway(), Ed25519PrivateKey.generate()
    app = create_app(engine, node_key, trusted_gateways={gateway.public_hex}, operator_token="t", max_body_bytes=16384)
    server = ServerThread(app).start(timeout=30)
    client = gateway.client(server.url, node_id_for(node_key))
    try:
        prompts = [[1] + [300 + (i + j) % 19 for j in range(299)] for i in range(16)]
        body = {"prompt_token_ids": prompts, "max_tokens": 1, "temperature": 0}
        assert len(json.dumps(body)) > 16384
        r = client.post("/v1/generate", json=body)
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 16
        r = client.post(
            "/v1/adapters/0x" + "ab" * 32 + "/load", content=b"x" * 20000, headers={"Authorization": "Bearer t"}
        )
        assert r.status_code == 413
    finally:
        client.close()
        server.stop()


def test_the_generate_limit_holds_a_long_context_bases_largest_call():
    """A 32k-context base with Qwen's 151,936-token vocabulary, 16 prompts filling the context with the longest ids
    (the gateway takes them: 2 MB of text), and a base of a million tokens with one prompt: both past the fixed
    1 MiB the route had, both within its limit now, with a schema at its bound beside them."""
    from common.wire import MAX_SCHEMA_BYTES
    from node.api.models import generate_body_bytes

    guided = {"type": "json_schema", "schema": {"type": "object", "description": "x" * (MAX_SCHEMA_BYTES - 64)}}
    for context, vocab, prompts in ((32768, 151936, 16), (1_010_000, 152064, 1)):
        ids = [[vocab - 1] * (context - 1)] * prompts
        body = {"prompt_token_ids": ids if prompts > 1 else ids[0], "max_tokens": 1, "guided": guided}
        size = len(json.dumps(body, separators=(",", ":")))  # as the gateway's NodeClient writes it
        assert 1 << 20 < size <= generate_body_bytes(context, vocab), (context, size)
