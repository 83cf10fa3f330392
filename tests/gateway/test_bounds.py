"""Counts are bounded by max_tokens and the context: a node that streams past max_tokens is cut off there
(the client gets and is billed max_tokens; the receipt claiming more leaves the record disputed), and a
prompt the context cannot hold is refused by the gateway itself."""

from __future__ import annotations

import openai
import pytest
from sqlmodel import Session, select

from common.identity import Identity
from ledger.models import RecordStatus, UsageRecord
from node.adapters.basemodel import base_model_id
from tests.gateway import TINY
from tests.utils.gateway import StandInNode, gateway_over, poll

pytestmark = pytest.mark.integration


@pytest.fixture
def world(tmp_path, tiny_base):
    node = StandInNode(Identity.generate(), base_model_id(tiny_base), tokens=10, ignore_max_tokens=True)
    with gateway_over(node, tmp_path, tiny_base, heartbeat_ttl_s=120) as (gw, engine, key):
        yield openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20), engine, node


@pytest.mark.parametrize("stream", [False, True])
def test_tokens_past_max_tokens_are_not_relayed_nor_billed(world, stream):
    client, engine, node = world
    if stream:
        chunks = list(
            client.completions.create(
                model=TINY, prompt="x", max_tokens=3, stream=True, stream_options={"include_usage": True}
            )
        )
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        usage, reason = chunks[-1].usage, [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        r = client.completions.create(model=TINY, prompt="x", max_tokens=3)
        text, usage, reason = r.choices[0].text, r.usage, r.choices[0].finish_reason
    assert text == " t0 t1 t2" and usage.completion_tokens == 3 and reason == "length"
    (u,) = poll(lambda: Session(engine).exec(select(UsageRecord)).all())
    assert u.completion_tokens == 3 and u.status == RecordStatus.DISPUTED and u.node_completion_tokens > 4


def test_prompt_longer_than_the_context_is_refused_by_the_gateway(world):
    client, _, node = world
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model=TINY, prompt=[5] * 600, max_tokens=3)  # the tiny base holds 512
    assert ei.value.body["code"] == "context_length_exceeded" and "512" in ei.value.body["message"]
    assert node.requests == []
