"""The gateway pays for what its client received: tokens it relayed before the client left or the node's
stream broke. What the node made beyond that (tokens read after an abort, a count in the abort's receipt)
is information: an honest node's receipt above the delivered count is recorded normally and paid at the
delivered count; a rogue node cannot raise it by streaming on after the abort. A node that sends events
without end is cut off with a clear error.

The gateway in a real uvicorn, one stand-in node (tests/utils/gateway.py) steered by the prompt."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from common.identity import Identity
from gateway.tables import RequestStatus
from ledger.models import RecordStatus
from node.adapters.basemodel import base_model_id
from tests.gateway import TINY
from tests.utils.gateway import StandInNode, record_of, served_gateway

pytestmark = pytest.mark.integration

DEADLINE_S = 3.0  # the gateway's request_deadline_s here (every other request ends well within it)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    node = StandInNode(Identity.generate(), base_model_id(tiny_base), tokens=5, tokenizer=tokenizer)
    tmp = tmp_path_factory.mktemp("delivered")
    with served_gateway(node, tmp, tiny_base, heartbeat_ttl_s=600, request_deadline_s=DEADLINE_S) as served:
        gw, engine, key, sender, service = served
        yield gw, engine, key, node, sender, service


@pytest.fixture
def w(world):
    gw, engine, key, node, sender, service = world
    service.directory.disputed.clear()  # each test stands alone (a dispute is for good otherwise)
    assert asyncio.run(sender.send_once()) == {gw.url: 200}  # live again (a failed node is routed around)
    return gw, engine, key, node


def read_then_leave(gw, key: str, prompt: str, max_tokens: int, n: int = 1) -> str:
    """A streamed request whose client leaves after `n` token chunks; its request id."""
    with httpx.stream(
        "POST",
        gw.url + "/v1/completions",
        headers={"Authorization": f"Bearer {key}"},
        timeout=20,
        json={"model": TINY, "prompt": prompt, "max_tokens": max_tokens, "stream": True},
    ) as r:
        rid, got = r.headers["x-request-id"], 0
        for line in r.iter_lines():
            if line.startswith("data: {") and '"text":" t' in line:
                got += 1
            if got == n:
                break  # the connection is closed with the response half read
    return rid


def stream_until_error(gw, key: str, prompt: str, *, match: str, timeout: float) -> tuple[list[str], str]:
    """A streamed request (max_tokens 20) through the official client that must end in an APIError
    matching `match`: the texts received before it, and the request id."""
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=timeout)
    raw = client.completions.with_raw_response.create(model=TINY, prompt=prompt, max_tokens=20, stream=True)
    texts = []
    with pytest.raises(openai.APIError, match=match):
        for c in raw.parse():
            texts.append(c.choices[0].text)
    return texts, raw.headers["x-request-id"]


def disputed(gw) -> list:
    return httpx.get(gw.url + "/health", timeout=5).json()["disputed_nodes"]


def test_tokens_streamed_after_the_client_left_are_not_paid(w):
    # the node ignores the abort: it streams every other token the request allows, then a receipt for all
    gw, engine, key, node = w
    rid = read_then_leave(gw, key, "BURST_AFTER_ABORT", max_tokens=400)  # the tiny base's context holds 512
    done, u = record_of(engine, rid)
    assert done.status == RequestStatus.CLIENT_CLOSED
    assert (u.completion_tokens, done.completion_tokens) == (1, 1)  # what the client received
    assert u.node_completion_tokens == 400 and json.loads(u.receipt_json)["completion_tokens"] == 400
    assert u.status == RecordStatus.PENDING  # the node made more than the client got: consistent, paid 1
    assert disputed(gw) == []


def test_honest_node_whose_stream_broke_is_paid_what_the_client_got(w):
    # the stream breaks after 2 tokens; the node had made 10 when the abort reached it
    gw, engine, key, node = w
    texts, rid = stream_until_error(gw, key, "CUT_KEEP_GOING", match="incomplete", timeout=20)
    assert texts == [" t0", " t1"]
    done, u = record_of(engine, rid)
    assert done.status == RequestStatus.NODE_FAILED and u.status == RecordStatus.PENDING, u.error
    assert (u.completion_tokens, u.node_completion_tokens) == (2, 10)
    assert disputed(gw) == []


def test_honest_node_whose_drain_timed_out_is_paid_what_the_client_got(w):
    # the client leaves after 1 token; the node's abort receipt says 6 (made, not yet sent) and its stream
    # sends nothing more until the gateway stops reading it
    gw, engine, key, node = w
    rid = read_then_leave(gw, key, "STALL_AFTER_ABORT", max_tokens=20)
    done, u = record_of(engine, rid)
    assert done.status == RequestStatus.CLIENT_CLOSED and u.status == RecordStatus.PENDING, u.error
    assert (u.completion_tokens, u.node_completion_tokens) == (1, 6)
    assert disputed(gw) == []


def test_events_without_end_after_a_token_end_the_request(w):
    gw, engine, key, node = w
    texts, rid = stream_until_error(gw, key, "PINGS_AFTER_TOKEN", match="events", timeout=15)
    assert texts == [" t0"]
    done, u = record_of(engine, rid)
    assert done.status == RequestStatus.NODE_FAILED and "events" in done.error
    assert u.completion_tokens == 1 and u.status == RecordStatus.PENDING


def test_events_without_end_after_an_error_fail_the_node_before_the_first_token(w):
    gw, engine, key, node = w
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=15)
    with pytest.raises(openai.InternalServerError) as ei:
        client.completions.create(model=TINY, prompt="PINGS_AFTER_ERROR", max_tokens=5)
    assert ei.value.status_code == 503 and "before the first token" in ei.value.message


def test_a_node_that_does_not_finish_by_the_deadline_is_cut_off(w):
    # one token, then nothing for longer than the deadline (the node's abort receipt says 6 were made)
    gw, engine, key, node = w
    texts, rid = stream_until_error(
        gw, key, "STALL_AFTER_ABORT", match=f"did not finish within {DEADLINE_S:.0f} s", timeout=15
    )
    assert texts == [" t0"]
    done, u = record_of(engine, rid)
    assert done.status == RequestStatus.NODE_FAILED and u.status == RecordStatus.PENDING, u.error
    assert (u.completion_tokens, u.node_completion_tokens) == (1, 6)


def test_nonstream_client_answered_with_an_error_pays_nothing(w):
    # non-streaming: the stream breaks after 2 tokens, the node's abort receipt claims 10; the client gets a 502
    # and no text, so nothing was delivered: the request is recorded at 0 + 0 tokens (a fee of 0), the node's
    # claim kept beside it, and the error carries the request's id
    gw, engine, key, node = w
    r = httpx.post(
        gw.url + "/v1/completions",
        headers={"Authorization": f"Bearer {key}"},
        timeout=20,
        json={"model": TINY, "prompt": "CUT_KEEP_GOING", "max_tokens": 20},
    )
    assert r.status_code == 502 and "incomplete" in r.json()["error"]["message"]
    done, u = record_of(engine, r.headers["x-request-id"])
    assert done.status == RequestStatus.NODE_FAILED
    assert (done.prompt_tokens, done.completion_tokens) == (0, 0)
    assert (u.prompt_tokens, u.completion_tokens, u.node_completion_tokens) == (0, 0, 10)
    assert u.status == RecordStatus.PENDING, u.error
    assert disputed(gw) == []


@pytest.mark.parametrize("prompt,delay", [("hello", 0.3), ("GATE_AFTER_1", 0.0)], ids=["slow", "stalled"])
def test_nonstream_client_that_left_stops_the_node_and_pays_nothing(w, prompt, delay):
    # non-streaming: the client gives up after 1 s, its answer never sent. The node is aborted at once (it would
    # otherwise make every token for nobody), and nothing is billed: nothing was delivered. Billing the tokens read
    # until then paid a node that sent them at once and then nothing more until the client's timeout (red team:
    # 100 tokens settled, none delivered): "stalled" here, one token then silence; "slow", a token every 0.3 s
    gw, engine, key, node = w
    node.delay = delay
    node.gate.clear()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                gw.url + "/v1/completions",
                headers={"Authorization": f"Bearer {key}"},
                timeout=1.0,
                json={"model": TINY, "prompt": prompt, "max_tokens": 5},
            )
        rid = node.requests[-1]["request_id"]
        done, u = record_of(engine, rid)
    finally:
        node.delay = 0.0
        node.gate.set()
    assert rid in node.aborted and done.status == RequestStatus.CLIENT_CLOSED
    assert (u.prompt_tokens, u.completion_tokens) == (done.prompt_tokens, done.completion_tokens) == (0, 0)
    # the receipt is judged against what was read: the node made at least that
    assert u.status == RecordStatus.PENDING and u.node_completion_tokens >= 1, u.error
    assert disputed(gw) == []


def test_a_keys_tokens_per_minute_count_what_a_client_that_left_had_made(w):
    """A non-streaming client that leaves pays nothing, but its key's --tpm counts the prompt and the tokens read
    until it left: refunded whole, a client leaving each answer just before its end had nodes make tokens without
    limit (re-attack: 8 requests of 100 tokens under a --tpm of 250, none refused)."""
    import threading

    from sqlmodel import Session

    from gateway.keys import create_key
    from gateway.tables import RateBucket
    from tests.utils.gateway import poll

    gw, engine, key, node = w
    tpm = 60  # a token a second refilled: what the charge left is read before the bucket is full again
    secret, info = create_key(engine, name="leaves", tpm=tpm)

    def bucket() -> RateBucket | None:
        with Session(engine) as s:
            return s.get(RateBucket, (info.id, "tokens"))

    def ask() -> None:  # one token, then nothing: the client leaves after 1 s
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                gw.url + "/v1/completions",
                headers={"Authorization": f"Bearer {secret}"},
                timeout=1.0,
                json={"model": TINY, "prompt": "GATE_AFTER_1", "max_tokens": 5},
            )

    node.gate.clear()
    client = threading.Thread(target=ask)
    client.start()
    try:
        # the request's tokens reserved as it was admitted (the bucket is made full by its admission first)
        reserved = poll(lambda: (b := bucket()) is not None and b.level < tpm - 1 and b, timeout=10)
        client.join(30)
        rid = node.requests[-1]["request_id"]
        done, u = record_of(engine, rid)
    finally:
        node.gate.set()
        client.join(30)
    prompt = u.node_prompt_tokens
    assert (u.prompt_tokens, u.completion_tokens) == (0, 0) and prompt > 0
    charged = poll(lambda: (b := bucket()) is not None and b.stamp > reserved.stamp and b, timeout=10)
    # the bucket as the reservation left it, refilled to the charge (a token a second), then given back what the
    # request reserved (its prompt and max_tokens) and did not use: all but the prompt and the one token read
    refilled = reserved.level + (charged.stamp - reserved.stamp) * tpm / 60
    assert refilled + 5 < tpm, "the bucket refilled before the charge: the test cannot tell the charge"
    assert charged.level == pytest.approx(min(tpm, refilled + (prompt + 5) - (prompt + 1)), abs=0.01), prompt
