"""Disputed nodes: which are kept out of routing, and the operator's way back for one.

A record is disputed when a node's receipt or text belies what the gateway relayed (gateway.usage); its
node then gets no traffic from any gateway on the database: each reads `kept_out` when it starts and every
registry_sync_s (gateway.usage_book.UsageBook.sync_disputes). The records stay disputed and are never
settled: they are the evidence. An operator who judges a node honest after all (a client can force odd
output; a bug of ours can misjudge) readmits it with `loramesh gateway disputes readmit`: the disputes
recorded up to then no longer keep it out, and any later one does again."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import case, func, or_
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, select

from gateway.tables import NodeReadmission
from ledger.models import RecordStatus, UsageRecord, utcnow

MIN_PREFIX_DIGITS = 6  # a node named by fewer hex digits is too easily the wrong one
READMIT_LOCK_WAIT_S = 10.0  # the longest a readmission waits for the usage records' writers in flight
LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's SQLSTATE for a lock_timeout that ran out


class DisputeError(ValueError):
    """A readmission that cannot be made as asked (no such disputed node, several, nothing to readmit)."""


@dataclass(frozen=True)
class NodeDisputes:
    node_id: str
    records: int  # its disputed records, all of them
    open: int  # those recorded after its last readmission: while any is, the node is kept out
    last_reason: str  # why its latest record was disputed
    last_at: datetime
    last_record_id: int
    readmitted_at: datetime | None = None
    note: str = ""  # the operator's words at its last readmission


def _after_readmission():
    """A disputed record that keeps its node out: none of its node's readmissions reaches it."""
    return or_(NodeReadmission.through_record_id.is_(None), UsageRecord.id > NodeReadmission.through_record_id)


def kept_out(engine: Engine) -> dict[str, str]:
    """Node id -> the reason of its latest dispute, for each node with a dispute not readmitted."""
    latest = (
        select(func.max(UsageRecord.id))
        .outerjoin(NodeReadmission, NodeReadmission.node_id == UsageRecord.node_id)
        .where(UsageRecord.status == RecordStatus.DISPUTED)
        .where(_after_readmission())
        .group_by(UsageRecord.node_id)
    )
    with Session(engine) as s:
        rows = s.exec(select(UsageRecord.node_id, UsageRecord.error).where(UsageRecord.id.in_(latest))).all()
    return {node_id: error or "disputed" for node_id, error in rows}


def node_disputes(engine: Engine, *, include_readmitted: bool = False) -> list[NodeDisputes]:
    """Every node with disputed records (those kept out only, unless include_readmitted), latest first."""
    with Session(engine) as s:
        return _node_disputes(s, include_readmitted=include_readmitted)


def _node_disputes(s: Session, *, include_readmitted: bool) -> list[NodeDisputes]:
    summary = (
        select(
            UsageRecord.node_id,
            func.count(),
            func.sum(case((_after_readmission(), 1), else_=0)),
            func.max(UsageRecord.id),
            func.max(UsageRecord.created_at),
        )
        .outerjoin(NodeReadmission, NodeReadmission.node_id == UsageRecord.node_id)
        .where(UsageRecord.status == RecordStatus.DISPUTED)
        .group_by(UsageRecord.node_id)
    )
    rows = s.exec(summary).all()
    last_ids = [r[3] for r in rows]
    reasons = dict(s.exec(select(UsageRecord.id, UsageRecord.error).where(UsageRecord.id.in_(last_ids))).all())
    readmissions = {r.node_id: r for r in s.exec(select(NodeReadmission)).all()}
    out = []
    for node_id, records, open_, last_id, last_at in rows:
        if not open_ and not include_readmitted:
            continue
        r = readmissions.get(node_id)
        out.append(
            NodeDisputes(
                node_id=node_id,
                records=records,
                open=open_ or 0,
                last_reason=reasons.get(last_id) or "disputed",
                last_at=last_at,
                last_record_id=last_id,
                readmitted_at=r.readmitted_at if r is not None else None,
                note=r.note if r is not None else "",
            )
        )
    return sorted(out, key=lambda d: d.last_record_id, reverse=True)


def find_disputed(engine: Engine, ident: str) -> NodeDisputes:
    """The one disputed node whose id is `ident` or starts with it (with or without 0x)."""
    with Session(engine) as s:
        return _find_disputed(s, ident)


def _find_disputed(s: Session, ident: str) -> NodeDisputes:
    digits = ident.strip().lower().removeprefix("0x")
    if len(digits) < MIN_PREFIX_DIGITS or any(c not in "0123456789abcdef" for c in digits):
        raise DisputeError(f"give a node id, or at least {MIN_PREFIX_DIGITS} of its first hex digits (got {ident!r})")
    found = [d for d in _node_disputes(s, include_readmitted=True) if d.node_id[2:].startswith(digits)]
    if not found:
        raise DisputeError(f"no disputed node has an id starting {ident} (`loramesh gateway disputes list --all`)")
    if len(found) > 1:
        raise DisputeError(f"more than one disputed node starts with {ident}: {', '.join(d.node_id for d in found)}")
    return found[0]


def readmit(engine: Engine, ident: str, *, note: str = "") -> NodeDisputes:
    """Let a disputed node serve again: its disputes recorded up to now stop keeping it out (they stay
    disputed, unpaid). Returns the node's disputes as they were, `open` being those now readmitted.
    Running gateways route to it again within their registry_sync_s."""
    with Session(engine) as s:
        if engine.dialect.name == "postgresql":
            # a record's id is drawn from a sequence when it is inserted, not when it commits: a dispute
            # inserted before the read below and committed after it has an id under the highest read, so it
            # would be readmitted unseen. SHARE waits for the inserts in flight and holds off new ones until
            # this commits; the gateways' writes queue behind it meanwhile, so its wait is bounded. (SQLite has
            # one writer at a time: a dispute in flight there has an id above every committed one.)
            conn = s.connection()
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = {int(READMIT_LOCK_WAIT_S * 1000)}")
            try:
                conn.exec_driver_sql("LOCK TABLE usage_records IN SHARE MODE")
            except OperationalError as e:
                if getattr(e.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                    raise
                raise DisputeError(
                    f"the usage records stayed locked by writers for over {READMIT_LOCK_WAIT_S:g} s: "
                    "nothing readmitted, try again"
                ) from e
        node = _find_disputed(s, ident)
        if not node.open:
            raise DisputeError(
                f"node {node.node_id} is not kept out: its {node.records} disputed record(s) were readmitted "
                f"{node.readmitted_at:%Y-%m-%d %H:%M} UTC"
            )
        s.merge(
            NodeReadmission(
                node_id=node.node_id, through_record_id=node.last_record_id, readmitted_at=utcnow(), note=note[:500]
            )
        )
        s.commit()
    return node
