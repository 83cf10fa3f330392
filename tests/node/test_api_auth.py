"""Who may call a node, tried against a real `loramesh node run` process as an attacker with no key would.

Gateways A and B are trusted (--trust-gateway-key), C is not; the operator holds <data dir>/operator.token.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from eth_account import Account
from fastapi import FastAPI, Request

from node.adapters import AdapterStore
from node.request_auth import BODY_HASH_HEADER, KEY_HEADER, SIG_HEADER, TS_HEADER, sign_request
from tests.utils.factories import make_package
from tests.utils.node_auth import Gateway, NodeProcess
from tests.utils.servers import ServerThread

pytestmark = pytest.mark.integration
A, B, C = Gateway(), Gateway(), Gateway()


@pytest.fixture(scope="module")
def node(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    store = AdapterStore(root / "store")
    adapters = []
    for i in range(2):  # as many as the node has slots
        pkg = make_package(tiny_base, root / f"pkg{i}", account=Account.create(), name=f"auth/a{i}", rank=2, seed=i)
        adapters.append(store.install(pkg.path).adapter_id)
    n = NodeProcess(root, tiny_base, trusted=[A, B], store=root / "store").start()
    n.adapters = adapters
    try:
        yield n
    finally:
        assert n.stop() == 0, n.log()[-2000:]


def _error(r: httpx.Response, status: int, code: str, fragment: str = "") -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and fragment in err["message"], err


GEN = {"prompt": "hello", "max_tokens": 2, "temperature": 0}


def test_public_endpoints_need_no_credentials(node):
    c = node.anonymous()
    assert c.get("/health").json() == {"status": "ok", "checks": {"engine": "ok", "store": "ok"}}
    assert c.get("/status").json()["node_id"] == node.node_id
    assert c.get("/openapi.json").status_code == 200 and c.get("/docs").status_code == 200
    _error(c.get("/v1/requests/0x" + "01" * 32 + "/receipt"), 404, "receipt_not_found")


def test_generate_without_a_gateway_signature_is_401(node):
    _error(node.anonymous().post("/v1/generate", json=GEN), 401, "unauthenticated", "signed by a gateway")
    # the operator's token is not a gateway's signature: generation is for gateways only
    _error(node.operator().post("/v1/generate", json=GEN), 401, "unauthenticated")
    assert node.signed(A).post("/v1/generate", json=GEN).status_code == 200


def test_a_key_the_node_does_not_trust_is_403(node):
    _error(node.signed(C).post("/v1/generate", json=GEN), 403, "gateway_not_trusted")


def _post_signed(node, path: str, signed_body: bytes, sent_body: bytes, **sign_kw) -> httpx.Response:
    headers = sign_request(
        A.key,
        method="POST",
        path=sign_kw.pop("signed_path", path),
        node_id=sign_kw.pop("node_id", node.node_id),
        body=signed_body,
        **sign_kw,
    )
    return httpx.post(
        node.url + path, content=sent_body, timeout=30, headers=headers | {"content-type": "application/json"}
    )


def test_a_valid_signature_over_other_bytes_another_path_node_or_time_is_401(node):
    body = json.dumps(GEN).encode()
    other = json.dumps(GEN | {"max_tokens": 3}).encode()
    _error(_post_signed(node, "/v1/generate", body, other), 401, "unauthenticated", "does not verify")
    _error(
        _post_signed(node, "/v1/generate", body, body, signed_path="/v1/adapters/" + "0" * 64 + "/load"),
        401,
        "unauthenticated",
        "does not verify",
    )
    _error(_post_signed(node, "/v1/generate", body, body, node_id="0x" + "11" * 32), 401, "unauthenticated")
    stale = int(time.time() * 1000) - 61_000
    _error(_post_signed(node, "/v1/generate", body, body, ts_ms=stale), 401, "unauthenticated", "from the node's clock")


@pytest.mark.parametrize(
    "key, ts, sig",
    [
        (A.public_hex, b"\xb2", "ab" * 64),  # "\xb2" reads as "²", which str.isdigit() takes and int() does not
        (A.public_hex, b"\xb9\xb3", "ab" * 64),
        (A.public_hex, b"1 2", "ab" * 64),
        (A.public_hex[:32] + " " + A.public_hex[33:], b"1", "ab" * 64),  # bytes.fromhex() skips spaces
        (A.public_hex, b"1", "ab " * 42 + "ab"),
    ],
)
def test_malformed_signature_headers_are_401_not_500(node, key, ts, sig):
    headers = [
        (b"x-loramesh-gateway-key", key.encode()),
        (b"x-loramesh-timestamp", ts),
        (b"x-loramesh-signature", sig.encode()),
        (b"content-type", b"application/json"),
    ]
    r = httpx.post(node.url + "/v1/generate", content=json.dumps(GEN).encode(), headers=headers, timeout=30)
    _error(r, 401, "unauthenticated", "malformed gateway signature headers")


def test_a_replayed_request_is_refused(node):
    rid = "0x" + "a1" * 32
    body = json.dumps(GEN | {"request_id": rid}).encode()
    headers = sign_request(A.key, method="POST", path="/v1/generate", node_id=node.node_id, body=body)
    headers |= {"content-type": "application/json"}
    assert httpx.post(node.url + "/v1/generate", content=body, headers=headers, timeout=30).status_code == 200
    _error(httpx.post(node.url + "/v1/generate", content=body, headers=headers, timeout=30), 409, "replayed_request")
    # signed afresh, the same request id is still refused: the node has its receipt
    _error(node.signed(A).post("/v1/generate", json=GEN | {"request_id": rid}), 409, "duplicate_request")
    _error(node.signed(B).post("/v1/generate", json=GEN | {"request_id": rid}), 409, "duplicate_request")


def test_a_signature_sent_with_other_bytes_is_not_used_up(node):
    """Signed headers seen on the way (they carry the body's hash) and sent first with other bytes are refused,
    and the call they were signed for still goes through: only a body that matches uses a signature up."""
    body = json.dumps(GEN | {"request_id": "0x" + "a2" * 32}).encode()
    headers = sign_request(A.key, method="POST", path="/v1/generate", node_id=node.node_id, body=body)
    headers |= {"content-type": "application/json"}
    assert BODY_HASH_HEADER in headers
    junk = json.dumps(GEN | {"request_id": "0x" + "a3" * 32}).encode()
    _error(httpx.post(node.url + "/v1/generate", content=junk, headers=headers, timeout=30), 401, "unauthenticated")
    # ... or first with a body that never ends (found by a review: the signature was held while it was read)
    held = socket.create_connection(("127.0.0.1", node.port))
    try:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        held.sendall(f"POST /v1/generate HTTP/1.1\r\nhost: x\r\n{head}content-length: {len(body)}\r\n\r\n{{".encode())
        time.sleep(0.3)
        assert httpx.post(node.url + "/v1/generate", content=body, headers=headers, timeout=30).status_code == 200
    finally:
        held.close()
    _error(httpx.post(node.url + "/v1/generate", content=body, headers=headers, timeout=30), 409, "replayed_request")


def test_pinning_every_slot_needs_the_operator(node):
    for aid in node.adapters:
        _error(node.anonymous().post(f"/v1/adapters/{aid}/load", json={"pin": True}), 401, "unauthenticated")
        wrong = httpx.post(
            f"{node.url}/v1/adapters/{aid}/load", json={"pin": True}, headers={"Authorization": "Bearer not-the-token"}
        )
        _error(wrong, 401, "unauthenticated", "wrong operator token")
        _error(node.signed(C).post(f"/v1/adapters/{aid}/load", json={"pin": True}), 403, "gateway_not_trusted")
    status = node.anonymous().get("/status").json()
    assert not any(a["pinned"] for a in status["resident_adapters"]) and status["free_slots"] == 2
    # the operator may pin, a trusted gateway may prefetch
    r = node.operator().post(f"/v1/adapters/{node.adapters[0]}/load", json={"pin": True})
    assert r.status_code == 200 and r.json()["pinned"] is True, r.text
    assert node.signed(B).post(f"/v1/adapters/{node.adapters[1]}/load").status_code == 200
    # ... and not pin (any settler's gateway that said hello is trusted: pinning a slot each, one left none for
    # the others), nor unpin what the operator pinned
    for aid, pin in ((node.adapters[1], True), (node.adapters[0], False)):
        signed = node.signed(B).post(f"/v1/adapters/{aid}/load", json={"pin": pin})
        _error(signed, 403, "pin_refused", "only the node's operator pins or unpins")
    status = node.anonymous().get("/status").json()
    assert [a["adapter_id"] for a in status["resident_adapters"] if a["pinned"]] == [node.adapters[0]]
    assert node.operator().post(f"/v1/adapters/{node.adapters[0]}/load", json={"pin": False}).json()["pinned"] is False


def test_only_the_gateway_that_started_a_stream_may_abort_it(node):
    rid = "0x" + "b2" * 32
    events, started = [], threading.Event()
    # clients made before the stream starts: the tiny model makes ~1,000 tokens a second, and the checks
    # below must all run while it is still generating
    a, b, c, anon = node.signed(A), node.signed(B), node.signed(C), node.anonymous()

    def consume():
        body = {"request_id": rid, "prompt": "hello", "max_tokens": 1000, "temperature": 0, "stream": True}
        with a.stream("POST", "/v1/generate", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    started.set()

    t = threading.Thread(target=consume)
    t.start()
    assert started.wait(60)
    _error(anon.post(f"/v1/requests/{rid}/abort"), 401, "unauthenticated")
    _error(c.post(f"/v1/requests/{rid}/abort"), 403, "gateway_not_trusted")
    _error(b.post(f"/v1/requests/{rid}/abort"), 403, "not_request_owner", "started by another gateway")
    _error(anon.get(f"/v1/requests/{rid}/receipt"), 409, "request_running")  # B cut nothing
    r = a.post(f"/v1/requests/{rid}/abort")
    t.join(60)
    assert r.status_code == 200, r.text
    assert r.json()["receipt"]["finish_reason"] == "abort" and events[-1]["finish_reason"] == "abort"
    assert r.json()["receipt"]["completion_tokens"] < 1000
    _error(node.signed(B).post("/v1/requests/0x" + "b3" * 32 + "/abort"), 404, "request_not_found")


def test_upload_needs_the_operator_token_before_its_body_is_read(node):
    _error(node.anonymous().post("/v1/adapters", content=b"x" * 1000), 401, "unauthenticated", "operator's token")
    _error(node.signed(A).post("/v1/adapters", content=b"x" * 1000), 401, "unauthenticated")
    wrong = httpx.post(node.url + "/v1/adapters", content=b"x", headers={"Authorization": "Bearer nope"})
    _error(wrong, 401, "unauthenticated", "wrong operator token")
    assert list((node.store / ".tmp").iterdir()) == []


# ---- keys learnt from the gateways a node heartbeats to ----


class FakeGateway:
    """The two routes of a gateway that a node calls to learn its key, on a real uvicorn."""

    def __init__(self, key_hex: str) -> None:
        self.key_hex, self.beats = key_hex, 0
        app = FastAPI()

        @app.get("/internal/gateway-key")
        async def gateway_key() -> dict:
            return {"gateway_key": self.key_hex}

        @app.post("/internal/heartbeat")
        async def heartbeat(request: Request) -> dict:
            await request.body()
            self.beats += 1
            return {"ok": True, "gateway_key": self.key_hex}

        self.server = ServerThread(app)


def test_a_node_trusts_the_keys_its_gateways_announce_and_follows_a_new_one(tiny_base, tmp_path):
    g1, g2 = Gateway(), Gateway()
    fake = FakeGateway(g1.public_hex)
    with fake.server:
        n = NodeProcess(tmp_path, tiny_base, trusted=[], extra_args=["--gateway", fake.server.url]).start()
        try:
            deadline = time.time() + 30
            while (r := n.signed(g1).post("/v1/generate", json=GEN)).status_code != 200:
                assert time.time() < deadline, r.text
                time.sleep(0.2)
            _error(n.signed(A).post("/v1/generate", json=GEN), 403, "gateway_not_trusted")
            fake.key_hex, seen = g2.public_hex, fake.beats
            while fake.beats < seen + 2:
                assert time.time() < deadline + 30
                time.sleep(0.2)
            assert n.signed(g2).post("/v1/generate", json=GEN).status_code == 200
            _error(n.signed(g1).post("/v1/generate", json=GEN), 403, "gateway_not_trusted")
        finally:
            n.stop()


def _raw_call(node, *, ts_ms: int, declared: int, sent: bytes, body_hash: str | None = None) -> socket.socket:
    """A generate call with A's key and a made-up signature (anyone can write these headers), `declared` bytes of
    body announced and only `sent` sent: the connection stays open, as a stranger holding it would."""
    s = socket.create_connection(("127.0.0.1", node.port), timeout=20)
    head = (
        f"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n{KEY_HEADER}: {A.public_hex}\r\n{TS_HEADER}: {ts_ms}\r\n"
        f"{SIG_HEADER}: {'ab' * 64}\r\n" + (f"{BODY_HASH_HEADER}: {body_hash}\r\n" if body_hash else "") + "\r\n"
    )
    s.sendall(head.encode() + sent)
    return s


def _answer(s: socket.socket) -> tuple[int, bytes]:
    """(status, the rest of what came back), read before the call's body was sent whole."""
    t0, data = time.monotonic(), b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
        data.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0]
    ):
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    assert time.monotonic() - t0 < 5, "the node waited for the body"
    return int(data.split(b" ", 2)[1]), data


def test_a_call_no_gateway_could_sign_now_is_answered_before_its_body_is_read(node):
    """A stale timestamp is refused from the headers: the megabyte it announces is never awaited."""
    s = _raw_call(node, ts_ms=int(time.time() * 1000) - 600_000, declared=1_000_000, sent=b"{")
    try:
        assert _answer(s)[0] == 401
    finally:
        s.close()


def test_a_strangers_large_body_is_never_read(node):
    """Made-up headers (a trusted key, the time, a signature) with the body's hash are refused on the signature
    from the headers alone; without the hash, a body past 1 MiB is refused before it is read (a body is read
    before its signature can be checked only up to 1 MiB). Two such held open took the node's large reads."""
    now, large = int(time.time() * 1000), 2 << 20
    for body_hash in ("cd" * 32, None):
        s = _raw_call(node, ts_ms=now, declared=large, sent=b"{" * 1024, body_hash=body_hash)
        try:
            status, data = _answer(s)
            assert status == 401 and (body_hash is not None or BODY_HASH_HEADER.encode() in data), data
        finally:
            s.close()


def test_a_gateways_large_call_is_read_once_verified_and_held_to_its_hash(node):
    """A body past 1 MiB (a long context's prompts: here JSON's own whitespace) signed with its hash is served;
    the same headers with another body of the same length are refused: it is not the body signed."""
    body = json.dumps(GEN).encode() + b" " * (3 << 19)
    assert (
        node.signed(A).post("/v1/generate", content=body, headers={"content-type": "application/json"}).status_code
        == 200
    )
    headers = sign_request(A.key, method="POST", path="/v1/generate", node_id=node.node_id, body=body)
    forged = body.replace(b'"hello"', b'"jello"')
    r = httpx.post(node.url + "/v1/generate", content=forged, headers=headers | {"content-type": "application/json"})
    _error(r, 401, "unauthenticated", "not the one signed")


def test_a_strangers_unverified_body_is_held_only_seconds(node):
    """A call without the body's hash is read before it is verified (up to 1 MiB): one that never finishes sending
    it is answered 408 after a few seconds (300 such held ~300 MB, unanswered, for good: red team)."""
    s = _raw_call(node, ts_ms=int(time.time() * 1000), declared=1_000_000, sent=b"{" * 1024)
    try:
        t0 = time.monotonic()
        s.settimeout(15)
        assert int(s.recv(4096).split(b" ", 2)[1]) == 408 and time.monotonic() - t0 < 10
    finally:
        s.close()
