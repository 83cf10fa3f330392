"""A key revoked while its requests run: they end at their next token, as its new requests are refused. A stolen
key's streams ran on to their max_tokens (up to the request deadline, 30 minutes) after the operator revoked it,
billed to the key's owner (red team)."""

from __future__ import annotations

import threading

import httpx
import pytest
from transformers import AutoTokenizer

from common.identity import Identity
from gateway.keys import create_key, revoke_key
from gateway.tables import RequestStatus
from node.adapters.basemodel import base_model_id
from tests.gateway import TINY
from tests.utils.gateway import StandInNode, poll, record_of, served_gateway

pytestmark = pytest.mark.integration


@pytest.fixture
def world(tmp_path, tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))  # the stand-in reads its steering words from the ids
    node = StandInNode(Identity.generate(), base_model_id(tiny_base), tokens=40, tokenizer=tokenizer)
    with served_gateway(node, tmp_path, tiny_base, key_cache_ttl_s=0.2) as (gw, engine, _, _, service):
        yield gw, engine, node, service


def _revoke_after_the_first_token(engine, node, service, send) -> tuple[object, object]:
    """Send a request the node holds after its first token; revoke its key meanwhile; let the node go on once the
    gateway knows. Returns (what `send` returned, the request's completion and usage rows)."""
    secret, key = create_key(engine, name="stolen")
    node.gate.clear()
    result = {}
    sender = threading.Thread(target=lambda: result.update(got=send(secret)), daemon=True)
    sender.start()
    poll(lambda: node.seen, timeout=30)  # the node has the request
    revoke_key(engine, key.id)
    poll(lambda: key.id in service.admission.revoked, timeout=30)
    node.gate.set()
    sender.join(60)
    return result["got"], record_of(engine, next(iter(node.seen)))


def test_a_revoked_keys_stream_ends_at_its_next_token_billed_for_what_it_got(world):
    gw, engine, node, service = world

    def stream(secret):
        with httpx.stream(
            "POST",
            gw.url + "/v1/completions",
            headers={"Authorization": f"Bearer {secret}"},
            json={"model": TINY, "prompt": "GATE_AFTER_1", "max_tokens": 40, "stream": True},
            timeout=60,
        ) as r:
            return [line for line in r.iter_lines() if line.startswith("data: ")]

    lines, (done, usage) = _revoke_after_the_first_token(engine, node, service, stream)
    texts = [line for line in lines if '"text"' in line]
    assert len(texts) == 1, lines  # 39 more came before
    assert "API key was revoked while it ran after 1 tokens" in lines[-1]
    assert done.status == RequestStatus.CLIENT_CLOSED  # ended as a client leaving: the node is not blamed
    assert (usage.completion_tokens, done.completion_tokens) == (1, 1)
    assert node.identity.node_id not in service.directory.disputed


def test_a_revoked_keys_whole_answer_is_refused_and_not_billed(world):
    gw, engine, node, service = world

    def whole(secret):
        return httpx.post(
            gw.url + "/v1/completions",
            headers={"Authorization": f"Bearer {secret}"},
            json={"model": TINY, "prompt": "GATE_AFTER_1", "max_tokens": 40},
            timeout=60,
        )

    r, (done, usage) = _revoke_after_the_first_token(engine, node, service, whole)
    assert r.status_code == 401 and "API key was revoked while it ran" in r.json()["error"]["message"]
    assert done.status == RequestStatus.CLIENT_CLOSED
    assert (usage.prompt_tokens, usage.completion_tokens) == (0, 0)  # nothing of it was given
