"""ModelCatalog.resolve: a model string shaped like an id resolves only as an id, and a base model's name or
id always to the base model; an adapter name can shadow neither (H3)."""

from __future__ import annotations

import time
from functools import partial
from types import SimpleNamespace

import pytest

from common.identity import Identity
from gateway.catalog import ModelCatalog, Prices
from gateway.chain_registry import RegistryView
from gateway.directory import NodeDirectory
from gateway.errors import ModelNotFound
from gateway.keys import KeyInfo
from node.adapters.basemodel import base_model_name
from node.heartbeat import make_heartbeat
from tests.gateway import TINY
from tests.utils.clock import Clock
from tests.utils.gateway import add_adapter, add_node, make_db

BASE = "0x" + "11" * 32
OTHER_BASE = "0x" + "22" * 32
REAL = "0x" + "aa" * 32  # a real adapter's id
SHADOW = "0x" + "bb" * 32  # the attacker's adapters
KEY = KeyInfo(id=1, name="k", prefix="p", requests_per_minute=None, tokens_per_minute=None, adapters=frozenset())


@pytest.fixture
def world(tmp_path):
    """Base "tiny" served by a live node; adapter REAL on it; rows an attacker's mirror could hold."""
    engine = make_db(tmp_path / "gw.db")
    node = Identity.generate()
    add_node(engine, node_id=node.node_id, base_model=BASE, api_url="http://127.0.0.1:7001")
    add_adapter(engine, adapter_id=REAL, name="alice/capitals", base_model=BASE, block=1)
    clock = Clock()
    reg = RegistryView(engine)
    directory = NodeDirectory(reg, ttl=10, clock=clock)
    directory.accept_heartbeat(
        make_heartbeat(
            node,
            api_url="http://127.0.0.1:7001",
            base_model_id=BASE,
            status={"queue_depth": 0, "running": 0, "base_model": {"name": "tiny"}},
            ts_ms=int(time.time() * 1000),
        )
    )
    # the bases this gateway was configured with (--base): their names are the only base names it knows
    gw = SimpleNamespace(
        registry=reg, directory=directory, base_names={BASE: "tiny"}, _visible=partial(ModelCatalog._visible, None)
    )
    return engine, reg, gw, clock


def resolve(gw, model):
    return ModelCatalog.resolve(gw, model, KEY, frozenset())


def test_names_ids_and_bases_resolve(world):
    _, _, gw, _ = world
    assert resolve(gw, "alice/capitals").adapter_id == REAL
    assert resolve(gw, REAL).adapter_id == REAL
    t = resolve(gw, "tiny")
    assert (t.adapter_id, t.base_model_id) == (None, BASE)
    t = resolve(gw, BASE)
    assert (t.adapter_id, t.base_model_id) == (None, BASE)
    with pytest.raises(ModelNotFound):
        resolve(gw, "nobody/nothing")


def test_an_adapter_named_like_an_adapter_id_does_not_take_its_requests(world):
    engine, reg, gw, _ = world
    add_adapter(engine, adapter_id=SHADOW, name=REAL, base_model=BASE, block=2, owner="0x" + "ee" * 20)
    reg.reload()
    assert resolve(gw, REAL).adapter_id == REAL


def test_an_adapter_named_like_an_unknown_id_is_not_served(world):
    engine, reg, gw, _ = world
    unknown = "0x" + "cc" * 32
    add_adapter(engine, adapter_id=SHADOW, name=unknown, base_model=BASE, block=2, owner="0x" + "ee" * 20)
    add_adapter(engine, adapter_id="0x" + "dd" * 32, name="0xabc", base_model=BASE, block=2, owner="0x" + "ee" * 20)
    reg.reload()
    for model in (unknown, "0xabc"):
        with pytest.raises(ModelNotFound):
            resolve(gw, model)


def test_an_adapter_named_like_a_base_model_does_not_take_its_requests(world):
    engine, reg, gw, clock = world
    add_adapter(engine, adapter_id=SHADOW, name="tiny", base_model=BASE, block=2, owner="0x" + "ee" * 20)
    add_adapter(engine, adapter_id="0x" + "dd" * 32, name=BASE, base_model=BASE, block=2, owner="0x" + "ee" * 20)
    reg.reload()
    for model in ("tiny", BASE):
        t = resolve(gw, model)
        assert (t.adapter_id, t.base_model_id) == (None, BASE)
    clock.t += 60  # the base's nodes went quiet: its name still never reaches the adapter named after it
    t = resolve(gw, "tiny")
    assert (t.adapter_id, t.base_model_id) == (None, BASE)


@pytest.mark.parametrize("base", [BASE, OTHER_BASE])
def test_a_base_name_a_node_announces_does_not_take_an_adapters_requests(world, base):
    # a node (on the adapter's base or any other) announces the base name "alice/capitals": base names come
    # only from the gateway's own configuration, so the adapter keeps its name, live or offline
    engine, reg, gw, clock = world
    evil = Identity.generate()
    add_node(engine, node_id=evil.node_id, base_model=base, api_url="http://127.0.0.1:7002")
    reg.reload()
    gw.directory.accept_heartbeat(
        make_heartbeat(
            evil,
            api_url="http://127.0.0.1:7002",
            base_model_id=base,
            status={"queue_depth": 0, "running": 0, "base_model": {"name": "alice/capitals"}},
            ts_ms=int(time.time() * 1000),
        )
    )
    assert resolve(gw, "alice/capitals").adapter_id == REAL
    clock.t += 60
    assert resolve(gw, "alice/capitals").adapter_id == REAL


def test_the_tiny_bases_name_is_the_one_the_gateway_tests_ask_for(tiny_base):
    assert base_model_name(tiny_base) == TINY


def test_an_adapter_named_like_a_base_model_is_listed_by_its_id(world):
    """/v1/models listed a stranger's adapter named after a base under the base's name, first, with the
    stranger as owner and its price: a client picking the first match showed them as the base's. The name
    resolves to the base, so the adapter is listed by the id that reaches it."""
    engine, reg, _, _ = world
    add_adapter(engine, adapter_id=SHADOW, name="tiny", base_model=BASE, block=2, owner="0x" + "ee" * 20, price=10**15)
    reg.reload()
    catalog = ModelCatalog(reg, world[2].directory, {BASE: "tiny"}, Prices(engine), default_max_price=0)
    models = catalog.list_models(KEY, frozenset())
    (named,) = [m for m in models if m["id"] == "tiny"]
    assert (named["adapter_id"], named["owned_by"]) == (None, "loramesh")
    (shadow,) = [m for m in models if m["adapter_id"] == SHADOW]
    assert shadow["id"] == SHADOW and catalog.resolve(shadow["id"], KEY, frozenset()).adapter_id == SHADOW
    assert catalog.model_object(SHADOW, KEY, frozenset())["id"] == SHADOW
    assert [m["id"] for m in models if m["adapter_id"] == REAL] == ["alice/capitals"]


def test_model_objects_say_what_they_are_as_vllms_do(world):
    """vLLM's root (the model itself) and parent (the base an adapter applies to; none for a base), and the
    context the gateway holds a base's requests to (max_model_len; None for a base it has no folder of)."""
    engine, reg, _, _ = world
    catalog = ModelCatalog(
        reg, world[2].directory, {BASE: "tiny"}, Prices(engine), default_max_price=0, contexts={BASE: 512}
    )
    models = {m["id"]: m for m in catalog.list_models(KEY, frozenset())}
    adapter = models["alice/capitals"]
    assert (adapter["root"], adapter["parent"], adapter["max_model_len"]) == (REAL, "tiny", 512)
    assert catalog.model_object("tiny", KEY, frozenset()) == models["tiny"]
    assert (models["tiny"]["root"], models["tiny"]["parent"], models["tiny"]["max_model_len"]) == (BASE, None, 512)
