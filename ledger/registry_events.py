"""AdapterRegistry events as typed updates: the one reading of what each registry event does to the registry's
state. The gateway's mirror tables (ledger.mirror) and the explorer's in-memory index (devnet.explorer.index)
both apply these, each to its own storage, so an event means the same thing to both.

`registry_update(event)` takes a web3-decoded log (`event`, `args`) and returns one of the update classes
below, or None for an event that is not a registry one (the explorer also reads the ledger's events).
Ids and hashes come out as "0x" + 64 lowercase hex (common.wire), amounts as ints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.wire import hex0x
from ledger.types import AdapterInfo, DatasetInfo, NodeInfo

# every AdapterRegistry event that changes its state, in the order the registry's ABI declares them
REGISTRY_EVENTS = (
    "DatasetRegistered",
    "DatasetPayeeChanged",
    "NameRegistered",
    "NameTransferred",
    "AdapterRegistered",
    "AdapterPriceChanged",
    "AdapterOwnershipTransferred",
    "NodeRegistered",
    "NodeUpdated",
    "NodeActiveChanged",
)


@dataclass(frozen=True, slots=True)
class DatasetRegistered:
    """A new dataset; its registering address is its contributor and first payee."""

    dataset: DatasetInfo


@dataclass(frozen=True, slots=True)
class DatasetPayeeChanged:
    dataset_id: str
    payee: str


@dataclass(frozen=True, slots=True)
class NameRegistered:
    """An adapter name claimed: only its owner registers versions under it."""

    name: str
    owner: str


@dataclass(frozen=True, slots=True)
class NameTransferred:
    name: str
    previous_owner: str
    new_owner: str


@dataclass(frozen=True, slots=True)
class AdapterRegistered:
    """A new adapter, owned and published by its registering address."""

    adapter: AdapterInfo


@dataclass(frozen=True, slots=True)
class AdapterPriceChanged:
    adapter_id: str
    price_per_1k_tokens: int


@dataclass(frozen=True, slots=True)
class AdapterOwnershipTransferred:
    """The adapter's owner share goes to new_owner from now on; its publisher stays."""

    adapter_id: str
    previous_owner: str
    new_owner: str


@dataclass(frozen=True, slots=True)
class NodeRegistered:
    """A node registered, active, by its operator with its key's proof. A node registered again (its key
    holder moved it to another operator) is replaced whole."""

    node: NodeInfo


@dataclass(frozen=True, slots=True)
class NodeUpdated:
    node_id: str
    base_model: str
    peer_id: str
    api_url: str
    multiaddrs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NodeActiveChanged:
    node_id: str
    active: bool


RegistryUpdate = (
    DatasetRegistered
    | DatasetPayeeChanged
    | NameRegistered
    | NameTransferred
    | AdapterRegistered
    | AdapterPriceChanged
    | AdapterOwnershipTransferred
    | NodeRegistered
    | NodeUpdated
    | NodeActiveChanged
)


def registry_update(event: Any) -> RegistryUpdate | None:
    """The update a decoded registry event makes; None when the event is not one of REGISTRY_EVENTS.
    A malformed event raises KeyError, TypeError or ValueError."""
    name, a = event["event"], event["args"]
    if name == "DatasetRegistered":
        return DatasetRegistered(
            DatasetInfo(hex0x(a["datasetId"]), hex0x(a["contentHash"]), a["payee"], a["payee"], a["name"])
        )
    if name == "DatasetPayeeChanged":
        return DatasetPayeeChanged(hex0x(a["datasetId"]), a["payee"])
    if name == "NameRegistered":
        return NameRegistered(a["name"], a["owner"])
    if name == "NameTransferred":
        return NameTransferred(a["name"], a["previousOwner"], a["newOwner"])
    if name == "AdapterRegistered":
        spec = a["spec"]
        return AdapterRegistered(
            AdapterInfo(
                hex0x(a["adapterId"]),
                a["owner"],
                spec["name"],
                spec["version"],
                hex0x(spec["predecessor"]),
                hex0x(spec["baseModel"]),
                int(spec["pricePer1kTokens"]),
                tuple(hex0x(d) for d in spec["datasetIds"]),
                tuple(int(b) for b in spec["sharesBps"]),
                publisher=a["owner"],
            )
        )
    if name == "AdapterPriceChanged":
        return AdapterPriceChanged(hex0x(a["adapterId"]), int(a["pricePer1kTokens"]))
    if name == "AdapterOwnershipTransferred":
        return AdapterOwnershipTransferred(hex0x(a["adapterId"]), a["previousOwner"], a["newOwner"])
    if name == "NodeRegistered":
        return NodeRegistered(
            NodeInfo(
                hex0x(a["nodeId"]),
                a["operator"],
                True,
                hex0x(a["baseModel"]),
                a["peerId"],
                a["apiUrl"],
                tuple(a["multiaddrs"]),
                hex0x(a["publicKey"]),
            )
        )
    if name == "NodeUpdated":
        return NodeUpdated(hex0x(a["nodeId"]), hex0x(a["baseModel"]), a["peerId"], a["apiUrl"], tuple(a["multiaddrs"]))
    if name == "NodeActiveChanged":
        return NodeActiveChanged(hex0x(a["nodeId"]), bool(a["active"]))
    return None
