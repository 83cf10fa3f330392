"""An ensemble request end to end: a real anvil with the contracts, the gateway and a tiny-model node under
uvicorn (tests/utils/stack.py), the official openai client. The request is served as one, recorded as one
usage record per adapter (derived ids, tokens split by weight, summing exactly to the request's), and once
settled on chain each record is priced at its own adapter's price and the rewards accrued equal the fees."""

from __future__ import annotations

import httpx
import openai
import pytest
from sqlmodel import Session, select

from gateway.tables import CompletionRecord
from ledger.batching import record_fee
from ledger.models import UsageRecord
from ledger.outbox import component_request_id, split_by_weight
from ledger.settler import Settler
from ledger.settler_config import SettlerConfig
from node.adapters import AdapterStore
from node.adapters.basemodel import base_model_id
from node.adapters.ensemble import ensemble_key
from tests.utils.factories import make_package
from tests.utils.gateway import add_adapter, poll
from tests.utils.stack import start_gateway, start_node

pytestmark = pytest.mark.integration

NAMES = ("alice/capitals", "bob/elements")
PRICES = (2 * 10**12, 7 * 10**11)  # wei per 1,000 tokens: different, so a swapped share shows


@pytest.fixture(scope="module")
def stack(anvil_chain, tiny_base, tmp_path_factory):
    env, root = anvil_chain, tmp_path_factory.mktemp("ensemble")
    base = base_model_id(tiny_base)
    publisher = env.users[0]
    pkgs = [
        make_package(tiny_base, root / f"pkg{i}", account=publisher, name=n, seed=40 + i, rank=4 + 4 * i)
        for i, n in enumerate(NAMES)
    ]
    store = AdapterStore(root / "store")
    gw = start_gateway(root / "gateway", tiny_base)
    for pkg, name, price in zip(pkgs, NAMES, PRICES):
        store.install(pkg.path)
        env.client(publisher).register_adapter(
            pkg.adapter_id, name=name, version="1.0.0", base_model=base, price_per_1k_tokens=price
        )
        add_adapter(gw.db, adapter_id=pkg.adapter_id, name=name, base_model=base, owner=publisher.address, price=price)
    node = start_node(tiny_base, gateway=gw, store=store)
    env.client(env.users[1]).register_node(
        node.identity.node_key,
        peer_id="12D3KooWtest",
        multiaddrs=["/ip4/127.0.0.1/tcp/4001"],
        api_url=node.url,
        base_model=base,
    )
    poll(lambda: httpx.get(gw.url + "/health", timeout=5).json().get("live_nodes") == 1, timeout=30)
    oai = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.api_key, max_retries=0, timeout=120)
    try:
        yield env, gw, node, oai, [p.adapter_id for p in pkgs]
    finally:
        node.stop()
        gw.stop()


def test_ensemble_request_is_recorded_per_adapter_and_settles_to_its_fees(stack):
    env, gw, node, oai, ids = stack
    weights = [0.7, 0.3]
    r = oai.completions.create(
        model="+".join(NAMES),
        prompt="The capital of France is",
        max_tokens=9,
        temperature=0,
        extra_body={"adapter_weights": weights},
    )
    assert r.usage.completion_tokens == 9
    # greedy: the ensemble answers otherwise than either adapter alone
    alone = [
        oai.completions.create(model=n, prompt="The capital of France is", max_tokens=9, temperature=0) for n in NAMES
    ]
    assert r.choices[0].text not in [a.choices[0].text for a in alone]
    key = ensemble_key(list(zip(ids, weights)))

    def records():
        with Session(gw.db) as s:
            done = s.exec(select(CompletionRecord).where(CompletionRecord.adapter_id == key)).all()
            if len(done) != 1 or done[0].status == "open":
                return None
            rows = [
                s.exec(
                    select(UsageRecord).where(UsageRecord.request_id == component_request_id(done[0].request_id, i))
                ).first()
                for i in range(2)
            ]
            return (done[0], rows) if all(rows) else None

    done, rows = poll(records, timeout=30)
    assert [u.adapter_id for u in rows] == ids
    assert [u.prompt_tokens for u in rows] == split_by_weight(r.usage.prompt_tokens, weights)
    assert [u.completion_tokens for u in rows] == split_by_weight(9, weights)
    assert sum(u.prompt_tokens for u in rows) == done.prompt_tokens == r.usage.prompt_tokens
    assert sum(u.completion_tokens for u in rows) == done.completion_tokens == 9
    assert all(u.status == "pending" and u.node_id == node.node_id for u in rows), [u.error for u in rows]
    # settle them (and every other record the module made) on chain
    client = env.client(env.settler)
    before = client.totals()["accrued"]
    with Session(gw.db) as s:
        all_rows = s.exec(select(UsageRecord)).all()
    prices = dict(zip(ids, PRICES))
    fees = sum(record_fee(prices[u.adapter_id], u.prompt_tokens, u.completion_tokens) for u in all_rows)
    assert Settler(gw.db, client, SettlerConfig(batch_size=100)).drain() == len(all_rows)
    settled = {s.request_id: s for s in client.settled_records()}
    for u, price in zip(rows, PRICES):
        on_chain = settled[u.request_id]
        assert on_chain.adapter_id == u.adapter_id
        assert (on_chain.prompt_tokens, on_chain.completion_tokens) == (u.prompt_tokens, u.completion_tokens)
        assert on_chain.fee == record_fee(price, u.prompt_tokens, u.completion_tokens) > 0
    assert sum(settled[u.request_id].fee for u in rows) == sum(
        record_fee(p, u.prompt_tokens, u.completion_tokens) for u, p in zip(rows, PRICES)
    )
    assert client.totals()["accrued"] - before == fees


def test_bad_ensembles_are_refused_by_name(stack):
    _, _, _, oai, _ = stack
    cases = [
        (dict(model="alice/capitals", extra_body={"adapter_weights": [1.0, 1.0]}), "adapter_weights", "needs several"),
        (dict(model="+".join(NAMES), extra_body={"adapter_weights": [1.0, 1.0, 1.0]}), "adapter_weights", "3 weights"),
        (dict(model="+".join(NAMES), extra_body={"adapter_weights": [1.0, -1.0]}), "adapter_weights", "greater than 0"),
        (dict(model="alice/capitals+alice/capitals"), "model", "appears twice"),
        (dict(model="+".join(NAMES * 3)), "model", "2 to 4 adapters"),
    ]
    for kw, param, fragment in cases:
        with pytest.raises(openai.BadRequestError) as ei:
            oai.completions.create(prompt="x", max_tokens=2, **kw)
        assert ei.value.body["param"] == param and fragment in ei.value.body["message"], ei.value.body
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="alice/capitals+carol/nothing", prompt="x", max_tokens=2)


def test_streamed_chat_ensemble_is_recorded_per_adapter(stack):
    _, gw, _, oai, ids = stack
    chunks = list(
        oai.chat.completions.create(
            model="+".join(NAMES),
            messages=[{"role": "user", "content": "Name an element."}],
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert usage.completion_tokens == 5
    key = ensemble_key([(a, 0.5) for a in ids])  # equal weights by default: 1/n each

    def records():
        with Session(gw.db) as s:
            done = s.exec(select(CompletionRecord).where(CompletionRecord.adapter_id == key)).first()
            if done is None or done.status == "open":
                return None
            rid = done.request_id
            return [
                s.exec(select(UsageRecord).where(UsageRecord.request_id == component_request_id(rid, i))).first()
                for i in range(2)
            ]

    rows = poll(lambda: (lambda r: r if r and all(r) else None)(records()), timeout=30)
    assert [u.adapter_id for u in rows] == ids
    assert [u.completion_tokens for u in rows] == [3, 2]  # 2.5 each: the tie goes to the first
    assert sum(u.prompt_tokens for u in rows) == usage.prompt_tokens


def test_weights_summing_to_less_than_one_are_billed_every_token(stack):
    # each record used to be the tokens times its weight as given: at 1e-6 each the node served the base
    # model's answer, the client got every token, and both records held 0 tokens
    _, gw, _, oai, ids = stack
    weights = [1e-6, 3e-6]
    r = oai.completions.create(  # ignore_eos: a sampled end token (1.6% of such requests) would end it sooner
        model="+".join(NAMES),
        prompt="hello there",
        max_tokens=5,
        extra_body={"adapter_weights": weights, "ignore_eos": True},
    )
    assert r.usage.completion_tokens == 5
    key = ensemble_key(list(zip(ids, weights)))

    def rows():
        with Session(gw.db) as s:
            done = s.exec(select(CompletionRecord).where(CompletionRecord.adapter_id == key)).first()
            if done is None or done.status == "open":
                return None
            got = [
                s.exec(
                    select(UsageRecord).where(UsageRecord.request_id == component_request_id(done.request_id, i))
                ).first()
                for i in range(2)
            ]
            return got if all(got) else None

    got = poll(rows, timeout=30)
    assert [u.completion_tokens for u in got] == [1, 4]  # 5 in the weights' proportion, 1:3 (1.25, 3.75)
    assert sum(u.prompt_tokens for u in got) == r.usage.prompt_tokens
