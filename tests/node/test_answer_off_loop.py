"""What a node writes back that can be megabytes is built on a worker thread, not on the event loop every other
stream, receipt and health check waits on: a whole answer (64 sequences with 20 logprobs a token was 13.7 MB
and held /status 3.8 s in a helper's run) and a prompt's scores (one event for the whole prompt)."""

from __future__ import annotations

import asyncio
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.api import create_app
from node.api.routes import generate
from node.engine import AsyncEngine
from tests.utils.engine import make_world
from tests.utils.node_auth import Gateway, node_id_for
from tests.utils.servers import ServerThread


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    world = make_world(tmp_path_factory.mktemp("answers"), specs=())
    engine = AsyncEngine(world.config(num_kv_blocks=512, block_size=8, max_model_len=128))
    gw, key = Gateway(), Ed25519PrivateKey.generate()
    server = ServerThread(create_app(engine, key, trusted_gateways={gw.public_hex}, operator_token="t")).start(30)
    client = gw.client(server.url, node_id_for(key))
    yield client
    client.close()
    server.stop()


def _recording(monkeypatch, name: str) -> list[bool]:
    """Wrap generate.<name> so each call records whether it ran where an event loop runs."""
    on_loop: list[bool] = []
    real = getattr(generate, name)

    def wrapped(*args):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return real(*args)

    monkeypatch.setattr(generate, name, wrapped)
    return on_loop


BODY = {"prompt_token_ids": [[5, 6, 7], [8, 9]], "n": 2, "max_tokens": 3, "logprobs": 3, "prompt_logprobs": 2}


def test_a_whole_answer_is_built_off_the_loop(node, monkeypatch):
    on_loop = _recording(monkeypatch, "_whole_answer")
    r = node.post("/v1/generate", json=BODY | {"temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    got = r.json()
    assert on_loop == [False]
    assert len(got["choices"]) == 4 and all(len(c["logprobs"]) == 3 == len(c["token_ids"]) for c in got["choices"])
    assert len(got["choices"][0]["logprobs"][0]["top_logprobs"]) == 3
    assert [len(p) for p in got["prompt_logprobs"]] == [3, 2] and got["prompt_logprobs"][0][0] is None
    assert got["usage"]["completion_tokens"] == 12 and got["receipt"]["completion_tokens"] == 12 and got["signature"]


def test_a_prompts_scores_are_encoded_off_the_loop(node, monkeypatch):
    on_loop = _recording(monkeypatch, "_prompt_logprobs_frame")
    events = []
    with node.stream("POST", "/v1/generate", json=BODY | {"stream": True, "temperature": 0}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    scores = [e for e in events if e["type"] == "prompt_logprobs"]
    assert on_loop == [False, False]
    assert sorted((e["prompt_index"], len(e["entries"])) for e in scores) == [(0, 3), (1, 2)]
