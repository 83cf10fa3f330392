"""Keep the registry mirror tables (datasets, names, adapters, nodes) current from AdapterRegistry events."""

from __future__ import annotations

import json
import logging
import threading
import weakref

from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError, IntegrityError, ProgrammingError
from sqlmodel import Session

from ledger.chain import ChainClient
from ledger.db import is_postgres
from ledger.models import AdapterMirror, DatasetMirror, NameMirror, NodeMirror, SyncCursor

log = logging.getLogger(__name__)

CURSOR = "registry"
_SYNC_LOCK = 0x6C6D5F6D6972  # pg_try_advisory_xact_lock key of sync_registry ("lm_mir")
EVENTS = ("DatasetRegistered", "DatasetPayeeChanged", "NameRegistered", "NameTransferred", "AdapterRegistered",
          "AdapterPriceChanged", "AdapterOwnershipTransferred", "NodeRegistered", "NodeUpdated",
          "NodeActiveChanged")  # fmt: skip
MIRRORS = (DatasetMirror, NameMirror, AdapterMirror, NodeMirror)
_checked: weakref.WeakSet = weakref.WeakSet()
_checked_lock = threading.Lock()


def ensure_mirror_schema(engine: Engine) -> bool:
    """Make the mirror tables match the models. The mirrors are derived from chain events, so tables of
    an older schema (a database from before a registry upgrade) are dropped, recreated and re-synced
    from the deploy block; returns True when that happened. Checked once per engine."""
    with _checked_lock:
        if engine in _checked:
            return False
        insp = inspect(engine)
        stale = []
        for model in MIRRORS:
            table = model.__table__
            if insp.has_table(table.name):
                have = {c["name"] for c in insp.get_columns(table.name)}
                if not {c.name for c in table.columns} <= have:
                    stale.append(table)
        if stale:
            log.warning("registry mirror tables of an older schema (%s): rebuilding them from chain events",
                        ", ".join(t.name for t in stale))  # fmt: skip
            for model in MIRRORS:
                model.__table__.drop(engine, checkfirst=True)
            with Session(engine) as s:
                if (cur := s.get(SyncCursor, CURSOR)) is not None:
                    s.delete(cur)
                s.commit()
        for model in (*MIRRORS, SyncCursor):
            model.__table__.create(engine, checkfirst=True)
        _checked.add(engine)
        return bool(stale)


def _h(b: bytes) -> str:
    return "0x" + bytes(b).hex()


def sync_registry(engine: Engine, client: ChainClient, *, to_block: int | None = None) -> int:
    """Apply registry events after the stored cursor up to `to_block` (default latest); returns how many.
    Gateways sharing one PostgreSQL database sync one at a time: while another holds the sync lock this
    returns 0 at once (that one is writing the same rows; two would collide on their keys)."""
    ensure_mirror_schema(engine)
    to_block = client.block_number() if to_block is None else to_block
    with Session(engine) as s:
        if is_postgres(engine) and not s.execute(text("SELECT pg_try_advisory_xact_lock(:k)"),
                                                 {"k": _SYNC_LOCK}).scalar():  # fmt: skip
            return 0
        cursor = s.get(SyncCursor, CURSOR)
        start = client.deployment.deploy_block if cursor is None else cursor.block + 1
        if start > to_block:
            return 0
        logs = [ev for name in EVENTS for ev in client.events("registry", name, from_block=start, to_block=to_block)]
        logs.sort(key=lambda ev: (ev["blockNumber"], ev["logIndex"]))
        for ev in logs:
            _apply_or_skip(s, ev)
        s.merge(SyncCursor(name=CURSOR, block=to_block))
        s.commit()
    log.debug("registry mirror: %d events up to block %d", len(logs), to_block)
    return len(logs)


def _apply_or_skip(s: Session, ev) -> None:
    """Apply one event in a savepoint of its own. An event the database refuses for what it holds (a value
    too large for an index, a key that collides) or that names a row a skipped event never wrote is logged
    and skipped: one bad event must not stop the cursor forever. Anything passing (a lost connection, a
    lock or statement timeout, a deadlock: OperationalError, InternalError) fails the whole sync, which is
    retried: skipping those would lose events for good."""
    try:
        with s.begin_nested():
            _apply(s, ev)
            s.flush()
    except (IntegrityError, DataError, ProgrammingError) as e:
        if e.connection_invalidated:
            raise
        _skipped(ev, e)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        _skipped(ev, e)


def _skipped(ev, e: Exception) -> None:
    tx = ev.get("transactionHash")
    why = (str(e).splitlines() or [type(e).__name__])[0][:300]
    log.error("registry mirror: %s at block %s (tx %s) cannot be mirrored and is skipped: %s", ev["event"],
              ev["blockNumber"], "0x" + bytes(tx).hex() if tx is not None else "?", why)  # fmt: skip


def _apply(s: Session, ev) -> None:
    a, block, name = ev["args"], ev["blockNumber"], ev["event"]
    if name == "DatasetRegistered":  # the registering address is the contributor and first payee
        s.merge(DatasetMirror(dataset_id=_h(a["datasetId"]), content_hash=_h(a["contentHash"]), payee=a["payee"],
                              contributor=a["payee"], name=a["name"], registered_block=block,
                              updated_block=block))  # fmt: skip
    elif name == "DatasetPayeeChanged":
        row = s.get(DatasetMirror, _h(a["datasetId"]))
        row.payee, row.updated_block = a["payee"], block
    elif name == "NameRegistered":
        s.merge(NameMirror(name=a["name"], owner=a["owner"], registered_block=block, updated_block=block))
    elif name == "NameTransferred":
        row = s.get(NameMirror, a["name"])
        row.owner, row.updated_block = a["newOwner"], block
    elif name == "AdapterRegistered":
        spec = a["spec"]
        datasets = [[_h(d), int(b)] for d, b in zip(spec["datasetIds"], spec["sharesBps"])]
        s.merge(AdapterMirror(
            adapter_id=_h(a["adapterId"]), owner=a["owner"], publisher=a["owner"], name=spec["name"],
            version=spec["version"],
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
            node_id=_h(a["nodeId"]), operator=a["operator"], public_key=bytes(a.get("publicKey", b"")).hex(),
            active=True, base_model=_h(a["baseModel"]),
            peer_id=a["peerId"], api_url=a["apiUrl"], multiaddrs_json=json.dumps(list(a["multiaddrs"])),
            registered_block=block, updated_block=block))  # fmt: skip
    elif name == "NodeUpdated":
        row = s.get(NodeMirror, _h(a["nodeId"]))
        row.base_model, row.peer_id, row.api_url = _h(a["baseModel"]), a["peerId"], a["apiUrl"]
        row.multiaddrs_json, row.updated_block = json.dumps(list(a["multiaddrs"])), block
    elif name == "NodeActiveChanged":
        row = s.get(NodeMirror, _h(a["nodeId"]))
        row.active, row.updated_block = bool(a["active"]), block
