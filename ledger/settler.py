"""The settler: outbox records -> batches -> AttributionLedger.settleBatch, exactly once.

State machine (every step is committed before the next one acts, so a crash anywhere resumes):
  records pending --form--> batch `created` + records `submitted` (one DB transaction)
  batch created --send--> tx hash recorded, batch `sent`
  batch sent --receipt--> batch `settled` + records `settled` (one DB transaction)
The chain is the judge: before sending, and after any failure, `isSettled(batch_id)` decides. A
resent batch that already landed reverts with BatchAlreadySettled, which means "settled".
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import timedelta

from eth_utils import keccak
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from ledger.chain import ChainClient
from ledger.errors import (
    BatchAlreadySettled,
    ChainUnavailable,
    ContractError,
    LedgerError,
    TransactionFailed,
    UnknownAdapter,
    UnknownNode,
)
from ledger.merkle import MerkleTree
from ledger.models import BatchStatus, RecordStatus, SettlementBatch, UsageRecord, utcnow
from ledger.outbox import batch_records, pending_records
from ledger.types import SettleRecord, id_bytes

log = logging.getLogger(__name__)

CRASH_ENV = "LORAMESH_SETTLER_CRASH_AT"
CRASH_POINTS = ("before_send", "after_send", "after_receipt")
CRASH_EXIT_CODE = 97
BATCH_DOMAIN = b"loramesh.batch.v1"


class SettlementError(LedgerError):
    """The chain disagrees with what the database says about a batch."""


@dataclass(slots=True)
class SettlerConfig:
    """batch_size (N): most records per batch, and a full batch goes out at once; interval (T): a
    partial batch goes out when its oldest record has waited this long (seconds)."""

    batch_size: int = 100
    interval: float = 5.0
    poll: float = 0.2
    max_backoff: float = 15.0
    receipt_timeout: float = 60.0
    crash_at: str | None = field(default_factory=lambda: os.environ.get(CRASH_ENV) or None)

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= 5_000:
            raise ValueError(f"batch_size must be 1..5000, got {self.batch_size}")
        if self.interval < 0 or self.poll <= 0:
            raise ValueError(f"interval must be >= 0 and poll > 0, got {self.interval}, {self.poll}")
        if self.crash_at is not None and self.crash_at not in CRASH_POINTS:
            raise ValueError(f"{CRASH_ENV} must be one of {', '.join(CRASH_POINTS)}, got {self.crash_at!r}")


def batch_id_for(request_ids: list[str]) -> str:
    """Deterministic batch id: keccak256(domain || request ids in batch order)."""
    return "0x" + keccak(BATCH_DOMAIN + b"".join(id_bytes(r) for r in request_ids)).hex()


def to_settle_record(r: UsageRecord) -> SettleRecord:
    return SettleRecord(r.request_id, r.adapter_id, r.node_id, r.prompt_tokens, r.completion_tokens)


class Settler:
    """Moves outbox records onto the chain. One instance per database is the intended deployment;
    two would still settle each batch once (the contract refuses duplicates)."""

    def __init__(self, engine: Engine, client: ChainClient, config: SettlerConfig | None = None) -> None:
        self.engine = engine
        self.client = client
        self.config = config or SettlerConfig()
        self._known_ids: set[str] = set()  # adapter and node ids seen registered (registries never delete)

    # ------------------------------------------------------------------ loop

    def run(self, stop: threading.Event | None = None, *, drain: bool = False) -> int:
        """Settle until `stop` is set (or, with drain, until nothing is left); returns records settled.
        Chain errors are logged and retried with backoff: records wait, nothing is lost."""
        stop = stop or threading.Event()
        settled, backoff = 0, self.config.poll
        while not stop.is_set():
            try:
                n = self.step(force=drain)
                settled += n
                backoff = self.config.poll
                if n == 0:
                    if drain and not self.has_work():
                        break
                    stop.wait(self.config.poll)
            except (ChainUnavailable, TransactionFailed) as e:
                log.warning("settler waiting for the chain (retry in %.1fs): %s", backoff, e)
                stop.wait(backoff)
                backoff = min(backoff * 2, self.config.max_backoff)
            except ContractError as e:
                log.error("settlement refused by the contract (retry in %.1fs): %s", backoff, e)
                stop.wait(backoff)
                backoff = min(backoff * 2, self.config.max_backoff)
        return settled

    def drain(self) -> int:
        """Settle everything pending now (partial batches included); raises on chain errors."""
        total = 0
        while (n := self.step(force=True)) or self.has_work():
            total += n
        return total

    def has_work(self) -> bool:
        with Session(self.engine) as s:
            return s.exec(select(UsageRecord.id).where(
                UsageRecord.status.in_([RecordStatus.PENDING, RecordStatus.SUBMITTED])).limit(1)).first() is not None

    def step(self, *, force: bool = False) -> int:
        """Finish the oldest unfinished batch, else form one if due; returns records settled."""
        batch = self._unfinished_batch()
        if batch is None:
            batch = self._form_batch(force=force)
            if batch is None:
                return 0
        return self._finish(batch)

    # ------------------------------------------------------------------ forming

    def _unfinished_batch(self) -> SettlementBatch | None:
        with Session(self.engine, expire_on_commit=False) as s:
            stmt = (select(SettlementBatch).where(SettlementBatch.status != BatchStatus.SETTLED)
                    .order_by(SettlementBatch.id).limit(1))  # fmt: skip
            return s.exec(stmt).first()

    def _form_batch(self, *, force: bool) -> SettlementBatch | None:
        cfg = self.config
        with Session(self.engine) as s:  # short read; no chain call while the database is locked
            records = pending_records(s, cfg.batch_size)
        if not records:
            return None
        due = force or len(records) >= cfg.batch_size or (
            utcnow() - records[0].created_at >= timedelta(seconds=cfg.interval))
        if not due:
            return None
        unknown = self._unregistered_ids(records)
        with Session(self.engine, expire_on_commit=False) as s:
            rows = pending_records(s, cfg.batch_size)
            if [r.id for r in rows] != [r.id for r in records]:
                return None  # the outbox changed under us (another settler?): look again next step
            keep = []
            for r in rows:
                reason = unknown.get(r.adapter_id) or unknown.get(r.node_id)
                if reason:
                    log.error("rejecting usage record %s: %s", r.request_id, reason)
                    r.status, r.error = RecordStatus.REJECTED, reason
                    s.add(r)
                else:
                    keep.append(r)
            if not keep:
                s.commit()
                return None
            settle = [to_settle_record(r) for r in keep]
            batch = SettlementBatch(
                batch_id=batch_id_for([r.request_id for r in keep]),
                merkle_root="0x" + MerkleTree.from_records(settle).root.hex(),
                record_count=len(keep),
            )
            for i, r in enumerate(keep):
                r.status, r.batch_id, r.leaf_index = RecordStatus.SUBMITTED, batch.batch_id, i
                s.add(r)
            s.add(batch)
            s.commit()
        log.info("formed batch %s with %d records", batch.batch_id, batch.record_count)
        return batch

    def _unregistered_ids(self, records: list[UsageRecord]) -> dict[str, str]:
        """Adapter and node ids the registry does not know, with the reason. Records naming them are
        rejected: one such record would otherwise make every batch it sits in revert forever."""
        bad: dict[str, str] = {}
        checks = [(r.adapter_id, self.client.get_adapter, "adapter") for r in records]
        checks += [(r.node_id, self.client.get_node, "node") for r in records]
        for ident, getter, what in checks:
            if ident in self._known_ids or ident in bad:
                continue
            try:
                getter(ident)
                self._known_ids.add(ident)
            except (UnknownAdapter, UnknownNode):
                bad[ident] = f"{what} {ident} is not registered on chain"
        return bad

    # ------------------------------------------------------------------ finishing

    def _finish(self, batch: SettlementBatch) -> int:
        with Session(self.engine) as s:
            records = [to_settle_record(r) for r in batch_records(s, batch.batch_id)]
        if self.client.is_settled(batch.batch_id):
            return self._mark_settled(batch)
        if batch.tx_hash and self._tx_still_pending(batch.tx_hash):
            return self._await(batch, batch.tx_hash, records)
        self._crash_point("before_send")
        try:
            tx_hash = self.client.send_settle_batch(batch.batch_id, batch.merkle_root, records)
        except BatchAlreadySettled:
            return self._mark_settled(batch)
        self._crash_point("after_send")
        with Session(self.engine, expire_on_commit=False) as s:
            row = s.get(SettlementBatch, batch.id)
            row.tx_hash, row.status, row.sent_at, row.attempts = tx_hash, BatchStatus.SENT, utcnow(), row.attempts + 1
            s.add(row)
            s.commit()
            batch = row
        return self._await(batch, tx_hash, records)

    def _tx_still_pending(self, tx_hash: str) -> bool:
        """Whether to wait on a recorded transaction rather than resend: mined successfully (odd,
        since isSettled said no: _await sorts it out) or still in the mempool. Reverted or dropped
        transactions (e.g. the chain restarted) are resent."""
        rcpt = self.client.tx.receipt(tx_hash)
        if rcpt is not None:
            return rcpt["status"] == 1
        try:
            self.client.w3.eth.get_transaction(tx_hash)
            return True
        except Exception:  # noqa: BLE001 - TransactionNotFound: dropped (e.g. chain restarted)
            return False

    def _await(self, batch: SettlementBatch, tx_hash: str, records: list[SettleRecord]) -> int:
        try:
            self.client.wait_settle_batch(tx_hash, batch.batch_id, batch.merkle_root, records,
                                          timeout=self.config.receipt_timeout)  # fmt: skip
        except BatchAlreadySettled:
            pass  # an earlier send of this batch landed first
        except (TransactionFailed, ContractError):
            if not self.client.is_settled(batch.batch_id):
                raise
        self._crash_point("after_receipt")
        return self._mark_settled(batch)

    def _mark_settled(self, batch: SettlementBatch) -> int:
        info = self.client.get_batch(batch.batch_id)
        if info is None:
            raise SettlementError(f"batch {batch.batch_id} is not settled on chain")
        if info.merkle_root != batch.merkle_root:
            raise SettlementError(
                f"batch {batch.batch_id} settled on chain with root {info.merkle_root}, database has {batch.merkle_root}"
            )
        with Session(self.engine) as s:
            row = s.get(SettlementBatch, batch.id)
            row.status, row.block_number, row.total_fees = BatchStatus.SETTLED, info.settled_block, str(info.total_fees)
            row.settled_at = utcnow()
            s.add(row)
            records = batch_records(s, batch.batch_id)
            for r in records:
                r.status = RecordStatus.SETTLED
                s.add(r)
            s.commit()
        log.info("batch %s settled in block %d (%d records)", batch.batch_id, info.settled_block, len(records))
        return len(records)

    def _crash_point(self, name: str) -> None:
        """Test-only: die here, abruptly, when LORAMESH_SETTLER_CRASH_AT names this point."""
        if self.config.crash_at == name:
            log.warning("crash injection at %s", name)
            logging.shutdown()
            os._exit(CRASH_EXIT_CODE)
