"""The router: rendezvous-hash owners per adapter, resident-first, least-loaded, spill when saturated.

Pure logic over node entries: importing it loads no web, database or chain library (tests/test_layering.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only a type here: gateway.directory imports the chain registry (sqlalchemy)
    from gateway.directory import NodeEntry


@dataclass(frozen=True, slots=True)
class Target:
    """What a request's `model` resolved to (gateway.catalog.ModelCatalog.resolve): what the router routes."""

    model: str
    adapter_id: str | None  # None: the bare base model; an ensemble's own id (node/adapters/ensemble.py)
    base_model_id: str
    # an ensemble's (adapter id, weight) pairs in the order named; None for one adapter or the base
    ensemble: tuple[tuple[str, float], ...] | None = None

    @property
    def label(self) -> str:
        """The metrics label: the model as named, but one label for every ensemble (clients choose their
        combinations and weights freely, and each label is a time series kept for good)."""
        return "ensemble" if self.ensemble is not None else self.model

    @property
    def components(self) -> tuple[str, ...]:
        """The registered adapters this request runs: an ensemble's parts, or its one adapter."""
        if self.ensemble is not None:
            return tuple(aid for aid, _ in self.ensemble)
        return () if self.adapter_id is None else (self.adapter_id,)


def rendezvous_score(adapter_id: str, node_id: str) -> int:
    """hash(adapter id, node id): the highest scores own the adapter."""
    h = hashlib.sha256(bytes.fromhex(adapter_id[2:]) + bytes.fromhex(node_id[2:])).digest()
    return int.from_bytes(h[:8], "big")


def rank_nodes(adapter_id: str, nodes: Sequence[NodeEntry]) -> list[NodeEntry]:
    """Nodes by rendezvous score for this adapter, best first (ties, which need equal hashes, by id)."""
    return sorted(nodes, key=lambda n: (-rendezvous_score(adapter_id, n.node_id), n.node_id))


@dataclass(frozen=True, slots=True)
class Route:
    """The nodes to try, in order, and why the first was chosen."""

    nodes: tuple[NodeEntry, ...]
    owners: tuple[str, ...]  # node ids of the adapter's top-k owners
    decision: str  # resident_owner | owner | spill | overloaded_owner | base

    @property
    def first(self) -> NodeEntry:
        return self.nodes[0]


class Router:
    """Chooses nodes for a request; stateless apart from its configuration."""

    def __init__(self, *, k: int = 2, saturation: int = 4) -> None:
        if k < 1 or saturation < 1:
            raise ValueError(f"owners k and saturation depth must be >= 1, got {k}, {saturation}")
        self.k = k
        self.saturation = saturation

    def saturated(self, n: NodeEntry) -> bool:
        return n.load >= self.saturation

    def owners(self, adapter_id: str, nodes: Sequence[NodeEntry]) -> list[NodeEntry]:
        """The adapter's top-k live nodes by rendezvous hashing (`nodes` already filtered by base model)."""
        return rank_nodes(adapter_id, nodes)[: self.k]

    def rank_ensemble(self, components: Sequence[str], nodes: Sequence[NodeEntry]) -> list[NodeEntry]:
        """Nodes for an ensemble, best first: those among the top-k owners of the most components (a node
        that owns all of them serves it with no fetch), then by the first component's rendezvous rank, so
        an ensemble whose parts have no common owner goes to its first part's owners, which fetch the
        rest from their peers as for any adapter they lack."""
        owned: dict[str, int] = {}
        for aid in components:
            for n in self.owners(aid, nodes):
                owned[n.node_id] = owned.get(n.node_id, 0) + 1
        first = {n.node_id: i for i, n in enumerate(rank_nodes(components[0], nodes))}
        return sorted(nodes, key=lambda n: (-owned.get(n.node_id, 0), first[n.node_id]))

    def route(self, adapter_id: str | None, nodes: Sequence[NodeEntry], components: Sequence[str] = ()) -> Route | None:
        """Order `nodes` (live, serving the right base) for this request; None when there are none. An
        ensemble's `adapter_id` is its own id (what a node reports resident) and `components` its parts."""
        if not nodes:
            return None
        if adapter_id is None:  # the bare base model: any node will do, least loaded first
            ordered = sorted(nodes, key=lambda n: (n.load, n.node_id))
            return Route(tuple(ordered), (), "base")
        ranked = self.rank_ensemble(components, nodes) if len(components) > 1 else rank_nodes(adapter_id, nodes)
        owners, others = ranked[: self.k], ranked[self.k :]
        rank = {n.node_id: i for i, n in enumerate(ranked)}

        def preference(n: NodeEntry) -> tuple:
            # resident beats cold, then least loaded; the rendezvous rank keeps equal cases stable
            return (adapter_id not in n.resident, n.load, rank[n.node_id])

        free_owners = sorted((n for n in owners if not self.saturated(n)), key=preference)
        busy_owners = sorted((n for n in owners if self.saturated(n)), key=lambda n: (n.load, rank[n.node_id]))
        free_others = [n for n in others if not self.saturated(n)]
        busy_others = [n for n in others if self.saturated(n)]
        if free_owners:
            decision = "resident_owner" if adapter_id in free_owners[0].resident else "owner"
            ordered = free_owners + free_others + busy_owners + busy_others
        elif free_others:
            decision = "spill"
            ordered = free_others + busy_owners + busy_others
        else:
            decision = "overloaded_owner"
            ordered = busy_owners + busy_others
        return Route(tuple(ordered), tuple(n.node_id for n in owners), decision)
