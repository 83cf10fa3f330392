"""Nothing served goes unrecorded when a process dies mid-stream.

- kill -9 of the gateway while several streams run: a restarted gateway on the same database closes every
  cut request from the receipt the node kept (GET /v1/requests/{id}/receipt): the receipt's completion
  count capped at max_tokens, the prompt count the gateway stored when it dispatched the request. The node
  is the real node API over the real engine (tiny base); the gateway is `loramesh gateway run`.
- kill -9 of a node while several streams run: each cut request is recorded at the gateway's count, which
  is what its client received, with no receipt."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from sqlmodel import Session, select

from common.identity import Identity
from devnet.anvil import free_port
from devnet.processes import ManagedProcess
from gateway.identity import load_or_create_gateway_key
from gateway.keys import create_key
from gateway.main import create_app
from gateway.settings import GatewaySettings
from gateway.tables import CompletionRecord, RequestStatus
from ledger.models import RecordStatus, UsageRecord
from node.adapters.basemodel import base_model_id, base_model_name
from node.heartbeat import HeartbeatSender
from node.receipts import check_receipt
from node.request_auth import gateway_public_key_hex
from tests.gateway import TINY
from tests.utils.gateway import add_node, make_db, poll, start_script_node
from tests.utils.servers import ServerThread

pytestmark = pytest.mark.integration

STREAMS = 4
GW_ENV = {
    "LORAMESH_GATEWAY_INSTANCE_LEASE_S": "1.5",
    "LORAMESH_GATEWAY_OUTBOX_PROBE_S": "0.2",
    "LORAMESH_GATEWAY_HEARTBEAT_TTL_S": "60",
}


class Beats:
    """The node's heartbeats to a gateway URL, from a thread (the gateway may be down for a while)."""

    def __init__(self, identity, gw_url: str, api_url: str, base: str, status_fn) -> None:
        self.sender = HeartbeatSender(
            identity, [gw_url], api_url=api_url, base_model_id=base, status_fn=status_fn, interval=0.3
        )
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.thread.start()

    async def _run(self) -> None:
        while not self.stop.is_set():
            await self.sender.send_once()
            await asyncio.sleep(0.3)


def records(engine, rids):
    with Session(engine) as s:
        done = {r: s.get(CompletionRecord, r) for r in rids}
        usage = {u.request_id: u for u in s.exec(select(UsageRecord).where(UsageRecord.request_id.in_(rids))).all()}
    return done, usage


def open_streams(url: str, key: str, body: dict, n: int) -> tuple[list[dict], list[threading.Thread]]:
    """n streamed requests, each read on in a thread of its own; returns once each has 3 token chunks."""
    states = [{"chunks": 0, "rid": None, "ended": None} for _ in range(n)]

    def run(st: dict) -> None:
        try:
            with httpx.stream(
                "POST", url + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, json=body, timeout=60
            ) as r:
                st["rid"] = r.headers["x-request-id"]
                for line in r.iter_lines():
                    if line.startswith("data: {") and '"choices":[{' in line and '"finish_reason":null' in line:
                        st["chunks"] += 1
                    elif line.startswith('data: {"error"'):
                        st["ended"] = "error"
            st["ended"] = st["ended"] or "eof"
        except httpx.HTTPError as e:
            st["ended"] = f"cut: {e!r}"

    threads = [threading.Thread(target=run, args=(st,), daemon=True) for st in states]
    for t in threads:
        t.start()
    poll(lambda: all(st["chunks"] >= 3 for st in states), timeout=60)
    return states, threads


def test_gateway_killed_mid_stream_is_reconciled_from_the_nodes_receipts(tiny_base, tmp_path):
    from node.api import create_app as node_app
    from node.engine import AsyncEngine, EngineConfig

    identity = Identity.generate()
    base = base_model_id(tiny_base)
    engine = AsyncEngine(EngineConfig(model_dir=tiny_base, num_kv_blocks=512, block_size=8, num_slots=2))
    # the gateway keeps its key across the restart (--gateway-key-file); the node trusts its signed calls
    gw_key = load_or_create_gateway_key(tmp_path / "gw.key")
    node = ServerThread(
        node_app(
            engine,
            identity.node_key,
            trusted_gateways={gateway_public_key_hex(gw_key)},
            operator_token="operator-token",
        )
    ).start()
    db = make_db(tmp_path / "gw.db")
    add_node(db, node_id=identity.node_id, base_model=base, api_url=node.url)
    key, _ = create_key(db, name="app")
    port = free_port()
    gw_url = f"http://127.0.0.1:{port}"
    args = [
        "gateway",
        "run",
        "--db",
        f"sqlite:///{tmp_path / 'gw.db'}",
        "--port",
        str(port),
        "--base",
        str(tiny_base),
        "--no-settle",
        "--gateway-key-file",
        str(tmp_path / "gw.key"),
    ]

    def status() -> dict:
        return {
            "node_id": identity.node_id,
            "base_model": {"name": base_model_name(tiny_base), "id": base},
            "queue_depth": 0,
        }

    beats = Beats(identity, gw_url, node.url, base, status)
    gateway = ManagedProcess("gateway", args, tmp_path / "gw1.log", env=GW_ENV).start()
    try:
        gateway.wait_until(
            lambda: httpx.get(gw_url + "/health", timeout=2).json()["live_nodes"] == 1,
            timeout=120,
            what="the node live",
        )
        body = {
            "model": base_model_name(tiny_base),
            "prompt": "once upon a time",
            "max_tokens": 400,
            "temperature": 0,
            "stream": True,
        }
        states, threads = open_streams(gw_url, key, body, STREAMS)
        gateway.kill()  # SIGKILL mid-stream: no finish, no record written by it
        for t in threads:
            t.join(30)
        rids = [st["rid"] for st in states]
        done, usage = records(db, rids)
        assert all(d.status == RequestStatus.OPEN for d in done.values()) and usage == {}
        prompt = done[rids[0]].prompt_tokens
        assert prompt > 0 and all(d.max_tokens == 400 for d in done.values())

        gateway = ManagedProcess("gateway", args, tmp_path / "gw2.log", env=GW_ENV).start()  # same database
        gateway.wait_http(gw_url + "/health")

        def closed():
            d, u = records(db, rids)
            return len(u) == STREAMS and all(r.status != RequestStatus.OPEN for r in d.values()) and (d, u)

        done, usage = poll(closed, timeout=60, interval=0.3)
        for st in states:
            d, u = done[st["rid"]], usage[st["rid"]]
            receipt = json.loads(u.receipt_json)
            check_receipt(receipt, u.node_signature, identity.node_public_key)
            assert d.status == RequestStatus.RECONCILED and u.status == RecordStatus.PENDING, (d.error, u.error)
            assert (u.prompt_tokens, u.node_prompt_tokens) == (prompt, prompt)
            assert u.completion_tokens == u.node_completion_tokens == receipt["completion_tokens"]
            assert d.completion_tokens == u.completion_tokens
            assert st["chunks"] <= u.completion_tokens <= 400  # at least what its client got
        assert any(json.loads(u.receipt_json)["finish_reason"] == "abort" for u in usage.values())  # cut, not done
    finally:
        beats.stop.set()
        gateway.stop()
        node.stop()
        db.dispose()


def test_node_killed_mid_stream_is_recorded_at_the_gateways_count(tiny_base, tmp_path):
    db = make_db(tmp_path / "gw.db")
    key, _ = create_key(db, name="app")
    base = base_model_id(tiny_base)
    settings = GatewaySettings(db_url=f"sqlite:///{tmp_path / 'gw.db'}", bases=[tiny_base], heartbeat_ttl_s=60)
    gw = ServerThread(create_app(settings)).start()
    port = free_port()
    proc, identity, url = start_script_node(
        tmp_path, "node", gw.url, base, mode="honest", tokens=300, delay=0.02, port=port
    )
    add_node(db, node_id=identity.node_id, base_model=base, api_url=url)
    try:
        poll(lambda: httpx.get(gw.url + "/health", timeout=2).json()["live_nodes"] == 1, timeout=60, interval=0.2)
        body = {"model": TINY, "prompt": "hello there", "max_tokens": 300, "stream": True}
        states, threads = open_streams(gw.url, key, body, 3)
        proc.kill()  # SIGKILL mid-stream: no receipt will ever come
        proc.wait(10)
        for t in threads:
            t.join(30)
        assert all(st["ended"] == "error" for st in states), states  # each stream says it is incomplete
        rids = [st["rid"] for st in states]
        done, usage = poll(lambda: (r := records(db, rids)) and len(r[1]) == 3 and r, timeout=30)
        for st in states:
            d, u = done[st["rid"]], usage[st["rid"]]
            assert d.status == RequestStatus.NODE_FAILED and u.status == RecordStatus.PENDING
            assert u.completion_tokens == d.completion_tokens == st["chunks"]  # exactly what its client received
            assert u.receipt_json is None and u.node_signature is None and u.node_completion_tokens is None
            assert u.prompt_tokens > 0
    finally:
        if proc.poll() is None:
            proc.kill()
        gw.stop()
        db.dispose()
