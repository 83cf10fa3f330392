"""Keep the registry mirror tables (datasets, adapters, nodes) current from AdapterRegistry events."""

from __future__ import annotations

import json
import logging

from sqlalchemy.engine import Engine
from sqlmodel import Session

from ledger.chain import ChainClient
from ledger.models import AdapterMirror, DatasetMirror, NodeMirror, SyncCursor

log = logging.getLogger(__name__)

CURSOR = "registry"
EVENTS = ("DatasetRegistered", "DatasetPayeeChanged", "AdapterRegistered", "AdapterPriceChanged",
          "AdapterOwnershipTransferred", "NodeRegistered", "NodeUpdated", "NodeActiveChanged")  # fmt: skip


def _h(b: bytes) -> str:
    return "0x" + bytes(b).hex()


def sync_registry(engine: Engine, client: ChainClient, *, to_block: int | None = None) -> int:
    """Apply registry events after the stored cursor up to `to_block` (default latest); returns how many."""
    to_block = client.block_number() if to_block is None else to_block
    with Session(engine) as s:
        cursor = s.get(SyncCursor, CURSOR)
        start = client.deployment.deploy_block if cursor is None else cursor.block + 1
        if start > to_block:
            return 0
        logs = [ev for name in EVENTS for ev in client.events("registry", name, from_block=start, to_block=to_block)]
        logs.sort(key=lambda ev: (ev["blockNumber"], ev["logIndex"]))
        for ev in logs:
            _apply(s, ev)
        s.merge(SyncCursor(name=CURSOR, block=to_block))
        s.commit()
    log.debug("registry mirror: %d events up to block %d", len(logs), to_block)
    return len(logs)


def _apply(s: Session, ev) -> None:
    a, block, name = ev["args"], ev["blockNumber"], ev["event"]
    if name == "DatasetRegistered":
        s.merge(DatasetMirror(dataset_id=_h(a["datasetId"]), content_hash=_h(a["contentHash"]), payee=a["payee"],
                              registered_block=block, updated_block=block))  # fmt: skip
    elif name == "DatasetPayeeChanged":
        row = s.get(DatasetMirror, _h(a["datasetId"]))
        row.payee, row.updated_block = a["payee"], block
    elif name == "AdapterRegistered":
        spec = a["spec"]
        datasets = [[_h(d), int(b)] for d, b in zip(spec["datasetIds"], spec["sharesBps"])]
        s.merge(AdapterMirror(
            adapter_id=_h(a["adapterId"]), owner=a["owner"], name=spec["name"], version=spec["version"],
            predecessor=_h(spec["predecessor"]), base_model=_h(spec["baseModel"]),
            price_per_1k_tokens=str(spec["pricePer1kTokens"]), datasets_json=json.dumps(datasets),
            registered_block=block, updated_block=block))  # fmt: skip
    elif name == "AdapterPriceChanged":
        row = s.get(AdapterMirror, _h(a["adapterId"]))
        row.price_per_1k_tokens, row.updated_block = str(a["pricePer1kTokens"]), block
    elif name == "AdapterOwnershipTransferred":
        row = s.get(AdapterMirror, _h(a["adapterId"]))
        row.owner, row.updated_block = a["newOwner"], block
    elif name == "NodeRegistered":
        s.merge(NodeMirror(
            node_id=_h(a["nodeId"]), operator=a["operator"], active=True, base_model=_h(a["baseModel"]),
            peer_id=a["peerId"], api_url=a["apiUrl"], multiaddrs_json=json.dumps(list(a["multiaddrs"])),
            registered_block=block, updated_block=block))  # fmt: skip
    elif name == "NodeUpdated":
        row = s.get(NodeMirror, _h(a["nodeId"]))
        row.base_model, row.peer_id, row.api_url = _h(a["baseModel"]), a["peerId"], a["apiUrl"]
        row.multiaddrs_json, row.updated_block = json.dumps(list(a["multiaddrs"])), block
    elif name == "NodeActiveChanged":
        row = s.get(NodeMirror, _h(a["nodeId"]))
        row.active, row.updated_block = bool(a["active"]), block
