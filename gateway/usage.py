"""Usage capture: the gateway bills what it saw. A request is written "open" when it is dispatched (the
gateway's prompt count, max_tokens) and closed when it ends: its completion record and its usage record
(the ledger outbox row) in one database transaction.

The billed counts are always the gateway's own: the prompt it tokenized and sent as token ids, the token
events it relayed. The node's signed receipt is checked against them; within RECEIPT_COMPLETION_SLACK_ON_ABORT
it is kept beside them and the record is settled normally; outside it (or a receipt that does not verify)
the record is kept as DISPUTED with both counts and the reason, never settled, and the node is dropped
from routing. A node that died mid-stream sent no receipt: its record is billed at the gateway's count.

A request to the bare base model (no adapter) is recorded like any other, with the zero adapter id
(ledger.types.BASE_MODEL_ADAPTER_ID): the ledger prices it at its base price and credits the node.
The node's receipt for it says adapter_id null, and is checked to say so."""

from __future__ import annotations

import logging
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import event, or_
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, select

from gateway.models import CompletionRecord, GatewayInstance, RequestStatus
from ledger.models import RecordStatus, utcnow
from ledger.outbox import OutboxError, add_usage_record
from ledger.types import BASE_MODEL_ADAPTER_ID
from node.receipts import ReceiptError, check_receipt

log = logging.getLogger(__name__)

# How far a node's signed receipt may differ from the gateway's own count and still be recorded normally
# (billing is the gateway's count either way; outside this the record is DISPUTED and never settled).
# - prompt: exact. The gateway sends every prompt as token ids, so the node's count is their number.
# - completion, request that ended on its own (stop, length, engine error): exact. The node streams one
#   token event per token and signs its receipt from the same finish event, after the last token event.
# - completion, request the gateway aborted (client gone, node cut off): the receipt may claim one token
#   more than the gateway read. The gateway reads the stream on to the node's done event after the abort
#   and so normally still sees every token; when that read is cut short, one token can have been produced
#   while the abort was in flight, after the last event the gateway read.
# - never fewer than the gateway saw: a node does not under-count tokens it streamed.
RECEIPT_COMPLETION_SLACK_ON_ABORT = 1


class UsageError(RuntimeError):
    """A request end that could not be written to the database."""


@dataclass(slots=True)
class RequestEnd:
    """How one request ended, as the gateway saw it; receipt and signature come from the node.

    prompt_tokens / completion_tokens are the gateway's counts (what is billed). `served`: a node took the
    request (it answered with its first event), so its prompt was processed. `aborted`: the gateway aborted
    it. `node_lost`: the node's stream broke and it did not answer the abort (no receipt is expected).
    `reconciled`: the gateway died mid-request, so it has no completion count of its own: the receipt's,
    capped at max_tokens and the context, is billed."""

    request_id: str
    model: str
    adapter_id: str | None
    node_id: str | None
    status: str
    key_id: int | None = None
    finish_reason: str | None = None
    receipt: dict | None = None
    signature: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 1
    ttft_ms: float | None = None
    latency_ms: float | None = None
    error: str | None = None
    served: bool = True
    aborted: bool = False
    node_lost: bool = False
    reconciled: bool = False
    max_tokens: int | None = None
    context_len: int | None = None
    disputed: str | None = None  # set by the recorder: why the receipt was not accepted


def check_served_receipt(end: RequestEnd, public_key: bytes | None) -> dict:
    """The receipt, once its signature verifies and it describes this request on this node."""
    if end.receipt is None or end.signature is None:
        raise ReceiptError("the node sent no receipt")
    if public_key is None:
        raise ReceiptError(f"no public key known for node {end.node_id}")
    if not isinstance(end.receipt, dict) or not isinstance(end.signature, str):
        raise ReceiptError("the receipt is not an object with a hex signature")
    check_receipt(end.receipt, end.signature, public_key)
    r = end.receipt
    for name, want in (("request_id", end.request_id), ("node_id", end.node_id), ("adapter_id", end.adapter_id)):
        if r[name] != want:
            raise ReceiptError(f"receipt {name} is {r[name]}, expected {want}")
    return r


def completion_bound(end: RequestEnd) -> int | None:
    """The most completion tokens this request can have: max_tokens, and what the context leaves."""
    bounds = [b for b in (end.max_tokens,
                          None if end.context_len is None else max(0, end.context_len - end.prompt_tokens))
              if b is not None]  # fmt: skip
    return min(bounds) if bounds else None


def judge(end: RequestEnd, receipt: dict) -> str | None:
    """Why this verified receipt is outside the tolerance (None: it is within). For a reconciled request
    it also sets the gateway's completion count from the receipt, capped."""
    np, nc = receipt["prompt_tokens"], receipt["completion_tokens"]
    reasons = []
    if np != end.prompt_tokens:
        reasons.append(f"receipt claims {np} prompt tokens, the gateway sent {end.prompt_tokens}")
    bound = completion_bound(end)
    if end.reconciled:
        end.completion_tokens = nc if bound is None else min(nc, bound)
        if bound is not None and nc > bound:
            reasons.append(f"receipt claims {nc} completion tokens, more than the request allows ({bound})")
    else:
        slack = RECEIPT_COMPLETION_SLACK_ON_ABORT if end.aborted else 0
        if not end.completion_tokens <= nc <= end.completion_tokens + slack:
            reasons.append(f"receipt claims {nc} completion tokens, the gateway relayed {end.completion_tokens}"
                           + (f" (+{slack} allowed for an abort)" if slack else ""))  # fmt: skip
    return "; ".join(reasons) or None


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


class UsageRecorder:
    """Opens and closes request records. Call its methods from a worker thread (they block on the database)."""

    def __init__(self, engine: Engine, public_key_of, *, instance_id: str | None = None) -> None:
        self.engine = engine
        self.public_key_of = public_key_of  # node id -> raw Ed25519 key (from its heartbeats) or None
        self.instance_id = instance_id
        # SQLite has one writer at a time, and a writer that finds the lock taken sleeps in growing steps
        # (1, 2, 5, 10 ms...) before it retries: our own writers wait their turn here instead
        self._write_lock = threading.Lock() if engine.dialect.name == "sqlite" else nullcontext()

    # ------------------------------------------------------------------ open

    def open(self, *, request_id: str, model: str, adapter_id: str | None, node_id: str | None, key_id: int | None,
             prompt_tokens: int, max_tokens: int) -> None:  # fmt: skip
        """Write the request as open before any node sees it (UsageError when the database refuses)."""
        row = CompletionRecord(request_id=request_id, key_id=key_id, model=model, adapter_id=adapter_id,
                               node_id=node_id, status=RequestStatus.OPEN, prompt_tokens=prompt_tokens,
                               max_tokens=max_tokens, instance_id=self.instance_id)  # fmt: skip
        self._write(lambda s: s.add(row), request_id)

    def move(self, request_id: str, node_id: str) -> None:
        """The open request goes to another node (failover before the first token)."""
        def change(s: Session) -> None:
            row = s.get(CompletionRecord, request_id)
            if row is not None:
                row.node_id = node_id
                s.add(row)
        self._write(change, request_id)

    def _write(self, fn, request_id: str) -> None:
        try:
            with self._write_lock, Session(self.engine) as s:
                fn(s)
                s.commit()
        except SQLAlchemyError as e:
            raise UsageError(f"could not record request {request_id}: {e}") from e

    # ------------------------------------------------------------------ close

    def record(self, end: RequestEnd) -> str:
        """Close the request: its completion record, and its usage record when a node served it (base-model
        requests too, under the zero adapter id). Returns "recorded", "disputed" (see end.disputed) or
        "not_served"; UsageError when the database refuses."""
        receipt = None
        usage = None
        result = "not_served"
        if end.served and end.node_id is not None:
            result = "recorded"
            node_counts = (None, None)
            if end.receipt is None and end.node_lost:
                pass  # the node died: billed at the gateway's count, no receipt
            else:
                try:
                    receipt = check_served_receipt(end, self.public_key_of(end.node_id))
                except ReceiptError as e:
                    end.disputed = f"receipt refused: {e}"
                else:
                    node_counts = (receipt["prompt_tokens"], receipt["completion_tokens"])
                    end.disputed = judge(end, receipt)
                    end.finish_reason = end.finish_reason or receipt["finish_reason"]
            if end.disputed:
                result = "disputed"
                log.error("request %s on node %s disputed: %s", end.request_id[:10], str(end.node_id)[:10],
                          end.disputed)  # fmt: skip
                end.error = f"{end.error + '; ' if end.error else ''}disputed: {end.disputed}"
            usage = dict(request_id=end.request_id,
                         adapter_id=BASE_MODEL_ADAPTER_ID if end.adapter_id is None else end.adapter_id,
                         node_id=end.node_id, prompt_tokens=end.prompt_tokens, completion_tokens=end.completion_tokens,
                         node_prompt_tokens=node_counts[0], node_completion_tokens=node_counts[1],
                         receipt_json=receipt, node_signature=end.signature if receipt is not None else None,
                         status=RecordStatus.DISPUTED if end.disputed else RecordStatus.PENDING,
                         error=end.disputed, gateway_key_id=end.key_id)  # fmt: skip
        fields = dict(key_id=end.key_id, model=end.model, adapter_id=end.adapter_id, node_id=end.node_id,
                      status=end.status, finish_reason=end.finish_reason, prompt_tokens=end.prompt_tokens,
                      completion_tokens=end.completion_tokens, attempts=end.attempts, ttft_ms=end.ttft_ms,
                      latency_ms=end.latency_ms, error=end.error, finished_at=utcnow())  # fmt: skip
        try:
            with self._write_lock, Session(self.engine) as s:
                row = s.get(CompletionRecord, end.request_id)
                if row is None:
                    row = CompletionRecord(request_id=end.request_id, max_tokens=end.max_tokens,
                                           instance_id=self.instance_id, **fields)  # fmt: skip
                else:
                    for k, v in fields.items():
                        setattr(row, k, v)
                s.add(row)
                if usage is not None:
                    add_usage_record(s, **usage)
                s.commit()
        except (SQLAlchemyError, OutboxError) as e:
            raise UsageError(f"could not record request {end.request_id}: {e}") from e
        return result

    # ------------------------------------------------------------------ instances and reconciliation

    def beat(self) -> None:
        """Write this instance's last_seen: proof of life, and the check that the database takes writes."""
        def touch(s: Session) -> None:
            row = s.get(GatewayInstance, self.instance_id) or GatewayInstance(instance_id=self.instance_id)
            row.last_seen = utcnow()
            s.add(row)
        self._write(touch, "(instance heartbeat)")

    def orphaned(self, lease_s: float, limit: int = 100) -> list[CompletionRecord]:
        """Open requests of gateway instances that stopped writing `lease_s` seconds ago (or are unknown)."""
        cutoff = utcnow() - timedelta(seconds=lease_s)
        with Session(self.engine) as s:
            instances = s.exec(select(GatewayInstance)).all()
            alive = {i.instance_id for i in instances if _aware(i.last_seen) > cutoff} | {self.instance_id}
            stmt = (select(CompletionRecord).where(CompletionRecord.status == RequestStatus.OPEN)
                    .where(or_(CompletionRecord.instance_id.is_(None), CompletionRecord.instance_id.not_in(alive)))
                    .order_by(CompletionRecord.created_at).limit(limit))  # fmt: skip
            return list(s.exec(stmt).all())

    def disputed_nodes(self) -> dict[str, str]:
        """Node id -> the reason of its latest disputed record, from the outbox."""
        from ledger.models import UsageRecord

        with Session(self.engine) as s:
            rows = s.exec(select(UsageRecord.node_id, UsageRecord.error)
                          .where(UsageRecord.status == RecordStatus.DISPUTED).order_by(UsageRecord.id)).all()
        return {node_id: error or "disputed" for node_id, error in rows}


def set_busy_timeout(engine: Engine, seconds: float) -> None:
    """SQLite connections of this engine wait at most `seconds` for the write lock (ledger's default is 30 s:
    a request must not hang that long on a locked outbox; it is refused with 503 instead)."""
    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "connect")
    def _timeout(dbapi_conn, _record) -> None:
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={int(seconds * 1000)}")
        cur.close()
