"""A rogue node: registered on chain, heartbeating, it streams 2 tokens and signs a correct receipt claiming
5,000,000 prompt + 5,000,000 completion tokens. The gateway bills what it delivered: the client sees the
gateway's count, the outbox keeps the record DISPUTED with both counts, the node is dropped from routing
and shown in /health and /metrics, and nothing of it settles, while an honest node's request does.

Real parts: anvil with the contracts, the node as its own process (tests/utils/rogue_node.py), the gateway
in a real uvicorn with its in-process settler, the official openai client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from sqlmodel import Session, select
from transformers import AutoTokenizer

from gateway.keys import create_key
from gateway.main import create_app
from gateway.settings import GatewaySettings
from gateway.tables import CompletionRecord
from ledger.models import RecordStatus, UsageRecord
from node.adapters.basemodel import base_model_id
from node.receipts import check_receipt
from tests.gateway import TINY
from tests.utils.gateway import add_node, make_db, poll, start_script_node
from tests.utils.rogue_node import ROGUE_CLAIM
from tests.utils.servers import ServerThread

pytestmark = pytest.mark.integration


def stop(proc) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


@pytest.fixture
def gw(anvil_chain, tiny_base, tmp_path):
    engine = make_db(tmp_path / "gw.db")
    key, _ = create_key(engine, name="app")
    settings = GatewaySettings(
        db_url=f"sqlite:///{tmp_path / 'gw.db'}",
        deployment=anvil_chain.deployment_path,
        bases=[tiny_base],
        registry_sync_s=0.3,
        settle_interval_s=0.3,
        heartbeat_ttl_s=30,
    )
    app = create_app(settings, chain_client=anvil_chain.client(), settler_account=anvil_chain.settler)
    server = ServerThread(app).start()
    try:
        yield server, engine, key
    finally:
        server.stop()
        engine.dispose()


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=5).json()


def test_rogue_node_is_disputed_dropped_and_never_settled(gw, anvil_chain, tiny_base, tmp_path):
    server, engine, key = gw
    base = base_model_id(tiny_base)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30)
    rogue, rogue_id, _ = start_script_node(tmp_path, "rogue", server.url, base, mode="rogue", chain=anvil_chain)
    honest = None
    try:
        poll(lambda: health(server.url)["live_nodes"] == 1, timeout=60, interval=0.2)
        models = {m.id: m.model_extra for m in client.models.list()}
        assert models[TINY]["price_per_1k_tokens_wei"] == str(anvil_chain.client().base_price())  # the base price

        raw = client.completions.with_raw_response.create(model=TINY, prompt="hello world, how are you", max_tokens=8)
        r, rid = raw.parse(), raw.headers["x-request-id"]
        prompt_ids = AutoTokenizer.from_pretrained(str(tiny_base)).encode("hello world, how are you")
        # the client is shown what the gateway saw, not the receipt's claim
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt_ids), 2)
        assert r.usage.prompt_tokens_details.cached_tokens == 0  # its claim of more than the prompt is not shown
        assert r.usage.prompt_tokens_details.cache_write_tokens == 0  # nor of more written
        assert r.choices[0].text == " w0 w1"

        with Session(engine) as s:
            u = s.exec(select(UsageRecord).where(UsageRecord.request_id == rid)).one()
            done = s.get(CompletionRecord, rid)
        assert u.status == RecordStatus.DISPUTED
        assert (u.prompt_tokens, u.completion_tokens) == (len(prompt_ids), 2)
        assert (u.node_prompt_tokens, u.node_completion_tokens) == (ROGUE_CLAIM, ROGUE_CLAIM)
        assert "5000000" in u.error and "disputed" in done.error
        check_receipt(json.loads(u.receipt_json), u.node_signature, rogue_id.node_public_key)  # signed, still refused

        h = health(server.url)
        assert h["live_nodes"] == 0 and [d["node_id"] for d in h["disputed_nodes"]] == [rogue_id.node_id]
        assert "5000000" in h["disputed_nodes"][0]["reason"]
        metrics = httpx.get(server.url + "/metrics").text
        assert f'loramesh_gateway_disputed_node{{node_id="{rogue_id.node_id}"}} 1.0' in metrics
        # dropped from routing though it still heartbeats: its base model is served by nobody now (the base
        # keeps its name: 503, not 404)
        with pytest.raises(openai.InternalServerError) as ei:
            client.completions.create(model=TINY, prompt="again", max_tokens=2)
        assert ei.value.status_code == 503 and ei.value.body["code"] == "no_node_available"
        assert health(server.url)["live_nodes"] == 0

        # an honest node takes over; its request settles, the disputed one never does
        honest, honest_id, _ = start_script_node(
            tmp_path, "honest", server.url, base, mode="honest", chain=anvil_chain, tokens=3
        )
        poll(lambda: health(server.url)["live_nodes"] == 1, timeout=60, interval=0.2)
        raw = client.completions.with_raw_response.create(model=TINY, prompt="hello", max_tokens=3)
        ok_rid = raw.headers["x-request-id"]
        assert raw.headers["x-loramesh-node"] == honest_id.node_id and raw.parse().usage.completion_tokens == 3

        def status_of(request_id):
            with Session(engine) as s:
                return s.exec(select(UsageRecord.status).where(UsageRecord.request_id == request_id)).one()

        poll(lambda: status_of(ok_rid) == RecordStatus.SETTLED, timeout=60, interval=0.3)
        assert status_of(rid) == RecordStatus.DISPUTED
        settled = {r.request_id for r in anvil_chain.client().settled_records()}
        assert ok_rid in settled and rid not in settled
        # the in-process settler's view: on /health (at most STATUS_TTL_S old) and /metrics
        poll(lambda: health(server.url)["settlement"]["settled"] >= 1, timeout=15, interval=0.5)
        st = health(server.url)["settlement"]
        assert st["disputed"] == 1 and st["deposit_low"] is False and st["settler"] == anvil_chain.settler.address
        metrics = httpx.get(server.url + "/metrics").text
        assert 'loramesh_gateway_settlement_records{state="disputed"} 1.0' in metrics
        assert "loramesh_gateway_settler_deposit_low 0.0" in metrics
    finally:
        stop(rogue)
        if honest is not None:
            stop(honest)


def test_node_streaming_on_after_the_client_left_is_paid_what_the_client_got(tiny_base, tmp_path):
    # the node ignores the abort: it streams every other token the request allows at once, then a receipt
    # for all of them. The gateway reads them (for the receipt) but pays only the tokens its client got;
    # the receipt is consistent (the node made more than was delivered), so the node stays in routing.
    db = make_db(tmp_path / "gw.db")
    key, _ = create_key(db, name="app")
    base = base_model_id(tiny_base)
    settings = GatewaySettings(db_url=f"sqlite:///{tmp_path / 'gw.db'}", bases=[tiny_base], heartbeat_ttl_s=60)
    gw = ServerThread(create_app(settings)).start()
    proc, identity, url = start_script_node(
        tmp_path, "greedy", gw.url, base, mode="honest", tokens=100, delay=0.3, extra_args=("--ignore-abort",)
    )
    add_node(db, node_id=identity.node_id, base_model=base, api_url=url)
    try:
        poll(lambda: health(gw.url)["live_nodes"] == 1, timeout=60, interval=0.2)
        with httpx.stream(
            "POST",
            gw.url + "/v1/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": TINY, "prompt": "hello", "max_tokens": 100, "stream": True},
            timeout=30,
        ) as r:
            rid = r.headers["x-request-id"]
            for line in r.iter_lines():
                if line.startswith("data: {") and '"text":" w0"' in line:
                    break  # one token read, then the client hangs up

        def record():
            with Session(db) as s:
                u = s.exec(select(UsageRecord).where(UsageRecord.request_id == rid)).first()
                return u and (s.get(CompletionRecord, rid), u)

        done, u = poll(record, timeout=30)
        assert done.status == "client_closed" and (u.completion_tokens, done.completion_tokens) == (1, 1)
        assert u.node_completion_tokens == 100 and u.status == RecordStatus.PENDING
        assert health(gw.url)["disputed_nodes"] == []
    finally:
        stop(proc)
        gw.stop()
        db.dispose()
