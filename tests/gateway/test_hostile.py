"""Bodies an attacker sends, with or without a key, against `loramesh gateway run` as a process of its own
(so a crash ends it, not the test): each gets one answer in the OpenAI error shape with the right status,
never a 500, and the gateway keeps serving. A node process (tests/utils/rogue_node.py, honest) serves what
is valid, and checks that every generate call is signed with the gateway's key for it.

Found before: 200 KB of nested "[" killed the gateway (SIGSEGV) on /internal/heartbeat and /v1/*; a lone
surrogate in a prompt gave a 500; a seed of 2^64 reached the node (500 there, 503 here); "16" was taken as
max_tokens; a 20 MB body was read whole, and a prompt far longer than the context was tokenized whole
before it was refused."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.keys import create_key
from node.adapters.basemodel import base_model_id, base_model_name
from node.heartbeat import make_heartbeat
from tests.utils.gateway import add_node, error_of, make_db, poll, start_gateway_process, start_script_node

pytestmark = pytest.mark.integration

NESTED = b"[" * 200_000


class World:
    def __init__(self, tmp, tiny_base) -> None:
        self.engine = make_db(tmp / "gw.db")
        self.key, _ = create_key(self.engine, name="app")
        self.model = base_model_name(tiny_base)
        self.base = base_model_id(tiny_base)
        self.gw, self.url = start_gateway_process(
            tmp, f"sqlite:///{tmp / 'gw.db'}", bases=(tiny_base,), env={"LORAMESH_GATEWAY_HEARTBEAT_TTL_S": "60"}
        )
        self.gw.wait_http(self.url + "/health")
        self.gateway_key = httpx.get(self.url + "/internal/gateway-key", timeout=5).json()["gateway_key"]
        self.node, self.identity, self.node_url = start_script_node(
            tmp, "node", self.url, self.base, mode="honest", tokens=2, extra_args=("--trust", self.gateway_key)
        )
        self.calls = tmp / "node.key.calls"
        add_node(self.engine, node_id=self.identity.node_id, base_model=self.base, api_url=self.node_url)
        poll(lambda: httpx.get(self.url + "/health", timeout=2).json()["live_nodes"] == 1, timeout=60, interval=0.2)
        self.http = httpx.Client(base_url=self.url, timeout=30, headers={"Authorization": f"Bearer {self.key}"})

    def post(self, path: str, body, **kw) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.http.post(path, content=content, headers={"Content-Type": "application/json"}, **kw)

    def completion(self, **fields) -> dict:
        return {"model": self.model, "prompt": "hello", "max_tokens": 2} | fields

    def chat(self, **fields) -> dict:
        return {"model": self.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2} | fields

    def alive(self) -> None:
        assert self.gw.alive(), self.gw.last_log_line()
        assert httpx.get(self.url + "/health", timeout=5).status_code == 200

    def stop(self) -> None:
        self.http.close()
        self.gw.stop()
        if self.node.poll() is None:
            self.node.kill()
            self.node.wait(10)
        self.engine.dispose()


@pytest.fixture(scope="module")
def w(tmp_path_factory, tiny_base):
    world = World(tmp_path_factory.mktemp("hostile"), tiny_base)
    try:
        yield world
    finally:
        world.stop()


@pytest.mark.parametrize("path", ["/internal/heartbeat", "/v1/completions", "/v1/chat/completions"])
def test_nested_brackets_are_refused_and_the_gateway_lives(w, path):
    r = w.post(path, NESTED)
    assert r.status_code == 400 and "nested deeper" in error_of(r)["message"]
    w.alive()


def test_a_valid_request_is_served_and_its_node_call_signed(w):
    r = w.post("/v1/completions", w.completion(seed=2**64 - 1))  # the largest seed a node takes
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2
    calls = w.calls.read_text().splitlines()
    assert f"/v1/generate {w.gateway_key}" in calls and not any("refused" in c for c in calls)


def test_the_heartbeat_answer_names_the_gateway_key(w):
    assert len(w.gateway_key) == 64 and bytes.fromhex(w.gateway_key)
    # dated 2 s ahead (within the allowed skew): the node's own beats, every 0.5 s, cannot be newer and make it stale
    ts_ms = int(time.time() * 1000) + 2000
    doc = make_heartbeat(w.identity, api_url=w.node_url, base_model_id=w.base, status={"queue_depth": 0}, ts_ms=ts_ms)
    r = w.post("/internal/heartbeat", doc)
    assert r.status_code == 200 and r.json()["gateway_key"] == w.gateway_key, r.text


def test_a_lone_surrogate_is_a_400(w):
    body = ('{"model": "' + w.model + '", "prompt": "a\\ud800b", "max_tokens": 2}').encode()
    r = w.post("/v1/completions", body)
    assert r.status_code == 400 and "surrogate" in error_of(r)["message"]
    chat = ('{"model": "' + w.model + '", "messages": [{"role": "user", "content": "\\udfff"}]}').encode()
    assert w.post("/v1/chat/completions", chat).status_code == 400


# a field, a value of the wrong type or out of range, for either endpoint; OpenAI takes no strings for numbers
WRONG = [
    ("max_tokens", "16"),
    ("max_tokens", 1.0),
    ("max_tokens", True),
    ("max_tokens", 0),
    ("seed", 2**64),
    ("seed", -(2**63) - 1),  # OpenAI's seeds are signed 64-bit numbers
    ("seed", "3"),
    ("temperature", "1"),
    ("temperature", 3),
    ("top_p", [1]),
    ("stream", "true"),
    ("stream", 1),
    ("n", "1"),
    ("stop", 5),
    ("stop", [1]),
    ("stop", ["a"] * 5),
    ("user", 5),
    ("model", 5),
    ("model", ""),
    ("stream_options", {"include_usage": "yes"}),
    ("logit_bias", "x"),
    ("presence_penalty", "0"),
]
WRONG_COMPLETION = [
    ("prompt", {"a": 1}),
    ("prompt", [1.5]),
    ("prompt", [-1]),
    ("prompt", [2**40]),
    ("prompt", []),
    ("prompt", None),
    ("echo", "no"),
    ("best_of", "1"),
]
WRONG_CHAT = [
    ("messages", "hi"),
    ("messages", []),
    ("messages", [{"role": "user", "content": 5}]),
    ("messages", [{"role": "bot", "content": "x"}]),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": 1}]}]),
    ("max_completion_tokens", "5"),
    ("response_format", "json"),
]


@pytest.mark.parametrize("field,value", WRONG + WRONG_COMPLETION)
def test_completion_fields_are_strict(w, field, value):
    r = w.post("/v1/completions", w.completion(**{field: value}))
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["type"] == "invalid_request_error" and err["param"] == field, err


@pytest.mark.parametrize("field,value", WRONG + WRONG_CHAT)
def test_chat_fields_are_strict(w, field, value):
    r = w.post("/v1/chat/completions", w.chat(**{field: value}))
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["type"] == "invalid_request_error" and err["param"] == field, err


def test_a_model_name_that_resolves_to_nothing_is_no_metrics_label(w):
    # every label value is a time series the gateway keeps for good and renders on the public /metrics: an
    # error is counted under the model it resolved to, or "-"
    for i in range(3):
        name = f"no-such-model-{i}-" + "x" * 10_000
        assert w.post("/v1/completions", w.completion(model=name)).status_code == 404
        assert w.post("/v1/chat/completions", w.chat(model=name)).status_code == 404
        assert w.http.get(f"/v1/models/{name}").status_code == 404
    metrics = httpx.get(w.url + "/metrics", timeout=10).text
    assert "no-such-model" not in metrics
    assert 'loramesh_gateway_requests_total{model="-",status="404"}' in metrics


@pytest.mark.parametrize("chat", [False, True])
def test_a_stop_string_longer_than_the_bound_is_a_400(w, chat):
    # a node checks every stop string against each token's text; 4 of 300,000 characters were sent on, and
    # the node's 413 for the body came back as a 503 after trying every node
    for stop in ("y" * 257, ["a", "y" * 257]):
        body = w.chat(stop=stop) if chat else w.completion(stop=stop)
        r = w.post("/v1/chat/completions" if chat else "/v1/completions", body)
        assert r.status_code == 400 and error_of(r)["param"] == "stop", r.text[:300]
    r = w.post("/v1/completions", w.completion(stop=["y" * 256]))
    assert r.status_code == 200, r.text[:300]


def test_a_body_over_the_limit_is_413_before_it_is_read(w):
    big = json.dumps(w.completion(prompt="a " * 10_000_000)).encode()  # 20 MB
    try:
        r = w.post("/v1/completions", big)
    except httpx.HTTPError:  # the gateway answered and closed before the client finished sending
        pytest.fail("the 413 did not reach the client")
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
    w.alive()


def test_a_prompt_the_context_cannot_hold_is_refused_without_tokenizing_it(w):
    started = time.monotonic()
    r = w.post("/v1/completions", w.completion(prompt="word " * 600_000))  # 3 MB; the tiny base holds 512
    took = time.monotonic() - started
    err = error_of(r)
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and "at least" in err["message"], err
    assert took < 5, took
    r = w.post("/v1/chat/completions", w.chat(messages=[{"role": "user", "content": "word " * 600_000}]))
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    "method,path,headers,body,status",
    [
        ("GET", "/nowhere", {}, None, 404),
        ("GET", "/v1/completions", {}, None, 405),
        ("POST", "/v1/completions", {"Authorization": ""}, b"{}", 401),
        ("POST", "/v1/completions", {"Authorization": "Bearer lm-nope"}, b"{}", 401),
        ("POST", "/v1/completions", None, b"[1, 2]", 400),
        ("POST", "/v1/completions", None, b"\xff\xfe", 400),
        ("POST", "/v1/completions", None, b'{"model": "m", "model": "n"}', 400),
        ("POST", "/v1/completions", None, b'{"model": "x", "prompt": "a", "temperature": NaN}', 400),
        ("POST", "/v1/completions", None, b'{"model": "no-such-model", "prompt": "a"}', 404),
        ("POST", "/internal/heartbeat", {}, b'{"node_id": 1}', 400),
        ("POST", "/internal/heartbeat", {}, b'"x" * 300000', 400),
        ("POST", "/internal/heartbeat", {}, b"[" * 300_000, 413),
        ("POST", "/internal/heartbeat", {}, b"[" + b"[]," * 1100 + b"[]]", 400),  # arrays by the thousand
        ("POST", "/internal/heartbeat", {}, b"{" + b",".join(b'"%d":0' % i for i in range(9000)) + b"}", 400),  # keys
        ("POST", "/internal/heartbeat", {}, b" " * (257 << 10) + b"{}", 413),  # past what a heartbeat may be
    ],
)
def test_every_refusal_has_the_openai_shape(w, method, path, headers, body, status):
    r = w.http.request(method, path, content=body, headers=headers)
    assert r.status_code == status, r.text[:300]
    error_of(r)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "stream",
    "n",
    "stream_options",
    "user",
    "max_completion_tokens",
    "logprobs",
    "echo",
    "suffix",
    "tools",
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chat=st.booleans(), changes=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=3))
def test_fuzzed_request_bodies_never_get_a_server_error(w, chat, changes):
    body = (w.chat() if chat else w.completion()) | changes
    r = w.post("/v1/chat/completions" if chat else "/v1/completions", body)
    assert r.status_code in (200, 400, 403, 404), (r.status_code, r.text[:300])
    if r.status_code != 200:
        error_of(r)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_heartbeats_never_get_a_server_error(w, data):
    doc = make_heartbeat(w.identity, api_url=w.node_url, base_model_id=w.base, status={"queue_depth": 0})
    where = data.draw(st.sampled_from([None, *doc, *(f"body.{k}" for k in doc.get("body", {}))]))
    value = data.draw(JSON)
    if where is None:
        doc = value
    elif where.startswith("body."):
        doc["body"][where[5:]] = value
    else:
        doc[where] = value
    r = w.post("/internal/heartbeat", doc)
    assert r.status_code in (200, 400, 403), (r.status_code, r.text[:300])
    if r.status_code != 200:
        error_of(r)
    else:
        assert r.json()["gateway_key"] == w.gateway_key
    w.alive()


def test_an_unhandled_error_is_a_500_answer_and_the_connection_stays(tmp_path, monkeypatch):
    """A bug behind a route (here: listing models raises) answers 500 in the error shape, and the client's
    keep-alive connection serves its next request (found: dropped after the 500)."""
    from gateway.catalog import ModelCatalog
    from gateway.main import create_app
    from gateway.settings import GatewaySettings
    from tests.utils.servers import ServerThread

    engine = make_db(tmp_path / "gw.db")
    key, _ = create_key(engine, name="app")
    calls = []

    def broken(self, key, private):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return []

    monkeypatch.setattr(ModelCatalog, "list_models", broken)
    with ServerThread(create_app(GatewaySettings(db_url=f"sqlite:///{tmp_path / 'gw.db'}"))) as srv:
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as c:
            first = c.get("/v1/models")
            conn = first.extensions["network_stream"]
            second = c.get("/v1/models")
            assert first.status_code == 500 and error_of(first)["code"] == "internal_error"
            assert second.status_code == 200 and second.extensions["network_stream"] is conn
    engine.dispose()
