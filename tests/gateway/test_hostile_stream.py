"""What a node streams is bounded by the request, whatever the node sends: a stream of SSE comments, or one
line dripped a byte at a time (each byte keeps the connection's read timeout from firing), ends after
node_timeout_s without an event, before the first token (the request is failed over) or after it (cut
off); a token's text is at most what a token of the base can hold; token ids outside the vocabulary are not
remembered by the gateway; a sequence ends at its end-of-sequence token (or a stop token id), so what a node
streams after it (invisible padding of empty text) is neither relayed nor billed; a node whose text is shorter
than an honest node sends for its token ids (padding before the end), or that sends ids outside the
vocabulary, is disputed: its record is never paid and it is routed around.

The gateway in a real uvicorn, one stand-in node (tests/utils/gateway.py) steered by the prompt."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from sqlmodel import Session, select

from common.identity import Identity
from gateway.tables import CompletionRecord, RequestStatus
from ledger.models import RecordStatus
from node.adapters.basemodel import base_model_id
from tests.gateway import TINY
from tests.utils.gateway import StandInNode, error_of, gateway_over, poll, record_of

pytestmark = pytest.mark.integration

NODE_TIMEOUT_S = 2.0


@pytest.fixture
def world(tmp_path, tiny_base, tokenizer):
    node = StandInNode(Identity.generate(), base_model_id(tiny_base), tokens=5, tokenizer=tokenizer)
    settings = dict(heartbeat_ttl_s=600, node_timeout_s=NODE_TIMEOUT_S, first_byte_timeout_s=NODE_TIMEOUT_S)
    with gateway_over(node, tmp_path, tiny_base, **settings) as (gw, engine, key):
        yield gw, engine, key, node


@pytest.mark.parametrize("stream,prompt", [(False, "COMMENTS_ONLY"), (True, "COMMENTS_ONLY"), (True, "DRIP_LINE")])
def test_a_node_sending_no_event_is_given_up_before_the_first_token(world, stream, prompt):
    gw, engine, key, node = world
    r = httpx.post(
        gw.url + "/v1/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": TINY, "prompt": prompt, "max_tokens": 3, "stream": stream},
        timeout=30,  # without the bound the gateway waits for a first event for good
    )
    assert r.status_code == 503 and f"no event within {NODE_TIMEOUT_S:g} s" in error_of(r)["message"]

    def closed():
        with Session(engine) as s:
            (done,) = s.exec(select(CompletionRecord)).all()
            return done.status != RequestStatus.OPEN and done

    assert poll(closed).status == RequestStatus.NOT_SERVED


def test_comments_after_a_token_end_the_request_with_the_token_billed(world):
    gw, engine, key, node = world
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30)
    raw = client.completions.with_raw_response.create(
        model=TINY, prompt="COMMENTS_AFTER_TOKEN", max_tokens=3, stream=True
    )
    texts = []
    with pytest.raises(openai.APIError, match=f"no event within {NODE_TIMEOUT_S:g} s"):
        for c in raw.parse():
            texts.append(c.choices[0].text)
    assert texts == [" t0"]
    done, u = record_of(engine, raw.headers["x-request-id"])
    assert done.status == RequestStatus.NODE_FAILED and "no event within" in done.error
    assert u.completion_tokens == 1


def test_token_text_longer_than_any_token_of_the_base_is_refused(world, tokenizer):
    gw, engine, key, node = world
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30)
    with pytest.raises(openai.APIStatusError) as ei:
        client.completions.create(model=TINY, prompt="FAT_TEXT", max_tokens=5)
    assert ei.value.status_code == 502 and "characters" in ei.value.message
    rid = ei.value.response.headers["x-request-id"]
    done, u = record_of(engine, rid)
    assert done.status == RequestStatus.NODE_FAILED and "characters" in done.error
    assert len(ei.value.response.content) < 4096  # none of the text reached the client


def test_token_ids_outside_the_vocabulary_are_shown_empty_and_not_remembered(world, tokenizer):
    gw, engine, key, node = world
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30)
    raw = client.completions.with_raw_response.create(model=TINY, prompt="WILD_IDS", max_tokens=5, logprobs=5)
    r = raw.parse()
    assert r.choices[0].logprobs.tokens == [""] * 5
    texts = gw.server.config.app.state.gateway.deps.templates.token_texts
    (tt,) = texts.values()
    assert len(tt._cache) <= len(tokenizer)
    assert all(tid < len(tokenizer) for tid in tt._cache)
    done, u = record_of(engine, raw.headers["x-request-id"])
    assert u.status == RecordStatus.DISPUTED and "outside the vocabulary" in u.error


@pytest.mark.parametrize("stream", [False, True])
def test_tokens_after_the_end_of_sequence_are_not_billed(world, stream):
    gw, engine, key, node = world
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30)
    raw = client.completions.with_raw_response.create(
        model=TINY,
        prompt="PAST_EOS",
        max_tokens=8,
        stream=stream,
        stream_options={"include_usage": True} if stream else None,
    )
    if stream:
        chunks = list(raw.parse())
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        usage = chunks[-1].usage
    else:
        r = raw.parse()
        text, reason, usage = r.choices[0].text, [r.choices[0].finish_reason], r.usage
    assert (text, reason, usage.completion_tokens) == (" t0", ["stop"], 2)  # the token and its EOS
    done, u = record_of(engine, raw.headers["x-request-id"])
    assert u.completion_tokens == 2 and u.node_completion_tokens == 8  # the receipt's claim, not paid
    assert done.status == RequestStatus.OK


def test_a_stop_token_id_ends_the_sequence_and_ignore_eos_does_not(world, tokenizer):
    gw, engine, key, node = world
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30)
    # the client asked to go past EOS: every token is the answer, and billed
    r = client.completions.create(model=TINY, prompt="PAST_EOS", max_tokens=8, extra_body={"ignore_eos": True})
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (8, "length")
    # a stop token id ends it, ignore_eos or not
    r = client.completions.create(
        model=TINY, prompt="PAST_EOS", max_tokens=8, extra_body={"ignore_eos": True, "stop_token_ids": [77]}
    )
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (2, "stop")


def test_tokens_sent_without_their_text_are_disputed(world, tokenizer):
    gw, engine, key, node = world
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30)
    raw = client.completions.with_raw_response.create(model=TINY, prompt="EMPTY_PAD", max_tokens=30)
    r = raw.parse()
    assert (r.choices[0].text, r.usage.completion_tokens) == (" t0", 30)  # relayed as the node sent them
    done, u = record_of(engine, raw.headers["x-request-id"])
    assert u.status == RecordStatus.DISPUTED and "shorter than an honest node sends for its 30 token ids" in u.error, (
        u.error
    )
    disputed = httpx.get(gw.url + "/health", timeout=5).json()["disputed_nodes"]
    assert [d["node_id"] for d in disputed] == [node.identity.node_id]


def test_tokens_after_the_stop_string_are_disputed(world):
    gw, engine, key, node = world
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30)
    raw = client.completions.with_raw_response.create(model=TINY, prompt="PAST_STOP", max_tokens=20, stop=["("])
    done, u = record_of(engine, raw.headers["x-request-id"])
    assert u.status == RecordStatus.DISPUTED and "19 tokens of choice 0 past its stop string" in u.error, u.error


def test_a_request_its_node_operator_aborted_is_not_held_against_the_node(world):
    # the node held back "(" (it may begin the stop string "((") and its operator aborted the request: an honest
    # node does not send what it held then
    gw, engine, key, node = world
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30)
    raw = client.completions.with_raw_response.create(model=TINY, prompt="OPERATOR_ABORT", max_tokens=20, stop=["(("])
    done, u = record_of(engine, raw.headers["x-request-id"])
    assert u.status == RecordStatus.PENDING and u.completion_tokens == 1, u.error


@pytest.mark.parametrize("stream", [False, True])
def test_a_logprob_no_float_holds_is_shown_as_the_floor_not_a_500(world, stream):
    # float(10**400) raised OverflowError in the relay: a 500 with no text, yet billed, the node not blamed
    gw, engine, key, node = world
    r = httpx.post(
        gw.url + "/v1/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": TINY, "prompt": "HUGE_LOGPROB", "max_tokens": 3, "logprobs": 0, "stream": stream},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    if stream:
        events = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")]
        shown = [
            lp for ev in events for c in ev["choices"] for lp in (c.get("logprobs") or {}).get("token_logprobs", [])
        ]
    else:
        shown = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert shown == [-0.5, -9999.0, -0.5]
    done, usage = record_of(engine, r.headers["x-request-id"])
    assert done.status == RequestStatus.OK and usage.status == RecordStatus.PENDING and usage.completion_tokens == 3


@pytest.fixture
def padded_world(tmp_path, tiny_base, tokenizer):
    """The world over a base whose model has 352 output rows and whose tokenizer 320 tokens (ids 320-351: padded rows
    with no text, as Qwen2.5's 151,936 rows over its 151,665 tokens): the gateway reads both (config.json's
    vocab_size, the tokenizer), and a stand-in node needs no weights."""
    import shutil

    padded = tmp_path / "padded"
    shutil.copytree(tiny_base, padded)
    config = json.loads((padded / "config.json").read_text())
    (padded / "config.json").write_text(json.dumps(config | {"vocab_size": 352}))
    node = StandInNode(Identity.generate(), base_model_id(padded), tokens=5, tokenizer=tokenizer)
    settings = dict(heartbeat_ttl_s=600, node_timeout_s=NODE_TIMEOUT_S, first_byte_timeout_s=NODE_TIMEOUT_S)
    with gateway_over(node, tmp_path / "gw", padded, **settings) as (gw, engine, key):
        yield gw, engine, key, node


@pytest.mark.parametrize("stop", [["€"], ["\ufffd"], []], ids=["euro", "replacement", "none"])
def test_padded_ids_in_a_half_character_do_not_make_an_honest_node_look_dishonest(padded_world, stop):
    """An honest node's detokenizer counts ids past the tokenizer (a padded row, forced by a grammar or drawn from
    a model's untrained rows) among the tokens it holds half a character for, and gives the byte up as U+FFFD at
    the eighth; the gateway's check left them out, held the byte on, completed the "€", and with a stop string
    disputed the honest node (red team: "streamed past its stop string", or "1 character shorter")."""
    gw, engine, key, node = padded_world
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30)
    raw = client.completions.with_raw_response.create(model=TINY, prompt="PADDED_HALF_CHAR", max_tokens=16, stop=stop)
    assert raw.parse().choices[0].text.startswith("\ufffd") or stop == ["\ufffd"]
    done, u = record_of(engine, raw.headers["x-request-id"])
    assert u.status != RecordStatus.DISPUTED, u.error
    assert httpx.get(gw.url + "/health", timeout=5).json()["disputed_nodes"] == []


def test_a_node_that_lists_allowed_token_ids_and_ignores_them_is_disputed(tmp_path, tiny_base, tokenizer):
    """A node whose release lists allowed_token_ids, which then answers with tokens the list leaves out, was paid
    (red team): the gateway checks each id against the list and the base's end tokens (an honest node draws one
    where a row has nothing else to draw)."""
    node = StandInNode(
        Identity.generate(), base_model_id(tiny_base), tokens=5, tokenizer=tokenizer, features=["allowed_token_ids"]
    )
    with gateway_over(node, tmp_path, tiny_base, heartbeat_ttl_s=600) as (gw, engine, key):
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30)
        raw = client.completions.with_raw_response.create(
            model=TINY, prompt="x", max_tokens=3, extra_body={"allowed_token_ids": [300]}
        )
        done, u = record_of(engine, raw.headers["x-request-id"])
    assert u.status == RecordStatus.DISPUTED and "allowed_token_ids leave out" in u.error, u.error


@pytest.mark.parametrize("then_close", [False, True], ids=["done", "stream-cut"])
def test_a_grammar_failure_is_believed_only_of_a_node_that_then_ends_the_request(world, then_close):
    """A node's error event saying the request's own grammar failed it (guided_failed) makes a whole answer a 400
    to the client (billed nothing: none of it was sent); a node that then fails in its own way (the stream cut, no
    done event) is the one at fault, as any broken node: a 502 (review)."""
    gw, engine, key, node = world
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30)
    prompt = "ENGINE_ERROR AFTER_1 GUIDED" + (" THEN_CLOSE" if then_close else "")
    with pytest.raises(openai.APIStatusError) as ei:
        client.completions.create(model=TINY, prompt=prompt, max_tokens=4, extra_body={"guided_regex": "t.*"})
    done, u = record_of(engine, ei.value.response.headers["x-request-id"])
    if then_close:
        assert ei.value.status_code == 502 and done.status == RequestStatus.NODE_FAILED
        assert u.completion_tokens == 0
    else:
        assert ei.value.status_code == 400 and ei.value.body["param"] == "guided_regex"
        assert done.status == RequestStatus.GRAMMAR_FAILED and (u.completion_tokens, u.node_completion_tokens) == (0, 1)
