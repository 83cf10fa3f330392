"""The settler: outbox records -> batches -> AttributionLedger.settleBatch, exactly once.

State machine (every step is committed before the next one acts, so a crash anywhere resumes):
  records pending --form--> batch `created` + records `submitted` (one DB transaction)
  batch created --send--> tx hash recorded, batch `sent`
  batch sent --receipt--> batch `settled` + records `settled` (one DB transaction)
The chain is the judge: before resending, and after any failure, `isSettled(batch_id)` decides. A
resent batch that already landed reverts with BatchAlreadySettled, which means "settled".

Pipelining: a step sends up to `max_in_flight` batches (each written before it is sent, each with
the next local nonce) and then waits for all their receipts, so one block carries many batches.
After a start or any error the settler probes: one batch per step, simulated before it is sent,
until one of its transactions settles; a revert then never costs more than that one batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from ledger.batching import batch_id_for, pending_rows, to_settle_record
from ledger.chain import ChainClient, encode_record, record_leaves
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
from ledger.outbox import batch_records
from ledger.settler_config import CrashHook, SettlerConfig
from ledger.types import BASE_MODEL_ADAPTER_ID, BatchInfo, SettleRecord

log = logging.getLogger(__name__)


class SettlementError(LedgerError):
    """The chain disagrees with what the database says about a batch."""


@dataclass(slots=True)
class _Work:
    """A batch this step sends or waits for. resumed: written by an earlier step (or process), so
    it may already be settled or have a live transaction; a batch formed in this step has neither."""

    batch: SettlementBatch
    records: list[SettleRecord]
    resumed: bool
    tx_hash: str | None = None


class Settler:
    """Moves outbox records onto the chain. One instance per database is the intended deployment;
    two would still settle each batch once (the contract refuses duplicates)."""

    def __init__(self, engine: Engine, client: ChainClient, config: SettlerConfig | None = None) -> None:
        self.engine = engine
        self.client = client
        self.config = config or SettlerConfig()
        self.settled_total = 0  # records this instance marked settled
        self._known_ids: set[str] = set()  # adapter and node ids seen registered (registries never delete)
        self._probe = True  # one simulated batch per step until one of our transactions settles
        self._crash_point = CrashHook(self.config.crash_at)  # test-only: LORAMESH_SETTLER_CRASH_AT

    # ------------------------------------------------------------------ loop

    def run(self, stop: threading.Event | None = None, *, drain: bool = False) -> int:
        """Settle until `stop` is set (or, with drain, until nothing is left); returns records settled.
        Chain errors are logged and retried with backoff: records wait, nothing is lost."""
        stop = stop or threading.Event()
        start, backoff = self.settled_total, self.config.poll
        while not stop.is_set():
            try:
                n = self.step(force=drain)
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
            except (LedgerError, SQLAlchemyError) as e:  # a long-running settler must outlive these; drain() raises
                log.error("settlement step failed (retry in %.1fs): %s", backoff, e)
                stop.wait(backoff)
                backoff = min(backoff * 2, self.config.max_backoff)
        return self.settled_total - start

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
        """Finish unfinished batches and form due ones, up to max_in_flight (1 while probing), sending
        each as soon as it is written; then await every receipt. Returns records settled; raises the
        first chain error after awaiting whatever was already sent."""
        limit = 1 if self._probe else self.config.max_in_flight
        before = self.settled_total
        self.client.tx.reset()  # nonce and fees from the chain once a step: a lost transaction leaves no gap
        error: LedgerError | None = None
        sent: list[_Work] = []
        batches = self._batches(limit, force=force)
        while True:
            try:  # forming (registry look-ups) and sending may both fail on the chain
                if (w := next(batches, None)) is None:
                    break
                if self._send(w):
                    sent.append(w)
            except LedgerError as e:
                error = e
                break  # later batches would only queue behind the failure
        if sent:
            self._crash_point("in_flight")
        deadline = time.monotonic() + self.config.receipt_timeout  # one wait for the whole step
        for w in sent:
            try:
                self._await(w, max(0.0, deadline - time.monotonic()))
            except LedgerError as e:
                error = error or e
        if error is not None:
            self._probe = True
            raise error
        return self.settled_total - before

    def _batches(self, limit: int, *, force: bool) -> Iterator[_Work]:
        """This step's batches: unfinished ones (oldest first), then new ones, each formed just before
        it is sent so that early transactions are mined while later batches are being written."""
        work = self._unfinished(limit)
        yield from work
        n = len(work)
        while n < limit and (w := self._form_batch(force=force)) is not None:
            n += 1
            yield w

    # ------------------------------------------------------------------ forming

    def _unfinished(self, limit: int) -> list[_Work]:
        with Session(self.engine, expire_on_commit=False) as s:
            stmt = (select(SettlementBatch).where(SettlementBatch.status != BatchStatus.SETTLED)
                    .order_by(SettlementBatch.id).limit(limit))  # fmt: skip
            return [_Work(b, [to_settle_record(r) for r in batch_records(s, b.batch_id)], resumed=True)
                    for b in s.exec(stmt).all()]  # fmt: skip

    def _form_batch(self, *, force: bool) -> _Work | None:
        cfg = self.config
        with Session(self.engine) as s:  # short read; no chain call while the database is locked
            rows = pending_rows(s, cfg.batch_size)
        if not rows:
            return None
        due = force or len(rows) >= cfg.batch_size or (
            utcnow() - rows[0].created_at >= timedelta(seconds=cfg.interval))
        if not due:
            return None
        unknown = self._unregistered_ids(rows)
        with Session(self.engine, expire_on_commit=False) as s:
            ids = s.exec(select(UsageRecord.id).where(UsageRecord.status == RecordStatus.PENDING)
                         .order_by(UsageRecord.id).limit(cfg.batch_size)).all()  # fmt: skip
            if list(ids) != [r.id for r in rows]:
                return None  # the outbox changed under us (another settler?): look again next step
            keep = []
            for r in rows:
                reason = unknown.get(r.adapter_id) or unknown.get(r.node_id)
                if reason:
                    log.error("rejecting usage record %s: %s", r.request_id, reason)
                    s.execute(update(UsageRecord).where(UsageRecord.id == r.id)
                              .values(status=RecordStatus.REJECTED, error=reason))  # fmt: skip
                else:
                    keep.append(r)
            if not keep:
                s.commit()
                return None
            settle = [to_settle_record(r) for r in keep]
            tree = MerkleTree(record_leaves([encode_record(r) for r in settle]))
            batch = SettlementBatch(batch_id=batch_id_for([r.request_id for r in keep]),
                                    merkle_root="0x" + tree.root.hex(), record_count=len(keep))  # fmt: skip
            s.execute(update(UsageRecord), [
                {"id": r.id, "status": RecordStatus.SUBMITTED, "batch_id": batch.batch_id, "leaf_index": i}
                for i, r in enumerate(keep)
            ])  # fmt: skip
            s.add(batch)
            s.commit()
        log.info("formed batch %s with %d records", batch.batch_id, batch.record_count)
        return _Work(batch, settle, resumed=False)

    def _unregistered_ids(self, records) -> dict[str, str]:
        """Adapter and node ids the registry does not know, with the reason. Records naming them are
        rejected: one such record would otherwise make every batch it sits in revert forever."""
        bad: dict[str, str] = {}
        checks = [(r.adapter_id, self.client.get_adapter, "adapter") for r in records
                  if r.adapter_id != BASE_MODEL_ADAPTER_ID]  # a base-model record names no adapter
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

    def _send(self, w: _Work) -> bool:
        """Send the batch (or find it settled, or its transaction still live); True when a receipt
        is to be awaited."""
        batch = w.batch
        if w.resumed:
            if self.client.is_settled(batch.batch_id):
                self._mark_settled(batch)
                return False
            if batch.tx_hash and self._tx_still_pending(batch.tx_hash):
                w.tx_hash = batch.tx_hash
                return True
        self._crash_point("before_send")
        try:
            tx_hash = self.client.send_settle_batch(batch.batch_id, batch.merkle_root, w.records,
                                                    simulate=self._probe)  # fmt: skip
        except BatchAlreadySettled:
            self._mark_settled(batch)
            return False
        self._crash_point("after_send")
        with Session(self.engine, expire_on_commit=False) as s:
            row = s.get(SettlementBatch, batch.id)
            row.tx_hash, row.status, row.sent_at, row.attempts = tx_hash, BatchStatus.SENT, utcnow(), row.attempts + 1
            s.add(row)
            s.commit()
            w.batch = row
        w.tx_hash = tx_hash
        return True

    def _tx_still_pending(self, tx_hash: str) -> bool:
        """Whether to wait on a recorded transaction rather than resend: mined successfully (odd,
        since isSettled said no: _await sorts it out) or still in the mempool. Reverted or dropped
        transactions (e.g. the chain restarted) are resent."""
        rcpt = self.client.tx.light_receipt(tx_hash)
        if rcpt is not None:
            return rcpt["status"] == 1
        try:
            self.client.w3.eth.get_transaction(tx_hash)
            return True
        except Exception:  # noqa: BLE001 - TransactionNotFound: dropped (e.g. chain restarted)
            return False

    def _await(self, w: _Work, timeout: float) -> None:
        batch = w.batch
        info = None
        try:
            info = self.client.await_settled_batch(w.tx_hash, batch.batch_id, batch.merkle_root, w.records,
                                                   timeout=timeout)  # fmt: skip
            self._probe = False  # our own transaction settled: the pipe may open
        except BatchAlreadySettled:
            pass  # an earlier send of this batch landed first
        except (TransactionFailed, ContractError):
            if not self.client.is_settled(batch.batch_id):
                raise
        self._crash_point("after_receipt")
        self._mark_settled(batch, info)

    def _mark_settled(self, batch: SettlementBatch, info: BatchInfo | None = None) -> int:
        """Record the batch settled as the chain has it (`info`, else getBatch)."""
        info = info or self.client.get_batch(batch.batch_id)
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
            n = s.execute(update(UsageRecord).where(UsageRecord.batch_id == batch.batch_id)
                          .values(status=RecordStatus.SETTLED)).rowcount  # fmt: skip
            s.commit()
        self.settled_total += n
        log.info("batch %s settled in block %d (%d records)", batch.batch_id, info.settled_block, n)
        return n
