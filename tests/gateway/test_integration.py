"""The whole path with real processes: anvil with the contracts, two real node daemons (tiny base, three
adapters), the gateway, all started as `python -m devnet ...` and driven through the official openai client.

Each node registers itself on chain (its operator is its own funded identity), takes the packages at
POST /v1/adapters and heartbeats to the gateway: the test process only publishes and asks.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from sqlmodel import Session, select

from common.identity import Identity, create_identity
from devnet.anvil import free_port
from devnet.processes import ManagedProcess, ProcessGroup
from gateway.keys import create_key
from gateway.tables import CompletionRecord
from ledger.models import RecordStatus, UsageRecord
from ledger.types import BASE_MODEL_ADAPTER_ID
from node.adapters.basemodel import base_model_name
from node.publish import publish, upload_to_node
from node.receipts import check_receipt
from tests.utils.factories import make_package
from tests.utils.gateway import make_db, poll

pytestmark = pytest.mark.integration

PASSWORD = "integration"
ETHER = 10**18
ADAPTER_NAMES = ("acme/capitals", "acme/elements", "acme/poems")
ENV = {"LORAMESH_KEY_PASSWORD": PASSWORD, "LORAMESH_GATEWAY_SETTLE_INTERVAL_S": "1"}


@dataclass
class Node:
    identity: Identity
    url: str
    proc: ManagedProcess


@dataclass
class Net:
    gw: str
    key: str
    limited: str
    nodes: list[Node]
    engine: object  # the gateway's database (ledger outbox + completion records)
    base_name: str


def start_node(group: ProcessGroup, i: int, root: Path, base: Path, chain, gw_url: str) -> Node:
    """A node daemon with its own funded identity; it registers itself on chain and heartbeats to gw_url."""
    key = root / f"node{i}.key"
    identity = create_identity(key, PASSWORD)
    chain.client(chain.admin).fund([identity.address], ETHER)  # gas for its own registration
    port = free_port()
    args = [
        "node",
        "run",
        "--base",
        str(base),
        "--store",
        str(root / f"store{i}"),
        "--port",
        str(port),
        "--key",
        str(key),
        "--deployment",
        str(chain.deployment_path),
        "--gateway",
        gw_url,
        "--slots",
        "4",
        "--threads",
        "1",
        "--kv-blocks",
        "64",
    ]
    proc = group.start(ManagedProcess(f"node{i}", args, root / f"node{i}.log", env=ENV))
    return Node(identity, f"http://127.0.0.1:{port}", proc)


@pytest.fixture(scope="module")
def net(anvil_chain, tiny_base, tmp_path_factory):
    chain = anvil_chain
    root = tmp_path_factory.mktemp("net")
    publisher = chain.users[0]
    packages = [
        make_package(tiny_base, root / f"pkg{i}", account=publisher, name=name, seed=10 + i)
        for i, name in enumerate(ADAPTER_NAMES)
    ]
    engine = make_db(root / "gateway.db")
    key, _ = create_key(engine, name="app")
    limited, _ = create_key(engine, name="slow", rpm=1)
    settler_key = root / "settler.key"
    settler_key.write_text(chain.settler.key.hex())
    gw_port = free_port()
    gw_url = f"http://127.0.0.1:{gw_port}"
    group = ProcessGroup()
    try:
        gateway = group.start(
            ManagedProcess(
                "gateway",
                [
                    "gateway",
                    "run",
                    "--deployment",
                    str(chain.deployment_path),
                    "--db",
                    f"sqlite:///{root / 'gateway.db'}",
                    "--port",
                    str(gw_port),
                    "--key",
                    str(settler_key),
                    "--base",
                    str(tiny_base),
                ],
                root / "gateway.log",
                env=ENV,
            )
        )
        nodes = [start_node(group, i, root, tiny_base, chain, gw_url) for i in range(2)]  # both load at once
        gateway.wait_http(gw_url + "/health")
        for n in nodes:
            n.proc.wait_http(n.url + "/health")
        for pkg in packages:  # both nodes hold every adapter, so either can take over the other's
            publish(pkg.path, chain.client(publisher), node_url=nodes[0].url)
            upload_to_node(pkg, nodes[1].url)

        def ready() -> bool:
            listed = httpx.get(gw_url + "/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=5).json()
            live = httpx.get(gw_url + "/health", timeout=5).json()["live_nodes"]
            return live == 2 and set(ADAPTER_NAMES) <= {m["id"] for m in listed.get("data", [])}

        gateway.wait_until(ready, timeout=60, what="both nodes live and every adapter listed")
        yield Net(gw=gw_url, key=key, limited=limited, nodes=nodes, engine=engine, base_name=base_model_name(tiny_base))
    finally:
        group.stop_all()
        engine.dispose()


def client(net, key=None) -> openai.OpenAI:
    return openai.OpenAI(base_url=net.gw + "/v1", api_key=key or net.key, max_retries=0, timeout=60)


def test_list_models(net):
    ids = [m.id for m in client(net).models.list()]
    assert ids == [*ADAPTER_NAMES, net.base_name]


def test_completion(net):
    r = client(net).completions.create(
        model="acme/capitals", prompt="The capital of France is", max_tokens=6, temperature=0
    )
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 0 and r.choices[0].finish_reason == "length"
    again = client(net).completions.create(
        model="acme/capitals", prompt="The capital of France is", max_tokens=6, temperature=0
    )
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic


def test_a_stop_string_cuts_the_answer_and_its_record_is_payable(net):
    # the node holds back the text that may begin the stop string and never sends the stop string: its text is
    # shorter than its token ids decode to, by what a stop string and its token can explain (not disputed)
    ask = dict(model="acme/capitals", prompt="The capital of France is", max_tokens=12, temperature=0)
    whole = client(net).completions.create(**ask).choices[0].text
    assert len(whole) >= 6
    stop = whole[4:6]
    raw = client(net).completions.with_raw_response.create(stop=[stop], **ask)
    r = raw.parse()
    assert (r.choices[0].text, r.choices[0].finish_reason) == (whole[: whole.index(stop)], "stop")
    _payable(net, raw.headers["x-request-id"])


def _payable(net, rid: str):
    def record():
        with Session(net.engine) as s:
            return s.exec(select(UsageRecord).where(UsageRecord.request_id == rid)).first()

    usage = poll(record, timeout=30)
    assert usage.status in (RecordStatus.PENDING, RecordStatus.SUBMITTED, RecordStatus.SETTLED), usage.error
    return usage


def _lone_byte_and_letter(tiny_base) -> tuple[int, int]:
    """A token that is one byte no character starts or ends with alone (it decodes to U+FFFD, and so does any
    run of it), and the letter "a"."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    lone = next(i for i in range(len(tok)) if tok.decode([i]) == "\ufffd")
    return lone, tok.convert_tokens_to_ids("a")


def test_a_client_cannot_make_an_honest_node_look_like_it_padded(net, tiny_base):
    # the node holds back a run of half characters (the client forces them with logit_bias) until a character
    # completes, and drops what it held when the stop string is then found at its start: it sends no text for
    # tokens whose ids decode to plenty. The gateway runs the node's detokenizer over the ids: not disputed
    lone, letter = _lone_byte_and_letter(tiny_base)
    raw = client(net).completions.with_raw_response.create(
        model="acme/capitals",
        prompt="x",
        max_tokens=48,
        seed=0,
        stop=["\ufffd"],
        logit_bias={str(lone): 100, str(letter): 97},
    )
    r = raw.parse()
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("", "stop") and r.usage.completion_tokens >= 2
    _payable(net, raw.headers["x-request-id"])
    # the same run, the client leaving mid-way: what the node held back was never sent
    with httpx.stream(
        "POST",
        net.gw + "/v1/completions",
        headers={"Authorization": f"Bearer {net.key}"},
        json={"model": "acme/capitals", "prompt": "x", "max_tokens": 400, "stream": True, "logprobs": 1}
        | {"logit_bias": {str(lone): 100}},
    ) as r:
        rid, seen = r.headers["x-request-id"], 0
        for line in r.iter_lines():
            seen += line.startswith("data: {")
            if seen == 10:
                break  # hang up mid-stream
    assert _payable(net, rid).completion_tokens >= 9


def test_chat(net):
    r = client(net).chat.completions.create(
        model="acme/elements", max_tokens=5, temperature=0, seed=1, messages=[{"role": "user", "content": "hello"}]
    )
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 5


def test_stream_usage_matches_tokens_streamed(net):
    ask = dict(model="acme/poems", max_tokens=8, temperature=0, messages=[{"role": "user", "content": "write"}])
    chunks = list(client(net).chat.completions.create(stream=True, stream_options={"include_usage": True}, **ask))
    token_chunks = [
        c for c in chunks if c.choices and c.choices[0].delta.content is not None and c.choices[0].delta.role is None
    ]
    whole = client(net).chat.completions.create(**ask)
    used = chunks[-1].usage.completion_tokens
    assert used == whole.usage.completion_tokens
    assert "".join(c.choices[0].delta.content for c in token_chunks) == whole.choices[0].message.content
    # one chunk per token, except a token that adds no text (EOS, half a character): no empty chunk for it
    assert 0 < len(token_chunks) <= used and all(c.choices[0].delta.content for c in token_chunks)


def test_cached_prompt_tokens_are_reported(net):
    """A chat after a long system prompt the node has computed for this adapter before: OpenAI's
    usage.prompt_tokens_details.cached_tokens counts the prompt tokens read from the node's prefix cache, in
    whole answers and in a stream's usage chunk; a first asking finds nothing cached."""
    system = "You answer briefly. " + " ".join(f"rule {i}: {os.urandom(4).hex()}." for i in range(12))
    ask = dict(model="acme/elements", max_tokens=2, temperature=0)

    def chat(question: str, **kw):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        return client(net).chat.completions.create(messages=messages, **ask, **kw)

    first = chat("hello")
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = chat("hello again")
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 16 <= cached < again.usage.prompt_tokens  # at least one whole KV block of the shared system prompt
    streamed = list(chat("and once more", stream=True, stream_options={"include_usage": True}))[-1].usage
    assert 16 <= streamed.prompt_tokens_details.cached_tokens < streamed.prompt_tokens


def test_base_model(net):
    r = client(net).completions.create(model=net.base_name, prompt="hello", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


def test_repeated_requests_stay_on_one_node(net):
    served = set()
    for _ in range(4):
        raw = client(net).completions.with_raw_response.create(model="acme/elements", prompt="x", max_tokens=1)
        served.add(raw.headers["x-loramesh-node"])
    assert len(served) == 1


def test_errors(net):
    ids = set()  # every error carries a request id, as OpenAI's do (the SDK's e.request_id was None; compat audit)
    with pytest.raises(openai.AuthenticationError) as ei:
        client(net, "lm-not-a-key").models.list()
    ids.add(ei.value.request_id)
    slow = client(net, net.limited)  # one request a minute
    for _ in range(3):  # the model list costs no node's work and takes none of it (a UI asks it on every page)
        assert slow.models.list().data and slow.models.retrieve("acme/capitals").id == "acme/capitals"
    served = slow.completions.with_raw_response.create(model="acme/capitals", prompt="x", max_tokens=1)
    # where the key's bucket stands, in OpenAI's headers (the answer's and the refusal's)
    assert (served.headers["x-ratelimit-limit-requests"], served.headers["x-ratelimit-remaining-requests"]) == (
        "1",
        "0",
    )
    with pytest.raises(openai.RateLimitError) as ei:
        slow.completions.create(model="acme/capitals", prompt="x", max_tokens=1)
    assert int(ei.value.response.headers["retry-after"]) >= 1
    assert ei.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert ei.value.response.headers["x-ratelimit-reset-requests"].endswith("s")
    assert "x-ratelimit-limit-requests" not in client(net).models.with_raw_response.list().headers  # no limits
    ids.add(ei.value.request_id)
    with pytest.raises(openai.NotFoundError) as ei:
        client(net).completions.create(model="acme/nothing", prompt="x")
    ids.add(ei.value.request_id)
    with pytest.raises(openai.BadRequestError) as ei:
        client(net).completions.create(model="acme/capitals", prompt="x", n=17)
    assert ei.value.body["param"] == "n"
    ids.add(ei.value.request_id)
    too_large = httpx.post(
        net.gw + "/v1/completions", content=b" " * (5 << 20), headers={"Authorization": f"Bearer {net.key}"}
    )
    assert too_large.status_code == 413
    ids.add(too_large.headers.get("x-request-id"))
    assert len(ids) == 5 and all(i and re.fullmatch("0x[0-9a-f]{64}", i) for i in ids), ids
    served = client(net).completions.with_raw_response.create(model="acme/capitals", prompt="x", max_tokens=1)
    assert len(served.headers.get_list("x-request-id")) == 1  # a served answer's own id, not a second one
    # OpenAI's processing time, on answers and errors alike: the milliseconds to the answer's first byte
    for headers in (served.headers, too_large.headers, ei.value.response.headers):
        assert len(headers.get_list("openai-processing-ms")) == 1 and headers["openai-processing-ms"].isdigit()
    assert int(served.headers["openai-processing-ms"]) >= 1  # the node was asked


def test_client_disconnect_is_recorded_with_the_nodes_receipt(net):
    with httpx.stream(
        "POST",
        net.gw + "/v1/completions",
        headers={"Authorization": f"Bearer {net.key}"},
        # ignore_eos: a sampled end token would finish the request before the hang-up reaches the node
        json={"model": "acme/capitals", "prompt": "x", "max_tokens": 400, "stream": True, "ignore_eos": True},
    ) as r:
        rid = r.headers["x-request-id"]
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data:")
            if seen == 2:
                break  # hang up mid-stream

    def record():
        with Session(net.engine) as s:
            usage = s.exec(select(UsageRecord).where(UsageRecord.request_id == rid)).first()
            return s.get(CompletionRecord, rid), usage

    done, usage = poll(lambda: all(record()) and record(), timeout=30)
    receipt = json.loads(usage.receipt_json)
    # the node usually is still generating (abort, fewer tokens); on a fast box it may have finished
    assert (done.status, receipt["finish_reason"]) in (("client_closed", "abort"), ("ok", "length"))
    # billed: the tokens the client got; the node's receipt may count more (made before the abort reached
    # it), which is consistent and recorded beside them
    assert receipt["completion_tokens"] == usage.node_completion_tokens >= usage.completion_tokens >= 1
    # payable, not disputed: the in-process settler may already have taken it into a batch
    payable = (RecordStatus.PENDING, RecordStatus.SUBMITTED, RecordStatus.SETTLED)
    assert usage.status in payable and done.completion_tokens == usage.completion_tokens
    assert receipt["finish_reason"] == "length" or usage.completion_tokens < 400


def test_killing_a_node_moves_its_adapters(net):
    raw = client(net).completions.with_raw_response.create(model="acme/poems", prompt="x", max_tokens=1)
    victim_id = raw.headers["x-loramesh-node"]
    victim = next(n for n in net.nodes if n.identity.node_id == victim_id)
    victim.proc.kill()  # no graceful shutdown: its heartbeats just stop
    victim.proc.proc.wait(10)
    for model in ADAPTER_NAMES:
        raw = client(net).completions.with_raw_response.create(
            model=model,
            prompt="x",
            max_tokens=2,
            extra_body={"ignore_eos": True},  # sampled: EOS may come first
        )
        assert raw.headers["x-loramesh-node"] != victim_id and raw.parse().usage.completion_tokens == 2


def test_every_served_request_is_in_the_outbox_once_with_valid_signature(net, anvil_chain):
    with Session(net.engine) as s:
        done = s.exec(select(CompletionRecord)).all()
        usage = s.exec(select(UsageRecord)).all()
    served = {d.request_id for d in done if d.completion_tokens > 0}  # adapter and bare base-model requests
    assert len(served) >= 10
    assert {u.request_id for u in usage} == served and len(usage) == len(served)
    base = {d.request_id for d in done if d.adapter_id is None and d.completion_tokens > 0}
    assert base and {u.request_id for u in usage if u.adapter_id == BASE_MODEL_ADAPTER_ID} == base
    keys = {n.identity.node_id: n.identity.node_public_key for n in net.nodes}
    for u in usage:
        check_receipt(json.loads(u.receipt_json), u.node_signature, keys[u.node_id])
    # the in-process settler takes it from there
    poll(
        lambda: all(u.status == "settled" for u in Session(net.engine).exec(select(UsageRecord)).all()),
        timeout=30,
        interval=0.5,
    )
    chain = anvil_chain.client()
    price = chain.base_price()
    settled = {r.request_id: r for r in chain.settled_records()}
    for u in usage:
        if u.adapter_id == BASE_MODEL_ADAPTER_ID:  # on chain under the zero adapter id, at the base price
            rec = settled[u.request_id]
            assert rec.adapter_id == BASE_MODEL_ADAPTER_ID
            assert rec.fee == price * (u.prompt_tokens + u.completion_tokens) // 1000 > 0
