"""A bounded load test: a few hundred requests through a real gateway to two real tiny-model nodes.

Mixed models (the base and two adapters), completions and chat, streaming and not, with about one stream in
ten cut by its client after the first token, 16 at a time. Asserted: no 5xx and no error event, every answer
whole, and every request the gateway served recorded exactly once (a usage record for the ledger and a closed
request row) with the counts the client was given. The gateway signs its calls to the nodes, and the nodes
trust its key as learned from their heartbeats (tests/utils/stack.py), as in production.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import pytest
from sqlmodel import Session, select

from gateway.tables import CompletionRecord, RequestStatus
from ledger.models import RecordStatus, UsageRecord
from node.adapters import AdapterStore
from tests.gateway import TINY
from tests.utils.factories import make_package
from tests.utils.gateway import poll
from tests.utils.stack import register_adapter, start_gateway, start_node

pytestmark = pytest.mark.integration

REQUESTS = 300
CONCURRENCY = 16
CUT_SHARE = 0.1  # of all requests: a streaming client that goes away after its first token
ADAPTERS = ("load/alpha", "load/beta")


@dataclass
class Outcome:
    kind: str  # "stream" | "plain" | "cut"
    model: str
    status: int
    rid: str | None = None
    usage: dict | None = None  # what the client was told it used (completed requests)
    error: str | None = None


@pytest.fixture(scope="module")
def stack(tiny_base, tmp_path_factory, publisher):
    root = tmp_path_factory.mktemp("load")
    packages = [
        make_package(tiny_base, root / f"pkg{i}", account=publisher, name=name, seed=20 + i, rank=4)
        for i, name in enumerate(ADAPTERS)
    ]
    gw = start_gateway(root / "gateway", tiny_base)
    nodes = []
    try:
        for i in range(2):
            store = AdapterStore(root / f"store{i}")
            for p in packages:
                store.install(p.path)
            nodes.append(start_node(tiny_base, gateway=gw, store=store, num_slots=4, num_kv_blocks=256))
        for name, p in zip(ADAPTERS, packages):
            register_adapter(gw, adapter_id=p.adapter_id, name=name, tiny_base=tiny_base)
        poll(lambda: httpx.get(gw.url + "/health", timeout=5).json().get("live_nodes") == 2, timeout=30)

        def listed() -> bool:  # the gateway reads its registry mirror every registry_sync_s
            r = httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {gw.api_key}"}, timeout=5)
            return set(ADAPTERS) <= {m["id"] for m in r.json()["data"]}

        poll(listed, timeout=30)
        yield gw, nodes
    finally:
        for n in nodes:
            n.stop()
        gw.stop()


def _plan(n: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    plan = []
    for i in range(n):
        model = rng.choice((TINY, *ADAPTERS))
        chat = rng.random() < 0.3
        stream = rng.random() < 0.5
        cut = stream and rng.random() < CUT_SHARE * 2  # half the requests stream
        body = {"model": model, "max_tokens": rng.randint(2, 12), "temperature": rng.choice((0, 0.7)), "seed": i}
        if chat:
            body["messages"] = [{"role": "user", "content": f"question {i}: name a capital"}]
        else:
            body["prompt"] = f"request {i}: once upon a time"
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        plan.append({"path": "/v1/chat/completions" if chat else "/v1/completions", "body": body, "cut": cut})
    return plan


async def _one(client: httpx.AsyncClient, item: dict) -> Outcome:
    body, model = item["body"], item["body"]["model"]
    if not body.get("stream"):
        r = await client.post(item["path"], json=body)
        out = Outcome("plain", model, r.status_code, r.headers.get("x-request-id"))
        if r.status_code == 200:
            doc = r.json()
            out.usage = doc["usage"]
            text = doc["choices"][0].get("text", doc["choices"][0].get("message", {}).get("content"))
            assert isinstance(text, str) and doc["choices"][0]["finish_reason"] in ("stop", "length"), doc
        else:
            out.error = r.text[:300]
        return out
    async with client.stream("POST", item["path"], json=body) as r:
        out = Outcome("cut" if item["cut"] else "stream", model, r.status_code, r.headers.get("x-request-id"))
        if r.status_code != 200:
            out.error = (await r.aread()).decode("utf-8", "replace")[:300]
            return out
        finished, done = None, False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                out.error = json.dumps(ev)[:300]
                break
            if ev.get("usage"):
                out.usage = ev["usage"]
            if ev.get("choices"):
                finished = ev["choices"][0].get("finish_reason") or finished
                if item["cut"]:
                    return out  # the client goes away mid-stream: the connection is closed here
        if out.error is None and not (done and finished in ("stop", "length") and out.usage):
            out.error = f"stream ended early: done={done} finish={finished} usage={out.usage}"
        return out


async def _run(url: str, key: str, plan: list[dict]) -> list[Outcome]:
    sem = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60, limits=limits
    ) as client:

        async def go(item: dict) -> Outcome:
            async with sem:
                try:
                    return await _one(client, item)
                except httpx.HTTPError as e:
                    return Outcome("cut" if item["cut"] else "stream", item["body"]["model"], 0, error=repr(e))

        return await asyncio.gather(*(go(item) for item in plan))


def test_a_few_hundred_mixed_requests_no_5xx_each_recorded_once(stack):
    gw, nodes = stack
    plan = _plan(REQUESTS)
    started = time.monotonic()
    outcomes = asyncio.run(_run(gw.url, gw.api_key, plan))
    elapsed = time.monotonic() - started
    statuses = Counter(o.status for o in outcomes)
    failed = [o for o in outcomes if o.status != 200 or (o.error and o.kind != "cut")]
    assert not failed, f"{statuses}; first failures: {[(o.kind, o.model, o.status, o.error) for o in failed[:5]]}"
    kinds = Counter(o.kind for o in outcomes)
    assert kinds["cut"] >= 5 and kinds["stream"] >= 50 and kinds["plain"] >= 50, kinds
    assert len({o.model for o in outcomes}) == 3
    rids = [o.rid for o in outcomes]
    assert all(rids) and len(set(rids)) == len(rids), "every request has a request id of its own"

    def closed() -> dict[str, CompletionRecord] | None:
        with Session(gw.db) as s:
            rows = {r.request_id: r for r in s.exec(select(CompletionRecord)).all()}
        return rows if all(rows.get(r) is not None and rows[r].status != RequestStatus.OPEN for r in rids) else None

    requests_rows = poll(closed, timeout=60)
    with Session(gw.db) as s:
        usage_rows = s.exec(select(UsageRecord)).all()
    per_rid = Counter(u.request_id for u in usage_rows)
    assert set(per_rid) == set(rids) and set(per_rid.values()) == {1}, (len(per_rid), len(rids))
    usage = {u.request_id: u for u in usage_rows}
    for o in outcomes:
        row = requests_rows[o.rid]
        if o.kind == "cut":
            assert row.status == RequestStatus.CLIENT_CLOSED or row.status == RequestStatus.OK, row
            continue
        assert row.status == RequestStatus.OK, row
        u = usage[o.rid]  # billed at what the client was told, and the node's signed receipt agrees
        assert (u.prompt_tokens, u.completion_tokens) == (o.usage["prompt_tokens"], o.usage["completion_tokens"]), o
        assert u.status == RecordStatus.PENDING and u.receipt_json and u.node_signature, (u.status, u.error)
        assert (u.node_prompt_tokens, u.node_completion_tokens) in (
            (None, None),
            (u.prompt_tokens, u.completion_tokens),
        )
    served = Counter(u.node_id for u in usage_rows)
    assert set(served) == {n.node_id for n in nodes}, served  # both nodes took part
    print(f"\n{REQUESTS} requests in {elapsed:.1f} s: {dict(kinds)}; per node {dict(served)}")
