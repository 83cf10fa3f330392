"""Concurrent first chat requests right after a gateway starts are all served (found: they raced in
transformers' lazy imports while loading the tokenizer and its chat template: 500s, and the client's
keep-alive connection dropped). The gateway is a fresh `loramesh gateway run` process, so nothing of
transformers is imported in it before the requests."""

from __future__ import annotations

import threading

import httpx
import pytest

from gateway.keys import create_key
from node.adapters.basemodel import base_model_id, base_model_name
from tests.utils.gateway import add_node, make_db, poll, start_gateway_process, start_script_node

pytestmark = pytest.mark.integration

CONCURRENT = 8


def test_concurrent_first_chat_requests_are_all_served(tmp_path, tiny_base):
    engine = make_db(tmp_path / "gw.db")
    key, _ = create_key(engine, name="app")
    base = base_model_id(tiny_base)
    gw, url = start_gateway_process(
        tmp_path, f"sqlite:///{tmp_path / 'gw.db'}", bases=(tiny_base,), env={"LORAMESH_GATEWAY_HEARTBEAT_TTL_S": "60"}
    )
    node, identity, node_url = start_script_node(tmp_path, "node", url, base, mode="honest", tokens=2)
    add_node(engine, node_id=identity.node_id, base_model=base, api_url=node_url)
    try:
        gw.wait_http(url + "/health")
        poll(lambda: httpx.get(url + "/health", timeout=2).json()["live_nodes"] == 1, timeout=60, interval=0.2)
        body = {"model": base_model_name(tiny_base), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        results: list = [None] * CONCURRENT
        go = threading.Barrier(CONCURRENT)

        def ask(i: int) -> None:
            with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as c:
                go.wait()
                first = c.post("/v1/chat/completions", json=body)
                again = c.post("/v1/chat/completions", json=body)  # on the same keep-alive connection
                results[i] = (first.status_code, again.status_code, first.text[:200])

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(CONCURRENT)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert all(r is not None and r[:2] == (200, 200) for r in results), results
    finally:
        gw.stop()
        node.kill()
        node.wait(10)
        engine.dispose()
