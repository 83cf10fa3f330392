"""What a settlement batch is formed from: the oldest pending outbox rows, their on-chain records
and the batch's deterministic id."""

from __future__ import annotations

from eth_utils import keccak
from sqlmodel import Session, select

from ledger.models import RecordStatus, UsageRecord
from ledger.types import SettleRecord, id_bytes

BATCH_DOMAIN = b"loramesh.batch.v1"


def batch_id_for(request_ids: list[str]) -> str:
    """Deterministic batch id: keccak256(domain || request ids in batch order)."""
    return "0x" + keccak(BATCH_DOMAIN + b"".join(id_bytes(r) for r in request_ids)).hex()


def to_settle_record(r: UsageRecord) -> SettleRecord:
    return SettleRecord(r.request_id, r.adapter_id, r.node_id, r.prompt_tokens, r.completion_tokens)


_PENDING_COLUMNS = (UsageRecord.id, UsageRecord.request_id, UsageRecord.adapter_id, UsageRecord.node_id,
                    UsageRecord.prompt_tokens, UsageRecord.completion_tokens, UsageRecord.created_at)  # fmt: skip


def pending_rows(session: Session, limit: int) -> list:
    """The oldest pending records as plain rows (the ORM objects cost more than the rest of a batch)."""
    stmt = (select(*_PENDING_COLUMNS).where(UsageRecord.status == RecordStatus.PENDING)
            .order_by(UsageRecord.id).limit(limit))  # fmt: skip
    return list(session.exec(stmt).all())
