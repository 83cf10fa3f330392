"""The gateway in a real uvicorn, driven by the official openai client, in front of two stand-in nodes
(real uvicorn servers speaking the node API contract and signing real receipts). The real node is in
test_integration.py; here we steer failures the real engine cannot be made to produce on demand."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from sqlmodel import Session, select

from common.identity import Identity
from gateway.keys import cache_salt_of, create_key, hash_secret, node_cache_salt, revoke_key
from gateway.main import create_app
from gateway.router import rank_nodes
from gateway.settings import GatewaySettings
from gateway.tables import CompletionRecord, RequestStatus
from ledger.models import UsageRecord
from ledger.types import BASE_MODEL_ADAPTER_ID
from node.adapters.basemodel import base_model_id
from node.heartbeat import HeartbeatSender, make_heartbeat
from node.receipts import check_receipt
from tests.gateway import TINY
from tests.utils.gateway import StandInNode, add_adapter, add_node, make_db, poll
from tests.utils.servers import ServerThread

pytestmark = pytest.mark.integration

BASE = ""  # the tiny base's id, set by World
LONELY_BASE = "0x" + "b1" * 32
ADAPTERS = {
    "acme/alpha": "0x" + "a1" * 32,
    "acme/beta": "0x" + "a2" * 32,
    "acme/secret": "0x" + "a3" * 32,
    "acme/orphan": "0x" + "a4" * 32,
}


class World:
    def __init__(self, tmp, base_dir) -> None:
        from transformers import AutoTokenizer

        global BASE
        BASE = base_model_id(base_dir)  # the gateway tokenizes prompts with this base's tokenizer
        self.tok = AutoTokenizer.from_pretrained(str(base_dir))
        self.db_path = tmp / "gw.db"
        self.engine = make_db(self.db_path)
        self.nodes = [StandInNode(Identity.generate(), BASE, delay=0.0, tokenizer=self.tok) for _ in range(2)]
        self.node_servers = [ServerThread(n.app()).start() for n in self.nodes]
        for n, srv in zip(self.nodes, self.node_servers):
            add_node(self.engine, node_id=n.identity.node_id, base_model=BASE, api_url=srv.url)
        for i, (name, aid) in enumerate(ADAPTERS.items()):
            add_adapter(
                self.engine,
                adapter_id=aid,
                name=name,
                base_model=LONELY_BASE if "orphan" in name else BASE,
                block=10 + i,
            )
        self.key, _ = create_key(self.engine, name="app")
        self.limited, _ = create_key(self.engine, name="slow", rpm=2)
        self.granted, _ = create_key(self.engine, name="insider", adapters=["acme/secret"])
        self.revoked, info = create_key(self.engine, name="gone")
        revoke_key(self.engine, info.id)
        settings = GatewaySettings(
            db_url=f"sqlite:///{self.db_path}",
            heartbeat_ttl_s=60,
            max_attempts=3,
            node_holdoff_max_s=1,  # a node struck in a row is held off past heartbeats: here for at most 1 s
            registry_sync_s=0.5,
            default_max_tokens=5,
            bases=[base_dir],
        )
        self.gw = ServerThread(create_app(settings)).start()

    def beat(self, nodes=None) -> None:
        async def go():
            for n, srv in zip(self.nodes, self.node_servers):
                if nodes is None or n in nodes:
                    sender = HeartbeatSender(
                        n.identity, [self.gw.url], api_url=srv.url, base_model_id=BASE, status_fn=n.status
                    )
                    result = await sender.send_once()
                    assert result == {self.gw.url: 200}, result

        asyncio.run(go())

    def client(self, key=None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gw.url + "/v1", api_key=key or self.key, max_retries=0, timeout=20)

    def owners(self, adapter: str) -> list[StandInNode]:
        by_id = {n.identity.node_id: n for n in self.nodes}
        from gateway.directory import NodeEntry

        entries = [NodeEntry(n.identity.node_id, "", BASE, b"", {}, 1, 0.0) for n in self.nodes]
        return [by_id[e.node_id] for e in rank_nodes(ADAPTERS[adapter], entries)]

    def records(self):
        with Session(self.engine) as s:
            return s.exec(select(CompletionRecord)).all(), s.exec(select(UsageRecord)).all()

    def stop(self) -> None:
        self.gw.stop()
        for s in self.node_servers:
            s.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base):
    w = World(tmp_path_factory.mktemp("gw"), tiny_base)
    try:
        yield w
    finally:
        w.stop()


@pytest.fixture
def w(world):
    for n in world.nodes:
        n.fail_early = False
        n.delay = 0.0
    world.beat()
    return world


def test_models_listing_respects_private_adapters(w):
    ids = [m.id for m in w.client().models.list()]
    assert ids == ["acme/alpha", "acme/beta", "acme/orphan", TINY]
    insider = [m.id for m in w.client(w.granted).models.list()]
    assert "acme/secret" in insider
    alpha = w.client().models.retrieve("acme/alpha")
    assert alpha.owned_by == "0x" + "cd" * 20 and alpha.model_extra["adapter_id"] == ADAPTERS["acme/alpha"]


def test_private_adapter_is_404_to_other_keys(w):
    with pytest.raises(openai.NotFoundError):
        w.client().completions.create(model="acme/secret", prompt="x")
    r = w.client(w.granted).completions.create(model="acme/secret", prompt="x", max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_completion_and_usage_record(w):
    raw = w.client().completions.with_raw_response.create(
        model="acme/alpha",
        prompt="one two three",
        max_tokens=4,
        temperature=0.5,
        top_p=0.9,
        seed=7,
        stop=["\n"],
        user="u",
    )
    r = raw.parse()
    rid = raw.headers["x-request-id"]
    assert r.choices[0].text == " t0 t1 t2 t3" and r.choices[0].finish_reason == "length"
    ids = w.tok.encode("one two three")  # the gateway counts the prompt itself and sends it as these ids
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 4, len(ids) + 4)
    sent = next(b for n in w.nodes for b in n.requests if b["request_id"] == rid)
    assert sent == {
        "adapter_id": ADAPTERS["acme/alpha"],
        "prompt_token_ids": ids,
        "max_tokens": 4,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["\n"],
        "request_id": rid,
        "stream": True,
    }
    done, usage = w.records()
    row = next(u for u in usage if u.request_id == rid)
    node = next(n for n in w.nodes if n.identity.node_id == row.node_id)
    check_receipt(json.loads(row.receipt_json), row.node_signature, node.identity.node_public_key)
    assert next(d for d in done if d.request_id == rid).status == "ok"


def test_chat_stream_usage_matches_tokens(w):
    stream = w.client().chat.completions.create(
        model="acme/beta",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=5,
    )
    chunks = list(stream)
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(content) == 5
    # the base's own chat template, sent as token ids
    want = w.tok("<s><|user|>\nhi\n<|assistant|>\n", add_special_tokens=False)["input_ids"]
    assert any(b.get("prompt_token_ids") == want for n in w.nodes for b in n.requests)


def test_chat_stream_without_tokens_still_opens_with_the_role(w):
    # on the bare base model; it produced no token but the node counted the prompt: it is in the
    # outbox under the zero adapter id (see the last test)
    for n in w.nodes:
        n.tokens = 0
    try:
        r = httpx.post(
            w.gw.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {w.key}"},
            timeout=10,
            json={"model": TINY, "messages": [{"role": "user", "content": "hi"}], "stream": True},
        )
    finally:
        for n in w.nodes:
            n.tokens = 5
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]" and len(events) == 3, events
    role, finish = json.loads(events[0]), json.loads(events[1])
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert finish["choices"][0]["finish_reason"] == "length" and finish["choices"][0]["delta"] == {}


def test_completion_stream_stop_reason(w):
    chunks = list(w.client().completions.create(model="acme/alpha", prompt="STOP_AT_3", stream=True, max_tokens=9))
    assert "".join(c.choices[0].text for c in chunks) == " t0 t1 t2"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_same_adapter_goes_to_same_node_and_owner_prefetches(w):
    nodes = set()
    for _ in range(4):
        raw = w.client().completions.with_raw_response.create(model="acme/beta", prompt="x", max_tokens=1)
        nodes.add(raw.headers["x-loramesh-node"])
    assert len(nodes) == 1
    # with k=2 both stand-ins own every adapter: the one not serving was told to load it
    poll(lambda: all(ADAPTERS["acme/beta"] in n.loaded for n in w.nodes if n.identity.node_id not in nodes))


def test_failover_before_first_token(w):
    first = w.owners("acme/alpha")[0]
    first.resident.clear()
    w.nodes[1 - w.nodes.index(first)].resident.clear()
    w.beat()
    first.fail_early = True
    raw = w.client().completions.with_raw_response.create(model="acme/alpha", prompt="x", max_tokens=2)
    assert raw.headers["x-loramesh-node"] != first.identity.node_id and raw.parse().usage.completion_tokens == 2
    rid = raw.headers["x-request-id"]
    assert next(d for d in w.records()[0] if d.request_id == rid).attempts == 2


def test_engine_error_everywhere_is_503(w):
    with pytest.raises(openai.InternalServerError) as ei:
        w.client().completions.create(model="acme/alpha", prompt="ENGINE_ERROR", max_tokens=2)
    assert ei.value.status_code == 503 and "before the first token" in ei.value.message
    # the node's own words stay in the gateway's log: a node is a stranger, and its text is not the gateway's
    assert "engine broke" not in ei.value.message


def test_engine_error_after_first_token_is_told_in_our_words(w):
    stream = w.client().completions.create(model="acme/alpha", prompt="ENGINE_ERROR_AFTER_1", stream=True, max_tokens=5)
    texts = []
    with pytest.raises(openai.APIError, match="engine failed after 1 tokens") as ei:
        for c in stream:
            texts.append(c.choices[0].text)
    assert texts == [" t0"] and "engine broke" not in ei.value.message


def test_node_cut_after_first_token_ends_stream_with_error(w):
    stream = w.client().completions.with_raw_response.create(
        model="acme/alpha", prompt="CUT_AFTER_2", stream=True, max_tokens=5
    )
    rid = stream.headers["x-request-id"]
    texts = []
    with pytest.raises(openai.APIError, match="incomplete"):
        for c in stream.parse():
            texts.append(c.choices[0].text)
    assert texts == [" t0", " t1"]
    row = poll(lambda: next((u for u in w.records()[1] if u.request_id == rid), None))
    assert row.completion_tokens == 2  # the tokens the client got are paid (the abort's receipt beside them)
    assert next(d for d in w.records()[0] if d.request_id == rid).status == "node_failed"


def test_node_cut_after_first_token_ends_a_responses_stream_failed(w):
    """The Responses stream's own end for a node that broke off: response.failed, the text relayed billed."""
    raw = w.client().responses.with_raw_response.create(
        model="acme/alpha", input="CUT_AFTER_2", stream=True, max_output_tokens=5
    )
    rid = raw.headers["x-request-id"]
    events = list(raw.parse())
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == [" t0", " t1"] and events[-1].type == "response.failed"
    failed = events[-1].response
    assert failed.status == "failed" and "incomplete" in failed.error.message
    assert failed.output[0].content[0].text == " t0 t1" and failed.output[0].status == "incomplete"
    assert failed.usage.output_tokens == 2  # what was relayed, and billed
    row = poll(lambda: next((u for u in w.records()[1] if u.request_id == rid), None))
    assert row.completion_tokens == 2
    assert next(d for d in w.records()[0] if d.request_id == rid).status == "node_failed"


def test_non_stream_cut_is_502(w):
    with pytest.raises(openai.APIStatusError) as ei:
        w.client().completions.create(model="acme/alpha", prompt="CUT_AFTER_2", max_tokens=5)
    assert ei.value.status_code == 502
    # the kind of break, in our words; the HTTP library's own (its protocol states, its exception's repr) stay in
    # the gateway's log (found by a review of LoRAX's API, which shares this message)
    assert "stream broke (ClientPayloadError)" in ei.value.message
    assert "TransferEncodingError" not in ei.value.message and "ClientPayloadError(" not in ei.value.message
    rid = ei.value.response.headers["x-request-id"]  # the error names its request; nothing delivered, 0 billed
    d = poll(lambda: next((d for d in w.records()[0] if d.request_id == rid and d.status != "open"), None))
    assert (d.status, d.prompt_tokens, d.completion_tokens) == ("node_failed", 0, 0)


def test_client_disconnect_aborts_and_records(w):
    for n in w.nodes:
        n.delay = 0.2
        n.tokens = 30
    try:
        with httpx.stream(
            "POST",
            w.gw.url + "/v1/completions",
            headers={"Authorization": f"Bearer {w.key}"},
            json={"model": "acme/alpha", "prompt": "long", "max_tokens": 30, "stream": True},
        ) as r:
            rid = r.headers["x-request-id"]
            got = []
            for line in r.iter_lines():
                if line.startswith("data:"):
                    got.append(line)
                if len(got) == 2:
                    break  # leave with the response half read: the connection is closed
    finally:
        for n in w.nodes:
            n.tokens = 5
    row = poll(lambda: next((u for u in w.records()[1] if u.request_id == rid), None), timeout=15)
    assert json.loads(row.receipt_json)["finish_reason"] == "abort" and row.completion_tokens < 30
    assert any(rid in n.aborted for n in w.nodes)
    assert next(d for d in w.records()[0] if d.request_id == rid).status == "client_closed"


@pytest.mark.parametrize("key", [None, "lm-wrong", "revoked"])
def test_401(w, key):
    headers = {} if key is None else {"Authorization": f"Bearer {w.revoked if key == 'revoked' else key}"}
    r = httpx.post(w.gw.url + "/v1/completions", headers=headers, json={"model": "acme/alpha", "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_revoked_key_is_refused_once_the_key_cache_ttl_passed(w):
    secret, info = create_key(w.engine, name="soon-gone")
    assert w.client(secret).completions.create(model="acme/alpha", prompt="x", max_tokens=1).choices  # now cached
    revoke_key(w.engine, info.id)  # from outside the gateway, as `loramesh gateway keys revoke` does
    # the cached entry was read before the revocation, so it has expired once the ttl has passed since
    time.sleep(GatewaySettings().key_cache_ttl_s)
    r = httpx.get(w.gw.url + "/v1/models", headers={"Authorization": f"Bearer {secret}"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        w.client(secret).completions.create(model="acme/alpha", prompt="x", max_tokens=1)


def test_401_through_openai_client(w):
    with pytest.raises(openai.AuthenticationError):
        w.client("lm-wrong").models.list()


def test_429_with_retry_after(w):
    c = w.client(w.limited)
    for _ in range(2):  # what its requests per minute allow (the model list takes none of it)
        c.models.list()
        c.completions.create(model="acme/alpha", prompt="x", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as ei:
        c.completions.create(model="acme/alpha", prompt="x")
    assert int(ei.value.response.headers["retry-after"]) >= 1


def test_404_unknown_model(w):
    with pytest.raises(openai.NotFoundError) as ei:
        w.client().chat.completions.create(model="nobody/none", messages=[{"role": "user", "content": "x"}])
    assert ei.value.body["code"] == "model_not_found" and ei.value.body["param"] == "model"


def test_400_bad_body(w):
    with pytest.raises(openai.BadRequestError) as ei:
        w.client().completions.create(model="acme/alpha", prompt="x", n=17)
    assert ei.value.body["param"] == "n"
    r = httpx.post(w.gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {w.key}"}, content=b"{")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_400_from_node_is_the_clients_only_when_every_node_asked_says_so(w):
    """A node's 400 is its word that the request is the client's mistake: the next node is asked (a node answering
    every request so would otherwise fail them all for the adapters it is first for, red team), and the client hears
    the refusal when every node asked refused."""
    before = sum(len(n.requests) for n in w.nodes)
    with pytest.raises(openai.BadRequestError) as ei:
        w.client().completions.create(model="acme/alpha", prompt="TOO_LONG")
    assert ei.value.body["code"] == "context_length_exceeded" and ei.value.body["param"] == "prompt"
    assert sum(len(n.requests) for n in w.nodes) == before + 2


def test_a_node_that_refuses_every_request_fails_no_client(w):
    first = w.owners("acme/alpha")[0]
    first.reject_all = True
    asked = len(first.requests)
    try:
        for _ in range(3):
            raw = w.client().completions.with_raw_response.create(model="acme/alpha", prompt="x", max_tokens=2)
            assert raw.headers["x-loramesh-node"] != first.identity.node_id
            assert raw.parse().usage.completion_tokens == 2
        # refused what the other node served: routed around until it heartbeats again, not asked every time
        assert len(first.requests) == asked + 1
        # a refusal and a node that fails: nobody said the client erred but one stranger, so no 400 (a 503)
        other = w.nodes[1 - w.nodes.index(first)]
        w.beat()
        other.fail_early = True
        with pytest.raises(openai.InternalServerError) as ei:
            w.client().completions.create(model="acme/alpha", prompt="x", max_tokens=2)
        assert ei.value.status_code == 503 and "refused it (invalid_request)" in ei.value.message
    finally:
        first.reject_all = False
        for n in w.nodes:
            n.fail_early = False
        w.beat()


def test_503_when_no_node_serves_the_base(w):
    with pytest.raises(openai.InternalServerError) as ei:
        w.client().completions.create(model="acme/orphan", prompt="x")
    assert ei.value.status_code == 503 and ei.value.body["code"] == "no_node_available"


def test_heartbeat_refusals(w):
    stranger = Identity.generate()
    doc = make_heartbeat(stranger, api_url="http://127.0.0.1:1", base_model_id=BASE, status={})
    r = httpx.post(w.gw.url + "/internal/heartbeat", json=doc)
    assert r.status_code == 403 and r.json()["error"]["code"] == "unregistered_node"
    doc = make_heartbeat(w.nodes[0].identity, api_url="http://127.0.0.1:1", base_model_id=BASE, status={})
    doc["signature"] = ""
    assert httpx.post(w.gw.url + "/internal/heartbeat", json=doc).status_code == 403
    assert httpx.post(w.gw.url + "/internal/heartbeat", content=b"nope").status_code == 400


def test_each_key_has_its_own_prefix_cache_salt_on_nodes_that_know_the_field(w):
    """One key's prompts must not warm another key's cache (its cached_tokens would tell that a prompt was sent):
    each key's requests carry a salt of their own, and each node is sent its own (nodes pooling what they were
    sent cannot tell one key's requests across the network). A node that does not list the field (an older
    release, which refuses a body with a field it does not know) is sent none."""

    def sent(key):  # (node id, body) of what the nodes were sent
        before = [len(n.requests) for n in w.nodes]
        w.client(key).completions.create(model="acme/alpha", prompt="x", max_tokens=1)
        return [(n.identity.node_id, b) for n, k in zip(w.nodes, before) for b in n.requests[k:]]

    assert all("cache_salt" not in b for _, b in sent(w.key))
    try:
        for n in w.nodes:
            n.features = ["cache_salt"]
        w.beat()
        got = {key: {(node, b["cache_salt"]) for node, b in sent(key) + sent(key)} for key in (w.key, w.granted)}
    finally:
        for n in w.nodes:
            n.features = None
        w.beat()
    for key, pairs in got.items():
        assert pairs == {(node, node_cache_salt(cache_salt_of(hash_secret(key)), node)) for node, _ in pairs}
    assert {s for _, s in got[w.key]}.isdisjoint(s for _, s in got[w.granted])
    a, b = (n.identity.node_id for n in w.nodes)
    assert node_cache_salt(cache_salt_of(hash_secret(w.key)), a) != node_cache_salt(
        cache_salt_of(hash_secret(w.key)), b
    )


@pytest.mark.parametrize(
    "field, value, feature",
    [
        # 10: the id the stand-in nodes send first (one outside the list would have the node disputed)
        ("allowed_token_ids", [10, 3], "allowed_token_ids"),
        ("bad_words", ["ab", "c"], "bad_words_token_ids"),
        ("guided_grammar", 'start: " t0"', "guided_grammar"),
        ("skip_special_tokens", False, "skip_special_tokens"),
    ],
)
def test_a_request_with_a_later_field_goes_only_to_nodes_that_list_it(w, field, value, feature):
    """allowed_token_ids, bad_words, a grammar and special tokens' text change the answer: a node of an older
    release (which does not list the field, and refuses a body with a field or guided type it does not know) is not
    sent it, and without one that lists it the client hears why, by the field's name; the request goes to one that
    does."""

    def ask():
        before = [len(n.requests) for n in w.nodes]
        w.client().completions.create(model="acme/alpha", prompt="x", max_tokens=1, extra_body={field: value})
        return [(n, b) for n, k in zip(w.nodes, before) for b in n.requests[k:]]

    before = [len(n.requests) for n in w.nodes]
    with pytest.raises(openai.APIStatusError) as ei:
        ask()
    assert ei.value.status_code == 503 and f"takes {field} right now" in ei.value.body["message"]
    assert [len(n.requests) for n in w.nodes] == before  # neither was sent it
    newer, older = w.nodes
    try:
        newer.features = [feature, "some_later_field"]
        w.beat()
        for _ in range(4):
            ((node, body),) = ask()
            assert node is newer and (feature in body or body["guided"]["type"] == "grammar")
        # a request without the field still goes to either
        w.client().completions.create(model="acme/alpha", prompt="x", max_tokens=1)
    finally:
        newer.features = None
        w.beat()


def test_metrics(w):
    w.client().completions.create(model="acme/alpha", prompt="x", max_tokens=1)
    text = httpx.get(w.gw.url + "/metrics").text
    assert 'loramesh_gateway_requests_total{model="acme/alpha",status="ok"}' in text
    # a name that resolved to nothing is counted under "-" (any string a client sends would be a series)
    assert 'loramesh_gateway_requests_total{model="-",status="404"}' in text and "nobody/none" not in text
    for name in (
        "loramesh_gateway_time_to_first_token_seconds_bucket",
        "loramesh_gateway_request_latency_seconds",
        'loramesh_gateway_tokens_total{kind="completion",model="acme/alpha"}',
        "loramesh_gateway_routing_decisions_total",
        "loramesh_gateway_residency_total",
        "loramesh_gateway_live_nodes 2.0",
    ):
        assert name in text, name


def test_killed_node_moves_its_adapters(world):
    w = world
    w.beat()
    served = w.client().completions.with_raw_response.create(model="acme/beta", prompt="x", max_tokens=1)
    victim = next(n for n in w.nodes if n.identity.node_id == served.headers["x-loramesh-node"])
    w.node_servers[w.nodes.index(victim)].stop()
    for _ in range(3):
        raw = w.client().completions.with_raw_response.create(model="acme/beta", prompt="x", max_tokens=1)
        assert raw.headers["x-loramesh-node"] != victim.identity.node_id


def test_every_served_request_is_in_the_outbox_once(world):
    # served = a node answered it with a signed receipt: tokens counted, prompt or completion. That
    # includes bare base-model requests (the chat stream that produced no token above paid for its
    # prompt), which go to the outbox under the zero adapter id like adapter requests under theirs.
    # A non-streaming request answered with an error (its node failed) delivered nothing: recorded at 0 + 0.
    done, usage = world.records()
    served = {d.request_id for d in done if d.node_id is not None and d.prompt_tokens + d.completion_tokens > 0}
    withheld = {u.request_id for u in usage if u.prompt_tokens + u.completion_tokens == 0}
    assert served and served == {u.request_id for u in usage} - withheld
    assert all(d.status == RequestStatus.NODE_FAILED for d in done if d.request_id in withheld)
    adapter_of = {d.request_id: d.adapter_id for d in done}
    assert all(u.adapter_id == (adapter_of[u.request_id] or BASE_MODEL_ADAPTER_ID) for u in usage)
    assert any(u.adapter_id == BASE_MODEL_ADAPTER_ID and u.completion_tokens == 0 for u in usage)
    assert len(usage) == len({u.request_id for u in usage})
    keys = {n.identity.node_id: n.identity.node_public_key for n in world.nodes}
    for u in usage:
        check_receipt(json.loads(u.receipt_json), u.node_signature, keys[u.node_id])
