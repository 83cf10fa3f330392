"""The node's side of the chain: register itself in the node registry, find peers there, look up owners."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from common.wire import hex0x
from ledger.chain import ChainClient
from ledger.errors import ContractError, UnknownAdapter, UnknownNode
from ledger.types import MAX_MULTIADDRS, node_address_problem

log = logging.getLogger(__name__)


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


def registry_peers(client: ChainClient, *, base_model: str, exclude_node: str) -> tuple[set[str], list[str]]:
    """(peer ids, multiaddrs) of the other active nodes in the registry that serve the same base model: at most
    MAX_MULTIADDRS addresses each (a registry deployed before it bounded them may list any number)."""
    node_ids = {hex0x(ev["args"]["nodeId"]) for ev in client.events("registry", "NodeRegistered")}
    peer_ids: set[str] = set()
    addrs: list[str] = []
    for node_id in sorted(node_ids - {exclude_node}):
        info = client.get_node(node_id)
        if info.active and info.base_model == base_model:
            peer_ids.add(info.peer_id)
            addrs.extend(info.multiaddrs[:MAX_MULTIADDRS])
    return peer_ids, addrs


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
