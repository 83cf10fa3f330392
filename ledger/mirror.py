"""Keep the registry mirror tables (datasets, names, adapters, nodes) current from AdapterRegistry events.

The cursor keeps the hash of the last block read: when the chain's block at that height is another (a reorg, or a
chain reset), the mirror is read again from the deploy block, as the explorer's index is. Events of a dropped block
would otherwise stay applied (a node the chain does not know, routed to), and events mined again at a height
already read would never be (an owner's new price). A gateway reads `settle_confirmations` blocks behind the
head: on a public chain set to its reorg depth, a rebuild is rare."""

from __future__ import annotations

import json
import logging
import secrets
import threading
import weakref

from sqlalchemy import delete, inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError, IntegrityError, ProgrammingError
from sqlmodel import Session

from common.wire import hex0x
from ledger import registry_events as RE
from ledger.chain import ChainClient
from ledger.db import is_postgres
from ledger.models import AdapterMirror, DatasetMirror, NameMirror, NodeMirror, SyncCursor

log = logging.getLogger(__name__)

CURSOR = "registry"
# a cursor row whose block_ref is a fresh random token each time the mirror's rows change (events applied, or the
# tables cleared): readers of the snapshot reload it only then (`changes`), also after a sibling gateway's write
CHANGES = "registry_changes"
_SYNC_LOCK = 0x6C6D5F6D6972  # pg_try_advisory_xact_lock key of sync_registry ("lm_mir")
MIRRORS = (DatasetMirror, NameMirror, AdapterMirror, NodeMirror)
_AT = ":"  # SyncCursor.block_ref is "<block>:<hash>"
# a chain whose head is more than this many blocks below the cursor was reset (or reorged that deep), not answered
# by a provider's backend a block or two behind
PROVIDER_LAG_BLOCKS = 8
_checked: weakref.WeakSet = weakref.WeakSet()
_checked_lock = threading.Lock()


def ensure_mirror_schema(engine: Engine) -> bool:
    """Make the mirror tables match the models. The mirrors are derived from chain events, so tables of
    an older schema (a database from before a registry upgrade, or a cursor without its block's hash) are
    dropped, recreated and re-synced from the deploy block; returns True when that happened. Checked once per
    engine."""
    with _checked_lock:
        if engine in _checked:
            return False
        insp = inspect(engine)
        stale = []
        for model in (*MIRRORS, SyncCursor):
            table = model.__table__
            if insp.has_table(table.name):
                have = {c["name"] for c in insp.get_columns(table.name)}
                if not {c.name for c in table.columns} <= have:
                    stale.append(table)
        if stale:
            log.warning(
                "registry mirror tables of an older schema (%s): rebuilding them from chain events",
                ", ".join(t.name for t in stale),
            )
            # the cursor first: SQLite commits each DROP on its own, and a process killed between two of them must
            # leave no cursor over tables emptied (the next start would take them for a mirror read to the head)
            for model in (SyncCursor, *MIRRORS):
                model.__table__.drop(engine, checkfirst=True)
        for model in (*MIRRORS, SyncCursor):
            model.__table__.create(engine, checkfirst=True)
        _checked.add(engine)
        return bool(stale)


def sync_registry(engine: Engine, client: ChainClient, *, confirmations: int = 0) -> int:
    """Apply registry events after the stored cursor up to `confirmations` blocks behind the head; returns how
    many. The chain is read outside any database transaction (a SQLite write lock held through a rescan's reads
    stalled every other writer of the gateway's database), then the events are written in one. Gateways sharing
    one PostgreSQL database write one at a time: while another holds the sync lock, or has moved the cursor since
    it was read, this returns 0 (that one wrote the same rows)."""
    ensure_mirror_schema(engine)
    with Session(engine) as s:
        cursor = s.get(SyncCursor, CURSOR)
        seen = None if cursor is None else (cursor.block, cursor.block_ref)
    head = client.block_number()
    to_block = head - confirmations
    rebuild = False
    if (known := _cursor_hash(cursor)) is not None:
        now = client.block_hash(cursor.block)
        if now is None and cursor.block <= head + PROVIDER_LAG_BLOCKS:
            return 0  # a provider's backend that does not have the block yet: the next sync looks again
        rebuild = now != known  # another block there, or a chain far shorter than the cursor: reorged or reset
    start = client.deployment.deploy_block if cursor is None or rebuild else cursor.block + 1
    if start > to_block:
        return 0
    to_hash = client.block_hash(to_block)
    logs = [
        ev for name in RE.REGISTRY_EVENTS for ev in client.events("registry", name, from_block=start, to_block=to_block)
    ]
    if to_hash is None or client.block_hash(to_block) != to_hash:
        return 0  # a reorg while reading: these events may be of either history; the next sync reads again
    logs.sort(key=lambda ev: (ev["blockNumber"], ev["logIndex"]))
    with Session(engine) as s:
        if (
            is_postgres(engine)
            and not s.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _SYNC_LOCK}).scalar()
        ):
            return 0
        cursor = s.get(SyncCursor, CURSOR)
        if (None if cursor is None else (cursor.block, cursor.block_ref)) != seen:
            return 0
        if rebuild:
            log.warning(
                "registry mirror: block %d is no longer the chain's (a reorg, or the chain was reset): reading the "
                "registry again from its deploy block",
                cursor.block,
            )
        if rebuild or cursor is None:  # from the deploy block: over nothing a rebuild killed midway left
            for model in MIRRORS:
                s.execute(delete(model))
        for ev in logs:
            _apply_or_skip(s, ev)
        s.merge(SyncCursor(name=CURSOR, block=to_block, block_ref=f"{to_block}{_AT}{to_hash}"))
        if logs or rebuild or cursor is None:
            s.merge(SyncCursor(name=CHANGES, block=0, block_ref=secrets.token_hex(16)))
        s.commit()
    log.debug("registry mirror: %d events up to block %d", len(logs), to_block)
    return len(logs)


def changes(engine: Engine) -> str | None:
    """The mirror's change token: another value than before means its rows may have changed since (None: no
    writer has set one, as a gateway of an older release does not)."""
    with Session(engine) as s:
        row = s.get(SyncCursor, CHANGES)
        return None if row is None else row.block_ref


def _cursor_hash(cursor: SyncCursor | None) -> str | None:
    """The hash the cursor's block had when it was read, kept as "<block>:<hash>"; None when unknown: no cursor,
    none written yet, or written for another block (a gateway of an older release, on a shared database, moves the
    block alone)."""
    if cursor is None or not cursor.block_ref:
        return None
    number, _, block_hash = cursor.block_ref.partition(_AT)
    return block_hash if number == str(cursor.block) else None


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
    log.error(
        "registry mirror: %s at block %s (tx %s) cannot be mirrored and is skipped: %s",
        ev["event"],
        ev["blockNumber"],
        hex0x(tx) if tx is not None else "?",
        why,
    )


def _apply(s: Session, ev) -> None:
    """Write one registry event's update into the mirror rows (a row an update names that is not there raises
    AttributeError: the event that made it was skipped)."""
    u, block = RE.registry_update(ev), ev["blockNumber"]
    if isinstance(u, RE.DatasetRegistered):
        d = u.dataset
        s.merge(
            DatasetMirror(
                dataset_id=d.dataset_id,
                content_hash=d.content_hash,
                payee=d.payee,
                contributor=d.contributor,
                name=d.name,
                registered_block=block,
                updated_block=block,
            )
        )
    elif isinstance(u, RE.DatasetPayeeChanged):
        row = s.get(DatasetMirror, u.dataset_id)
        row.payee, row.updated_block = u.payee, block
    elif isinstance(u, RE.NameRegistered):
        s.merge(NameMirror(name=u.name, owner=u.owner, registered_block=block, updated_block=block))
    elif isinstance(u, RE.NameTransferred):
        row = s.get(NameMirror, u.name)
        row.owner, row.updated_block = u.new_owner, block
    elif isinstance(u, RE.AdapterRegistered):
        ad = u.adapter
        datasets = [[d, b] for d, b in zip(ad.dataset_ids, ad.shares_bps)]
        s.merge(
            AdapterMirror(
                adapter_id=ad.adapter_id,
                owner=ad.owner,
                publisher=ad.publisher,
                name=ad.name,
                version=ad.version,
                predecessor=ad.predecessor,
                base_model=ad.base_model,
                price_per_1k_tokens=str(ad.price_per_1k_tokens),
                datasets_json=json.dumps(datasets),
                registered_block=block,
                updated_block=block,
            )
        )
    elif isinstance(u, RE.AdapterPriceChanged):
        row = s.get(AdapterMirror, u.adapter_id)
        row.price_per_1k_tokens, row.updated_block = str(u.price_per_1k_tokens), block
    elif isinstance(u, RE.AdapterOwnershipTransferred):
        row = s.get(AdapterMirror, u.adapter_id)
        row.owner, row.updated_block = u.new_owner, block
    elif isinstance(u, RE.NodeRegistered):
        n = u.node
        # public_key is stored as bare hex (no "0x"): gateway.chain_registry reads it with bytes.fromhex
        s.merge(
            NodeMirror(
                node_id=n.node_id,
                operator=n.operator,
                public_key=n.public_key[2:],
                active=n.active,
                base_model=n.base_model,
                peer_id=n.peer_id,
                api_url=n.api_url,
                multiaddrs_json=json.dumps(list(n.multiaddrs)),
                registered_block=block,
                updated_block=block,
            )
        )
    elif isinstance(u, RE.NodeUpdated):
        row = s.get(NodeMirror, u.node_id)
        row.base_model, row.peer_id, row.api_url = u.base_model, u.peer_id, u.api_url
        row.multiaddrs_json, row.updated_block = json.dumps(list(u.multiaddrs)), block
    elif isinstance(u, RE.NodeActiveChanged):
        row = s.get(NodeMirror, u.node_id)
        row.active, row.updated_block = u.active, block
