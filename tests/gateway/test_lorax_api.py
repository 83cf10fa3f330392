"""LoRAX's native REST API (`POST /`, `/generate`, `/generate_stream`) through the official lorax-client (0.6.3:
`Client` and `AsyncClient` post to the base URL, LoRAX's compat route) against a real gateway and a real tiny-model
node with two adapters (random weights): a generation is the completion of the same adapter and prompt (text,
counts and bill), whole and streamed; details say what LoRAX says (finish reason, tokens with their logprobs, the
prompt's positions); what cannot be served is refused by name in LoRAX's error shape, which the client raises as
its own error classes."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import lorax
import lorax.errors
import openai
import pytest
from lorax.types import MergedAdapters, Response, StreamResponse

from common.identity import Identity
from gateway.choices import Choices
from gateway.errors import BadRequest
from gateway.lorax_api import LoraxAnswer, LoraxGenerate, LoraxGenerateStream, LoraxParameters, LoraxRequest
from gateway.settings import DEFAULT_MAX_BODY_BYTES
from gateway.tables import RequestStatus
from ledger.models import RecordStatus
from node.adapters import AdapterStore
from node.adapters.basemodel import base_model_id
from node.adapters.ensemble import MAX_ENSEMBLE_ADAPTERS, MAX_ENSEMBLE_WEIGHT
from tests.gateway import TINY
from tests.gateway.conftest import PROMPT, usage_row
from tests.utils.factories import make_package
from tests.utils.gateway import StandInNode, poll, record_of, served_gateway
from tests.utils.stack import register_adapter, start_gateway, start_node

pytestmark = pytest.mark.integration

NAMES = ("acme/capitals", "acme/elements")


@pytest.fixture(scope="module")
def stack(tiny_base, tmp_path_factory):
    """One gateway (one base: TINY) and one node holding two adapters; the lorax client, the openai client."""
    root = tmp_path_factory.mktemp("lorax")
    pkgs = [make_package(tiny_base, root / f"pkg{i}", name=n, seed=60 + i) for i, n in enumerate(NAMES)]
    store = AdapterStore(root / "store")
    gw = start_gateway(root / "gateway", tiny_base)
    for pkg, name in zip(pkgs, NAMES):
        store.install(pkg.path)
        register_adapter(gw, adapter_id=pkg.adapter_id, name=name, tiny_base=tiny_base)
    node = start_node(tiny_base, gateway=gw, store=store)
    poll(lambda: httpx.get(gw.url + "/health", timeout=5).json().get("live_nodes") == 1, timeout=30)
    try:
        yield gw, [p.adapter_id for p in pkgs]
    finally:
        node.stop()
        gw.stop()


@pytest.fixture(scope="module")
def gw(stack):
    return stack[0]


@pytest.fixture(scope="module")
def ids(stack):
    return stack[1]


@pytest.fixture(scope="module")
def client(gw):
    return lorax.Client(gw.url, headers={"Authorization": f"Bearer {gw.api_key}"}, timeout=120)


@pytest.fixture(scope="module")
def oai(gw):
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.api_key, max_retries=0, timeout=120)


def auth(gw) -> dict:
    return {"Authorization": f"Bearer {gw.api_key}"}


def completion(oai, model: str, **kw):
    return oai.completions.create(model=model, **({"prompt": PROMPT, "max_tokens": 8, "temperature": 0} | kw))


def refused(call, *names: str) -> str:
    """The message of a refusal the client raises as its ValidationError (LoRAX's "validation" error), naming each
    of `names`."""
    with pytest.raises(lorax.errors.ValidationError) as ei:
        call()
    message = str(ei.value)
    for name in names:
        assert name in message, message
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------- served


def test_greedy_generate_is_the_completion_of_the_same_adapter_and_prompt(client, oai, ids):
    c = completion(oai, NAMES[0])
    r = client.generate(PROMPT, adapter_id=NAMES[0], max_new_tokens=8)
    assert r.generated_text == c.choices[0].text
    d = r.details
    assert d.finish_reason == "length" and c.choices[0].finish_reason == "length"  # random weights rarely stop
    assert (d.prompt_tokens, d.generated_tokens) == (c.usage.prompt_tokens, c.usage.completion_tokens)
    assert len(d.tokens) == d.generated_tokens == 8
    assert all(t.logprob <= 0 and t.id >= 0 for t in d.tokens)
    assert "".join(t.text for t in d.tokens if not t.special) == r.generated_text
    assert d.prefill == [] and d.seed is None and d.best_of_sequences is None
    # the adapter by its id, the same answer; do_sample false without warpers is greedy whatever the seed
    assert client.generate(PROMPT, adapter_id=ids[0], max_new_tokens=8, seed=7).generated_text == r.generated_text
    # the logprobs are the completion's
    lp = completion(oai, NAMES[0], logprobs=0).choices[0].logprobs.token_logprobs
    assert [t.logprob for t in d.tokens] == pytest.approx(lp, abs=1e-4)
    # details false: no details
    assert client.generate(PROMPT, adapter_id=NAMES[0], max_new_tokens=8, details=False).details is None


def test_truncate_keeps_the_inputs_last_tokens(client, oai):
    """LoRAX's truncate: the inputs' last tokens only, as the completion of those tokens answers (and bills)."""
    whole = client.generate(PROMPT, adapter_id=NAMES[0], max_new_tokens=8)
    cut = client.generate(PROMPT, adapter_id=NAMES[0], max_new_tokens=8, truncate=2, decoder_input_details=True)
    assert whole.details.prompt_tokens > 2 and cut.details.prompt_tokens == 2
    c = completion(oai, NAMES[0], extra_body={"truncate_prompt_tokens": 2})
    assert cut.generated_text == c.choices[0].text and c.usage.prompt_tokens == 2
    assert [t.id for t in cut.details.prefill] == [t.id for t in whole_prefill(client)][-2:]
    long = client.generate("word " * 2000, adapter_id=NAMES[0], max_new_tokens=4, truncate=100)  # past the context
    assert long.details.prompt_tokens == 100


def whole_prefill(client) -> list:
    return client.generate(PROMPT, adapter_id=NAMES[0], max_new_tokens=1, decoder_input_details=True).details.prefill


def test_streamed_tokens_make_the_whole_answer(client):
    whole = client.generate(PROMPT, adapter_id=NAMES[1], max_new_tokens=10)
    frames = list(client.generate_stream(PROMPT, adapter_id=NAMES[1], max_new_tokens=10))
    *body, last = frames
    assert all(f.generated_text is None and f.details is None for f in body)
    assert last.generated_text == whole.generated_text
    assert "".join(f.token.text for f in frames if not f.token.special) == last.generated_text
    assert [f.token.id for f in frames] == [t.id for t in whole.details.tokens]
    assert last.details.finish_reason == "length" and last.details.generated_tokens == len(frames) == 10
    assert last.details.prompt_tokens == whole.details.prompt_tokens
    # without details the last frame still carries the text
    plain = list(client.generate_stream(PROMPT, adapter_id=NAMES[1], max_new_tokens=10, details=False))
    assert plain[-1].generated_text == whole.generated_text and plain[-1].details is None


def test_the_async_client_gets_the_same(gw, client):
    whole = client.generate(PROMPT, adapter_id=NAMES[0], max_new_tokens=6)

    async def run():
        ac = lorax.AsyncClient(gw.url, headers=auth(gw), timeout=2)
        r = await ac.generate(PROMPT, adapter_id=NAMES[0], max_new_tokens=6)
        frames = [f async for f in ac.generate_stream(PROMPT, adapter_id=NAMES[0], max_new_tokens=6)]
        return r, frames

    r, frames = asyncio.run(run())
    assert r.generated_text == frames[-1].generated_text == whole.generated_text
    assert r.details.tokens == whole.details.tokens


def test_generate_and_generate_stream_routes_answer_in_lorax_shapes(gw, client):
    body = {"inputs": PROMPT, "parameters": {"adapter_id": NAMES[0], "max_new_tokens": 5, "details": True}}
    one = httpx.post(gw.url + "/generate", json=body, headers=auth(gw), timeout=60)
    assert one.status_code == 200 and isinstance(one.json(), dict), one.text
    r = Response(**one.json())
    compat = httpx.post(gw.url + "/", json=body, headers=auth(gw), timeout=60)
    assert isinstance(compat.json(), list) and Response(**compat.json()[0]) == r  # api-inference's list
    with httpx.stream("POST", gw.url + "/generate_stream", json=body, headers=auth(gw), timeout=60) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        frames = [StreamResponse(**json.loads(line[5:])) for line in s.iter_lines() if line.startswith("data:")]
    assert frames[-1].generated_text == r.generated_text and len(frames) == 5
    streamed = httpx.post(gw.url + "/", json=body | {"stream": True}, headers=auth(gw), timeout=60)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    # a stream flag the route contradicts is refused, by name
    bad = httpx.post(gw.url + "/generate", json=body | {"stream": True}, headers=auth(gw), timeout=60)
    assert bad.status_code == 400 and "stream" in bad.json()["error"]


def test_return_full_text_prepends_the_inputs(client):
    plain = client.generate(PROMPT, adapter_id=NAMES[0], max_new_tokens=6)
    full = client.generate(PROMPT, adapter_id=NAMES[0], max_new_tokens=6, return_full_text=True)
    assert full.generated_text == PROMPT + plain.generated_text
    frames = list(client.generate_stream(PROMPT, adapter_id=NAMES[0], max_new_tokens=6, return_full_text=True))
    assert frames[-1].generated_text == full.generated_text


def test_the_stop_sequence_that_ends_the_text_is_kept_in_it_as_lorax_keeps_it(gw, client, oai):
    """LoRAX (TGI's server: its StoppingCriteria only says when to stop, and the text is the decoding of every
    token generated) keeps the stop sequence that ended the generation in generated_text, finish_reason
    "stop_sequence"; the completion of the same request leaves it out (OpenAI's way). Whole (POST /, /generate)
    and streamed, the tokens' texts make the text, and the tokens counted (billed) are the completion's."""
    text = client.generate(PROMPT, adapter_id=NAMES[0], max_new_tokens=16).generated_text
    stop = next(text[i : i + 2] for i in range(4, len(text) - 2) if text[i : i + 2].strip())
    kept = text[: text.index(stop) + len(stop)]
    stops = ["QQ never said QQ", stop]  # the one that ended it is not the first asked
    r = client.generate(PROMPT, adapter_id=NAMES[0], max_new_tokens=16, stop_sequences=stops)
    c = completion(oai, NAMES[0], max_tokens=16, stop=stops)
    assert c.choices[0].text == text[: text.index(stop)] and c.choices[0].finish_reason == "stop"
    assert r.generated_text == kept
    d = r.details
    assert d.finish_reason == "stop_sequence"
    assert d.generated_tokens == len(d.tokens) == c.usage.completion_tokens
    assert "".join(t.text for t in d.tokens if not t.special) == kept
    full = client.generate(PROMPT, adapter_id=NAMES[0], max_new_tokens=16, stop_sequences=stops, return_full_text=True)
    assert full.generated_text == PROMPT + kept
    body = {"inputs": PROMPT, "parameters": {"adapter_id": NAMES[0], "max_new_tokens": 16, "stop": stops}}
    got = httpx.post(gw.url + "/generate", json=body, headers=auth(gw), timeout=120)
    assert got.status_code == 200 and got.json() == {"generated_text": kept}, got.text
    frames = list(client.generate_stream(PROMPT, adapter_id=NAMES[0], max_new_tokens=16, stop_sequences=stops))
    last = frames[-1]
    assert last.generated_text == kept and last.details.finish_reason == "stop_sequence"
    assert "".join(f.token.text for f in frames if not f.token.special) == kept
    assert last.details.generated_tokens == d.generated_tokens
    plain = list(
        client.generate_stream(PROMPT, adapter_id=NAMES[0], max_new_tokens=16, stop_sequences=stops, details=False)
    )
    assert plain[-1].generated_text == kept and plain[-1].details is None


def test_no_adapter_id_is_the_one_base_model(client, oai):
    r = client.generate(PROMPT, max_new_tokens=8)
    assert r.generated_text == completion(oai, TINY).choices[0].text
    assert client.generate(PROMPT, adapter_id=TINY, max_new_tokens=8).generated_text == r.generated_text


def test_sampling_follows_lorax_do_sample_and_warpers(client, oai):
    seeded = {"max_new_tokens": 8, "seed": 11}
    sampled = client.generate(PROMPT, adapter_id=NAMES[0], do_sample=True, **seeded)
    c = completion(oai, NAMES[0], temperature=1.0, seed=11)
    assert sampled.generated_text == c.choices[0].text and sampled.details.seed == 11
    # sampled without a seed: LoRAX says the one it drew, and that seed samples the same answer again
    drawn = client.generate(PROMPT, adapter_id=NAMES[0], do_sample=True, max_new_tokens=8)
    assert isinstance(drawn.details.seed, int) and drawn.details.seed != 11
    again = client.generate(PROMPT, adapter_id=NAMES[0], do_sample=True, max_new_tokens=8, seed=drawn.details.seed)
    assert again.generated_text == drawn.generated_text
    # a warper samples without do_sample, as LoRAX does
    warped = client.generate(PROMPT, adapter_id=NAMES[0], temperature=0.7, top_k=5, top_p=0.9, **seeded)
    c = completion(oai, NAMES[0], temperature=0.7, top_p=0.9, seed=11, extra_body={"top_k": 5})
    assert warped.generated_text == c.choices[0].text
    rp = client.generate(PROMPT, adapter_id=NAMES[0], max_new_tokens=8, repetition_penalty=1.3)
    c = completion(oai, NAMES[0], extra_body={"repetition_penalty": 1.3})
    assert rp.generated_text == c.choices[0].text


def test_merged_adapters_are_the_linear_ensemble(client, oai):
    merged = MergedAdapters(ids=list(NAMES), weights=[0.7, 0.3], merge_strategy="linear", density=1.0)
    r = client.generate(PROMPT, merged_adapters=merged, max_new_tokens=8)
    c = completion(oai, "+".join(NAMES), extra_body={"adapter_weights": [0.7, 0.3]})
    assert r.generated_text == c.choices[0].text


def test_decoder_input_details_alternatives_and_best_of(gw, client):
    r = client.generate(PROMPT, adapter_id=NAMES[0], max_new_tokens=4, decoder_input_details=True)
    ids = httpx.post(gw.url + "/tokenize", json={"model": NAMES[0], "prompt": PROMPT}, headers=auth(gw), timeout=30)
    assert [t.id for t in r.details.prefill] == ids.json()["tokens"]
    assert r.details.prefill[0].logprob is None and all(t.logprob <= 0 for t in r.details.prefill[1:])
    alt = client.generate(PROMPT, adapter_id=NAMES[0], max_new_tokens=4, return_k_alternatives=2)
    assert all(len(t.alternative_tokens) == 2 for t in alt.details.tokens)
    assert alt.details.tokens[0].alternative_tokens[0].logprob >= alt.details.tokens[0].alternative_tokens[1].logprob
    # sampled and unseeded (LoRAX refuses a seed with best_of): EOS is ignored so both sequences are 4 tokens long
    best = client.generate(
        PROMPT, adapter_id=NAMES[0], max_new_tokens=4, best_of=2, do_sample=True, ignore_eos_token=True
    )
    assert len(best.details.best_of_sequences) == 1 and best.details.generated_tokens == 4


def test_a_response_format_is_the_completions_structured_output(client):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    r = client.generate(
        PROMPT,
        max_new_tokens=60,
        do_sample=True,
        seed=3,
        response_format={"type": "json_object", "schema": schema},
    )
    assert r.generated_text.lstrip().startswith("{"), r.generated_text
    if r.details.finish_reason != "length":
        assert isinstance(json.loads(r.generated_text)["a"], int)


def test_usage_is_recorded_and_billed_like_a_completion(gw, oai, ids):
    body = {"inputs": PROMPT, "parameters": {"adapter_id": NAMES[0], "max_new_tokens": 8}}
    raw = httpx.post(gw.url + "/generate", json=body, headers=auth(gw), timeout=60)
    row = usage_row(gw, raw.headers["x-request-id"])
    c = oai.completions.with_raw_response.create(model=NAMES[0], prompt=PROMPT, max_tokens=8, temperature=0)
    ref = usage_row(gw, c.headers["x-request-id"])
    assert row.status != RecordStatus.DISPUTED, row.error
    assert row.adapter_id == ref.adapter_id == ids[0]
    assert (
        (row.prompt_tokens, row.completion_tokens)
        == (ref.prompt_tokens, ref.completion_tokens)
        == (
            c.parse().usage.prompt_tokens,
            8,
        )
    )
    assert (row.node_prompt_tokens, row.node_completion_tokens) == (row.prompt_tokens, row.completion_tokens)
    with httpx.stream("POST", gw.url + "/generate_stream", json=body, headers=auth(gw), timeout=60) as s:
        rid = s.headers["x-request-id"]
        s.read()
    streamed = usage_row(gw, rid)
    assert (streamed.prompt_tokens, streamed.completion_tokens) == (row.prompt_tokens, 8)


# ---------------------------------------------------------------------------------------------- refused


def test_each_unsupported_field_or_value_is_refused_by_name(gw, client):
    def gen(**kw):
        return client.generate(PROMPT, **({"max_new_tokens": 4} | kw))

    refused(lambda: gen(adapter_source="s3"), "adapter_source")
    refused(lambda: gen(adapter_source="local"), "adapter_source")
    refused(lambda: gen(watermark=True), "watermark")
    refused(lambda: gen(typical_p=0.5), "typical_p")
    refused(lambda: gen(truncate=10**6), "truncate")  # more than the context
    refused(lambda: gen(truncate=0), "truncate")
    refused(lambda: gen(temperature=3.0), "temperature")
    refused(lambda: gen(max_new_tokens=10**7), "max_new_tokens")
    refused(lambda: gen(return_k_alternatives=50), "return_k_alternatives")
    refused(lambda: gen(stop_sequences=["a"] * 9), "stop")
    refused(lambda: gen(best_of=2, do_sample=True, seed=1), "seed")
    ties = MergedAdapters(ids=list(NAMES), weights=[0.5, 0.5], merge_strategy="ties", density=0.5)
    refused(lambda: gen(merged_adapters=ties), "merge_strategy")
    signs = MergedAdapters(
        ids=list(NAMES), weights=[0.5, 0.5], merge_strategy="linear", density=1.0, majority_sign_method="total"
    )
    refused(lambda: gen(merged_adapters=signs), "majority_sign_method")
    refused(lambda: gen(response_format={"type": "json_object", "schema": {"type": 5}}), "response_format")
    refused(lambda: client.generate("word " * 600, max_new_tokens=4), "inputs")  # past the context
    refused(lambda: list(client.generate_stream(PROMPT, temperature=3.0)), "temperature")

    def raw(path: str = "/", **body):
        r = httpx.post(gw.url + path, json={"inputs": PROMPT} | body, headers=auth(gw), timeout=30)
        assert r.status_code == 400, r.text
        err = r.json()
        assert set(err) == {"error", "error_type"} and err["error_type"] == "validation", err
        assert "\n" not in err["error"]
        return err["error"]

    assert "parameters.foo" in raw(parameters={"foo": 1})
    assert "nope" in raw(nope=1)
    assert "inputs" in raw(inputs="")
    assert "best_of" in raw(parameters={"best_of": 2, "do_sample": True}, stream=True)
    assert "best_of" in raw(parameters={"best_of": 2})  # LoRAX's: best_of needs sampling
    assert "decoder_input_details" in raw("/generate_stream", parameters={"decoder_input_details": True})
    assert "adapter_id" in raw(
        parameters={"adapter_id": NAMES[0], "merged_adapters": {"ids": list(NAMES), "weights": [0.5, 0.5]}}
    )
    assert "do_sample" in raw(parameters={"do_sample": "yes"})


def test_an_unknown_adapter_is_a_404(client):
    with pytest.raises(lorax.errors.NotFoundError):
        client.generate(PROMPT, adapter_id="nobody/nothing", max_new_tokens=4)


def test_api_token_is_taken_and_ignored(client):
    r = client.generate(PROMPT, adapter_id=NAMES[0], max_new_tokens=4, api_token="hf_secret")
    assert r.generated_text == client.generate(PROMPT, adapter_id=NAMES[0], max_new_tokens=4).generated_text


def test_a_bad_key_is_a_401_in_lorax_shape(gw):
    bad = lorax.Client(gw.url, headers={"Authorization": "Bearer lm-wrong"}, timeout=30)
    with pytest.raises(lorax.errors.UnknownError) as ei:
        bad.generate(PROMPT, max_new_tokens=4)
    assert "401" in str(ei.value)
    for path in ("/", "/generate", "/generate_stream"):
        r = httpx.post(gw.url + path, json={"inputs": PROMPT}, timeout=30)
        assert r.status_code == 401 and isinstance(r.json()["error"], str), r.text


def test_a_malformed_or_oversized_body_is_one_line_in_lorax_shape(gw):
    r = httpx.post(gw.url + "/generate", content=b'{"inputs": "x",', headers=auth(gw), timeout=30)
    assert r.status_code == 400 and r.json()["error_type"] == "validation"
    assert isinstance(r.json()["error"], str) and "\n" not in r.json()["error"]
    r = httpx.post(gw.url + "/", content=b"[1, 2]", headers=auth(gw), timeout=30)
    assert r.status_code == 400 and "object" in r.json()["error"]
    over = {"inputs": "x" * (DEFAULT_MAX_BODY_BYTES + 1)}
    big = httpx.post(gw.url + "/generate", json=over, headers=auth(gw), timeout=30)
    assert big.status_code == 413 and isinstance(big.json()["error"], str), big.text
    assert big.json()["error_type"] == "validation"
    # a chunked body (no Content-Length) is cut off at the limit the same way
    chunks = (b'{"inputs": "' + b"x" * (1 << 20) if i == 0 else b"x" * (1 << 20) for i in range(6))
    big = httpx.post(gw.url + "/", content=chunks, headers=auth(gw), timeout=30)
    assert big.status_code == 413 and big.json()["error_type"] == "validation", big.text


def test_max_new_tokens_left_out_is_the_room_the_context_leaves(client):
    """LoRAX's effective max_new_tokens: max_total_tokens - input_length (the rule a chat's missing max_tokens
    follows here), not the completions' default of 16."""
    r = client.generate(PROMPT, adapter_id=NAMES[0], ignore_eos_token=True)
    assert r.details.finish_reason == "length"
    assert r.details.prompt_tokens + r.details.generated_tokens == 512  # the tiny base's context


def test_best_of_samples_when_a_warper_is_given_whatever_its_value(gw, client):
    """LoRAX's check (and lorax-client's own): best_of > 1 needs do_sample or a temperature, top_k or top_p given
    (is_some), so temperature 1.0 counts."""
    r = client.generate(PROMPT, adapter_id=NAMES[0], max_new_tokens=4, best_of=2, temperature=1.0)
    # sampled without a seed: the end token may be drawn before the fourth (once in a full run)
    ended = r.details.finish_reason == "eos_token"
    assert (r.details.generated_tokens == 4 or ended) and len(r.details.best_of_sequences) == 1
    assert r.details.seed is None  # sampled without a seed (best_of takes none)
    # none given (the client refuses it before posting): the refusal says what to give
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4, "best_of": 2}}
    r = httpx.post(gw.url + "/generate", json=body, headers=auth(gw), timeout=30)
    assert r.status_code == 400 and r.json()["error_type"] == "validation", r.text
    assert all(name in r.json()["error"] for name in ("best_of", "do_sample", "temperature")), r.text


def test_an_adapter_id_with_a_plus_is_refused_and_points_to_merged_adapters(client):
    """adapter_id names one adapter: 'a+b' is no adapter's name, and not an ensemble (merged_adapters is)."""
    refused(lambda: client.generate(PROMPT, adapter_id="+".join(NAMES), max_new_tokens=4), "adapter_id", "merged")


def test_sampling_at_a_temperature_of_zero_is_refused_as_lorax_refuses_it(client):
    """LoRAX: "`temperature` must be strictly positive"; sampling asked (do_sample, best_of) at 0 is refused by
    name rather than served greedy. Without them, a temperature of 0 is greedy decoding."""
    refused(lambda: client.generate(PROMPT, max_new_tokens=4, do_sample=True, temperature=0.0), "temperature")
    refused(lambda: client.generate(PROMPT, max_new_tokens=4, best_of=2, temperature=0.0), "temperature")
    greedy = client.generate(PROMPT, adapter_id=NAMES[0], max_new_tokens=6)
    assert client.generate(PROMPT, adapter_id=NAMES[0], max_new_tokens=6, temperature=0.0) == greedy


# ---------------------------------------------------------------------------------------------- the writer alone


class _Tokenizer:
    """A tokenizer's decode: token 7 is "a", 8 is "bcd", 9 is "b" (others "t"), 2 the end token (no text)."""

    TEXTS = {7: "a", 8: "bcd", 9: "b", 2: ""}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.TEXTS.get(i, "t") for i in ids)


class _Texts:
    """What the writer reads of a tokenizer's texts (gateway.logprobs.TokenTexts): 2 is the end token."""

    special = frozenset({2})
    size = 16
    tok = _Tokenizer()

    def text(self, tid: int) -> str:
        return f"<{tid}>"


def _choices(stop: bool = False) -> tuple[LoraxAnswer, Choices]:
    c = Choices(
        chat=False,
        prompts=[[1, 5]],
        per_prompt=1,
        n=1,
        max_tokens=4,
        logprobs=True,
        eos_ids=frozenset({2}),
        stops=("zz",) if stop else (),
    )
    c.texts = _Texts()
    params = {"details": True} | ({"stop": ["zz"]} if stop else {})
    req = LoraxGenerateStream.model_validate({"inputs": "hi", "parameters": params})
    req.check()
    return LoraxAnswer(req, c, prompt_tokens=2), c


def _frames(raw: bytes) -> list[dict]:
    return [json.loads(line[5:]) for line in raw.decode().splitlines() if line.startswith("data:")]


def test_the_end_token_is_eos_token_and_a_stop_on_a_stop_sequence_a_stop_sequence():
    """Random weights rarely end a sequence: the finish reasons LoRAX names, from the sequences the path gathers. A
    stop on neither the end token nor a stop sequence the node names or its tokens end on is no stop sequence
    (review: it was named one where stop sequences were asked)."""
    for stop, ids, named, reason in (
        (False, [7, 2], None, "eos_token"),
        (True, [7, 2], None, "eos_token"),
        (True, [7, 8], "zz", "stop_sequence"),
        (True, [7, 8], None, "eos_token"),
    ):
        w, c = _choices(stop)
        out = b""
        for tid in ids:
            text, scored = c.take_token(0, {"token_id": tid, "text": "" if tid == 2 else "a", "logprob": -0.5})
            out += c.chunk(w, 0, text, scored)
        c.take_finish(0, {"finish_reason": "stop"} | ({"stop_string": named} if named else {}))
        out += c.close_all(w, "stop", False) + w.end({})
        frames = [StreamResponse(**f) for f in _frames(out)]
        ended = ids[-1] == 2  # the end token is known to be the last: its frame is the last one
        assert [f.token.id for f in frames[: len(ids)]] == ids and len(frames) == len(ids) + (not ended)
        assert [f.token.special for f in frames] == [False, True] if ended else [False, False, not named]
        if not ended:  # the end came after the last token was sent: a token of id 0 carries it, and the stop's text
            assert (frames[-1].token.text, frames[-1].token.id) == (named or "", 0)
        assert frames[-1].details.finish_reason == reason and frames[-1].details.generated_tokens == len(ids)
        assert frames[-1].generated_text == "".join("" if t == 2 else "a" for t in ids) + (named or "")
        assert "".join(f.token.text for f in frames if not f.token.special) == frames[-1].generated_text
        assert all(f.generated_text is None for f in frames[:-1])


def _stopped(
    stops: list[str], relayed: list[tuple[int, str]], stream: bool, most: int = 8, named: str | None = None
) -> dict | list[dict]:
    """The answer (whole, or the stream's frames) of a sequence the node ended on a stop ("stop", no end token)
    after relaying these (token id, text) with its tokenizer's texts known; `most`: max_new_tokens."""
    c = Choices(
        chat=False,
        prompts=[[1, 5]],
        per_prompt=1,
        n=1,
        max_tokens=most,
        logprobs=True,
        eos_ids=frozenset({2}),
        stops=tuple(stops),  # the request's, as the path gives them (gateway.request)
    )
    c.texts = _Texts()
    route = LoraxGenerateStream if stream else LoraxGenerate
    req = route.model_validate({"inputs": "hi", "parameters": {"details": True, "stop": stops}})
    req.check()
    w, out = LoraxAnswer(req, c, prompt_tokens=2), b""
    for tid, text in relayed:
        text, scored = c.take_token(0, {"token_id": tid, "text": text, "logprob": -0.5})
        out += c.chunk(w, 0, text, scored)
    c.take_finish(0, {"finish_reason": "stop"} | ({"stop_string": named} if named else {}))
    if not stream:
        return w.whole("stop", False)
    return _frames(out + c.close_all(w, "stop", False) + w.end({}))


def test_the_stop_string_the_node_cut_is_read_back_from_the_tokens_and_kept():
    """The node leaves the stop string out of the text it relays (TextStream: the text before it); the writer reads
    which one it was from the tokens' decoding past the relayed text (the first asked that starts there, as the
    node looks for them in the order asked) and puts it back: the last token's text in details, and the stream's
    last frame (a token of that text, not special, so the tokens' texts make generated_text). What follows the stop
    string in its token is not kept (LoRAX stops only where the text ends with it). A stop the decoding does not
    show there (a node that ended for another reason) adds nothing, and names no stop sequence."""
    for stops, relayed, kept in (
        (["zz", "bc"], [(7, "a"), (8, "")], "abc"),  # "bcd": cut before "bc"; "d" dropped
        (["b", "bcd"], [(7, "a"), (8, "")], "ab"),  # both start there: the first asked
        (["a"], [(7, "")], "a"),
        (["zz"], [(7, "a"), (9, "b")], "ab"),  # no stop string at the cut: the text as relayed
    ):
        whole = _stopped(stops, relayed, stream=False)
        assert whole["generated_text"] == kept, (stops, whole)
        tokens = whole["details"]["tokens"]
        assert [t["id"] for t in tokens] == [tid for tid, _ in relayed]
        assert "".join(t["text"] for t in tokens) == kept and whole["details"]["generated_tokens"] == len(relayed)
        reason = "eos_token" if kept == "".join(t for _, t in relayed) else "stop_sequence"
        assert whole["details"]["finish_reason"] == reason
        frames = [StreamResponse(**f) for f in _stopped(stops, relayed, stream=True)]
        assert [f.token.id for f in frames[: len(relayed)]] == [tid for tid, _ in relayed]
        last = frames[-1]
        assert last.generated_text == kept and last.details.finish_reason == reason
        assert "".join(f.token.text for f in frames if not f.token.special) == kept
        assert last.details.generated_tokens == len(relayed)
        assert last.token.special == (kept == "".join(t for _, t in relayed))
    # the stop met on the max_new_tokens-th token: that token's frame, held as the last, ends with the stop string
    frames = [StreamResponse(**f) for f in _stopped(["bc"], [(7, "a"), (8, "")], stream=True, most=2)]
    assert [(f.token.id, f.token.text, f.token.special) for f in frames] == [(7, "a", False), (8, "bc", False)]
    assert frames[-1].generated_text == "abc" and frames[-1].details.finish_reason == "stop_sequence"


def test_a_stop_string_named_for_a_sequence_of_no_tokens_is_not_taken():
    """No token completed it: a node naming a stop string first (its finish before any token) made the whole answer
    with details a 500 (red team: its last token's text was read from an empty list); the answer is of no tokens,
    ended by none of them, whole and streamed."""
    whole = _stopped(["zz"], [], stream=False, named="zz")
    assert whole["generated_text"] == "" and whole["details"]["tokens"] == []
    assert whole["details"]["finish_reason"] == "eos_token"
    [last] = [StreamResponse(**f) for f in _stopped(["zz"], [], stream=True, named="zz")]
    assert last.generated_text == "" and (last.token.text, last.token.special) == ("", True)


def test_a_stream_the_node_broke_off_ends_in_the_error_the_client_raises_as_incomplete():
    w, c = _choices()
    text, scored = c.take_token(0, {"token_id": 7, "text": "a", "logprob": -0.5})
    out = c.chunk(w, 0, text, scored) + w.failed("node 0xab broke off; the response is incomplete")
    *tokens, error = _frames(out)
    assert [StreamResponse(**t).token.text for t in tokens] == ["a"]  # what was relayed (billed) reached the client
    assert isinstance(lorax.errors.parse_error(200, error), lorax.errors.IncompleteGenerationError)


def test_no_adapter_on_a_gateway_of_several_bases_asks_for_one_and_the_token_is_never_shown():
    req = LoraxGenerate.model_validate({"inputs": "hi", "parameters": {"api_token": "hf_secret"}})
    req.check()
    with pytest.raises(BadRequest) as ei:
        req.as_completion(None)  # gateway.catalog.ModelCatalog.only_base: several bases, or none
    assert "adapter_id" in str(ei.value)
    assert req.as_completion("tiny").model == "tiny"
    assert "hf_secret" not in repr(req) and "hf_secret" not in repr(req.as_completion("tiny"))


def test_each_token_is_sent_as_it_is_relayed_and_only_one_known_to_be_the_last_is_held():
    """A frame goes out with its token (LoRAX's router sends each token as it comes); the last one, which carries
    generated_text, is held only when it is known to be the last: max_new_tokens reached (here 4), or an end
    token. A stream the node breaks off still delivers a held token before its error."""
    w, c = _choices()
    sent = []
    for i, tid in enumerate((7, 8, 9, 10)):
        text, scored = c.take_token(0, {"token_id": tid, "text": f"t{i}", "logprob": -0.5})
        sent.append(_frames(c.chunk(w, 0, text, scored)))
    assert [[f["token"]["id"] for f in frames] for frames in sent] == [[7], [8], [9], []]
    assert all(f["generated_text"] is None and f["details"] is None for frames in sent for f in frames)
    c.take_finish(0, {"finish_reason": "length"})
    [last] = [StreamResponse(**f) for f in _frames(c.close_all(w, "length", False) + w.end({}))]
    assert last.token.id == 10 and last.generated_text == "t0t1t2t3"
    assert last.details.finish_reason == "length" and last.details.generated_tokens == 4

    w, c = _choices()
    text, scored = c.take_token(0, {"token_id": 2, "text": "", "logprob": -0.1})  # the end token: held
    assert c.chunk(w, 0, text, scored) == b""
    *held, error = _frames(w.failed("node 0xab broke off; the response is incomplete"))
    assert [f["token"]["id"] for f in held] == [2] and error["error_type"] == "incomplete_generation"


def _bounds(prop: dict) -> list:
    """The extreme values a LoraxParameters field's JSON schema allows (None included where it is)."""
    out = []
    for branch in prop.get("anyOf", [prop]):
        kind = branch.get("type")
        if kind == "null":
            out.append(None)
        elif kind == "boolean":
            out += [False, True]
        elif kind in ("integer", "number"):
            step = 1 if kind == "integer" else 1e-9
            lo = branch.get("minimum", branch.get("exclusiveMinimum", -(10**6)) + step)
            hi = branch.get("maximum", branch.get("exclusiveMaximum", 10**12) - step)
            out += [lo, hi] if kind == "integer" else [float(lo), float(hi), math.nextafter(float(hi), -math.inf)]
        elif kind == "string":
            out += ["x" * branch.get("minLength", 1), "x" * branch.get("maxLength", 300)]
        elif kind == "array" and branch.get("items", {}).get("type") == "string":
            items = branch["items"]
            out += [[], ["x" * items.get("maxLength", 300)] * branch.get("maxItems", 8)]
    return out


def test_a_request_lorax_shape_accepts_is_a_completion_that_validates():
    """as_completion builds its CompletionRequest without catching pydantic's ValidationError: every field of
    LoRAX's shape is typed as narrowly as the completion field it becomes. Each field at each of its bounds, in
    each mode (greedy, sampled, best_of; streamed or not; details), is a completion or a BadRequest by name."""
    schema = LoraxParameters.model_json_schema()
    names = [f"{'n' * 200}/{i}" for i in range(MAX_ENSEMBLE_ADAPTERS)]
    extra = [
        ("merged_adapters", {"ids": names, "weights": [MAX_ENSEMBLE_WEIGHT] * MAX_ENSEMBLE_ADAPTERS}),
        ("merged_adapters", {"ids": names[:2], "weights": [1e-9, 1e-9], "merge_strategy": "linear", "density": 0}),
        ("response_format", {"type": "json_object"}),
        ("response_format", {"type": "json_object", "schema": {"type": "object"}}),
        ("response_format", {"type": "json_schema", "schema": {"type": "array"}}),
    ]
    cases = [(name, v) for name, prop in schema["properties"].items() for v in _bounds(prop)] + extra
    assert {name for name, _ in cases} >= set(LoraxParameters.model_fields) - {"api_token"}
    modes = [{}, {"do_sample": True}, {"top_k": 3, "top_p": 0.5}, {"best_of": 4, "do_sample": True}]
    built = 0
    for name, value in cases:
        for mode in modes:
            for extra_params in ({}, {"details": True, "decoder_input_details": True}):
                params = mode | extra_params | {name: value}
                for route in (LoraxGenerate, LoraxGenerateStream, LoraxRequest):
                    req = route.model_validate({"inputs": "x" * 5, "parameters": params})
                    try:
                        req.check()
                        req.as_completion("tiny")
                        built += 1
                    except BadRequest:
                        pass
    assert built > 1000


# ---------------------------------------------------------------------------------------------- a stand-in node

STANDIN_MAX_MAX_TOKENS = 100


@pytest.fixture(scope="module")
def standin_world(tmp_path_factory, tiny_base):
    """A gateway (max_max_tokens 100) and a stand-in node (tests/utils/gateway.py: tokens " t0".." t4", ids
    10..14, steered by the prompt), for what a real node does not do on cue: pause between tokens, stop."""
    from transformers import AutoTokenizer

    base = base_model_id(tiny_base)
    node = StandInNode(Identity.generate(), base, tokens=5, tokenizer=AutoTokenizer.from_pretrained(str(tiny_base)))
    tmp = tmp_path_factory.mktemp("lorax_standin")
    with served_gateway(node, tmp, tiny_base, heartbeat_ttl_s=600, max_max_tokens=STANDIN_MAX_MAX_TOKENS) as served:
        srv, engine, key, sender, service = served
        yield srv, engine, key, node, sender, service, base


@pytest.fixture
def standin(standin_world):
    srv, engine, key, node, sender, service, base = standin_world
    service.directory.disputed.clear()  # each test stands alone
    node.delay = 0.0
    assert asyncio.run(sender.send_once()) == {srv.url: 200}
    try:
        yield srv, engine, key, node, service.templates.context_len(base)
    finally:
        node.delay = 0.0


def _leave_after_one_frame(url: str, key: str, path: str, body: dict, frame: str) -> tuple[str, str]:
    """A streamed request whose client leaves after its first token's frame: (request id, that frame)."""
    with httpx.stream("POST", url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith(frame):
                return r.headers["x-request-id"], line
    raise AssertionError("no frame came")


def test_a_client_leaving_a_stream_is_billed_the_tokens_it_was_sent_as_on_v1_completions(standin):
    """The node makes a token every 0.4 s; the client leaves once it read the first. Billed: 1, as the same
    client of /v1/completions is (tests/gateway/test_delivered.py), not a token held back and never sent."""
    srv, engine, key, node, _ = standin
    node.delay = 0.4
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 5}}
    rid, line = _leave_after_one_frame(srv.url, key, "/generate_stream", body, "data:")
    assert StreamResponse(**json.loads(line[5:])).token.text == " t0"
    done, usage = record_of(engine, rid)
    assert done.status == RequestStatus.CLIENT_CLOSED
    oai_body = {"model": TINY, "prompt": "hello", "max_tokens": 5, "stream": True}
    oai_rid, _ = _leave_after_one_frame(srv.url, key, "/v1/completions", oai_body, "data: {")
    _, oai_usage = record_of(engine, oai_rid)
    assert usage.completion_tokens == done.completion_tokens == oai_usage.completion_tokens == 1


def test_the_first_frame_comes_with_the_first_token(standin):
    """The node sends its first token, then nothing until the client has read that token's frame: the frame is not
    held until the second token comes (a gateway that held it would wait on a node that waits on it)."""
    srv, _, key, node, _ = standin
    node.gate.clear()
    body = {"inputs": "GATE_AFTER_1", "parameters": {"max_new_tokens": 3}}
    try:
        _, line = _leave_after_one_frame(srv.url, key, "/generate_stream", body, "data:")
    finally:
        node.gate.set()
    assert StreamResponse(**json.loads(line[5:])).token.text == " t0"


def test_a_stream_the_node_stops_ends_in_a_special_frame_of_no_text(standin):
    """The node stops after 3 tokens without an end token (a stop sequence does so too): each token was sent as
    it came, so the end is a frame of a special token of no text, carrying generated_text and details, which
    lorax-client takes; the tokens' texts still make the text, and the count is the tokens'."""
    srv, engine, key, _, _ = standin
    client = lorax.Client(srv.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    whole = client.generate("STOP_AT_3", max_new_tokens=5)
    frames = list(client.generate_stream("STOP_AT_3", max_new_tokens=5))
    assert [f.token.text for f in frames] == [" t0", " t1", " t2", ""]
    assert [f.token.special for f in frames] == [False, False, False, True]
    assert all(f.generated_text is None and f.details is None for f in frames[:3])
    last = frames[-1]
    assert last.generated_text == whole.generated_text == " t0 t1 t2"
    assert "".join(f.token.text for f in frames if not f.token.special) == last.generated_text
    assert last.details.generated_tokens == whole.details.generated_tokens == len(whole.details.tokens) == 3
    assert last.details.finish_reason == whole.details.finish_reason == "eos_token"  # no stop sequence asked
    # the node reaching max_new_tokens: the last token is known to be the last and carries the end itself
    frames = list(client.generate_stream("hello", max_new_tokens=5))
    assert [f.token.text for f in frames] == [" t0", " t1", " t2", " t3", " t4"]
    assert frames[-1].generated_text == " t0 t1 t2 t3 t4" and frames[-1].details.finish_reason == "length"
    # its end token (here followed by tokens past it, not relayed): known to be the last, it carries the end too
    frames = list(client.generate_stream("PAST_EOS", max_new_tokens=5))
    assert [(f.token.text, f.token.special) for f in frames] == [(" t0", False), ("", True)]
    assert frames[-1].generated_text == " t0" and frames[-1].details.finish_reason == "eos_token"
    assert frames[-1].details.generated_tokens == 2


def test_max_new_tokens_left_out_is_the_room_left_at_most_the_gateways_bound(standin):
    """The node is asked for what the context leaves after the inputs, capped at max_max_tokens (as a chat that
    names no max_tokens), whole or streamed."""
    srv, _, key, node, context = standin
    headers = {"Authorization": f"Bearer {key}"}
    for path in ("/generate", "/generate_stream"):
        r = httpx.post(srv.url + path, json={"inputs": "hello"}, headers=headers, timeout=30)
        assert r.status_code == 200 and node.requests[-1]["max_tokens"] == STANDIN_MAX_MAX_TOKENS, r.text
    long = "word " * 150
    r = httpx.post(srv.url + "/generate", json={"inputs": long, "parameters": {"details": True}}, headers=headers)
    assert r.status_code == 200, r.text
    prompt = r.json()["details"]["prompt_tokens"]
    assert context - prompt < STANDIN_MAX_MAX_TOKENS and node.requests[-1]["max_tokens"] == context - prompt
