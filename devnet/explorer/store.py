"""Read-only queries on the ledger database: the gateway's outbox rows and the settler's batches."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import inspect
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from gateway.disputes import NodeDisputes, node_disputes
from gateway.tables import NodeReadmission
from ledger.db import make_engine, redact_url
from ledger.models import RecordStatus, SettlementBatch, UsageRecord
from ledger.outbox import batch_records, count_by_status

# every status but settled (RecordStatus's values), so that listing them reads the few unsettled rows only
UNSETTLED = tuple(v for k, v in vars(RecordStatus).items() if k.isupper() and v != RecordStatus.SETTLED)


class ExplorerDatabaseError(RuntimeError):
    """The ledger database is missing or is not a loramesh ledger database."""


def open_ledger_db(url: str) -> Engine:
    """An engine on an existing ledger database; never creates one (the explorer only reads)."""
    if url.startswith("sqlite:///") and url not in ("sqlite:///:memory:",):
        path = Path(url.removeprefix("sqlite:///")).expanduser()
        if not path.is_file():
            raise ExplorerDatabaseError(f"ledger database {path} does not exist: point --db at the gateway's database")
    engine = make_engine(url)
    try:
        tables = set(inspect(engine).get_table_names())
    except SQLAlchemyError as e:
        engine.dispose()
        raise ExplorerDatabaseError(f"cannot open ledger database {redact_url(url)}: {e.__class__.__name__}") from e
    missing = {UsageRecord.__tablename__, SettlementBatch.__tablename__} - tables
    if missing:
        engine.dispose()
        raise ExplorerDatabaseError(
            f"database {redact_url(url)} has no {', '.join(sorted(missing))} table: "
            "expected the gateway's ledger database"
        )
    return engine


class LedgerStore:
    """What the ledger database knows about records and batches."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def record(self, request_id: str) -> UsageRecord | None:
        with Session(self.engine) as s:
            return s.exec(select(UsageRecord).where(UsageRecord.request_id == request_id)).first()

    def batch(self, batch_id: str) -> SettlementBatch | None:
        with Session(self.engine) as s:
            return s.exec(select(SettlementBatch).where(SettlementBatch.batch_id == batch_id)).first()

    def batch_by_tx(self, tx_hash: str) -> SettlementBatch | None:
        with Session(self.engine) as s:
            return s.exec(select(SettlementBatch).where(SettlementBatch.tx_hash == tx_hash)).first()

    def batch_records(self, batch_id: str) -> list[UsageRecord]:
        """The batch's records in leaf order."""
        with Session(self.engine) as s:
            return batch_records(s, batch_id)

    def counts(self) -> dict[str, int]:
        with Session(self.engine) as s:
            return count_by_status(s)

    def disputed(self, limit: int = 500, offset: int = 0) -> list[UsageRecord]:
        """Records whose node receipt disagreed with the gateway's count beyond tolerance, newest first."""
        with Session(self.engine) as s:
            stmt = (
                select(UsageRecord)
                .where(UsageRecord.status == RecordStatus.DISPUTED)
                .order_by(UsageRecord.id.desc())
                .offset(offset)
                .limit(limit)
            )
            return list(s.exec(stmt).all())

    def node_disputes(self) -> dict[str, NodeDisputes]:
        """Each node with disputed records: how many, and whether the gateway's operator readmitted it since
        (gateway.disputes). Empty on a database no gateway of this version opened (no readmission table)."""
        if not inspect(self.engine).has_table(NodeReadmission.__tablename__):
            return {}
        return {d.node_id: d for d in node_disputes(self.engine, include_readmitted=True)}

    def unsettled(self, limit: int = 100) -> list[UsageRecord]:
        """Records not (yet) settled, newest first: pending, submitted or rejected."""
        with Session(self.engine) as s:
            stmt = (
                select(UsageRecord)
                .where(col(UsageRecord.status).in_(UNSETTLED))  # IN, not !=: answered from the status index
                .order_by(UsageRecord.id.desc())
                .limit(limit)
            )
            return list(s.exec(stmt).all())
