"""The settler: outbox records -> batches -> AttributionLedger.settleBatch, exactly once, with any
number of settler processes (and gateways running one in-process) on one database and one ledger.

State machine (every step is committed before the next one acts, so a crash anywhere resumes):
  records pending --form--> batch `created` + records `submitted` (one DB transaction)
  batch created --send--> tx hash recorded, batch `sent`
  batch sent --receipt--> batch `settled` + records `settled` (one DB transaction)
  batch refused by the ledger (its send, simulated, or its receipt reverts: any contract error but
    BatchAlreadySettled and NotSettler) --> batch `abandoned` (one DB transaction), and
    - refused for its price (InsufficientDeposit, PriceAboveQuote): its records pending again
      (re-priced). Batches mix adapters, so the prices of its adapters (and the base price) are read
      again, and only the records whose fee moved since they were priced are marked (REPRICED); the
      others go back unmarked, so an adapter owner who raises its price under batches strikes only
      its own records. (Within a raise's grace the ledger charges the price the batch was priced at
      instead of refusing it: see "Prices are bounded" below.) InsufficientDeposit with no price moved
      is the deposit's fault (reclaimed meanwhile): nobody is marked, and the records are batched
      against the deposit left (what it cannot pay is set aside as DEPOSIT_SHORT);
    - a batch of one record refused for any other reason: its record pending again, marked;
    - a batch of several refused for any other reason (a revert the settler does not expect: a
      registry that does not know an adapter the settler's RPC node knew, a panic): split in two
      halves, new batches of the same records (`created`, sent next, simulated), so that the records
      at fault are isolated and set aside while the rest settle. Their records are marked; the mark
      is cleared on the records of a half that settles.
    A marked record caught again (re-priced, or refused alone) is set aside with the reason
    (PRICE_MOVING, UNREGISTERED, REVERTED); PRICE_MOVING ones go back to the outbox by themselves on
    start and every PRICE_MOVING_RETRY_EVERY seconds. A refused batch is abandoned, and an unfinished one
    resent by another account, only once no account that ever sent it (SettlementBatch.senders) has
    a transaction still waiting to be mined.
The chain is the judge: before resending, and after any failure, `isSettled(batch_id)` decides. A
resent batch that already landed reverts with BatchAlreadySettled, which means "settled". An old
batch that keeps failing never keeps new batches from forming in the same step. Chain unavailability
(ChainUnavailable, TransactionFailed) and NotSettler (this account may not settle: no record is at
fault) leave batches as they are, to be resumed.

Sequence numbers (AttributionLedger settles each settler account's records in one gapless sequence and
accepts a batch only at that account's nextSequence):
- A batch's first number (SettlementBatch.first_seq) is written with the batch, before anything is sent,
  and never changes while the account sending it stays the same: a resend after a crash, after a lost
  transaction or by another process of the account carries the same numbers, and the chain pays a
  number once, so at most one send of a record is paid, whatever batch carries it. A split keeps each
  record's number (the halves cover the parent's range).
- A new batch is numbered past the chain's nextSequence, past this account's batches settled, and past
  its batches in flight that continue the range (pipelining). A batch the chain refuses as out of
  sequence (SequenceMismatch: one before it was abandoned) is abandoned like a price refusal with
  nobody at fault: its records are batched and numbered again, once no transaction of it can land.
- A batch numbered in another account's sequence (taken over after its lease expired) is numbered
  again in ours before we send it, with the same batch id: should the other account's transaction
  land after all, the batch id settles once.

Many settlers, one database:
- Forming claims records atomically. The candidate rows are read in the forming transaction itself:
  on PostgreSQL with `SELECT ... FOR UPDATE SKIP LOCKED` (a second settler forming at the same moment
  takes the next rows instead of the same ones) under a per-settler-account advisory lock (two
  processes sharing a key count its deposit one at a time); on SQLite every settler transaction is
  BEGIN IMMEDIATE, which holds the database's write lock. Everywhere the records are then moved with
  an UPDATE that also requires `status = 'pending'` (ledger.batching.move_to_batch: one statement for a
  batch's rows, each with its leaf and fee) and the row count is checked: a mismatch
  rolls the whole batch back, so no record is ever in two batches and none is lost.
- Unfinished batches (a crash, a chain outage) are resumed by exactly one settler at a time through
  a lease on the batch row (claimed_by, lease_expires), taken and renewed with conditional updates.
  A lease rather than a row lock: it must hold across a whole step (send, then up to
  receipt_timeout waiting for the receipt), SQLite has no row locks, and a lock held by an open
  transaction would pin a PostgreSQL connection and snapshot that long. A thread renews our leases
  every lease/3 while a step runs; before each send the lease is checked again, so a settler that
  lost its claim never sends. A claim left by a dead process on this host is taken at once (same
  host name, boot id and pid namespace, and its pid is gone), one left elsewhere when it expires; a
  stopping settler hands its claims back.
- A batch id names its records (ledger.merkle.batch_id_for; the ledger refuses any other, BatchIdMismatch): a
  batch taken over by another settler keeps its id, so it settles once however many of its sends land, and
  no other settler can freeze one of ours by settling junk under its id first.
- No chain call is made inside a write transaction: prices, registrations and the deposit are read
  outside it (on SQLite it holds the database's write lock, which the gateway needs for every request),
  once a step (_StepReads), and inside it only the database is read. The deposit is read at a known
  block: the batches of this account settled after that block count as in flight, like the unfinished
  ones.

Prices are bounded (settler side): each record is priced as the contract will price it (the adapter's on-chain
price, or the ledger's base price for the zero adapter id, times tokens / 1000) into UsageRecord.fee_wei. A record
whose price is now above the one its request was admitted at (UsageRecord.quoted_price_per_1k: an owner raised it
meanwhile) is priced at its quote while the raise's grace allows that (contracts/src/PriceGrace.sol: for the
deployment's priceGraceSeconds after a change, the ledger charges a batch's maxPrices down to the price before), in
a batch whose maxPrices name that price for the record (the ledger's adapter table holds an adapter once per price
its records are charged, so records admitted at several prices settle in one batch); past the grace (less
GRACE_MARGIN_S) it is set aside as PRICE_ABOVE_QUOTE and priced again every PRICE_MOVING_RETRY_EVERY seconds: the
key pays at most what it was shown, or nothing while the price stays higher. A record priced above
SettlerConfig.max_price_per_1k, with more tokens than max_record_tokens, or whose fee the deposit cannot pay is set
aside (status set_aside, reason in `error`) and never holds up its batch or later ones. A batch's total never
exceeds the deposit left minus what this settler's in-flight batches will take. Records set aside because the
deposit was short go back to the outbox by themselves once the deposit can pay them. Records naming an adapter or
node the registry does not know (yet: an RPC node may lag behind the chain) are set aside as UNREGISTERED,
re-checked on start and every UNREGISTERED_RECHECK_EVERY seconds, and go back to the outbox once both are registered
(no record is rejected for good any more; records an older settler rejected, all for that reason, are re-checked the
same way). A batch that still fails with InsufficientDeposit (a deposit reclaimed meanwhile) or PriceAboveQuote (the
ledger refuses a batch in which any adapter costs more than the settler priced it at, beyond what a grace allows, so
a price raised between pricing and mining, e.g. by an owner front-running the batch, is never paid unseen) is
abandoned and its records re-priced; a record whose own price moved under two batches is set aside (for a while: see
above), the other records of those batches are never struck.

Finality (SettlerConfig.confirmations = N > 0): a batch settled on chain is recorded settled, with the hash
of its block (SettlementBatch.block_hash), and is final once N blocks are on top of it (block_hash cleared).
Until then every step compares the stored hash with the chain's canonical block at that height. A batch whose
block is gone and that getBatch no longer knows (a reorg dropped its transaction) goes back to `sent` with
its records `submitted`: the usual resume sends it again, at the same first sequence number (the contract
takes a settler's batches only in sequence order, so several dropped ones go out in order), or waits for its
transaction when the node still holds it. Since the chain settles a batch id and a sequence number once, a
resend racing the dropped transaction's return pays nothing twice. N = 0 (the devnet): final at the receipt.
A batch is recorded in the sequence that holds it on chain (_numbering): another settler may copy it from the
mempool (its id names its records) and settle it first, at its own numbers or, caught up with ours, at our very
numbers, or a reorg may put such a copy in its place. Every settler follows every account's batches until final:
a stranger's copy a reorg drops is ours to number anew, and a retired account's batch is sent again by the current
one; another account of ours has its batches judged final only at MAX_CONFIRMATIONS.

Stuck transactions: a batch's transaction unmined for `replace_after` seconds is replaced at the same nonce
with fees raised by at least 12.5% (Transactor.replace), never above the fee policy's max fee (then one
warning, and the settler keeps waiting); the newest hash is recorded in the batch row.

Pipelining: a step keeps up to `max_in_flight` batches in flight (each written before it is sent, each
with the next local nonce), so one block carries many batches. While it forms, it looks every REAP_EVERY
seconds whether its oldest batches have settled and records them at once, which frees their places: the
block time is spent forming, not waiting (a step forms at most STEP_ROUNDS x max_in_flight batches, so the
looks at set-aside records and finality at its start still come round). Then it waits for the rest.
After a start or any error the settler probes: one batch per step, simulated before it is sent,
until one of its transactions settles; a revert then never costs more than that one batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from eth_utils import keccak, to_canonical_address
from sqlalchemy import and_, case, false, func, or_, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Session, select
from web3.exceptions import TransactionNotFound

from common.wire import hex0x, to_id
from ledger.batching import move_to_batch, pending_rows, record_fee, to_settle_record
from ledger.chain import ChainClient
from ledger.db import is_postgres
from ledger.errors import (
    BatchAlreadySettled,
    ChainUnavailable,
    ContractError,
    InsufficientDeposit,
    LedgerError,
    NotSettler,
    PriceAboveQuote,
    SequenceMismatch,
    TransactionFailed,
    UnknownAdapter,
    UnknownNode,
)
from ledger.merkle import MAX_ADAPTERS_PER_BATCH, MAX_NODES_PER_BATCH, MAX_TOKEN_COUNT, MerkleTree, batch_id_for
from ledger.models import BatchStatus, RecordStatus, SettlementBatch, UsageRecord, utcnow
from ledger.outbox import batch_records, count_by_status
from ledger.settler_config import DEFAULT_LOW_DEPOSIT, GRACE_MARGIN_S, MAX_CONFIRMATIONS, SettlerConfig
from ledger.transport import rpc_guard
from ledger.types import BASE_MODEL_ADAPTER_ID, BatchInfo, PriceFloor, SettleRecord, read_wei

log = logging.getLogger(__name__)

OPEN = (BatchStatus.CREATED, BatchStatus.SENT)  # batches some settler still has to finish
# Reasons a record is set aside, as the start of its `error` (status set_aside). DEPOSIT_SHORT ones go
# back to the outbox by themselves when the deposit can pay them, PRICE_MOVING and PRICE_ABOVE_QUOTE ones
# every PRICE_MOVING_RETRY_EVERY seconds; the others wait for an operator (`loramesh settler requeue` after
# raising the bounds).
DEPOSIT_SHORT = "deposit short"
PRICE_TOO_HIGH = "price above bound"
# the price was raised after the gateway admitted the request at a lower one (UsageRecord.quoted_price_per_1k)
PRICE_ABOVE_QUOTE = "price above the request's quote"
# its quote is not a price (not decimal digits, or 2**256 or more): written by something other than the
# outbox, which checks it. Its record alone is at fault; it waits for an operator.
QUOTE_UNREADABLE = "quote unreadable"
# its request, adapter or node id is not a 32-byte id (not written by the outbox either): nothing can settle it
ID_UNREADABLE = "id unreadable"
# a token count a packed record cannot carry: negative (not written by the outbox), or, under a record bound set
# above it, more than a uint32 (MAX_TOKEN_COUNT)
TOKENS_UNREADABLE = "token count unreadable"
TOO_MANY_TOKENS = "tokens above bound"
PRICE_MOVING = "price changed while settling"
REVERTED = "reverted"  # the ledger refused it, alone, for a reason the settler does not expect, twice
# its adapter or node is not registered (yet: an RPC node may lag behind the chain); re-checked every
# UNREGISTERED_RECHECK_EVERY seconds, back in the outbox once both are
UNREGISTERED = "unregistered"
# the ledger refused the batch as priced: give it up and price its records again
REPRICE = (InsufficientDeposit, PriceAboveQuote)
REAP_EVERY = 0.2  # seconds between looks, while forming, for batches of this step the chain has settled
STEP_ROUNDS = 4  # a step forms at most this many times max_in_flight batches
REPRICED = "re-priced"  # `error` of a record whose batch was abandoned (or split): a second time sets it aside
SPLIT_MARK = f"{REPRICED} (split)"  # REPRICED as set on the records of a split batch; cleared when their half settles
REQUEUE_EVERY = 2.0  # seconds between looks for deposit-short records the deposit can now pay
UNREGISTERED_RECHECK_EVERY = 60.0  # seconds between looks at records set aside as unregistered
PRICE_MOVING_RETRY_EVERY = 600.0  # seconds between putting records set aside as PRICE_MOVING back in the outbox
LOW_WARN_EVERY = 60.0  # seconds between low-deposit warnings


class SettlementError(LedgerError):
    """The chain disagrees with what the database says about a batch."""


@dataclass(slots=True)
class _Work:
    """A batch this step sends or waits for. resumed: written by an earlier step (or process), so
    it may already be settled or have a live transaction; a batch formed in this step has neither."""

    batch: SettlementBatch
    records: list[SettleRecord]
    # adapter id -> the highest price per 1k tokens the batch charges its records (prices_priced; Settler._priced_of)
    priced: dict[str, int]
    # what each of `records` is charged per 1k tokens, in order: its adapter's price, or its quote when lower (a
    # raise's grace); settleBatch's maxPrices, by record (_record_bounds)
    bounds: list[int]
    resumed: bool
    tx_hash: str | None = None
    formed_at: float | None = None  # time.monotonic() just before a batch formed in this step took its lease


@dataclass(slots=True)
class _StepReads:
    """What one step's batches are formed against, read from the chain once for the step (outside any
    write transaction), not once per batch: at batch 500 those reads were a fifth of the forming time.
    - prices: adapter id (or node id) -> price per 1k tokens, or why it cannot be settled. A price raised
      during the step is caught by settleBatch's maxPrices, as a price raised between forming and mining
      always was: charged at the price the batch was priced at within the raise's grace, else the batch is
      refused and re-priced.
    - deposit: (this account's deposit, the block it was read at). The step's own batches stay open until
      awaited, so _free_deposit counts them against it; a top-up is seen from the next step on.
    - chain_next: the chain's next sequence number for this account; the step's own batches continue the
      range from it (_next_first_seq follows the batches in flight)."""

    prices: dict[str, int | str] = field(default_factory=dict)
    deposit: tuple[int, int] | None = None
    chain_next: int = 0
    # adapter id -> its price's grace, read for adapters with records quoted below their price (_needs_floor),
    # and the time it is read against (_chain_now)
    floors: dict[str, PriceFloor] = field(default_factory=dict)
    chain_time: int | None = None


def _aware(dt: datetime | None) -> datetime | None:
    """Timestamps come back naive from PostgreSQL's `timestamp` columns; they are UTC."""
    return dt.replace(tzinfo=UTC) if dt is not None and dt.tzinfo is None else dt


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "-"


def _boot_id() -> str:
    """This boot of this machine (the initial pid namespace's inode is the same on every Linux host)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or "-"
    except OSError:
        return "-"


def _pid_space() -> str:
    """Where a pid names one process: this boot of this machine, this pid namespace."""
    return f"{_boot_id()}/{_pid_namespace()}"


def _nowhere(point: str) -> None:
    """The default on_point: nothing happens at the points."""


def _needs_floor(r, prices: dict[str, int | str]) -> bool:
    """Whether a row is quoted below its adapter's price (read into `prices`): it settles at its quote only within
    the price's grace, which _StepReads.floors then holds."""
    price, quote = prices.get(r.adapter_id), read_wei(r.quoted_price_per_1k)
    return isinstance(price, int) and isinstance(quote, int) and not isinstance(quote, bool) and quote < price


def _charged(price: int, quote: int | None) -> int:
    """What a record is charged per 1k tokens: its adapter's price, or its quote when that is lower (a raise's
    grace; _form_in sets aside a record whose grace is over, so every record of a batch is charged this)."""
    return price if quote is None or quote >= price else quote


def _record_bounds(rows, priced: dict[str, int]) -> list[int]:
    """settleBatch's maxPrices, by record, for a batch's rows (in leaf order) priced at `priced` (adapter id -> the
    highest price the batch charges its records): each row at the lower of that and its quote, which is what it is
    charged (_charged: a row charged below that highest price was charged its quote). The one rule for a batch
    formed now and for one read back (_priced_of), so a batch resumed by any settler is sent under the same id;
    and for an adapter charged one price, `priced` holds that price, as the releases before stored it."""
    out = []
    for r in rows:
        quote = read_wei(r.quoted_price_per_1k)  # False (unreadable) only on a row _form_in set aside: no bound
        out.append(_charged(priced[to_id(r.adapter_id)], None if quote is False else quote))
    return out


def _split_senders(senders: str | None) -> list[str]:
    return [a for a in (senders or "").split(",") if a]


class Settler:
    """Moves outbox records onto the chain. Any number of instances (processes, gateways) may share
    one database and one ledger: see the module docstring for how they divide the work."""

    def __init__(
        self,
        engine: Engine,
        client: ChainClient,
        config: SettlerConfig | None = None,
        *,
        on_point: Callable[[str], None] | None = None,
    ) -> None:
        """on_point, when given, is called with the name of each point of the state machine a crash must be
        survivable at ("before_send", "after_send", "in_flight": every batch of a step sent and none awaited,
        "after_receipt"); the crash tests pass one that kills the process there."""
        self.engine = engine
        self.client = client
        self.config = config or SettlerConfig()
        self.address = client.address
        # who holds a lease: the account, then host, boot id and pid namespace, and pid (a claim of a
        # dead process on this host is free at once), then a random tag (two instances in one process differ)
        self.instance = f"{self.address}|{socket.gethostname()}|{_pid_space()}|{os.getpid()}|{secrets.token_hex(4)}"
        self._postgres = is_postgres(engine)
        # pg_advisory_xact_lock key of this settler account: same-key processes form one at a time
        self._lock_key = int.from_bytes(keccak(to_canonical_address(self.address))[:8], "big", signed=True)
        self.settled_total = 0  # records this instance marked settled
        self.set_aside_total = 0  # records this instance set aside
        self._known_nodes: set[str] = set()  # node ids seen registered (registries never delete)
        self._probe = True  # one simulated batch per step until one of our transactions settles
        self._point = on_point or _nowhere
        self._next_requeue = 0.0
        self._next_recheck = 0.0  # records set aside as unregistered: looked at on start, then every minute
        self._next_low_warning = 0.0
        self._next_price_retry = 0.0  # records set aside as PRICE_MOVING: back on start, then every 10 minutes

    # ------------------------------------------------------------------ loop

    def run(self, stop: threading.Event | None = None, *, drain: bool = False) -> int:
        """Settle until `stop` is set (or, with drain, until nothing is left); returns records settled.
        Chain errors are logged and retried with backoff: records wait, nothing is lost. On the way out
        the leases on unfinished batches are handed back, so another settler resumes them at once."""
        stop = stop or threading.Event()
        start, backoff = self.settled_total, self.config.poll
        try:
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
                except Exception:  # a bug, or data no check foresaw: the thread (a gateway's settler) lives on
                    log.exception("settlement step failed unexpectedly (retry in %.1fs)", backoff)
                    stop.wait(backoff)
                    backoff = min(backoff * 2, self.config.max_backoff)
        finally:
            self.release()
        return self.settled_total - start

    def drain(self) -> int:
        """Settle everything pending now (partial batches included); raises on chain errors. Batches
        another live settler holds are waited for."""
        total = 0
        while True:
            n = self.step(force=True)
            total += n
            if n == 0:
                if not self.has_work():
                    return total
                time.sleep(self.config.poll)  # another settler's batches: wait for them (or their lease)

    def has_work(self) -> bool:
        with Session(self.engine) as s:
            return (
                s.exec(
                    select(UsageRecord.id)
                    .where(UsageRecord.status.in_([RecordStatus.PENDING, RecordStatus.SUBMITTED]))
                    .limit(1)
                ).first()
                is not None
            )

    def release(self) -> int:
        """Hand back this instance's leases on unfinished batches (another settler may take them at
        once); returns how many."""
        try:
            with Session(self.engine) as s:
                n = s.execute(
                    update(SettlementBatch)
                    .where(SettlementBatch.claimed_by == self.instance, SettlementBatch.status.in_(OPEN))
                    .values(claimed_by=None, lease_expires=None)
                ).rowcount
                s.commit()
        except SQLAlchemyError as e:
            log.warning("could not hand back batch leases (they expire in %.0fs): %s", self.config.lease, e)
            return 0
        if n:
            log.info("handed back %d unfinished batches", n)
        return n

    def status(self) -> dict:
        """settler_status() for this settler's account and low-deposit threshold."""
        return settler_status(self.engine, self.client, self.address, low_deposit=self.config.low_deposit)

    def step(self, *, force: bool = False) -> int:
        """Finish unfinished batches and form due ones, up to max_in_flight in flight (1 while probing),
        sending each as soon as it is written and recording settled those the chain has settled meanwhile
        (_reap); then await every receipt. A batch the ledger refuses (any revert
        but BatchAlreadySettled and NotSettler) is abandoned at the end of the step: its records are
        priced again, or, when it holds several and the revert is not about the price, it is split in
        two. Returns records settled; raises the first chain error after awaiting whatever was sent."""
        limit = 1 if self._probe else self.config.max_in_flight
        before = self.settled_total
        self.client.tx.reset()  # nonce and fees from the chain once a step: a lost transaction leaves no gap
        error: LedgerError | None = None
        sent: list[_Work] = []
        refused: list[tuple[_Work, ContractError]] = []  # abandoned (re-priced or split) below
        with self._heartbeat():
            if self.config.confirmations > 0:
                self._follow_finality()  # first: a batch a reorg dropped is resumed in this very step
            for look in (self._requeue_deposit_short, self._recheck_unregistered, self._retry_price_moving):
                try:
                    look()
                except LedgerError as e:
                    log.warning("could not look at set-aside records: %s", e)
            work = self._unfinished(limit)
            reads = _StepReads()
            slots = limit  # places in flight; a batch reaped gives its place back (at most `refunds` times a step)
            refunds = 0 if self._probe else limit * (STEP_ROUNDS - 1)
            next_reap = time.monotonic() + REAP_EVERY
            while slots > 0:
                if refunds and sent and time.monotonic() >= next_reap:
                    next_reap = time.monotonic() + REAP_EVERY
                    try:
                        n = min(self._reap(sent), refunds)
                    except LedgerError as e:
                        error = error or e
                        break
                    slots, refunds = slots + n, refunds - n
                if work:
                    w = work.pop(0)
                else:
                    try:  # forming (registry look-ups, the deposit) may fail on the chain
                        w = self._form_batch(reads, force=force)
                    except LedgerError as e:
                        error = error or e
                        break
                    if w is None:
                        break
                try:
                    if self._send(w):
                        sent.append(w)
                    slots -= 1
                except NotSettler as e:  # this account may not settle: no batch is at fault
                    error = error or e
                    break
                except ContractError as e:
                    refused.append((w, e))  # later batches are priced against the deposit as it is now
                    slots -= 1
                except LedgerError as e:
                    error = error or e
                    if not w.resumed or isinstance(e, (ChainUnavailable, TransactionFailed)):
                        break  # later batches would only queue behind the failure
                    # an old batch failing for a reason of its own never keeps new ones from forming
            if sent:
                self._point("in_flight")
            deadline = time.monotonic() + self.config.receipt_timeout  # one wait for the whole step
            for w in sent:
                try:
                    self._await(w, max(0.0, deadline - time.monotonic()))
                except NotSettler as e:
                    error = error or e
                except ContractError as e:
                    refused.append((w, e))
                except LedgerError as e:
                    error = error or e
            for w, e in refused:  # every receipt of this step is in: nothing of ours is still on its way
                try:
                    self._abandon(w, e)
                except LedgerError as e2:
                    error = error or e2
        if refused:
            self._probe = True
        if error is not None:
            self._probe = True
            raise error
        return self.settled_total - before

    # ------------------------------------------------------------------ transactions and leases

    @contextlib.contextmanager
    def _write(self) -> Iterator[Session]:
        """A write transaction that forms or changes batches: on PostgreSQL under this account's
        advisory lock (released at commit or rollback); on SQLite the settler's engine begins every
        transaction IMMEDIATE, which takes the database's write lock."""
        with Session(self.engine, expire_on_commit=False) as s:
            if self._postgres:
                s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": self._lock_key})
            yield s

    def _now(self, s: Session) -> datetime:
        """The database's clock on PostgreSQL (settlers on several hosts compare leases with one
        clock), this host's on SQLite (every process is on this host)."""
        if self._postgres:
            return _aware(s.execute(text("SELECT now()")).scalar_one())
        return utcnow()

    def _claimable(self, now: datetime, dead: list[str]):
        """SQL condition: a batch row this instance may claim (or already holds)."""
        return or_(
            SettlementBatch.claimed_by == self.instance,
            SettlementBatch.claimed_by.is_(None),
            SettlementBatch.lease_expires.is_(None),
            SettlementBatch.lease_expires < now,
            SettlementBatch.claimed_by.in_(dead) if dead else false(),
        )

    def _dead_claims(self, s: Session) -> list[str]:
        """Claims on open batches held by processes of this host (same boot, same pid namespace) that are
        gone."""
        host, ns, pid = socket.gethostname(), _pid_space(), os.getpid()
        dead = []
        owners = s.exec(
            select(SettlementBatch.claimed_by)
            .where(
                SettlementBatch.status.in_(OPEN),
                SettlementBatch.claimed_by.is_not(None),
                SettlementBatch.claimed_by != self.instance,
            )
            .distinct()
        ).all()
        for owner in owners:
            parts = owner.split("|")
            if len(parts) != 5 or parts[1] != host or parts[2] != ns or not parts[3].isdigit():
                continue
            other = int(parts[3])
            if other == pid:
                continue  # another instance in this process: alive as far as we can tell
            try:
                os.kill(other, 0)
            except ProcessLookupError:
                dead.append(owner)
            except OSError:
                pass  # exists, someone else's
        return dead

    def _renew(self, batch_ids: list[int] | None = None) -> int:
        """Extend this instance's leases (all of them, or on the given batch rows); returns how many
        it still holds."""
        with Session(self.engine) as s:
            until = self._now(s) + timedelta(seconds=self.config.lease)
            cond = [SettlementBatch.claimed_by == self.instance, SettlementBatch.status.in_(OPEN)]
            if batch_ids is not None:
                cond.append(SettlementBatch.id.in_(batch_ids))
            n = s.execute(update(SettlementBatch).where(*cond).values(lease_expires=until)).rowcount
            s.commit()
        return n

    @contextlib.contextmanager
    def _heartbeat(self) -> Iterator[None]:
        """Renew our leases every lease/3 while a step runs (a step may wait receipt_timeout)."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.config.lease / 3):
                try:
                    self._renew()
                except SQLAlchemyError as e:
                    log.warning("could not renew batch leases: %s", e)

        t = threading.Thread(target=beat, name="settler-lease", daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()

    # ------------------------------------------------------------------ resuming

    def _unfinished(self, limit: int) -> list[_Work]:
        """Claim up to `limit` unfinished batches (ours, unclaimed, expired, or a dead local process's)."""
        with Session(self.engine, expire_on_commit=False) as s:
            dead = self._dead_claims(s)
            now = self._now(s)
            until = now + timedelta(seconds=self.config.lease)
            ids = s.exec(
                select(SettlementBatch.id)
                .where(SettlementBatch.status.in_(OPEN), self._claimable(now, dead))
                .order_by(SettlementBatch.first_seq, SettlementBatch.id)
                .limit(limit)
            ).all()
            mine = []
            for bid in ids:
                n = s.execute(
                    update(SettlementBatch)
                    .where(SettlementBatch.id == bid, SettlementBatch.status.in_(OPEN), self._claimable(now, dead))
                    .values(claimed_by=self.instance, lease_expires=until)
                ).rowcount
                if n == 1:
                    mine.append(bid)
            s.commit()
            work = []
            for bid in mine:
                b = s.get(SettlementBatch, bid)
                rows = batch_records(s, b.batch_id)
                priced = self._priced_of(b, rows)
                work.append(
                    _Work(b, [to_settle_record(r) for r in rows], priced, _record_bounds(rows, priced), resumed=True)
                )
            return work

    def _priced_of(self, batch: SettlementBatch, rows) -> dict[str, int]:
        """The highest price a batch written earlier charges each adapter's records (prices_priced), from which its
        maxPrices follow (_record_bounds). A batch without them (written by a release that bounded a batch's total only)
        or with them unreadable gets, per adapter, the highest price its records' fees and quotes allow, and at
        most this settler's max_price_per_1k; never no bound, under which a price raised while the batch was
        open would be paid unseen. (Records with neither a fee nor a quote, batched before fees were kept, are
        bounded by max_price_per_1k alone, as they are when they are priced again.)"""
        adapters = {to_id(r.adapter_id) for r in rows}
        stored = _stored_prices(batch.prices_priced)
        if stored is not None and adapters <= stored.keys():
            return {a: stored[a] for a in adapters}
        bounds = dict.fromkeys(adapters, self.config.max_price_per_1k)
        for r in rows:
            a, tokens = to_id(r.adapter_id), r.prompt_tokens + r.completion_tokens
            fee, quote = read_wei(r.fee_wei), read_wei(r.quoted_price_per_1k)
            if isinstance(fee, int) and not isinstance(fee, bool) and tokens > 0:
                # fee = price * tokens // 1000: the largest price that gives this fee
                bounds[a] = min(bounds[a], ((fee + 1) * 1000 - 1) // tokens)
            if isinstance(quote, int) and not isinstance(quote, bool):
                bounds[a] = min(bounds[a], quote)
        log.warning(
            "batch %s does not say the prices it was priced at: bounded by its records' fees and quotes", batch.batch_id
        )
        return bounds

    # ------------------------------------------------------------------ forming

    def _form_batch(self, reads: _StepReads, *, force: bool) -> _Work | None:
        """The next batch, written and claimed; None when nothing is due. Records set aside on the way
        never stop it: forming goes on with the rows after them.

        Every chain read (prices, registrations, the deposit, the chain's next sequence number) is made
        outside the write transaction: on SQLite that transaction holds the database's write lock, which
        the gateway needs for every request, and a slow chain must never hold it. The rows are read under
        the lock; rows naming something not looked up yet end the transaction, are looked up, and the
        forming starts over. `reads` carries what was read for this step's earlier batches."""
        cfg = self.config
        while True:
            with self._write() as s:
                rows = pending_rows(s, cfg.batch_size, lock=True)  # claimed for us
                if not rows or not self._due(s, rows, force):
                    return None
                missing = [r for r in rows if not self._looked_up(r, reads)]
                if not missing and reads.deposit is not None:
                    done = self._form_in(s, rows, reads)
                    if done is not False:
                        return done
                    continue  # only set-aside records this time: form again from the rows after them
            # the transaction is over (rolled back): read the chain, then form again
            self._look_up(missing, reads.prices)
            self._look_up_floors(missing, reads)
            if reads.deposit is None:
                reads.deposit = self._deposit()
                reads.chain_next = self.client.next_sequence(self.address)

    def _due(self, s: Session, rows, force: bool) -> bool:
        if force or len(rows) >= self.config.batch_size:
            return True
        oldest = s.exec(select(UsageRecord.created_at).where(UsageRecord.id == rows[0].id)).one()
        return utcnow() - _aware(oldest) >= timedelta(seconds=self.config.interval)

    def _look_up(self, rows, prices: dict[str, int | str]) -> None:
        """Fill `prices`: adapter id (or node id) -> price per 1k tokens, or the reason it cannot be
        settled (not registered). Prices are read fresh for every batch: the contract charges the price
        at mining time, so a cached price would only widen the window for a raised one."""
        for r in rows:
            a = r.adapter_id
            if a in prices:
                pass
            elif not _is_readable_id(a):  # written by something other than the outbox, which checks ids
                prices[a] = f"{ID_UNREADABLE}: adapter id {a[:80]!r} is not a 32-byte id"
            elif a == BASE_MODEL_ADAPTER_ID:  # a base-model record: the ledger's base price, no registry entry
                prices[a] = self.client.base_price()
            else:
                try:
                    prices[a] = self.client.adapter_price(a)
                except UnknownAdapter:
                    prices[a] = f"{UNREGISTERED}: adapter {a} is not registered on chain"
            n = r.node_id
            if n in prices or n in self._known_nodes:
                continue
            if not _is_readable_id(n):
                prices[n] = f"{ID_UNREADABLE}: node id {n[:80]!r} is not a 32-byte id"
                continue
            try:
                self.client.get_node(n)
                self._known_nodes.add(n)
            except UnknownNode:
                prices[n] = f"{UNREGISTERED}: node {n} is not registered on chain"

    def _look_up_floors(self, rows, reads: _StepReads) -> None:
        """Fill reads.floors for the adapters of rows quoted below their price, and reads.chain_time."""
        for r in rows:
            if _needs_floor(r, reads.prices) and r.adapter_id not in reads.floors:
                try:
                    reads.floors[r.adapter_id] = self.client.price_floor(r.adapter_id)
                except UnknownAdapter:  # its price was just read: a registry never deletes
                    reads.floors[r.adapter_id] = PriceFloor(0, 0)
                if reads.chain_time is None:
                    reads.chain_time = self._chain_now()

    def _chain_now(self) -> int:
        """The time a batch sent now is mined at, at the earliest: the latest block's timestamp, or the wall clock
        when that is later (a chain that mines only on demand, as the devnet does, can leave its latest block
        minutes old; a test chain moved ahead keeps its own)."""
        return max(self.client.chain_time(), int(time.time()))

    def _looked_up(self, r, reads: _StepReads) -> bool:
        if r.adapter_id not in reads.prices or not (r.node_id in reads.prices or r.node_id in self._known_nodes):
            return False
        return not _needs_floor(r, reads.prices) or (r.adapter_id in reads.floors and reads.chain_time is not None)

    def _deposit(self) -> tuple[int, int]:
        """(this account's deposit on chain, the block it was read at), read before a write
        transaction (never inside: see _form_batch)."""
        block = self.client.block_number()
        return self.client.deposit_of(self.address, block=block), block

    def _free_deposit(self, s: Session, deposit: tuple[int, int]) -> tuple[int, int]:
        """(deposit left: `deposit` as read at its block, minus what this account's batches that it
        does not reflect yet will take; that in-flight amount). Those batches are the unfinished ones
        (at their price) and the ones settled after that block (at what they cost). Counted inside the
        forming transaction, so same-key settlers never both count the same wei (PostgreSQL: the
        advisory lock; SQLite: the write lock)."""
        amount, block = deposit
        conn = s.connection()  # Core selects: the ORM's cost more than the queries, on every batch formed
        fees = (
            conn.execute(
                select(SettlementBatch.fees_priced).where(
                    SettlementBatch.settler == self.address, SettlementBatch.status.in_(OPEN)
                )
            )
            .scalars()
            .all()
        )
        since = (
            conn.execute(
                select(SettlementBatch.total_fees).where(
                    SettlementBatch.settler == self.address,
                    SettlementBatch.status == BatchStatus.SETTLED,
                    SettlementBatch.block_number > block,
                )
            )
            .scalars()
            .all()
        )
        in_flight = sum(int(f) for f in fees if f) + sum(int(f) for f in since if f)
        return amount - in_flight, in_flight

    def _form_in(self, s: Session, rows, reads: _StepReads) -> _Work | bool | None:
        """Price `rows` (claimed in `s`), set aside what cannot be settled, write the batch of the
        rest, commit. Returns the batch, False when only records were set aside, None when nothing
        changed.

        A record is priced at its adapter's price, or, quoted below it, at its quote while the price's grace
        allows that (PriceFloor; else it is set aside): _charged. The batch's adapter table names an adapter
        once per price its records are charged, so records admitted at several prices settle together (an owner
        who moves its price between requests costs no batch per price); that table, like the node table, has
        room for MAX_ADAPTERS_PER_BATCH entries, and a record that would need one more waits for the next
        batch."""
        cfg = self.config
        prices = reads.prices
        formed_at = time.monotonic()  # before the batch's lease is taken (_new_batch)
        free, in_flight = self._free_deposit(s, reads.deposit)
        keep: list[tuple[object, int]] = []
        aside: list[tuple[object, str, int | None]] = []
        total, short = 0, False
        read_at: dict[str, int] = {}  # adapter id (as settleBatch's table holds it) -> its price, as read
        priced: dict[str, int] = {}  # adapter id -> the highest price its records in this batch are charged
        entries: set[tuple[str, int]] = set()  # settleBatch's adapter table: (adapter id, a price charged)
        # each kept row's bound, as charged: what _record_bounds(kept rows, priced) gives (one price read per adapter,
        # priced its highest charge), taken here rather than derived again from every row's quote
        bounds: list[int] = []
        nodes: set[str] = set()

        for r in rows:
            a_price, n_reason = prices[r.adapter_id], prices.get(r.node_id)
            if not _is_readable_id(r.request_id):
                aside.append((r, f"{ID_UNREADABLE}: request id {r.request_id[:80]!r} is not a 32-byte id", None))
                continue
            if isinstance(a_price, str) or isinstance(n_reason, str):
                aside.append((r, a_price if isinstance(a_price, str) else n_reason, None))
                continue
            counts = (r.prompt_tokens, r.completion_tokens)
            if not all(isinstance(n, int) and n >= 0 for n in counts):  # a negative fee would make room
                aside.append((r, _unreadable_counts(counts), None))
                continue
            tokens = r.prompt_tokens + r.completion_tokens
            if tokens > cfg.max_record_tokens:
                aside.append((r, f"{TOO_MANY_TOKENS}: {tokens} tokens > max {cfg.max_record_tokens} per record", None))
                continue
            quote = read_wei(r.quoted_price_per_1k)
            if quote is False:
                aside.append(
                    (r, f"{QUOTE_UNREADABLE}: {r.quoted_price_per_1k[:90]!r} is not a price per 1k tokens", None)
                )
                continue
            if quote is not None and a_price > quote:  # charged its quote (_charged), if the grace allows it
                if not reads.floors[r.adapter_id].allows(quote, reads.chain_time + GRACE_MARGIN_S):
                    what = _priced(r.adapter_id)
                    fee = record_fee(a_price, r.prompt_tokens, r.completion_tokens)
                    aside.append(
                        (
                            r,
                            f"{PRICE_ABOVE_QUOTE}: {what} costs {a_price} wei per 1k tokens now, the request was "
                            f"admitted at {r.quoted_price_per_1k}, and the price's grace does not cover that",
                            fee,
                        )
                    )
                    continue
            charged = _charged(a_price, quote)
            fee = record_fee(charged, r.prompt_tokens, r.completion_tokens)
            if charged > cfg.max_price_per_1k:
                what = _priced(r.adapter_id)
                aside.append(
                    (r, f"{PRICE_TOO_HIGH}: {what} costs {charged} wei per 1k tokens > max {cfg.max_price_per_1k}", fee)
                )
                continue
            entry = (to_id(r.adapter_id), charged)  # as settleBatch's table holds it, however the row spells it
            if read_at.get(entry[0], a_price) != a_price:
                # its id, spelled otherwise in another row, was read at another price this step (a change between
                # the two reads): one batch takes one reading of a price, this row waits for the next
                continue
            if (entry not in entries and len(entries) == MAX_ADAPTERS_PER_BATCH) or (
                r.node_id not in nodes and len(nodes) == MAX_NODES_PER_BATCH
            ):
                break  # the ledger's id tables are full: the rest goes in the next batch
            if total + fee <= free:
                if max(counts) > MAX_TOKEN_COUNT:  # under a record bound set above it: packing it would raise
                    aside.append((r, _unreadable_counts(counts), fee))
                    continue
                keep.append((r, fee))
                bounds.append(charged)
                read_at[entry[0]] = a_price
                priced[entry[0]] = max(priced.get(entry[0], charged), charged)
                entries.add(entry)
                nodes.add(r.node_id)
                total += fee
                continue
            short = True
            if fee > free and in_flight == 0:  # no batch of ours will ever free room for it: set aside
                aside.append((r, f"{DEPOSIT_SHORT}: fee {fee} wei > deposit left {max(free, 0)} wei", fee))
                continue
            break  # the rest waits for the next batch (or for our in-flight batches to settle)
        if short or free - total < cfg.low_deposit:
            self._warn_low(free - total, in_flight + total, short)
        if not (keep or aside):
            return None

        batch = None
        if keep:
            first_seq = self._next_first_seq(s, reads.chain_next)
            batch, settle = self._new_batch(
                s, [r for r, _ in keep], [fee for _, fee in keep], first_seq, priced, bounds
            )
            moved = move_to_batch(s, batch.batch_id, [(r.id, fee) for r, fee in keep])
            if moved != len(keep):  # as _move: a record no longer pending is never put in a second batch
                s.rollback()
                log.info("outbox rows moved under us (%d of %d still pending): forming again", moved, len(keep))
                return None
            s.add(batch)
        for r, reason, fee in aside:
            if not self._move(
                s, [r.id], status=RecordStatus.SET_ASIDE, error=reason, fee_wei=None if fee is None else str(fee)
            ):
                return None
        s.commit()
        for r, reason, _ in aside:
            log.warning("setting aside usage record %s: %s", r.request_id, reason)
        self.set_aside_total += len(aside)
        if batch is None:
            return False
        log.info("formed batch %s with %d records (%d wei)", batch.batch_id, batch.record_count, total)
        return _Work(batch, settle, priced, bounds, resumed=False, formed_at=formed_at)

    def _next_first_seq(self, s: Session, chain_next: int) -> int:
        """The sequence number a new batch of this account starts at: past the chain's nextSequence (read
        before this transaction), past every batch of ours the database knows settled, and past the batches
        in flight that continue that range without a gap: sent ones, and written ones another process of
        this account holds a live lease on (it is about to send them), so that pipelined batches follow
        each other. Other open batches (one that keeps failing, one nobody works on) are not waited for: a
        new batch may take the same numbers, which is safe, since the chain settles a number once: of two
        batches starting at one number at most one lands, the other fails with SequenceMismatch and its
        records, none at fault, are batched again. An open batch beyond a gap fails the same way."""
        conn = s.connection()  # Core selects, as in _free_deposit
        settled_end = conn.execute(
            select(func.max(SettlementBatch.first_seq + SettlementBatch.record_count)).where(
                SettlementBatch.settler == self.address,
                SettlementBatch.status == BatchStatus.SETTLED,
                SettlementBatch.first_seq.is_not(None),
            )
        ).scalar_one()
        nxt = max(chain_next, settled_end or 0)
        now = self._now(s)
        in_flight = or_(
            SettlementBatch.status == BatchStatus.SENT,
            and_(
                SettlementBatch.status == BatchStatus.CREATED,
                SettlementBatch.claimed_by != self.instance,
                SettlementBatch.lease_expires > now,
            ),
        )
        ranges = conn.execute(
            select(SettlementBatch.first_seq, SettlementBatch.record_count)
            .where(SettlementBatch.settler == self.address, in_flight, SettlementBatch.first_seq >= nxt)
            .order_by(SettlementBatch.first_seq)
        ).all()
        for first, count in ranges:
            if first != nxt:
                break
            nxt += count
        return nxt

    def _new_batch(
        self, s: Session, rows, fees: list[int | None], first_seq: int, priced: dict[str, int], bounds: list[int]
    ) -> tuple[SettlementBatch, list[SettleRecord]]:
        """A batch row (not added yet) of `rows` in this order, numbered from `first_seq` in this account's
        sequence, claimed by this instance, named for `bounds` (_record_bounds of `priced`); fees_priced is the
        sum of `fees` (None when one is unknown: a record of a batch written before prices were), prices_priced
        the adapters' `priced`."""
        settle = [to_settle_record(r) for r in rows]
        tree = MerkleTree.from_records(settle, first_seq)
        salt = 0
        batch_id = batch_id_for(settle, salt, bounds)
        conn = s.connection()  # Core, as in _free_deposit
        while conn.execute(select(SettlementBatch.id).where(SettlementBatch.batch_id == batch_id)).first() is not None:
            salt += 1  # the very records of an abandoned batch: a new id
            batch_id = batch_id_for(settle, salt, bounds)
        fees_priced = None if any(f is None for f in fees) else str(sum(fees))
        batch = SettlementBatch(
            batch_id=batch_id,
            merkle_root=hex0x(tree.root),
            record_count=len(rows),
            settler=self.address,
            first_seq=first_seq,
            fees_priced=fees_priced,
            prices_priced=json.dumps({a: str(p) for a, p in sorted(priced.items())}),
            claimed_by=self.instance,
            lease_expires=self._now(s) + timedelta(seconds=self.config.lease),
        )
        return batch, settle

    def _move(self, s: Session, ids: list[int], **values) -> bool:
        """Move pending records, and only pending ones: False (and the transaction rolled back) when
        any of them is no longer pending, so no record ever lands in two batches."""
        n = s.execute(
            update(UsageRecord)
            .where(UsageRecord.id.in_(ids), UsageRecord.status == RecordStatus.PENDING)
            .values(**values)
            .execution_options(synchronize_session=False)
        ).rowcount
        if n != len(ids):
            s.rollback()
            log.info("outbox rows moved under us (%d of %d still pending): forming again", n, len(ids))
            return False
        return True

    def _warn_low(self, left: int, in_flight: int, short: bool) -> None:
        now = time.monotonic()
        if now < self._next_low_warning:
            return
        self._next_low_warning = now + LOW_WARN_EVERY
        log.warning(
            "settler %s deposit is low: %d wei left after %d wei in flight%s; top it up with depositFor(%s)",
            self.address,
            max(left, 0),
            in_flight,
            " (records wait or are set aside)" if short else "",
            self.address,
        )

    def _requeue_deposit_short(self) -> int:
        """Records set aside because the deposit was short go back to the outbox, oldest first, as far
        as the deposit left can pay them now (they are priced again when batched)."""
        now = time.monotonic()
        if now < self._next_requeue:
            return 0
        self._next_requeue = now + REQUEUE_EVERY
        cond = (UsageRecord.status == RecordStatus.SET_ASIDE, UsageRecord.error.like(f"{DEPOSIT_SHORT}%"))
        with Session(self.engine) as s:
            if s.exec(select(UsageRecord.id).where(*cond).limit(1)).first() is None:
                return 0
        deposit = self._deposit()  # read before the write lock is taken
        with self._write() as s:
            free, _ = self._free_deposit(s, deposit)
            rows = s.exec(
                select(UsageRecord.id, UsageRecord.fee_wei)
                .where(*cond)
                .order_by(UsageRecord.id)
                .limit(self.config.batch_size * self.config.max_in_flight)
            ).all()
            ids = []
            for rid, fee in rows:
                fee = int(fee or 0)
                if fee > free:
                    break
                free -= fee
                ids.append(rid)
            if not ids:
                return 0
            n = _back_to_outbox(s, UsageRecord.id.in_(ids), *cond)
        log.info("the deposit can pay %d records set aside for it: back in the outbox", n)
        return n

    def _recheck_unregistered(self) -> int:
        """Records set aside because their adapter or node was not registered go back to the outbox
        once the registry knows both (an RPC node lagging behind the chain, or a record written just
        before its adapter was registered). Looked at on start, then every UNREGISTERED_RECHECK_EVERY.
        Records an older settler rejected (status rejected: it rejected only for an unregistered adapter
        or node) are looked at the same way."""
        now = time.monotonic()
        if now < self._next_recheck:
            return 0
        self._next_recheck = now + UNREGISTERED_RECHECK_EVERY
        cond = (
            or_(
                and_(UsageRecord.status == RecordStatus.SET_ASIDE, UsageRecord.error.like(f"{UNREGISTERED}%")),
                UsageRecord.status == RecordStatus.REJECTED,
            ),
        )
        with Session(self.engine) as s:
            rows = s.exec(
                select(UsageRecord.id, UsageRecord.adapter_id, UsageRecord.node_id)
                .where(*cond)
                .order_by(UsageRecord.id)
                .limit(self.config.batch_size * 10)
            ).all()
        if not rows:
            return 0
        prices: dict[str, int | str] = {}
        self._look_up(rows, prices)  # a reason string for what is still not registered
        ids = [r.id for r in rows if not isinstance(prices[r.adapter_id], str) and r.node_id not in prices]
        if not ids:
            return 0
        with Session(self.engine) as s:
            n = _back_to_outbox(s, UsageRecord.id.in_(ids), *cond)
        log.info("%d records set aside as unregistered name a registered adapter and node now: back in the outbox", n)
        return n

    def _retry_price_moving(self) -> int:
        """Records set aside because their price kept moving while they were being settled, or was raised
        above the price their request was admitted at, go back to the outbox (unmarked, priced again) on start
        and then every PRICE_MOVING_RETRY_EVERY seconds: a price that moved twice is no reason to give a record
        up for good, a price lowered again lets a record settle, and a price refusal only ever strikes the
        records whose own price moved."""
        now = time.monotonic()
        if now < self._next_price_retry:
            return 0
        self._next_price_retry = now + PRICE_MOVING_RETRY_EVERY
        moved = or_(UsageRecord.error.like(f"{PRICE_MOVING}%"), UsageRecord.error.like(f"{PRICE_ABOVE_QUOTE}%"))
        with Session(self.engine) as s:
            n = _back_to_outbox(s, UsageRecord.status == RecordStatus.SET_ASIDE, moved)
        if n:
            log.info("%d records set aside as their price moved: back in the outbox, priced again", n)
        return n

    # ------------------------------------------------------------------ finishing

    def _senders_quiet(self, addresses) -> bool:
        """Whether none of these accounts has a transaction still waiting to be mined: then no earlier
        send of a batch by them can land any more."""
        eth = self.client.w3.eth
        with rpc_guard(self.client.rpc_url):
            return all(
                eth.get_transaction_count(a, "latest") == eth.get_transaction_count(a, "pending")
                for a in {x for x in addresses if x}
            )

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
            others = {batch.settler, *_split_senders(batch.senders)} - {None, self.address}
            if others and not self._senders_quiet(others):
                log.info(
                    "batch %s: waiting for the transactions of %s before sending it ourselves",
                    batch.batch_id,
                    ", ".join(sorted(others)),
                )
                return False
            if batch.first_seq is None or batch.settler not in (None, self.address):
                if not self._renumber(w):
                    return False
                batch = w.batch
        # never send a batch whose lease another settler has taken; one formed moments ago still holds the
        # lease it was written with (the heartbeat renews it meanwhile), which spares a transaction a batch
        fresh = w.formed_at is not None and time.monotonic() - w.formed_at < self.config.lease / 4
        if not fresh and self._renew([batch.id]) != 1:
            log.warning("lost the lease on batch %s to another settler", batch.batch_id)
            return False
        self._point("before_send")
        try:
            tx_hash = self.client.send_settle_batch(
                batch.batch_id,
                batch.merkle_root,
                w.records,
                first_sequence=batch.first_seq,
                simulate=self._probe,
                max_prices=w.bounds,
            )
        except BatchAlreadySettled:
            self._mark_settled(batch)
            return False
        self._point("after_send")
        self._record_sent(batch, tx_hash)
        w.tx_hash = tx_hash
        return True

    def _record_sent(self, batch: SettlementBatch, tx_hash: str) -> None:
        """Write down the transaction that sends `batch`, with this account as the one whose deposit pays it
        and among every account that ever sent it; `batch` (detached) is brought up to date alongside. One
        Core statement: the ORM's get and flush cost more than the update itself, once a batch."""
        me, now = self.address, utcnow()
        cols = SettlementBatch.__table__.c
        senders = case(
            (or_(cols.senders.is_(None), cols.senders == ""), me),
            (("," + cols.senders + ",").contains(f",{me},"), cols.senders),
            else_=cols.senders + f",{me}",
        )
        values = {"tx_hash": tx_hash, "status": BatchStatus.SENT, "sent_at": now, "settler": me}
        with self.engine.begin() as conn:
            conn.execute(
                update(SettlementBatch)
                .where(SettlementBatch.id == batch.id)
                .values(**values, attempts=SettlementBatch.attempts + 1, senders=senders)
            )
        known = _split_senders(batch.senders)
        values.update(attempts=batch.attempts + 1, senders=",".join(known if me in known else [*known, me]))
        for key, value in values.items():
            set_committed_value(batch, key, value)

    def _renumber(self, w: _Work) -> bool:
        """Take over a batch numbered in another account's sequence (its lease expired, or it was handed
        back; or it was written before sequences): number its records in ours, from our next free number,
        same records, same order, same batch id. Called once no account that sent it has a transaction
        waiting; should an old transaction of it land after all, the batch id is settled once and the
        other send reverts with BatchAlreadySettled. False when the claim was lost meanwhile."""
        chain_next = self.client.next_sequence(self.address)  # outside the write transaction
        with self._write() as s:
            row = s.get(SettlementBatch, w.batch.id)
            if row is None or row.claimed_by != self.instance or row.status not in OPEN:
                return False
            first = self._next_first_seq(s, chain_next)
            settle = [to_settle_record(r) for r in batch_records(s, row.batch_id)]
            old = (row.settler, row.first_seq)
            row.settler, row.first_seq = self.address, first
            row.merkle_root = MerkleTree.from_records(settle, first).root_hex
            s.add(row)
            s.commit()
            s.refresh(row)
        log.info(
            "batch %s: numbered again from %d in the sequence of %s (was %s from %s)",
            row.batch_id,
            first,
            self.address,
            old[0],
            old[1],
        )
        w.batch, w.records = row, settle
        return True

    def _tx_still_pending(self, tx_hash: str) -> bool:
        """Whether to wait on a recorded transaction rather than resend: mined successfully (odd,
        since isSettled said no: _await sorts it out) or still in the mempool. Reverted or dropped
        transactions (e.g. the chain restarted) are resent."""
        rcpt = self.client.tx.light_receipt(tx_hash)
        if rcpt is not None:
            return rcpt["status"] == 1
        try:
            with rpc_guard(self.client.rpc_url):
                self.client.w3.eth.get_transaction(tx_hash)
            return True
        except TransactionNotFound:  # dropped (e.g. the chain restarted)
            return False

    def _await(self, w: _Work, timeout: float) -> None:
        batch = w.batch
        info = None
        try:
            info = self.client.await_settled_batch(
                w.tx_hash,
                batch.batch_id,
                batch.merkle_root,
                w.records,
                timeout=timeout,
                first_sequence=batch.first_seq,
                max_prices=w.bounds,
                replace_after=self.config.replace_after,
                on_replace=lambda new: self._replaced(batch, new),
            )
            self._probe = False  # our own transaction settled: the pipe may open
        except BatchAlreadySettled:
            pass  # an earlier send of this batch landed first
        except (TransactionFailed, ContractError):
            if not self.client.is_settled(batch.batch_id):
                raise
        self._point("after_receipt")
        self._mark_settled(batch, info)

    def _reap(self, sent: list[_Work]) -> int:
        """Record settled the batches at the head of `sent` that the chain has settled, oldest first, and
        take them off it; returns how many. One account's transactions are mined in nonce order, so the
        first batch not settled yet ends the look; a failed one is left to _await, which says why."""
        n = 0
        while sent and (info := self.client.get_batch(sent[0].batch.batch_id)) is not None:
            w = sent.pop(0)
            self._point("after_receipt")
            self._mark_settled(w.batch, info)
            n += 1
        return n

    def _replaced(self, batch: SettlementBatch, tx_hash: str) -> None:
        """Record the replacement of a stuck transaction: a resume looks for this one, not the replaced one."""
        with Session(self.engine) as s:
            s.execute(
                update(SettlementBatch)
                .where(SettlementBatch.id == batch.id, SettlementBatch.status == BatchStatus.SENT)
                .values(tx_hash=tx_hash)
            )
            s.commit()

    # ------------------------------------------------------------------ finality

    def _follow_finality(self) -> int:
        """Look at the settled batches that are not final yet (ledger order): mark final those with
        `confirmations` blocks on top of theirs, follow those the chain moved to another block (in whichever
        sequence holds them there), and send back those a reorg dropped (module docstring: Finality). Returns how
        many batches went back. Every account's: a batch recorded in a stranger's sequence (a copier's, settled
        first: an account that never sent it from this database) is ours to send again if a reorg drops the copy,
        and one of another account of ours is (that account's process may be gone: its key rotated). Final is
        judged at our `confirmations` for ours and a stranger's, and for another account of ours, whose
        confirmations are its own, only at MAX_CONFIRMATIONS (at ours, one waiting 1 marked another's waiting 6
        final, and a deeper reorg left its records settled, unpaid)."""
        with Session(self.engine) as s:
            rows = s.exec(
                select(SettlementBatch)
                .where(
                    SettlementBatch.status == BatchStatus.SETTLED,
                    SettlementBatch.block_hash.is_not(None),
                )
                .order_by(SettlementBatch.first_seq, SettlementBatch.id)
            ).all()
        if not rows:
            return 0
        head = self.client.block_number()
        canonical: dict[int, str | None] = {}  # block number -> hash now: batches share blocks

        def hash_at(number: int) -> str | None:
            if number not in canonical:
                canonical[number] = self.client.block_hash(number)
            return canonical[number]

        final: list[tuple[int, str]] = []  # (batch row id, the hash it was checked at)
        moved: list[tuple[SettlementBatch, BatchInfo, str, dict]] = []
        dropped: list[SettlementBatch] = []
        for b in rows:
            deep = head - b.block_number >= (
                MAX_CONFIRMATIONS if self._ours_elsewhere(b) else self.config.confirmations
            )
            if hash_at(b.block_number) == b.block_hash and not deep:
                continue  # still where it was, not final yet: no eth_call
            # moved, gone, or about to be final: the chain says where the batch is (the hash was read after the
            # receipt, so a reorg in between could have given the hash of a block without it)
            info = self.client.get_batch(b.batch_id)
            if info is not None and info.settled_block == b.block_number and hash_at(b.block_number) == b.block_hash:
                final.append((b.id, b.block_hash))
                continue
            if info is None:
                dropped.append(b)
            elif (h := hash_at(info.settled_block)) is not None:
                moved.append((b, info, h, self._numbering(b, info)))  # its transaction, or a copy's, mined elsewhere
        with Session(self.engine) as s:
            for bid, h in final:  # only if unchanged since read: another process may have sent it back
                s.execute(
                    update(SettlementBatch)
                    .where(SettlementBatch.id == bid, SettlementBatch.block_hash == h)
                    .values(block_hash=None)
                )
            for b, info, h, numbering in moved:
                s.execute(
                    update(SettlementBatch)
                    .where(SettlementBatch.id == b.id, SettlementBatch.block_hash == b.block_hash)
                    .values(block_number=info.settled_block, block_hash=h, **numbering)
                )
                log.info(
                    "batch %s moved from block %d to block %d by a reorg",
                    b.batch_id,
                    b.block_number,
                    info.settled_block,
                )
            back = 0
            for b in dropped:
                # a stranger's copy (a copier that never sent it from here) is gone: the batch is ours to number anew,
                # and no send of a stranger's is waited for (it may keep a transaction waiting for ever)
                stranger = b.settler != self.address and not self._ours_elsewhere(b)
                n = s.execute(
                    update(SettlementBatch)
                    .where(
                        SettlementBatch.id == b.id,
                        SettlementBatch.status == BatchStatus.SETTLED,
                        SettlementBatch.block_hash == b.block_hash,
                    )
                    .values(
                        **({"settler": None, "first_seq": None} if stranger else {}),
                        status=BatchStatus.SENT,  # tx_hash kept: resuming waits on it while the node still has it
                        block_number=None,
                        block_hash=None,
                        total_fees=None,
                        settled_at=None,
                        claimed_by=None,
                        lease_expires=None,
                    )
                ).rowcount
                if n != 1:
                    continue  # another process of this account got there first
                records = s.execute(
                    update(UsageRecord)
                    .where(UsageRecord.batch_id == b.batch_id, UsageRecord.status == RecordStatus.SETTLED)
                    .values(status=RecordStatus.SUBMITTED)
                ).rowcount
                back += records
                log.warning(
                    "batch %s (%d records from sequence number %s) was in block %d, which a reorg dropped: "
                    "sending it again",
                    b.batch_id,
                    records,
                    b.first_seq,
                    b.block_number,
                )
            s.commit()
        if dropped:
            self.settled_total -= back
            self._probe = True  # the chain moved under us: simulate the next send
        return len(dropped)

    def _ours_elsewhere(self, b: SettlementBatch) -> bool:
        """Whether the batch is settled by another account of ours: one that sent it from this database."""
        return b.settler != self.address and b.settler in _split_senders(b.senders)

    def _abandon(self, w: _Work, error: ContractError) -> None:
        """The ledger refused the batch. Once no transaction of it can land any more (no account that
        ever sent it has one waiting to be mined), give it up:
        - refused as priced (REPRICE: a price raised since, a deposit reclaimed): its records go back
          to the outbox to be priced again; only those whose fee at today's price differs from the
          fee they were batched at (_price_moved), and those of the adapter a PriceAboveQuote names, are
          struck (marked REPRICED), the others go back unmarked (an InsufficientDeposit with no price
          moved strikes nobody);
        - a batch of one record refused for any other reason: it goes back, struck;
        - refused for any other reason with several records: it is split in two halves (written and
          claimed here, sent next), so that the records at fault are isolated and the rest settle;
          its records are marked (SPLIT_MARK, cleared when their half settles).
        A struck record that was marked already is set aside instead, with the reason: PRICE_MOVING
        for a price refusal, UNREGISTERED when the ledger did not know its adapter or node, else
        REVERTED."""
        batch = w.batch
        if self.client.is_settled(batch.batch_id):
            self._mark_settled(batch)
            return
        with Session(self.engine) as s:
            row = s.get(SettlementBatch, batch.id)
            senders = {self.address, batch.settler, row.settler, *_split_senders(row.senders)} - {None}
        if not self._senders_quiet(senders):
            raise error  # one of its transactions may still be mined: look again next step
        # out of sequence (a batch before it was abandoned, or it is another account's): no record is at
        # fault; they all go back unmarked and are numbered again in this account's sequence
        unnumbered = isinstance(error, SequenceMismatch)
        priced = unnumbered or isinstance(error, REPRICE)
        # refused for its price: whose price moved is read now, before the write lock (no chain call in it)
        moved = self._price_moved(batch.batch_id, w.priced) if priced and not unnumbered else set()
        reason = f"batch {batch.batch_id} refused: {error}"
        aside_as = (
            PRICE_MOVING if priced else UNREGISTERED if isinstance(error, (UnknownAdapter, UnknownNode)) else REVERTED
        )
        split: list[SettlementBatch] = []
        with self._write() as s:
            n = s.execute(
                update(SettlementBatch)
                .where(
                    SettlementBatch.id == batch.id,
                    SettlementBatch.status.in_(OPEN),
                    SettlementBatch.claimed_by == self.instance,
                )
                .values(status=BatchStatus.ABANDONED, last_error=reason[:1000], claimed_by=None, lease_expires=None)
            ).rowcount
            if n != 1:
                return  # not ours any more
            rows = s.exec(
                select(
                    UsageRecord.id,
                    UsageRecord.request_id,
                    UsageRecord.adapter_id,
                    UsageRecord.node_id,
                    UsageRecord.prompt_tokens,
                    UsageRecord.completion_tokens,
                    UsageRecord.error,
                    UsageRecord.fee_wei,
                    UsageRecord.quoted_price_per_1k,
                )
                .where(UsageRecord.batch_id == batch.batch_id, UsageRecord.status == RecordStatus.SUBMITTED)
                .order_by(UsageRecord.leaf_index, UsageRecord.id)
            ).all()
            mark = f"{REPRICED}: {reason}"[:1000]
            again, first, spared = [], [], []
            if not priced and len(rows) > 1:  # isolate: each half is sent (simulated) on its own
                split_mark = f"{SPLIT_MARK}: {reason}"[:1000]  # cleared again when its half settles
                k = len(rows) // 2
                for half, first in ((rows[:k], batch.first_seq), (rows[k:], batch.first_seq + k)):
                    # each half keeps its records' sequence numbers: the two cover the parent's range
                    # and is bound by the prices the parent was priced at: a split is no way round a raise
                    half_priced = {a: w.priced[a] for a in {to_id(r.adapter_id) for r in half}}
                    child, _ = self._new_batch(
                        s,
                        half,
                        [None if r.fee_wei is None else int(r.fee_wei) for r in half],
                        first,
                        half_priced,
                        _record_bounds(half, half_priced),
                    )
                    s.add(child)
                    split.append(child)
                    s.execute(
                        update(UsageRecord),
                        [
                            {"id": r.id, "batch_id": child.batch_id, "leaf_index": i, "error": split_mark}
                            for i, r in enumerate(half)
                        ],
                    )
            else:
                # a price refusal strikes only the records whose price moved (their adapter's owner, or the
                # ledger's base price), and those of the adapter the ledger named as above its bound, even if
                # its price is back by now: an owner who raises it around each send and restores it after
                # would otherwise stall every batch its records are in, for ever, striking nobody. The others
                # were not at fault and go back unmarked
                named = _named_adapter(error)
                struck = [r for r in rows if r.id in moved or to_id(r.adapter_id) == named] if priced else rows
                spared = [r.id for r in rows if r.id not in moved] if priced else []
                again = [r.id for r in struck if r.error and r.error.startswith(REPRICED)]
                first = [r.id for r in struck if not (r.error and r.error.startswith(REPRICED))]
                cleared = {"batch_id": None, "leaf_index": None}
                if spared:
                    s.execute(
                        update(UsageRecord)
                        .where(UsageRecord.id.in_(spared))
                        .values(status=RecordStatus.PENDING, fee_wei=None, **cleared)
                    )
                if first:
                    s.execute(
                        update(UsageRecord)
                        .where(UsageRecord.id.in_(first))
                        .values(status=RecordStatus.PENDING, fee_wei=None, error=mark, **cleared)
                    )
                if again:
                    s.execute(
                        update(UsageRecord)
                        .where(UsageRecord.id.in_(again))
                        .values(status=RecordStatus.SET_ASIDE, error=f"{aside_as}: {reason}"[:1000], **cleared)
                    )
            s.commit()
        self.set_aside_total += len(again)
        if split:
            log.warning(
                "abandoned batch %s (%s): split into %s (%d records) and %s (%d records) to find the records at fault",
                batch.batch_id,
                error,
                split[0].batch_id,
                split[0].record_count,
                split[1].batch_id,
                split[1].record_count,
            )
        else:
            log.warning(
                "abandoned batch %s (%s): %d records to be priced again (%d of them not at fault), %d set aside",
                batch.batch_id,
                error,
                len(first) + len(spared),
                len(spared),
                len(again),
            )

    def _price_moved(self, batch_id: str, priced: dict[str, int]) -> set[int]:
        """Ids of the batch's records whose fee at today's on-chain price (their adapter's, or the base
        price) differs from the fee they were batched at, or whose adapter is gone: the records a price
        refusal is charged to. Chain reads: call it outside any write transaction. A price raised and
        set back before this look strikes nobody (the batch is only formed again). A record the batch
        charged below its adapter's price (its settleBatch bound, _record_bounds of `priced`: a quote under a
        raise's grace) is taken at that bound while the grace still allows it: its price did not move."""
        with Session(self.engine) as s:
            rows = s.exec(
                select(
                    UsageRecord.id,
                    UsageRecord.adapter_id,
                    UsageRecord.prompt_tokens,
                    UsageRecord.completion_tokens,
                    UsageRecord.fee_wei,
                    UsageRecord.quoted_price_per_1k,
                ).where(UsageRecord.batch_id == batch_id, UsageRecord.status == RecordStatus.SUBMITTED)
            ).all()
        prices: dict[str, int | None] = {}
        floors: dict[str, PriceFloor] = {}
        now: int | None = None  # the chain's time, read once, for the first record charged below its price
        moved = set()
        for r, bound in zip(rows, _record_bounds(rows, priced), strict=True):
            a = r.adapter_id
            if a not in prices:
                if a == BASE_MODEL_ADAPTER_ID:
                    prices[a] = self.client.base_price()
                else:
                    try:
                        prices[a] = self.client.adapter_price(a)
                    except UnknownAdapter:
                        prices[a] = None
            price = prices[a]
            if price is not None and price > bound:
                now = self._chain_now() if now is None else now
                if a not in floors:
                    floors[a] = self.client.price_floor(a)
                if floors[a].allows(bound, now):
                    price = bound
            # a record without a fee (batched before fees were recorded) is never charged with a move
            if r.fee_wei is not None and (
                price is None or record_fee(price, r.prompt_tokens, r.completion_tokens) != int(r.fee_wei)
            ):
                moved.add(r.id)
        return moved

    def _numbering(self, batch: SettlementBatch, info: BatchInfo) -> dict:
        """The columns to write so that the batch's row says whose sequence holds it, and from which number, as
        the chain has it: {} when it already does. The same batch id (the same records, in order) may be settled
        by a tool or an older process of this account, or by another settler that copied it from the mempool (an
        id names its records), under other numbers, or under ours once that settler's sequence caught up with
        ours (the same numbers give the same root), and a reorg may put such a copy in our batch's place. A row
        left under our address with numbers the chain never gave our account would make every later batch of
        ours start past them and fail SequenceMismatch, for good."""
        chain = {"settler": info.settler, "first_seq": info.first_sequence, "merkle_root": info.merkle_root}
        if chain == {"settler": batch.settler, "first_seq": batch.first_seq, "merkle_root": batch.merkle_root}:
            return {}
        if info.merkle_root != batch.merkle_root:
            with Session(self.engine) as s:
                settle = [to_settle_record(r) for r in batch_records(s, batch.batch_id)]
            if not settle or MerkleTree.from_records(settle, info.first_sequence).root_hex != info.merkle_root:
                raise SettlementError(
                    f"batch {batch.batch_id} settled on chain with root {info.merkle_root}, "
                    f"database has {batch.merkle_root}"
                )
        log.warning(
            "batch %s settled by %s from sequence number %d, written as %s's from %s: recorded as the chain has it",
            batch.batch_id,
            info.settler,
            info.first_sequence,
            batch.settler,
            batch.first_seq,
        )
        return chain

    def _mark_settled(self, batch: SettlementBatch, info: BatchInfo | None = None) -> int:
        """Record the batch settled as the chain has it (`info`, else getBatch)."""
        info = info or self.client.get_batch(batch.batch_id)
        if info is None:
            raise SettlementError(f"batch {batch.batch_id} is not settled on chain")
        numbering = self._numbering(batch, info)
        # not final yet: keep the block's hash, which _follow_finality compares with the chain's until it is
        block_hash = self.client.block_hash(info.settled_block) if self.config.confirmations > 0 else None
        values = {
            "status": BatchStatus.SETTLED,
            "block_number": info.settled_block,
            "total_fees": str(info.total_fees),
            "settled_at": utcnow(),
            "lease_expires": None,
            "block_hash": block_hash,
        }
        values.update(numbering)
        # Core statements on a plain connection: the ORM's get, attribute events and session
        # synchronisation cost more than the database's own work here
        with self.engine.begin() as conn:
            conn.execute(update(SettlementBatch).where(SettlementBatch.id == batch.id).values(**values))
            n = conn.execute(
                update(UsageRecord)
                .where(UsageRecord.batch_id == batch.batch_id, UsageRecord.status == RecordStatus.SUBMITTED)
                .values(
                    status=RecordStatus.SETTLED,
                    # a split half settled: none of its records was at fault
                    error=case((UsageRecord.error.like(f"{SPLIT_MARK}%"), None), else_=UsageRecord.error),
                )
            ).rowcount
        self.settled_total += n
        if batch.fees_priced is not None and info.total_fees > int(batch.fees_priced):
            log.warning(
                "batch %s cost %d wei, priced at %s: a price rose between pricing and mining",
                batch.batch_id,
                info.total_fees,
                batch.fees_priced,
            )
        log.info("batch %s settled in block %d (%d records)", batch.batch_id, info.settled_block, n)
        return n


# ---------------------------------------------------------------------- status


def _unreadable_counts(counts: tuple[object, object]) -> str:
    return (
        f"{TOKENS_UNREADABLE}: {counts[0]!r} prompt and {counts[1]!r} completion tokens, where a settled record "
        f"carries 0 to {MAX_TOKEN_COUNT} of each"
    )


def _is_readable_id(value: object) -> bool:
    try:
        to_id(value)
    except ValueError:
        return False
    return True


def _named_adapter(error: Exception) -> str | None:
    """The adapter a PriceAboveQuote names (None for any other error, or one that cannot be read)."""
    if not isinstance(error, PriceAboveQuote):
        return None
    try:
        return to_id(error.args_by_name.get("adapterId"))
    except ValueError:
        return None


def _stored_prices(text: str | None) -> dict[str, int] | None:
    """A batch's prices_priced (adapter id -> price); None when it has none or they cannot be read."""
    try:
        got = json.loads(text) if text else None
        if not isinstance(got, dict):
            return None
        out = {to_id(a): read_wei(p) for a, p in got.items()}
    except (ValueError, TypeError, RecursionError):
        return None
    return out if all(isinstance(p, int) and not isinstance(p, bool) for p in out.values()) else None


def settler_status(
    engine: Engine,
    client: ChainClient | None = None,
    settler: str | None = None,
    *,
    low_deposit: int = DEFAULT_LOW_DEPOSIT,
) -> dict:
    """Where settlement stands, for `loramesh settler status`, /metrics and /health. Database only,
    plus one eth_call for the deposit when `client` and `settler` (an address) are given; a chain
    that does not answer leaves the deposit fields None and says why in chain_error.

    Keys: pending, in_flight (records in unsettled batches), set_aside, set_aside_deposit_short (of
    those, the ones that go back by themselves once the deposit can pay them), disputed, rejected,
    settled (record counts); settled_unconfirmed, fees_unconfirmed_wei (of the settled, the records and
    fees of batches not final yet: fewer than the settler's confirmations on top, a reorg may send them
    back); batches_in_flight; fees_pending_wei (what unsettled batches were priced
    at: the deposit will pay it); fees_set_aside_wei; settler; deposit_wei (on chain);
    deposit_left_wei (deposit_wei minus this settler's fees pending); deposit_low (deposit_left_wei
    below low_deposit, or records set aside for the deposit); chain_error."""
    with Session(engine) as s:
        counts = count_by_status(s)
        open_batches = s.exec(
            select(SettlementBatch.settler, SettlementBatch.fees_priced).where(SettlementBatch.status.in_(OPEN))
        ).all()
        aside_fees = s.exec(
            select(UsageRecord.fee_wei).where(
                UsageRecord.status == RecordStatus.SET_ASIDE, UsageRecord.fee_wei.is_not(None)
            )
        ).all()
        # settled on chain, not final yet: (records, fees) of batches still keeping their block's hash
        unconfirmed = s.exec(
            select(SettlementBatch.record_count, SettlementBatch.total_fees).where(
                SettlementBatch.status == BatchStatus.SETTLED, SettlementBatch.block_hash.is_not(None)
            )
        ).all()
        deposit_short = s.exec(
            select(func.count())
            .select_from(UsageRecord)
            .where(UsageRecord.status == RecordStatus.SET_ASIDE, UsageRecord.error.like(f"{DEPOSIT_SHORT}%"))
        ).one()
    mine = [f for who, f in open_batches if settler is None or (who or "").lower() == settler.lower()]
    out = {
        "pending": counts.get(RecordStatus.PENDING, 0),
        "in_flight": counts.get(RecordStatus.SUBMITTED, 0),
        "set_aside": counts.get(RecordStatus.SET_ASIDE, 0),
        "set_aside_deposit_short": int(deposit_short),
        "disputed": counts.get(RecordStatus.DISPUTED, 0),
        "rejected": counts.get(RecordStatus.REJECTED, 0),
        "settled": counts.get(RecordStatus.SETTLED, 0),
        "settled_unconfirmed": sum(n for n, _ in unconfirmed),
        "fees_unconfirmed_wei": sum(int(f) for _, f in unconfirmed if f),
        "batches_in_flight": len(open_batches),
        "fees_pending_wei": sum(int(f) for f in mine if f),
        "fees_set_aside_wei": sum(int(f) for f in aside_fees if f),
        "settler": settler,
        "deposit_wei": None,
        "deposit_left_wei": None,
        "deposit_low": bool(deposit_short) or None,
        "chain_error": None,
    }
    if client is not None and settler is not None:
        try:
            deposit = client.deposit_of(settler)
        except LedgerError as e:
            out["chain_error"] = str(e)
        else:
            left = deposit - out["fees_pending_wei"]
            out.update(
                deposit_wei=deposit, deposit_left_wei=left, deposit_low=left < low_deposit or bool(deposit_short)
            )
    return out


def _priced(adapter_id: str) -> str:
    """What a record pays for, in a reason it is set aside for."""
    return "base model" if adapter_id == BASE_MODEL_ADAPTER_ID else f"adapter {adapter_id}"


def _back_to_outbox(s: Session, *where) -> int:
    """Put the records matching `where` back in the outbox, unpriced and unmarked, and commit; how many."""
    n = s.execute(
        update(UsageRecord).where(*where).values(status=RecordStatus.PENDING, error=None, fee_wei=None)
    ).rowcount
    s.commit()
    return n


def requeue_set_aside(engine: Engine, reason_prefix: str = "") -> int:
    """Put set-aside records (those whose reason starts with `reason_prefix`) back in the outbox as
    pending; a settler prices and bounds them again. Returns how many."""
    cond = [UsageRecord.status == RecordStatus.SET_ASIDE]
    if reason_prefix:
        cond.append(UsageRecord.error.like(reason_prefix.replace("%", r"\%").replace("_", r"\_") + "%", escape="\\"))
    with Session(engine) as s:
        return _back_to_outbox(s, *cond)
