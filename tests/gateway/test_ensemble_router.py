"""Routing an ensemble: a node among the owners of every component first, else the first component's owners
(they fetch the rest from peers); a node holding the ensemble resident is preferred among equals."""

from __future__ import annotations

from gateway.router import Router, rank_nodes
from tests.gateway.test_router import aid, node


def _common_owner_case(router: Router, nodes):
    """Two adapters with exactly one common top-k owner among `nodes` (searching adapter pairs)."""
    for j in range(2, 60):
        owners = [{n.node_id for n in router.owners(a, nodes)} for a in (aid(1), aid(j))]
        common = owners[0] & owners[1]
        if len(common) == 1:
            return aid(j), common.pop(), owners
    raise AssertionError("no pair with one common owner")


def test_a_node_owning_every_component_comes_first():
    router, nodes = Router(k=2), [node(i) for i in range(8)]
    second, common, owners = _common_owner_case(router, nodes)
    route = router.route("0x" + "ee" * 32, nodes, (aid(1), second))
    assert route.first.node_id == common
    assert route.owners[0] == common and route.decision == "owner"
    # one adapter alone would have gone by its own ranking: the ensemble ranking is what put `common` first
    assert route.owners[1] in owners[0] | owners[1]


def test_without_a_common_owner_the_first_components_owners_take_it():
    router, nodes = Router(k=1), [node(i) for i in range(8)]
    for j in range(2, 60):
        if router.owners(aid(1), nodes)[0].node_id != router.owners(aid(j), nodes)[0].node_id:
            break
    route = router.route("0x" + "ee" * 32, nodes, (aid(1), aid(j)))
    assert route.first.node_id == rank_nodes(aid(1), nodes)[0].node_id


def test_the_ensemble_resident_on_an_owner_wins_over_load_order():
    router = Router(k=2)
    ens = "0x" + "ee" * 32
    plain = [node(i) for i in range(6)]
    second, common, _ = _common_owner_case(router, plain)
    ranked = router.rank_ensemble((aid(1), second), plain)
    other = ranked[1].node_id
    nodes = [node(int(n.node_id[2:4], 16), resident=(ens,) if n.node_id == other else (), queue=0) for n in plain]
    route = router.route(ens, nodes, (aid(1), second))
    assert route.first.node_id == other and route.decision == "resident_owner"
