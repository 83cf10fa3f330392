"""GET /health checks what it claims (node/health.py): the engine's loop answers, the adapter store takes
writes, the chain answers; 503 when the node cannot serve, "degraded" when only the chain is down."""

from __future__ import annotations

import time

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import node.health as health_module
from devnet.anvil import free_port
from ledger.chain import make_web3
from node.api import create_app
from node.engine import AsyncEngine
from node.health import NodeHealth
from tests.utils.engine import make_world
from tests.utils.servers import ServerThread

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("health-world"), specs=())


def _serve(world, health=None, *, engine=None):
    engine = engine or AsyncEngine(world.config(num_kv_blocks=32, block_size=8, max_model_len=128))
    app = create_app(engine, Ed25519PrivateKey.generate(), trusted_gateways=set(), operator_token="t", health=health)
    return engine, ServerThread(app).start(timeout=30)


def test_a_healthy_node_says_what_it_checked(world, tmp_path):
    engine = AsyncEngine(world.config(num_kv_blocks=32, block_size=8, max_model_len=128))
    _, server = _serve(world, NodeHealth(engine, store_dir=tmp_path / "store"), engine=engine)
    try:
        r = httpx.get(server.url + "/health", timeout=30)
        assert r.status_code == 200 and r.json() == {"status": "ok", "checks": {"engine": "ok", "store": "ok"}}
        assert not any((tmp_path / "store" / ".tmp").iterdir())  # the probe cleans up after itself
    finally:
        server.stop()


def test_an_unwritable_store_is_a_503(world, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    engine = AsyncEngine(world.config(num_kv_blocks=32, block_size=8, max_model_len=128))
    _, server = _serve(world, NodeHealth(engine, store_dir=blocker / "store"), engine=engine)
    try:
        r = httpx.get(server.url + "/health", timeout=30)
        assert r.status_code == 503 and r.json()["status"] == "failing"
        assert r.json()["checks"]["store"].startswith("the adapter store cannot be written")
    finally:
        server.stop()


def test_a_chain_that_is_down_degrades_but_serves(world, tmp_path):
    dead = make_web3(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    engine = AsyncEngine(world.config(num_kv_blocks=32, block_size=8, max_model_len=128))
    checks = NodeHealth(engine, store_dir=tmp_path / "store", block_number=lambda: dead.eth.block_number)
    _, server = _serve(world, checks, engine=engine)
    try:
        r = httpx.get(server.url + "/health", timeout=30)
        assert r.status_code == 200 and r.json()["status"] == "degraded"
        assert r.json()["checks"]["chain"].startswith("the chain cannot be reached")
    finally:
        server.stop()


def test_a_stuck_engine_loop_is_a_503_and_checks_are_not_repeated_within_a_second(world, monkeypatch):
    engine = AsyncEngine(world.config(num_kv_blocks=32, block_size=8, max_model_len=128))
    checks = NodeHealth(engine)
    calls = []
    real_call = engine.call
    engine.call = lambda fn: calls.append(fn) or real_call(fn)
    _, server = _serve(world, checks, engine=engine)
    try:
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        assert len(calls) == 1  # the second answer was the first's, a moment old

        # the engine's answer is waited for 0.3 s from here only: a fresh engine's first one may take longer
        monkeypatch.setattr(health_module, "ENGINE_TIMEOUT_S", 0.3)
        engine.call(lambda: time.sleep(1.5))  # a step that takes its time
        monkeypatch.setattr(health_module, "CACHE_S", 0.0)
        r = httpx.get(server.url + "/health", timeout=30)
        assert r.status_code == 503 and "did not answer within" in r.json()["checks"]["engine"]
    finally:
        server.stop()
