"""Nothing is served that could not be recorded: while the outbox database refuses writes (here: another
process holds SQLite's write lock), the gateway answers new requests with 503 outbox_unavailable and /health
says why; a request already streaming finishes, and its record is written once the database takes writes
again; then the gateway serves again by itself."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import httpx
import openai
import pytest
from sqlmodel import Session, select

from common.identity import Identity
from gateway.keys import create_key
from gateway.main import create_app
from gateway.settings import GatewaySettings
from gateway.tables import CompletionRecord
from ledger.models import UsageRecord
from node.adapters.basemodel import base_model_id
from node.heartbeat import HeartbeatSender
from tests.gateway import TINY
from tests.utils.gateway import StandInNode, add_node, make_db, poll
from tests.utils.servers import ServerThread

pytestmark = pytest.mark.integration


def make_world(tmp_path, tiny_base, probe_s: float):
    engine = make_db(tmp_path / "gw.db")
    base = base_model_id(tiny_base)
    # 3 s a stream: the one in flight must outlast the test taking the write lock (0.85 s margin at 0.1)
    node = StandInNode(Identity.generate(), base, tokens=10, delay=0.3)
    node_srv = ServerThread(node.app()).start()
    add_node(engine, node_id=node.identity.node_id, base_model=base, api_url=node_srv.url)
    key, _ = create_key(engine, name="app")
    settings = GatewaySettings(
        db_url=f"sqlite:///{tmp_path / 'gw.db'}",
        bases=[tiny_base],
        heartbeat_ttl_s=120,
        outbox_probe_s=probe_s,
        db_busy_timeout_s=0.2,
    )
    gw = ServerThread(create_app(settings)).start()
    sender = HeartbeatSender(node.identity, [gw.url], api_url=node_srv.url, base_model_id=base, status_fn=node.status)
    assert asyncio.run(sender.send_once()) == {gw.url: 200}
    return gw, engine, key, tmp_path / "gw.db", node, node_srv


@pytest.fixture
def world(tmp_path, tiny_base):
    gw, engine, key, path, _, node_srv = make_world(tmp_path, tiny_base, 0.1)
    try:
        yield gw, engine, key, path
    finally:
        gw.stop()
        node_srv.stop()
        engine.dispose()


def health(gw) -> httpx.Response:
    return httpx.get(gw.url + "/health", timeout=5)


def test_locked_outbox_refuses_then_recovers(world):
    gw, engine, key, path = world
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30)
    assert client.completions.create(model=TINY, prompt="hi", max_tokens=2).usage.completion_tokens == 2
    assert health(gw).status_code == 200 and health(gw).json()["outbox"] == {
        "writable": True,
        "error": None,
        "unwritten": 0,
    }

    # a request that is streaming when the database locks up
    got: dict = {}

    def stream() -> None:
        with httpx.stream(
            "POST",
            gw.url + "/v1/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": TINY, "prompt": "long one", "max_tokens": 10, "stream": True},
            timeout=30,
        ) as r:
            got["rid"] = r.headers["x-request-id"]
            got["chunks"] = [line for line in r.iter_lines() if line.startswith("data:")]

    t = threading.Thread(target=stream)
    t.start()
    poll(lambda: "rid" in got, timeout=10)
    lock = sqlite3.connect(path, isolation_level=None, timeout=5)
    lock.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        r = poll(lambda: (h := health(gw)).status_code == 503 and h, timeout=10)
        body = r.json()
        assert body["status"] == "unavailable" and not body["outbox"]["writable"]
        assert "locked" in body["outbox"]["error"]
        with pytest.raises(openai.InternalServerError) as ei:
            client.completions.create(model=TINY, prompt="hi", max_tokens=2)
        assert ei.value.status_code == 503 and ei.value.body["code"] == "outbox_unavailable"
        assert "locked" in ei.value.body["message"] and ei.value.response.headers["retry-after"]
        t.join(30)
        assert got["chunks"][-1] == "data: [DONE]"  # the request in flight was served to its end
        poll(lambda: health(gw).json()["outbox"]["unwritten"] == 1, timeout=10)  # its record waits
        text = httpx.get(gw.url + "/metrics").text
        assert "loramesh_gateway_outbox_writable 0.0" in text and "loramesh_gateway_outbox_unwritten 1.0" in text
    finally:
        lock.execute("ROLLBACK")
        lock.close()

    poll(lambda: health(gw).status_code == 200, timeout=10)
    assert health(gw).json()["outbox"] == {"writable": True, "error": None, "unwritten": 0}
    with Session(engine) as s:
        done = s.get(CompletionRecord, got["rid"])
        usage = s.exec(select(UsageRecord).where(UsageRecord.request_id == got["rid"])).one()
    assert done.status == "ok" and usage.completion_tokens == 10
    assert client.completions.create(model=TINY, prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_a_request_whose_open_record_cannot_be_written_is_refused(tmp_path, tiny_base):
    # the periodic check has not seen the lock yet: the request's own open record finds it
    gw, engine, key, path, node, node_srv = make_world(tmp_path, tiny_base, 60.0)
    lock = sqlite3.connect(path, isolation_level=None, timeout=5)
    try:
        lock.execute("BEGIN IMMEDIATE")
        r = httpx.post(
            gw.url + "/v1/completions",
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
            json={"model": TINY, "prompt": "hi", "max_tokens": 3},
        )
        assert r.status_code == 503 and r.json()["error"]["code"] == "outbox_unavailable", r.text
        assert health(gw).status_code == 503 and "locked" in health(gw).json()["outbox"]["error"]
        poll(lambda: node.aborted, timeout=10)  # the node, which had started on it, was told to stop
        lock.execute("ROLLBACK")
    finally:
        lock.close()
        gw.stop()
        node_srv.stop()
        engine.dispose()
