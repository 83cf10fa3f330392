"""The node's side of the chain: register itself in the node registry, find peers there, look up owners."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import replace

from ledger.chain import ChainClient
from ledger.errors import ContractError, UnknownAdapter, UnknownNode
from ledger.registry_events import NodeActiveChanged, NodeRegistered, NodeUpdated, registry_update
from ledger.types import MAX_MULTIADDRS, NodeInfo, node_address_problem

log = logging.getLogger(__name__)

_NODE_EVENTS = ("NodeRegistered", "NodeUpdated", "NodeActiveChanged")


class RegistrationError(RuntimeError):
    """The node cannot take its place in the on-chain registry."""


def ensure_registered(
    client: ChainClient, node_key, *, peer_id: str, multiaddrs: Sequence[str], api_url: str, base_model: str
) -> str:
    """Register this node (or bring its entry up to date); returns what was done: registered/moved/updated/
    unchanged. `node_key` (the node's Ed25519 private key) proves the node id; an entry another operator
    holds is moved to this one (only the key holder can), so nobody can keep the node off the registry."""
    from cryptography.hazmat.primitives import serialization

    from common.wire import node_id_of

    public_key = node_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    node_id = node_id_of(public_key)
    # the host's listen addresses, one per interface: past the registry's limit the first ones are registered
    multiaddrs = tuple(multiaddrs)[:MAX_MULTIADDRS]
    if (why := node_address_problem(peer_id, multiaddrs, api_url)) is not None:
        raise RegistrationError(f"the registry would refuse node {node_id}: {why}")
    kw = dict(peer_id=peer_id, multiaddrs=multiaddrs, api_url=api_url, base_model=base_model)
    try:
        current = client.get_node(node_id)
    except UnknownNode:
        current = None
    try:
        if current is None or current.operator != client.address:
            client.register_node(node_key, **kw)
            if current is None:
                log.info("registered node %s on chain (operator %s)", node_id, client.address)
                return "registered"
            log.warning(
                "node %s was registered to operator %s; moved to %s with the node key's proof",
                node_id,
                current.operator,
                client.address,
            )
            return "moved"
        action = "unchanged"
        wanted = (peer_id, tuple(multiaddrs), api_url, base_model)
        if (current.peer_id, tuple(current.multiaddrs), current.api_url, current.base_model) != wanted:
            client.update_node(node_id, **kw)
            action = "updated"
        if not current.active:
            client.set_node_active(node_id, True)
            action = "updated"
    except ContractError as e:
        raise RegistrationError(f"the registry refused node {node_id}: {e}") from e
    log.info("node %s on chain: %s", node_id, action)
    return action


def registry_peers(
    client: ChainClient, *, base_model: str, exclude_node: str, rng: random.Random | None = None
) -> tuple[set[str], list[str]]:
    """(peer ids, multiaddrs) of the other active nodes in the registry that serve the same base model: their
    addresses (at most MAX_MULTIADDRS each: a registry deployed before it bounded them may list any number) node by
    node in a random order. Registering a node costs only gas: read with one call per registered node, thousands of
    registrations made every start wait; the registry's node events are now read in one pass (three eth_getLogs).
    The dials themselves run in the background, a few at a time (P2PNode.add_peers); in a random order, no run of
    registrations placed together in the registry (every address dead, say) holds the live nodes back behind it."""
    live = _live_peers(client, base_model, exclude_node)
    (rng or random.SystemRandom()).shuffle(live)
    return {n.peer_id for n in live}, [a for n in live for a in n.multiaddrs[:MAX_MULTIADDRS]]


def refresh_registry_peers(client: ChainClient, peers: set[str], *, base_model: str, exclude_node: str) -> list[str]:
    """Read the registry's nodes again into `peers`, in place (the mesh holds its `__contains__`): a node
    registered since joins it, one deactivated or moved to another base leaves it. Read only at start, a node
    registered later was a stranger to this one until it restarted, its announcements and DHT records ranked
    with made-up ones. Returns the addresses of the nodes that joined, to dial."""
    live = _live_peers(client, base_model, exclude_node)
    now = {n.peer_id for n in live}
    peers.intersection_update(now)  # one operation each: the mesh's thread reads the set meanwhile
    joined = [n for n in live if n.peer_id not in peers]
    peers.update(now)
    return [a for n in joined for a in n.multiaddrs[:MAX_MULTIADDRS]]


def _live_peers(client: ChainClient, base_model: str, exclude_node: str) -> list[NodeInfo]:
    nodes = _registered_nodes(client)
    return [n for n in nodes.values() if n.active and n.base_model == base_model and n.node_id != exclude_node]


def _registered_nodes(client: ChainClient) -> dict[str, NodeInfo]:
    """Every registered node as the registry's events leave it (ledger.registry_events: the meaning the gateway's
    mirror and the explorer give them), folded in chain order."""
    events = [ev for name in _NODE_EVENTS for ev in client.events("registry", name)]
    events.sort(key=lambda ev: (ev["blockNumber"], ev["logIndex"]))
    nodes: dict[str, NodeInfo] = {}
    for ev in events:
        try:
            u = registry_update(ev)
        except (KeyError, TypeError, ValueError) as e:  # anyone can register; a malformed event is its own loss
            log.warning("skipping a registry event in block %s: %s", ev.get("blockNumber"), e)
            continue
        if isinstance(u, NodeRegistered):
            nodes[u.node.node_id] = u.node
        elif isinstance(u, NodeUpdated) and u.node_id in nodes:
            nodes[u.node_id] = replace(
                nodes[u.node_id], base_model=u.base_model, peer_id=u.peer_id, api_url=u.api_url, multiaddrs=u.multiaddrs
            )
        elif isinstance(u, NodeActiveChanged) and u.node_id in nodes:
            nodes[u.node_id] = replace(nodes[u.node_id], active=u.active)
    return nodes


def owner_lookup(client: ChainClient):
    """`owner_of(adapter_id) -> address | None` backed by the adapter registry (None = unregistered):
    the adapter's publisher, who registered it and signed its package (its reward owner may since have
    changed with transferAdapter; the signature does not)."""

    def owner_of(adapter_id: str) -> str | None:
        try:
            return client.get_adapter(adapter_id).publisher
        except UnknownAdapter:
            return None

    return owner_of
