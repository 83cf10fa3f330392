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
    adapter_id: str | None  # None: the bare base model
    base_model_id: str


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

    def route(self, adapter_id: str | None, nodes: Sequence[NodeEntry]) -> Route | None:
        """Order `nodes` (live, serving the right base) for this request; None when there are none."""
        if not nodes:
            return None
        if adapter_id is None:  # the bare base model: any node will do, least loaded first
            ordered = sorted(nodes, key=lambda n: (n.load, n.node_id))
            return Route(tuple(ordered), (), "base")
        ranked = rank_nodes(adapter_id, nodes)
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
