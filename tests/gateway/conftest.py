"""A real gateway and one real tiny-model node, once per module that asks for them (`oai`: the official openai
client on it), and the small helpers those modules share."""

from __future__ import annotations

import httpx
import openai
import pytest
from sqlmodel import Session, select

from ledger.models import RecordStatus, UsageRecord
from tests.gateway import TINY
from tests.utils.gateway import poll
from tests.utils.stack import start_gateway, start_node

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    """The tiny base's tokenizer, as a stand-in node decodes the prompts it is sent with."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_base))


@pytest.fixture(scope="module")
def served(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    # echo's bound low enough for the tiny bases' 512-token context to reach (test_openai_fields.py)
    gw = start_gateway(root / "gateway", tiny_base, max_echoed_positions=2048)
    node = start_node(tiny_base, gateway=gw, num_slots=4, num_kv_blocks=512)
    poll(lambda: httpx.get(gw.url + "/health", timeout=5).json().get("live_nodes") == 1, timeout=30)
    try:
        yield gw
    finally:
        node.stop()
        gw.stop()


@pytest.fixture(scope="module")
def oai(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=served.api_key, max_retries=0, timeout=120)


def complete(oai, **kw):
    return oai.completions.create(model=TINY, **({"prompt": PROMPT, "max_tokens": 8} | kw))


def chat(oai, **kw):
    return oai.chat.completions.create(model=TINY, **({"messages": MESSAGES, "max_tokens": 8} | kw))


def refused(call, param: str) -> str:
    """The message of a 400 naming `param`."""
    with pytest.raises(openai.BadRequestError) as ei:
        call()
    assert ei.value.body["param"] == param, ei.value.body
    return ei.value.body["message"]


def usage_row(gw, rid: str) -> UsageRecord:
    def get():
        with Session(gw.db) as s:
            return s.exec(select(UsageRecord).where(UsageRecord.request_id == rid)).first()

    return poll(get, timeout=20)


def agree(gw, raw) -> object:
    """The parsed answer, once its usage, the node's receipt and the usage row say the same counts (a chat's or a
    completion's usage, or a Responses one's)."""
    body = raw.parse()
    row = usage_row(gw, raw.headers["x-request-id"])
    u = body.usage
    counts = (u.input_tokens, u.output_tokens) if hasattr(u, "input_tokens") else (u.prompt_tokens, u.completion_tokens)
    assert row.status != RecordStatus.DISPUTED, row.error
    assert counts == (row.prompt_tokens, row.completion_tokens)
    assert (row.node_prompt_tokens, row.node_completion_tokens) == (row.prompt_tokens, row.completion_tokens)
    return body
