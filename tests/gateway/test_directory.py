"""NodeDirectory over real mirror tables: heartbeats accepted only from registered, active, signing nodes."""

from __future__ import annotations

import time

import pytest

from common.identity import Identity
from gateway.chain_registry import RegistryView
from gateway.directory import NodeDirectory
from gateway.errors import BadRequest, Forbidden
from node.heartbeat import make_heartbeat
from tests.utils.clock import Clock
from tests.utils.gateway import add_adapter, add_node, make_db

BASE = "0x" + "11" * 32
OTHER_BASE = "0x" + "22" * 32


@pytest.fixture
def world(tmp_path):
    engine = make_db(tmp_path / "gw.db")
    a, b = Identity.generate(), Identity.generate()
    add_node(engine, node_id=a.node_id, base_model=BASE, api_url="http://127.0.0.1:7001")
    add_node(engine, node_id=b.node_id, base_model=BASE, api_url="http://127.0.0.1:7002", active=False)
    clock = Clock()
    reg = RegistryView(engine)
    return engine, reg, NodeDirectory(reg, ttl=10, clock=clock), clock, a, b


def hb(ident, ts=None, base=BASE, **status):
    return make_heartbeat(
        ident,
        api_url="http://127.0.0.1:7001",
        base_model_id=base,
        status={"queue_depth": 0, "running": 0, **status},
        ts_ms=ts or int(time.time() * 1000),
    )


def test_registered_node_becomes_live(world):
    _, _, d, _, a, _ = world
    e = d.accept_heartbeat(hb(a, resident_adapters=[{"adapter_id": "0x" + "aa" * 32}], base_model={"name": "tiny"}))
    assert [n.node_id for n in d.live(BASE)] == [a.node_id]
    assert d.live(OTHER_BASE) == []
    assert e.resident == {"0x" + "aa" * 32} and d.public_key(a.node_id) == a.node_public_key
    assert d.base_models() == {BASE: "tiny"}
    assert e.api_url == "http://127.0.0.1:7001"  # the registered URL


def test_a_heartbeat_status_is_kept_only_as_far_as_routing_reads_it(world):
    """A node's status is its word, as large as a heartbeat may be: 20,000 empty items under resident_adapters
    were kept whole and scanned on every request routed to it. The gateway keeps its base's name, its queue depth
    and up to MAX_RESIDENT valid adapter ids."""
    from gateway.directory import MAX_RESIDENT

    _, _, d, _, a, _ = world
    ids = ["0x" + f"{i:064x}" for i in range(MAX_RESIDENT + 5)]
    junk = [{}] * 10_000 + [{"adapter_id": "nope"}, {"adapter_id": ["0x" + "aa" * 32]}]
    e = d.accept_heartbeat(
        hb(a, resident_adapters=junk + [{"adapter_id": i, "slot": 0} for i in ids], base_model={"name": "x" * 2_000})
    )
    assert e.resident == frozenset(ids[:MAX_RESIDENT]) and e.queue_depth == 0
    assert e.base_model_name == "x" * 256 and len(e.status["resident_adapters"]) == MAX_RESIDENT


def test_unregistered_node_refused(world):
    _, _, d, _, _, _ = world
    with pytest.raises(Forbidden, match="not registered") as ei:
        d.accept_heartbeat(hb(Identity.generate()))
    assert ei.value.status == 403


def test_node_registered_later_is_found_by_resync(world):
    engine, _, d, _, _, _ = world
    c = Identity.generate()
    add_node(engine, node_id=c.node_id, base_model=BASE, api_url="http://127.0.0.1:7003")
    assert d.accept_heartbeat(hb(c)).node_id == c.node_id


def test_inactive_node_refused(world):
    _, _, d, _, _, b = world
    with pytest.raises(Forbidden, match="inactive"):
        d.accept_heartbeat(hb(b))


def test_unsigned_refused(world):
    _, _, d, _, a, _ = world
    doc = hb(a)
    doc.pop("signature")
    with pytest.raises(Forbidden, match="no signature"):
        d.accept_heartbeat(doc)


def test_forged_refused(world):
    _, _, d, _, a, _ = world
    doc = hb(a)
    doc["body"]["status"]["queue_depth"] = 5
    with pytest.raises(Forbidden, match="does not verify"):
        d.accept_heartbeat(doc)


def test_someone_elses_id_refused(world):
    _, _, d, _, a, _ = world
    mallory = Identity.generate()
    doc = hb(mallory)
    doc["body"]["node_id"] = a.node_id
    with pytest.raises(Forbidden, match="does not hash"):
        d.accept_heartbeat(doc)


def test_wrong_base_refused(world):
    _, _, d, _, a, _ = world
    with pytest.raises(Forbidden, match="registered for"):
        d.accept_heartbeat(hb(a, base=OTHER_BASE))


def test_malformed_is_bad_request(world):
    _, _, d, _, _, _ = world
    with pytest.raises(BadRequest, match="JSON object"):
        d.accept_heartbeat("hello")


def test_replayed_heartbeat_refused(world):
    _, _, d, _, a, _ = world
    doc = hb(a)
    d.accept_heartbeat(doc)
    with pytest.raises(BadRequest, match="not newer"):
        d.accept_heartbeat(doc)


def test_silent_node_dies_after_ttl(world):
    _, _, d, clock, a, _ = world
    d.accept_heartbeat(hb(a))
    clock.t += 9.9
    assert d.live()
    clock.t += 0.2
    assert d.live() == []


def test_failed_node_out_until_next_heartbeat(world):
    _, _, d, clock, a, _ = world
    import time

    d.accept_heartbeat(hb(a, ts=int(time.time() * 1000) - 10))
    d.mark_failed(a.node_id)
    assert d.live() == []
    clock.t += 1
    d.accept_heartbeat(hb(a))
    assert [n.node_id for n in d.live()] == [a.node_id]


def test_a_node_struck_in_a_row_is_held_off_longer_each_time_until_it_serves(world):
    """A node that fails what other nodes serve, a stranger's or a broken one, is asked less and less often:
    heartbeats alone no longer bring it back after its second strike. A failure without a strike keeps it out
    only until its next heartbeat."""
    _, _, d, clock, a, _ = world
    ts = [int(time.time() * 1000) - 1000]

    def beat():  # half a second on
        clock.t += 0.5
        ts[0] += 1
        d.accept_heartbeat(hb(a, ts=ts[0]))

    beat()
    for _ in range(5):
        d.mark_failed(a.node_id)
        beat()
        assert d.live()
    d.mark_failed(a.node_id, strike=True)  # the first strike: out until its next heartbeat, as before
    beat()
    assert d.live()
    held = []
    for _ in range(4):
        d.mark_failed(a.node_id, strike=True)
        start = clock.t
        beat()
        while not d.live():
            beat()
        held.append(clock.t - start)
    assert held == [5.0, 10.0, 20.0, 40.0]
    for _ in range(10):
        d.mark_failed(a.node_id, strike=True)
    clock.t += 119
    beat()
    assert d.live() == []
    d.mark_failed(a.node_id)  # a failure without a strike shortens nothing
    beat()
    assert d.live()  # capped at holdoff_max_s
    local = d.get(a.node_id).local
    assert local.strikes == 15
    for _ in range(14):
        local.served()  # each request served whole takes one strike back (one cheap answer is not a clean slate)
    d.mark_failed(a.node_id, strike=True)  # the second in a row again
    beat()
    assert d.live() == []
    local.served()
    local.served()
    d.mark_failed(a.node_id, strike=True)  # a first again
    clock.t += 10
    beat()
    assert d.live()


def test_deactivated_on_chain_stops_routing(world):
    engine, reg, d, _, a, _ = world
    d.accept_heartbeat(hb(a))
    add_node(engine, node_id=a.node_id, base_model=BASE, api_url="http://127.0.0.1:7001", active=False)
    reg.reload()
    assert d.live() == []


def test_registry_newest_adapter_by_name(world):
    engine, reg, _, _, _, _ = world
    add_adapter(engine, adapter_id="0x" + "a1" * 32, name="acme/x", base_model=BASE, block=5)
    add_adapter(engine, adapter_id="0x" + "a2" * 32, name="acme/x", base_model=BASE, block=9)
    add_adapter(engine, adapter_id="0x" + "a3" * 32, name="acme/y", base_model=BASE, block=7)
    reg.reload()
    assert reg.adapter_by_name("acme/x").adapter_id == "0x" + "a2" * 32
    assert [a.name for a in reg.newest_adapters()] == ["acme/x", "acme/y"]
    assert reg.adapter_by_name("nope") is None


def test_a_node_going_live_is_logged_once(world, caplog):
    """The operator reads when a node joins, and when it heartbeats again after its heartbeats lapsed; not at
    every heartbeat."""
    _, _, d, clock, a, _ = world
    caplog.set_level("INFO", logger="gateway.directory")
    now_ms = int(time.time() * 1000)
    d.accept_heartbeat(hb(a, ts=now_ms))
    clock.t += 2
    d.accept_heartbeat(hb(a, ts=now_ms + 1))
    lines = [r.getMessage() for r in caplog.records if "is live" in r.getMessage()]
    assert lines == [f"node {a.node_id[:10]} is live at http://127.0.0.1:7001 (base model {BASE[:10]})"]
    clock.t += 11  # past the ttl: it was not live
    d.accept_heartbeat(hb(a, ts=now_ms + 2))
    lines = [r.getMessage() for r in caplog.records if "is live" in r.getMessage()]
    assert len(lines) == 2 and lines[1].endswith("heartbeating again")


def test_disputes_follow_the_database_but_not_a_read_older_than_the_mark(world):
    _, _, d, clock, a, _ = world
    d.accept_heartbeat(hb(a))
    d.sync_disputed({a.node_id: "another gateway disputed it"}, read_from=clock.t)
    assert d.live() == [] and d.disputed == {a.node_id: "another gateway disputed it"}
    clock.t += 1
    assert d.sync_disputed({}, read_from=clock.t) == [a.node_id]  # readmitted by its operator
    assert [e.node_id for e in d.live()] == [a.node_id]

    # disputed here while a read ran that began before: that read cannot know it yet, so it stays out
    read_from = clock.t
    clock.t += 1
    d.mark_disputed(a.node_id, "receipt claims more")
    assert d.sync_disputed({}, read_from=read_from) == [] and d.live() == []
    assert d.sync_disputed({}, read_from=clock.t + 1) == [a.node_id]


@pytest.mark.parametrize(
    "api_url",
    ["", "http://127.0.0.1:7004/admin?x=", "http://user:pw@127.0.0.1:7004", "ftp://127.0.0.1:7004", "http://a b"],
)
def test_node_registered_with_a_url_the_registry_now_refuses_gets_no_traffic(world, api_url):
    # a registry deployed before the URL rule may hold such a URL; the heartbeat's own URL is no substitute
    engine, _, d, _, _, _ = world
    c = Identity.generate()
    add_node(engine, node_id=c.node_id, base_model=BASE, api_url=api_url)
    with pytest.raises(Forbidden, match="API URL") as ei:
        d.accept_heartbeat(hb(c))
    assert ei.value.code == "bad_api_url" and d.live(BASE) == []


def test_heartbeats_of_unknown_nodes_pull_the_registry_at_most_every_few_seconds(world, monkeypatch):
    # anyone can sign a heartbeat for a node that is not registered: each one pulled the chain's registry,
    # and the pulls, waiting on one lock, held the worker threads that admit every key's requests
    _, reg, d, clock, _, _ = world
    pulls = []
    monkeypatch.setattr(reg, "sync", lambda force=True: pulls.append(force) or False)
    for _ in range(20):
        with pytest.raises(Forbidden, match="not registered"):
            d.accept_heartbeat(hb(Identity.generate()))
    assert pulls == [False]
    clock.t += 5.0
    with pytest.raises(Forbidden):
        d.accept_heartbeat(hb(Identity.generate()))
    assert pulls == [False, False]


def test_an_unforced_registry_pull_never_waits_on_another(world, monkeypatch):
    import threading

    import ledger.mirror

    engine = world[0]
    view = RegistryView(engine, client=object(), min_sync_interval=0.5)
    started, release, pulls = threading.Event(), threading.Event(), []

    def slow_chain(_engine, _client, **_how):
        pulls.append(1)
        started.set()
        release.wait(10)

    monkeypatch.setattr(ledger.mirror, "sync_registry", slow_chain)
    forced = threading.Thread(target=view.sync)
    forced.start()
    assert started.wait(10)
    t = time.monotonic()
    assert [view.sync(force=False) for _ in range(50)] == [False] * 50 and time.monotonic() - t < 1.0
    release.set()
    forced.join(10)
    assert not view.sync(force=False) and pulls == [1]  # half a second after the pull ended, not its start
    view._last_sync -= 0.5
    assert view.sync(force=False) and pulls == [1, 1]


def test_sightings_a_heartbeat_supersedes_are_forgotten(world):
    """An adapter this gateway saw a node load counts as resident until a newer heartbeat; then the sighting goes:
    each ensemble a client weighs anew is an id of its own, and sightings kept grew by one per request for good."""
    _, _, d, _, a, _ = world
    now = int(time.time() * 1000)
    e = d.accept_heartbeat(hb(a, ts=now - 10_000))
    seen = [f"0x{i:064x}" for i in range(500)]
    for aid in seen:
        e.local.saw_loaded(aid)
    assert set(seen) <= d.accept_heartbeat(hb(a, ts=now - 5_000)).resident  # made before the sightings
    later = d.accept_heartbeat(hb(a, ts=now + 5_000))  # made after them, naming none of them
    assert later.resident == frozenset() and later.local.loaded == {}


def test_a_heartbeat_meant_for_another_gateway_is_refused(world):
    """Anyone who receives a node's heartbeats (a gateway it heartbeats to) could post them to a gateway the node
    does not trust, which would then route requests to a node that refuses them. A heartbeat names the gateway
    it is for; one naming none is an older node's."""
    engine, reg, _, clock, a, _ = world
    mine, theirs = "aa" * 32, "bb" * 32
    d = NodeDirectory(reg, ttl=10, clock=clock, gateway_key=mine)

    def beat(key, ts):
        return make_heartbeat(
            a, api_url="http://127.0.0.1:7001", base_model_id=BASE, status={}, gateway_key=key, ts_ms=ts
        )

    now = int(time.time() * 1000)
    with pytest.raises(Forbidden, match="meant for gateway key bbbb") as e:
        d.accept_heartbeat(beat(theirs, now))
    assert e.value.code == "heartbeat_for_another_gateway" and d.live(BASE) == []
    d.accept_heartbeat(beat(mine, now + 1))
    d.accept_heartbeat(beat(None, now + 2))
    assert [n.node_id for n in d.live(BASE)] == [a.node_id]
