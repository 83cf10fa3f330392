"""Router: rendezvous owners, resident-first, least-loaded, spill, failover order, base routing."""

from __future__ import annotations

import pytest

from gateway.directory import NodeEntry, NodeLocal
from gateway.router import Router, rank_nodes, rendezvous_score

BASE = "0x" + "11" * 32


def nid(i: int) -> str:
    return "0x" + f"{i:02x}" * 32


def aid(i: int) -> str:
    return "0x" + f"{0x80 + i:02x}" * 32


def node(i: int, *, resident=(), queue=0, running=0, inflight=0) -> NodeEntry:
    return NodeEntry(
        node_id=nid(i),
        api_url=f"http://n{i}",
        base_model_id=BASE,
        public_key=b"\0" * 32,
        status={"queue_depth": queue, "running": running, "resident_adapters": [{"adapter_id": a} for a in resident]},
        ts_ms=1,
        last_seen=0.0,
        local=NodeLocal(inflight=inflight),
    )


def test_score_is_deterministic_and_pair_specific():
    assert rendezvous_score(aid(1), nid(1)) == rendezvous_score(aid(1), nid(1))
    assert rendezvous_score(aid(1), nid(1)) != rendezvous_score(aid(2), nid(1))


def test_owners_are_top_k_and_removing_a_non_owner_changes_nothing():
    nodes = [node(i) for i in range(6)]
    r = Router(k=2)
    owners = r.owners(aid(3), nodes)
    assert len(owners) == 2
    assert [n.node_id for n in owners] == [n.node_id for n in rank_nodes(aid(3), nodes)[:2]]
    rest = [n for n in nodes if n.node_id not in {o.node_id for o in owners}]
    assert [n.node_id for n in r.owners(aid(3), owners + rest[1:])] == [o.node_id for o in owners]
    # removing an owner promotes the next-ranked node, keeping the other owner
    second = rank_nodes(aid(3), nodes)[2]
    assert [n.node_id for n in r.owners(aid(3), nodes[:0] + [n for n in nodes if n.node_id != owners[0].node_id])] == [
        owners[1].node_id,
        second.node_id,
    ]


def test_adapters_spread_over_nodes():
    nodes = [node(i) for i in range(4)]
    firsts = {Router(k=1).route(aid(i), nodes).first.node_id for i in range(40)}
    assert len(firsts) >= 3


def test_same_adapter_same_node_when_idle():
    nodes = [node(i) for i in range(3)]
    r = Router(k=2)
    assert len({r.route(aid(7), nodes).first.node_id for _ in range(5)}) == 1
    assert r.route(aid(7), nodes).decision == "owner"


def test_resident_owner_preferred_over_less_loaded():
    nodes = [node(i) for i in range(3)]
    a, b = rank_nodes(aid(1), nodes)[:2]
    a2 = node(int(a.node_id[2:4], 16), queue=0)
    b2 = node(int(b.node_id[2:4], 16), resident=[aid(1)], queue=2)
    route = Router(k=2, saturation=4).route(aid(1), [a2, b2])
    assert route.first.node_id == b2.node_id and route.decision == "resident_owner"


def test_least_loaded_among_cold_owners():
    ranked = rank_nodes(aid(2), [node(i) for i in range(2)])
    top, second = (int(n.node_id[2:4], 16) for n in ranked)
    route = Router(k=2).route(aid(2), [node(top, queue=3), node(second, queue=1)])
    assert route.first.node_id == nid(second)


def test_a_stale_running_count_does_not_move_an_adapter():
    # a heartbeat sent while our last request ran still reports it; the top owner must keep the adapter
    ranked = rank_nodes(aid(2), [node(i) for i in range(2)])
    top, second = (int(n.node_id[2:4], 16) for n in ranked)
    route = Router(k=2).route(aid(2), [node(top, running=1, resident=[aid(2)]), node(second, resident=[aid(2)])])
    assert route.first.node_id == nid(top)


def test_inflight_counts_as_load():
    ranked = rank_nodes(aid(2), [node(i) for i in range(2)])
    top, second = (int(n.node_id[2:4], 16) for n in ranked)
    route = Router(k=2).route(aid(2), [node(top, inflight=2), node(second)])
    assert route.first.node_id == nid(second)


def test_spill_to_next_node_when_owners_saturated():
    nodes = [node(i) for i in range(3)]
    ranked = rank_nodes(aid(5), nodes)
    busy = {n.node_id for n in ranked[:2]}
    nodes = [node(int(n.node_id[2:4], 16), queue=9 if n.node_id in busy else 0) for n in ranked]
    route = Router(k=2, saturation=4).route(aid(5), nodes)
    assert route.decision == "spill" and route.first.node_id == ranked[2].node_id
    assert set(route.owners) == busy
    assert [n.node_id for n in route.nodes[1:]] == sorted(busy, key=lambda x: [m.node_id for m in ranked].index(x))


def test_all_saturated_goes_to_least_loaded_owner():
    ranked = rank_nodes(aid(5), [node(i) for i in range(2)])
    top, second = (int(n.node_id[2:4], 16) for n in ranked)
    route = Router(k=2, saturation=2).route(aid(5), [node(top, queue=9), node(second, queue=5)])
    assert route.decision == "overloaded_owner" and route.first.node_id == nid(second)


def test_failover_order_lists_every_node_once():
    nodes = [node(i) for i in range(4)]
    route = Router(k=2).route(aid(9), nodes)
    assert sorted(n.node_id for n in route.nodes) == sorted(n.node_id for n in nodes)


def test_base_model_least_loaded():
    route = Router().route(None, [node(1, inflight=2), node(2), node(3, queue=1)])
    assert route.decision == "base" and route.first.node_id == nid(2) and route.owners == ()


def test_no_nodes():
    assert Router().route(aid(1), []) is None


def test_bad_config():
    with pytest.raises(ValueError, match="k and saturation"):
        Router(k=0)


def test_what_we_saw_loaded_counts_as_resident_until_a_newer_heartbeat():
    n = node(1)
    n.ts_ms = 1_000
    n.local.loaded[aid(3)] = 2_000  # served after the heartbeat was made
    assert aid(3) in n.resident
    n.ts_ms = 3_000  # a newer heartbeat is the truth again (it may have evicted the adapter)
    assert aid(3) not in n.resident
