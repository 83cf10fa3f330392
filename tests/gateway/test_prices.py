"""Prices bounded and visible: /v1/models shows each adapter's price per 1,000 tokens (wei, from the registry
mirror); a key has a maximum price (the gateway's default, or its own from `loramesh gateway keys
create/update --max-price-per-1k-tokens`), and a dearer adapter is refused with 403 price_exceeds_key_limit
naming the price and the limit, before any node is asked; a price that a gateway with a chain has not read yet
(a new adapter's, the base price) is refused with 503 price_unavailable, also before any node is asked."""

from __future__ import annotations

import asyncio

import openai
import pytest
from typer.testing import CliRunner

from common.identity import Identity
from gateway.cli import gateway_app
from gateway.keys import create_key, lookup_key, update_key
from gateway.main import create_app
from gateway.settings import GatewaySettings
from ledger.outbox import component_request_id
from node.adapters.basemodel import base_model_id
from node.heartbeat import HeartbeatSender
from tests.gateway import TINY
from tests.utils.gateway import StandInNode, add_adapter, add_node, make_db, poll, record_of
from tests.utils.servers import ServerThread

pytestmark = pytest.mark.integration

CHEAP, DEAR, CHEAP2 = "0x" + "c1" * 32, "0x" + "c2" * 32, "0x" + "c3" * 32
HUGE, NEGATIVE = "0x" + "c4" * 32, "0x" + "c5" * 32  # prices no chain holds (a buggy or hostile mirror source)
FRESH, GREEDY, LATE = "0x" + "d1" * 32, "0x" + "d2" * 32, "0x" + "d3" * 32  # registered after the gateway started
DEFAULT_LIMIT = 10**15


def _node_and_db(tmp, tiny_base, adapters):
    """A gateway database holding a serving stand-in node and `adapters` ((id, name, price), one block each),
    and the gateway settings over it: (engine, base id, node, node server, settings)."""
    engine = make_db(tmp / "gw.db")
    base = base_model_id(tiny_base)
    node = StandInNode(Identity.generate(), base)
    node_srv = ServerThread(node.app()).start()
    add_node(engine, node_id=node.identity.node_id, base_model=base, api_url=node_srv.url)
    for block, (adapter_id, name, price) in enumerate(adapters, start=1):
        add_adapter(engine, adapter_id=adapter_id, name=name, base_model=base, price=price, block=block)
    settings = GatewaySettings(
        db_url=f"sqlite:///{tmp / 'gw.db'}",
        bases=[tiny_base],
        heartbeat_ttl_s=60,
        default_max_price_per_1k_tokens=DEFAULT_LIMIT,
        key_cache_ttl_s=0,
    )
    return engine, base, node, node_srv, settings


def _announce(node, node_srv, gw, base) -> None:
    """The node's heartbeat to the gateway: it is live and routable."""
    sender = HeartbeatSender(node.identity, [gw.url], api_url=node_srv.url, base_model_id=base, status_fn=node.status)
    assert asyncio.run(sender.send_once()) == {gw.url: 200}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base):
    tmp = tmp_path_factory.mktemp("prices")
    adapters = [
        (CHEAP, "acme/cheap", 10**12),
        (DEAR, "acme/dear", 5 * 10**18),
        (CHEAP2, "acme/cheap2", 10**12),
        (HUGE, "acme/huge", 2**256),
        (NEGATIVE, "acme/negative", -5),
    ]
    engine, base, node, node_srv, settings = _node_and_db(tmp, tiny_base, adapters)
    gw = ServerThread(create_app(settings)).start()
    _announce(node, node_srv, gw, base)
    try:
        yield gw, engine, node, tmp
    finally:
        gw.stop()
        node_srv.stop()


def client(gw, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20)


def test_models_show_prices(world):
    gw, engine, _, _ = world
    key, _ = create_key(engine, name="viewer")
    listed = {m.id: m.model_extra for m in client(gw, key).models.list()}
    assert listed["acme/cheap"]["price_per_1k_tokens_wei"] == str(10**12)
    assert listed["acme/dear"]["price_per_1k_tokens_wei"] == str(5 * 10**18)
    assert listed[TINY]["price_per_1k_tokens_wei"] is None  # no chain here: no base price to show
    assert client(gw, key).models.retrieve("acme/dear").model_extra["price_per_1k_tokens_wei"] == str(5 * 10**18)


def test_default_limit_refuses_the_dear_adapter(world):
    gw, engine, node, _ = world
    key, _ = create_key(engine, name="default")
    before = len(node.requests)
    with pytest.raises(openai.PermissionDeniedError) as ei:
        client(gw, key).completions.create(model="acme/dear", prompt="hi", max_tokens=2)
    err = ei.value.body
    assert ei.value.status_code == 403 and err["code"] == "price_exceeds_key_limit" and err["param"] == "model"
    assert str(5 * 10**18) in err["message"] and str(DEFAULT_LIMIT) in err["message"]
    assert len(node.requests) == before  # no node was asked
    r = client(gw, key).completions.create(model="acme/cheap", prompt="hi", max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_an_ensemble_costs_its_adapters_prices_times_their_weights(world):
    # each adapter is billed every token times its weight (ledger.outbox.split_by_weight): [1, 1] of two
    # adapters at 10^12 costs 2 x 10^12 per 1,000 tokens, over a key's limit of 1.5 x 10^12
    gw, engine, node, _ = world
    key, info = create_key(engine, name="ensembles", max_price_per_1k_tokens=15 * 10**11)
    with pytest.raises(openai.PermissionDeniedError, match=f"costs {2 * 10**12} wei"):
        client(gw, key).completions.create(
            model="acme/cheap+acme/cheap2", prompt="hi", max_tokens=1, extra_body={"adapter_weights": [1, 1]}
        )
    r = client(gw, key).completions.create(
        model="acme/cheap+acme/cheap2", prompt="hi", max_tokens=1, extra_body={"adapter_weights": [0.5, 0.5]}
    )
    assert r.usage.completion_tokens == 1
    # weights summing to less than 1 are billed as if scaled up to 1: [1e-6, 1e-6] costs 10^12, not 2 x 10^6
    key, info = create_key(engine, name="tiny-weights", max_price_per_1k_tokens=10**12 - 1)
    with pytest.raises(openai.PermissionDeniedError, match=f"costs {10**12} wei"):
        client(gw, key).completions.create(
            model="acme/cheap+acme/cheap2", prompt="hi", max_tokens=1, extra_body={"adapter_weights": [1e-6, 1e-6]}
        )


def test_key_limits_from_the_cli(world):
    gw, engine, _, tmp = world
    db = f"sqlite:///{tmp / 'gw.db'}"
    runner = CliRunner()
    r = runner.invoke(
        gateway_app, ["keys", "create", "--name", "frugal", "--max-price-per-1k-tokens", str(10**11), "--db", db]
    )
    assert r.exit_code == 0, r.output
    frugal = r.output.strip().splitlines()[-1]
    info = lookup_key(engine, frugal)
    assert info.max_price_per_1k_tokens == 10**11
    with pytest.raises(openai.PermissionDeniedError, match="limit of 100000000000 wei"):
        client(gw, frugal).completions.create(model="acme/cheap", prompt="hi", max_tokens=1)
    r = runner.invoke(
        gateway_app, ["keys", "update", str(info.id), "--max-price-per-1k-tokens", str(10**19), "--db", db]
    )
    assert r.exit_code == 0 and str(10**19) in r.output, r.output
    assert client(gw, frugal).completions.create(model="acme/dear", prompt="hi", max_tokens=1).choices
    listing = runner.invoke(gateway_app, ["keys", "list", "--db", db], env={"COLUMNS": "250"})
    assert str(10**19) in listing.output
    # at 80 columns the price folds onto lines of its own cell, whole (it was cut to 100000000000...)
    narrow = runner.invoke(gateway_app, ["keys", "list", "--db", db], env={"COLUMNS": "80"}).output
    cells = [line.split("\u2502")[6].strip() for line in narrow.splitlines() if line.startswith("\u2502")]
    assert str(10**19) in "".join(cells), narrow
    r = runner.invoke(gateway_app, ["keys", "update", str(info.id), "--default-max-price", "--db", db])
    assert r.exit_code == 0 and "gateway default" in r.output
    with pytest.raises(openai.PermissionDeniedError):
        client(gw, frugal).completions.create(model="acme/dear", prompt="hi", max_tokens=1)


def test_update_key_refuses_bad_values(world):
    from gateway.keys import ApiKeyError

    _, engine, _, _ = world
    _, info = create_key(engine, name="x")
    with pytest.raises(ApiKeyError):
        update_key(engine, info.id, max_price_per_1k_tokens=-1)
    with pytest.raises(ApiKeyError):
        update_key(engine, "lm-nothing-like-it", rpm=3)
    assert update_key(engine, info.id, rpm=3, tpm=10).requests_per_minute == 3


def test_each_record_keeps_the_price_its_request_was_admitted_at(world):
    # the settler never charges a record above it (tests/ledger/test_settler_bounds.py): an owner raising the
    # price after the key's limit was checked cannot make the key pay the new one
    gw, engine, _, _ = world
    key, _ = create_key(engine, name="quotes")
    c = client(gw, key)
    one = c.completions.with_raw_response.create(model="acme/cheap", prompt="hi", max_tokens=1).headers["x-request-id"]
    both = c.completions.with_raw_response.create(
        model="acme/cheap+acme/cheap2", prompt="hi", max_tokens=1, extra_body={"adapter_weights": [0.5, 0.5]}
    ).headers["x-request-id"]
    base = c.completions.with_raw_response.create(model=TINY, prompt="hi", max_tokens=1).headers["x-request-id"]
    assert record_of(engine, one)[1].quoted_price_per_1k == str(10**12)
    for i, adapter in enumerate((CHEAP, CHEAP2)):
        u = record_of(engine, component_request_id(both, i))[1]
        assert (u.adapter_id, u.quoted_price_per_1k) == (adapter, str(10**12))
    assert record_of(engine, base)[1].quoted_price_per_1k is None  # no chain here: the base price is unknown


def test_a_price_no_chain_holds_is_refused_before_any_node_is_asked(world):
    # the mirror copies the chain, where a price is a uint256; any other integer in it is no price to admit a
    # request at, nor to bound its record by: the record's write failed and the node was disputed for it
    gw, engine, node, _ = world
    key, _ = create_key(engine, name="boundless", max_price_per_1k_tokens=2**300)
    before = len(node.requests)
    for model, price in (("acme/huge", 2**256), ("acme/negative", -5), ("acme/cheap+acme/huge", 2**256)):
        with pytest.raises(openai.InternalServerError) as ei:
            client(gw, key).completions.create(model=model, prompt="hi", max_tokens=1)
        err = ei.value.body
        assert ei.value.status_code == 503 and err["code"] == "price_unavailable" and err["param"] == "model"
        assert f"{price} wei" in err["message"]
    assert len(node.requests) == before
    assert client(gw, key).completions.create(model="acme/cheap", prompt="hi", max_tokens=1).choices  # not disputed


class Chain:
    """The ledger as the gateway's prices read it (base_price); price None: the chain does not answer."""

    def __init__(self) -> None:
        self.price: int | None = None
        self.reads = 0

    def base_price(self) -> int:
        self.reads += 1
        if self.price is None:
            raise ConnectionError("the chain does not answer")
        return self.price


@pytest.fixture(scope="module")
def chained(tmp_path_factory, tiny_base):
    """A gateway that prices with a chain (down at its start: no base price yet) and syncs its registry once,
    at its start: the tests move the registry view and the prices on by hand, as the registry sync does."""
    tmp = tmp_path_factory.mktemp("chained")
    engine, base, node, node_srv, settings = _node_and_db(tmp, tiny_base, [(CHEAP, "acme/cheap", 10**12)])
    app = create_app(settings.model_copy(update={"registry_sync_s": 3600}))
    gateway, chain = app.state.gateway, Chain()
    gateway.prices.client = chain  # the prices' chain alone: the registry view reads the mirror table as it is
    gw = ServerThread(app).start()
    # the first sync is over: the base price is read before the port opens, then last in the sync
    poll(lambda: chain.reads >= 2, timeout=20)
    _announce(node, node_srv, gw, base)
    try:
        yield gw, engine, node, gateway, chain, base
    finally:
        gw.stop()
        node_srv.stop()


def assert_price_unavailable(gw, key, model: str, **kw) -> None:
    with pytest.raises(openai.InternalServerError) as ei:
        client(gw, key).completions.create(model=model, prompt="hi", max_tokens=1, **kw)
    err = ei.value.body
    assert ei.value.status_code == 503 and err["code"] == "price_unavailable" and err["param"] == "model"
    assert "not known to this gateway yet" in err["message"] and "retry" in err["message"]


def test_an_adapter_registered_before_the_gateway_has_its_price_is_refused_until_it_has(chained):
    # any process on the database writes the mirror, and the registry view re-reads it before the prices do:
    # an adapter at any price was served in between, unchecked against the key's limit, its records unbounded
    gw, engine, node, gateway, _, base = chained
    key, _ = create_key(engine, name="fresh", max_price_per_1k_tokens=10**13)
    add_adapter(engine, adapter_id=FRESH, name="acme/fresh", base_model=base, price=10**12, block=10)
    add_adapter(engine, adapter_id=GREEDY, name="acme/greedy", base_model=base, price=5 * 10**18, block=11)
    gateway.registry.reload()  # the registry sync's first step; the prices' reload is still to come
    assert gateway.prices.of(FRESH) is None and gateway.prices.of(GREEDY) is None
    before = len(node.requests)
    for model in ("acme/fresh", "acme/greedy", FRESH):
        assert_price_unavailable(gw, key, model)
    assert len(node.requests) == before  # no node was asked

    gateway.prices.reload()
    rid = client(gw, key).completions.with_raw_response.create(model="acme/fresh", prompt="hi", max_tokens=1)
    assert record_of(engine, rid.headers["x-request-id"])[1].quoted_price_per_1k == str(10**12)
    with pytest.raises(openai.PermissionDeniedError) as ei:  # its price known, checked against the key's limit
        client(gw, key).completions.create(model="acme/greedy", prompt="hi", max_tokens=1)
    assert ei.value.body["code"] == "price_exceeds_key_limit"
    assert len(node.requests) == before + 1


def test_the_base_model_is_refused_until_the_gateway_has_read_the_base_price(chained):
    gw, engine, node, gateway, chain, _ = chained
    chain.price, gateway.prices.base = None, None  # the chain did not answer at the gateway's start, nor since
    key, _ = create_key(engine, name="base", max_price_per_1k_tokens=10**13)
    before = len(node.requests)
    assert_price_unavailable(gw, key, TINY)
    gateway.prices.refresh_base()  # still down: nothing read
    assert_price_unavailable(gw, key, TINY)
    assert len(node.requests) == before

    chain.price = 10**12
    gateway.prices.refresh_base()
    rid = client(gw, key).completions.with_raw_response.create(model=TINY, prompt="hi", max_tokens=1)
    assert record_of(engine, rid.headers["x-request-id"])[1].quoted_price_per_1k == str(10**12)


def test_an_ensemble_with_an_adapter_of_unknown_price_is_refused(chained):
    # its part of unknown price was left out of the sum checked against the key's limit and out of the quote
    gw, engine, node, gateway, _, base = chained
    key, _ = create_key(engine, name="ensemble", max_price_per_1k_tokens=10**13)
    add_adapter(engine, adapter_id=LATE, name="acme/late", base_model=base, price=10**12, block=12)
    gateway.registry.reload()
    assert gateway.prices.of(LATE) is None
    before = len(node.requests)
    assert_price_unavailable(gw, key, "acme/cheap+acme/late")
    assert len(node.requests) == before

    gateway.prices.reload()
    both = client(gw, key).completions.with_raw_response.create(
        model="acme/cheap+acme/late", prompt="hi", max_tokens=1, extra_body={"adapter_weights": [0.5, 0.5]}
    )
    rid = both.headers["x-request-id"]
    for i, adapter in enumerate((CHEAP, LATE)):
        u = record_of(engine, component_request_id(rid, i))[1]
        assert (u.adapter_id, u.quoted_price_per_1k) == (adapter, str(10**12))
