"""OpenAI's usage.prompt_tokens_details.cache_write_tokens (Chat, Completions; optional there) and Responses'
usage.input_tokens_details.cache_write_tokens (required: the SDK's strict validation refuses a usage without it),
through the official openai client against a real gateway and a real tiny-model node (8-token KV blocks): the
prompt tokens a request wrote into the node's prefix cache, its full blocks not found there. An older node that
does not say: Chat leaves the field out, Responses shows 0."""

from __future__ import annotations

import os

import httpx
import openai
import pytest
from openai.types.responses import ResponseUsage

from gateway.keys import create_key
from gateway.main import create_app
from gateway.openai_api import usage_dict
from gateway.responses_api import responses_usage
from gateway.settings import GatewaySettings
from node.adapters.basemodel import base_model_id
from tests.gateway import TINY
from tests.gateway.conftest import chat
from tests.utils.gateway import add_node, make_db, poll, start_script_node
from tests.utils.servers import ServerThread

pytestmark = pytest.mark.integration

BLOCK = 8  # tests/utils/stack.py:start_node's block_size


def _split(prompt_tokens: int, cached: int, written: int, *, cold: bool) -> None:
    """A first asking reads the cached prefix and writes every full block after it; the same prompt again writes
    nothing and reads all its full blocks but the last token's."""
    full = prompt_tokens // BLOCK * BLOCK
    if cold:
        assert written > 0 and cached + written == full, (prompt_tokens, cached, written)
    else:
        assert (cached, written) == ((prompt_tokens - 1) // BLOCK * BLOCK, 0), prompt_tokens


def test_chat_and_completions_say_the_prompt_tokens_written_into_the_cache(oai):
    messages = [{"role": "user", "content": f"Remember {os.urandom(16).hex()} and tell me about Paris."}]
    for cold in (True, False):
        u = chat(oai, messages=messages, max_tokens=4, temperature=0).usage
        _split(
            u.prompt_tokens,
            u.prompt_tokens_details.cached_tokens,
            u.prompt_tokens_details.cache_write_tokens,
            cold=cold,
        )
    streamed = list(chat(oai, messages=messages, max_tokens=4, stream=True, stream_options={"include_usage": True}))
    u = streamed[-1].usage
    _split(
        u.prompt_tokens, u.prompt_tokens_details.cached_tokens, u.prompt_tokens_details.cache_write_tokens, cold=False
    )
    ids = [50 + i for i in range(27)]  # 3 full blocks and 3 tokens
    for cold in (True, False):
        u = oai.completions.create(model=TINY, prompt=ids, max_tokens=2).usage
        _split(
            u.prompt_tokens,
            u.prompt_tokens_details.cached_tokens,
            u.prompt_tokens_details.cache_write_tokens,
            cold=cold,
        )
    # n choices of one prompt write it once
    u = oai.completions.create(model=TINY, prompt=[60 + i for i in range(19)], max_tokens=2, n=3, seed=1).usage
    assert (u.prompt_tokens_details.cached_tokens, u.prompt_tokens_details.cache_write_tokens) == (0, 16)


def test_a_responses_usage_passes_the_sdks_strict_validation_with_cache_write_tokens(served, oai):
    strict = openai.OpenAI(
        base_url=served.url + "/v1",
        api_key=served.api_key,
        max_retries=0,
        timeout=120,
        _strict_response_validation=True,
    )
    question = f"Remember {os.urandom(16).hex()} and tell me about Lyon."
    for cold in (True, False):
        raw = oai.responses.with_raw_response.create(model=TINY, input=question, max_output_tokens=4, temperature=0)
        usage = ResponseUsage.model_validate(raw.http_response.json()["usage"])  # strict: every required field
        d = usage.input_tokens_details
        _split(usage.input_tokens, d.cached_tokens, d.cache_write_tokens, cold=cold)
    r = strict.responses.create(model=TINY, input=question, max_output_tokens=4, temperature=0)
    d = r.usage.input_tokens_details
    _split(r.usage.input_tokens, d.cached_tokens, d.cache_write_tokens, cold=False)
    events = list(strict.responses.create(model=TINY, input=question, max_output_tokens=4, stream=True))
    [done] = [e for e in events if e.type in ("response.completed", "response.incomplete")]
    d = done.response.usage.input_tokens_details
    _split(done.response.usage.input_tokens, d.cached_tokens, d.cache_write_tokens, cold=False)


def test_usage_without_a_nodes_count_leaves_chat_without_it_and_says_0_in_responses():
    for cached, written in ((5, None), (5, 3)):
        chat_usage = usage_dict(10, 2, cached, written)
        said = chat_usage["prompt_tokens_details"].get("cache_write_tokens")
        assert said == written and ("cache_write_tokens" in chat_usage["prompt_tokens_details"]) == (
            written is not None
        )
        got = ResponseUsage.model_validate(responses_usage(chat_usage)).input_tokens_details
        assert (got.cached_tokens, got.cache_write_tokens) == (cached, written or 0)
    assert "prompt_tokens_details" not in usage_dict(10, 2, None, 3)  # usage so far, before the done event


def test_an_older_node_that_does_not_say_what_it_wrote(tmp_path, tiny_base):
    """A node of before cache_write_tokens (tests/utils/rogue_node.py, honest: its done event's usage has
    cached_tokens alone, and more of them than the prompt): Chat's usage leaves the field out, Responses' says 0 and
    passes the SDK's strict validation."""
    engine = make_db(tmp_path / "gw.db")
    key, _ = create_key(engine, name="app")
    base = base_model_id(tiny_base)
    app = create_app(GatewaySettings(db_url=f"sqlite:///{tmp_path / 'gw.db'}", bases=[tiny_base], heartbeat_ttl_s=60))
    gw = ServerThread(app).start()
    trust = ("--trust", app.state.gateway.gateway_key_hex)
    proc, identity, url = start_script_node(tmp_path, "old", gw.url, base, mode="honest", tokens=2, extra_args=trust)
    add_node(engine, node_id=identity.node_id, base_model=base, api_url=url)
    try:
        poll(lambda: httpx.get(gw.url + "/health", timeout=2).json()["live_nodes"] == 1, timeout=60, interval=0.2)
        strict = openai.OpenAI(
            base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=60, _strict_response_validation=True
        )
        u = strict.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=2).usage
        assert u.prompt_tokens_details.cached_tokens == 0 and u.prompt_tokens_details.cache_write_tokens is None
        assert "cache_write_tokens" not in u.prompt_tokens_details.model_fields_set
        r = strict.responses.create(model=TINY, input="hi", max_output_tokens=2)
        d = r.usage.input_tokens_details
        assert (d.cached_tokens, d.cache_write_tokens) == (0, 0)
    finally:
        proc.kill()
        proc.wait(10)
        gw.stop()
        engine.dispose()
