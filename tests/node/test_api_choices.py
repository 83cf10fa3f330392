"""POST /v1/generate's OpenAI fields on a real node (uvicorn, signed gateway calls): several prompts and n, logprobs
and prompt_logprobs, penalties, logit_bias, min_p, min_tokens, stop_token_ids, ignore_eos, guided; each bound
answered 400 naming its field; the receipt signs the summed counts."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.api import create_app
from node.engine import AsyncEngine
from node.receipts import check_receipt
from tests.utils.engine import ADAPTER_SPECS, make_world
from tests.utils.node_auth import Gateway, node_id_for
from tests.utils.servers import ServerThread

pytestmark = pytest.mark.integration

P1, P2 = [1, 17, 42, 99, 5], [1, 250, 3]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    world = make_world(tmp_path_factory.mktemp("choices-world"), specs=ADAPTER_SPECS[:1])
    engine = AsyncEngine(world.config(num_kv_blocks=256, block_size=8, max_model_len=512), store=world.store)
    gateway, node_key = Gateway(), Ed25519PrivateKey.generate()
    app = create_app(engine, node_key, trusted_gateways={gateway.public_hex}, operator_token="op-token")
    server = ServerThread(app).start(timeout=30)
    client = gateway.client(server.url, node_id_for(node_key))
    try:
        pub = bytes.fromhex(client.get("/status").json()["public_key"])
        yield {"client": client, "pub": pub, "adapter": world.adapters[0].adapter_id}
    finally:
        client.close()
        server.stop()


def _sse(client, body) -> list[dict]:
    with client.stream("POST", "/v1/generate", json=body | {"stream": True}) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]


def test_several_prompts_and_n_stream_and_answer_with_choices_and_summed_usage(node):
    c = node["client"]
    body = {"prompt_token_ids": [P1, P2], "n": 2, "max_tokens": 5, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    whole = c.post("/v1/generate", json=body).json()
    assert [ch["index"] for ch in whole["choices"]] == [0, 1, 2, 3]
    assert all(len(ch["token_ids"]) == 5 and ch["finish_reason"] == "length" for ch in whole["choices"])
    assert whole["token_ids"] == whole["choices"][0]["token_ids"] and whole["choices"][0]["logprobs"] is None
    assert whole["usage"] == {
        "prompt_tokens": len(P1) + len(P2),
        "completion_tokens": 20,
        "total_tokens": 28,
        "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
    }
    rec = whole["receipt"]
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (8, 20)
    check_receipt(rec, whole["signature"], node["pub"])
    events = _sse(c, body)
    done = events[-1]
    assert done["type"] == "done" and done["usage"] == whole["usage"] and done["finish_reason"] == "length"
    check_receipt(done["receipt"], done["signature"], node["pub"])
    finishes = [e for e in events if e["type"] == "finish"]
    assert sorted(e["index"] for e in finishes) == [0, 1, 2, 3]
    for ch in whole["choices"]:  # seeded: the stream draws what the whole answer drew
        k = ch["index"]
        assert [e["token_id"] for e in events if e["type"] == "token" and e["index"] == k] == ch["token_ids"]
        last_token = max(i for i, e in enumerate(events) if e["type"] == "token" and e["index"] == k)
        assert events.index(next(e for e in finishes if e["index"] == k)) > last_token


def test_logprobs_and_prompt_logprobs_on_the_wire(node):
    c = node["client"]
    body = {"prompt_token_ids": P1, "max_tokens": 4, "temperature": 0, "logprobs": 3, "prompt_logprobs": 2}
    body |= {"adapter_id": node["adapter"], "ignore_eos": True}
    whole = c.post("/v1/generate", json=body).json()
    lps = whole["choices"][0]["logprobs"]
    assert [e["token_id"] for e in lps] == whole["token_ids"]
    for e in lps:  # greedy: the chosen token is the most likely, and the top list descends
        assert len(e["top_logprobs"]) == 3 and e["top_logprobs"][0][0] == e["token_id"]
        assert e["top_logprobs"][0][1] == e["logprob"] <= 0
        assert [lp for _, lp in e["top_logprobs"]] == sorted((lp for _, lp in e["top_logprobs"]), reverse=True)
    (prompt,) = whole["prompt_logprobs"]
    assert prompt[0] is None and [e["token_id"] for e in prompt[1:]] == P1[1:]
    assert all(len(e["top_logprobs"]) == 2 for e in prompt[1:])
    for e in prompt[1:]:  # each prompt token's rank: 1 where it is the most likely, else past those before it
        before = sum(lp > e["logprob"] for _, lp in e["top_logprobs"])
        assert e["rank"] == 1 + before if before < 2 else e["rank"] > 2
    events = _sse(c, body)
    assert events[0] == {"type": "prompt_logprobs", "prompt_index": 0, "entries": prompt}
    tokens = [e for e in events if e["type"] == "token"]
    assert [
        {"token_id": e["token_id"], "logprob": e["logprob"], "top_logprobs": e["top_logprobs"]} for e in tokens
    ] == lps


def test_sampling_fields_are_honoured(node):
    c = node["client"]
    base = {"prompt_token_ids": P1, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    free = c.post("/v1/generate", json=base).json()["token_ids"]
    # logit_bias: +100 makes a token certain, even when sampled hot
    biased = c.post("/v1/generate", json=base | {"temperature": 1.5, "logit_bias": {"77": 100}}).json()
    assert biased["token_ids"] == [77] * 6
    # stop_token_ids: the sequence ends with "stop" at the token, which is counted but not shown
    stop_at = free[2]
    first = free.index(stop_at)
    stopped = c.post("/v1/generate", json=base | {"stop_token_ids": [stop_at]}).json()
    assert stopped["finish_reason"] == "stop" and stopped["token_ids"] == free[: first + 1]
    assert stopped["usage"]["completion_tokens"] == first + 1
    # min_tokens holds the stop token back
    held = c.post("/v1/generate", json=base | {"stop_token_ids": [stop_at], "min_tokens": first + 2}).json()
    assert stop_at not in held["token_ids"][: first + 2]
    # a strong repetition penalty changes a greedy answer that repeats its prompt's tokens or its own
    rep = c.post("/v1/generate", json=base | {"repetition_penalty": 2.0, "max_tokens": 6}).json()["token_ids"]
    pres = c.post("/v1/generate", json=base | {"presence_penalty": 2.0, "frequency_penalty": 2.0}).json()
    assert pres["usage"]["completion_tokens"] == 6 and len(rep) == 6
    assert len(set(pres["token_ids"])) >= len(set(free))
    # min_p 1 keeps only the best token: greedy even when hot
    assert c.post("/v1/generate", json=base | {"temperature": 2.0, "min_p": 1.0}).json()["token_ids"] == free


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ({"n": 0}, "n:"),
        ({"n": 17}, "n:"),
        ({"n": 16, "prompt_token_ids": [P1] * 5}, "n: 5 prompts x n=16"),
        ({"prompt_token_ids": [P1] * 17}, "prompt_token_ids holds 17 prompts"),
        ({"prompt_token_ids": [P1, "x"]}, "prompt_token_ids"),
        ({"prompt_token_ids": [P1, [1, 10**7]]}, "prompt_token_ids holds 10000000"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.1}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": 2.5}, "repetition_penalty"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"logit_bias": {"1000000": 1}}, "in logit_bias, stop_token_ids or allowed_token_ids is not in the vocabulary"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens (5) must be <= max_tokens (4)"),
        ({"stop_token_ids": list(range(17))}, "stop_token_ids"),
        ({"stop": ["y" * 257]}, "stop"),  # each is checked against every token's text: bounded
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": [10**7]}, "not in the vocabulary"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"guided": "json"}, "guided"),
    ],
)
def test_each_bound_is_a_400_naming_its_field(node, extra, fragment):
    c = node["client"]
    r = c.post("/v1/generate", json={"prompt_token_ids": P1, "max_tokens": 4} | extra)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_request" and fragment in err["message"], err


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 5}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["name", "n"],
    "additionalProperties": False,
}


def test_guided_answers_parse_and_validate_streamed_and_whole(node):
    import jsonschema

    c = node["client"]
    body = {"prompt_token_ids": [P1, P2], "n": 2, "max_tokens": 200, "temperature": 1.0, "seed": 3}
    body |= {"guided": {"type": "json_schema", "schema": SCHEMA}}
    whole = c.post("/v1/generate", json=body).json()
    for ch in whole["choices"]:
        assert ch["finish_reason"] == "stop", ch
        jsonschema.validate(json.loads(ch["text"]), SCHEMA)
    events = _sse(c, body)
    for k in range(4):
        text = "".join(e["text"] for e in events if e["type"] == "token" and e["index"] == k)
        assert text == whole["choices"][k]["text"]


@pytest.mark.parametrize(
    "guided, fragment",
    [
        ({"type": "xml"}, "guided.type"),
        ({"type": "json_schema"}, "guided.schema"),
        ({"type": "json_schema", "schema": {"type": "object", "properties": {"x": {"type": "nope"}}}}, "guided"),
        ({"type": "json_schema", "schema": {"description": "x" * 70_000}}, "guided.schema is"),
        ({"type": "json_object", "extra": 1}, "guided"),
    ],
)
def test_a_guided_value_the_grammar_refuses_is_a_400_naming_guided(node, guided, fragment):
    r = node["client"].post("/v1/generate", json={"prompt_token_ids": P1, "max_tokens": 4, "guided": guided})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_request" and err["message"].startswith("guided") and fragment in err["message"]
