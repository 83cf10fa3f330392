"""A hung node is failed over before the first token, within first_byte_timeout_s, not after the stream's read
timeout (found: a SIGSTOPped node held a request 60 s). Two node processes (tests/utils/rogue_node.py, which
accept only calls signed by this gateway's key); the one the router picks first is stopped with SIGSTOP."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from gateway.keys import create_key
from gateway.main import create_app
from gateway.settings import GatewaySettings
from node.adapters.basemodel import base_model_id
from tests.gateway import TINY
from tests.utils.gateway import add_node, make_db, poll, start_script_node
from tests.utils.servers import ServerThread

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("stream", [False, True])
def test_a_stopped_node_is_failed_over_before_the_first_token(tmp_path, tiny_base, stream):
    engine = make_db(tmp_path / "gw.db")
    key, _ = create_key(engine, name="app")
    base = base_model_id(tiny_base)
    settings = GatewaySettings(
        db_url=f"sqlite:///{tmp_path / 'gw.db'}", bases=[tiny_base], heartbeat_ttl_s=60, first_byte_timeout_s=2.0
    )
    app = create_app(settings)
    gw = ServerThread(app).start()
    trust = ("--trust", app.state.gateway.gateway_key_hex)
    nodes = [
        (
            *start_script_node(tmp_path, f"n{i}", gw.url, base, mode="honest", tokens=2, extra_args=trust),
            tmp_path / f"n{i}.key.calls",
        )
        for i in range(2)
    ]
    for _, identity, url, _ in nodes:
        add_node(engine, node_id=identity.node_id, base_model=base, api_url=url)
    hung, healthy = sorted(nodes, key=lambda n: n[1].node_id)  # equal load: the lower node id is tried first
    try:
        poll(lambda: httpx.get(gw.url + "/health", timeout=2).json()["live_nodes"] == 2, timeout=60, interval=0.2)
        os.kill(hung[0].pid, signal.SIGSTOP)
        started = time.monotonic()
        body = {"model": TINY, "prompt": "hello", "max_tokens": 2, "stream": stream}
        with httpx.stream(
            "POST", gw.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as r:
            text = r.read().decode()
        took = time.monotonic() - started
        assert r.status_code == 200, text
        assert r.headers["x-loramesh-node"] == healthy[1].node_id
        assert "w0" in text and "w1" in text
        assert took < 10, took  # the stream's read timeout (node_timeout_s) is 60 s
        calls = healthy[3].read_text()
        assert f"/v1/generate {app.state.gateway.gateway_key_hex}" in calls and "refused" not in calls
    finally:
        for proc, *_ in nodes:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait(10)
        gw.stop()
        engine.dispose()
