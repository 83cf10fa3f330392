"""Usage capture: the gateway bills what it delivered. A request is written "open" when it is dispatched
(the gateway's prompt count, max_tokens) and closed when it ends: its completion record and its usage
record (the ledger outbox row) in one database transaction, once (a request that is no longer open is left
as it is: a live gateway's own close and a sibling's reconciliation never both write).

The billed counts are always the gateway's own: the prompt it tokenized and sent as token ids, the token
events it relayed to the client before the client left or the node's stream broke. Tokens the node made
beyond those (read after an abort, or counted in its receipt) are not paid. The node's signed receipt is
checked against the gateway's counts (see `receipt_completion_range`); within that it is kept beside them
and the record is settled normally; outside it (or a receipt that does not verify) the record is kept as
DISPUTED with both counts and the reason, never settled, and the node is dropped from routing. A node that
died mid-stream sent no receipt: its record is billed at the gateway's count.

A request to the bare base model (no adapter) is recorded like any other, with the zero adapter id
(ledger.types.BASE_MODEL_ADAPTER_ID): the ledger prices it at its base price and credits the node.
The node's receipt for it says adapter_id null, and is checked to say so.

An ensemble request (several adapters with weights, served as one) is one completion record under the
ensemble's id and one usage record per adapter in it (ledger.outbox.ensemble_usage): each under an id
derived from the request's and its index, its tokens the request's times its adapter's weight
(ledger.outbox.split_by_weight), so the ledger prices each share at its own adapter's price and credits its
owner."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Collection
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, event, or_, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError, SQLAlchemyError
from sqlmodel import Session, select

from common.wire import canonical_json, is_id
from gateway.tables import CompletionRecord, GatewayInstance, RequestStatus
from ledger.models import RecordStatus, UsageRecord, utcnow
from ledger.outbox import OutboxError, add_usage_record, ensemble_usage
from ledger.types import BASE_MODEL_ADAPTER_ID, is_uint256, read_wei
from node.receipts import FINISH_REASONS, ReceiptError, check_receipt

log = logging.getLogger(__name__)

# A write refused for a value it holds (the outbox's own checks, a number the database column cannot hold),
# not for the database's state: writing it again will not help, and the database is not down.
VALUE_ERRORS = (OutboxError, DataError, OverflowError)


_INSERT_OPEN = CompletionRecord.__table__.insert()  # an open request's row (UsageRecorder.open)


def quote_json(quote: dict[str, int] | None) -> str | None:
    """A request's quote as its open row keeps it (CompletionRecord.quote_json): prices as decimal strings."""
    return canonical_json({aid: str(p) for aid, p in quote.items()}).decode() if quote else None


def quote_of(text: str | None) -> dict[str, int]:
    """The quote an open row keeps (quote_json). Empty, so that no record has a quote (the settler bounds them
    by its own maximum price), when it has none, or holds anything but record ids with prices (logged): the
    row is read back from a database other gateways, older releases or a hand edit write too, and a price
    the outbox refuses would leave the request without a record."""
    if not text:
        return {}
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        raw = None
    if isinstance(raw, dict):
        # decimal strings as quote_json writes them (read as the settler reads them), ints as a hand may write
        quote = {aid: read_wei(p) if isinstance(p, str) else p for aid, p in raw.items()}
        if all(is_id(aid) and is_uint256(p) for aid, p in quote.items()):
            return quote
    log.warning("an open request's quote is not one, so its records get none: %r", text[:200])
    return {}


class UsageError(RuntimeError):
    """A request end that could not be written to the database."""


@dataclass(slots=True)
class RequestEnd:
    """How one request ended, as the gateway saw it; receipt and signature come from the node.

    prompt_tokens / completion_tokens are the gateway's counts: the prompt ids it sent, the token events it relayed
    to the client; the recorder makes them what is billed (`withheld`, `unsent`), keeping them in `counted`.
    `served`: a node took the request (it answered with its first event), so its prompt was processed. `aborted`:
    the request did not end on its own (the gateway aborted it, or the node's stream broke first). `node_lost`:
    the node's stream broke and it did not answer the
    abort (no receipt is expected).
    `reconciled`: the gateway died mid-request, so it has no completion count of its own: the receipt's,
    capped at max_tokens and the context, is billed.
    `withheld`: the client was answered with an error instead of the text, or left before a whole answer was
    sent (a non-streaming request): nothing was delivered, so nothing is billed. The receipt is still judged
    against the counts sent and relayed, then the request is recorded at 0 + 0 tokens.
    `unsent`: of the completion tokens relayed, those whose text never reached a streaming client that left (held
    back for a tool call not yet decided): judged as relayed, not billed."""

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
    withheld: bool = False
    unsent: int = 0
    counted: tuple[int, int] | None = None  # (prompt, completion) as the gateway counted them: set by the recorder
    misreported: str | None = None  # what the node's tokens belie (ServedRequest._misreported): a dispute
    max_tokens: int | None = None
    context_len: int | None = None
    disputed: str | None = None  # set by the recorder: why the receipt was not accepted
    # an ensemble's (adapter id, weight) pairs (adapter_id is then the ensemble's id); a reconciled request
    # has none of its own and takes them from the node's verified receipt, whose adapter_id is their hash
    ensemble: tuple[tuple[str, float], ...] | None = None
    # each record's adapter id (the zero id for the base model) -> the price in wei per 1,000 tokens the request
    # was admitted at, those known (gateway.catalog.ModelCatalog.check_price): the most each record settles at
    quote: dict[str, int] = field(default_factory=dict)


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
    bounds = [
        b
        for b in (end.max_tokens, None if end.context_len is None else max(0, end.context_len - end.prompt_tokens))
        if b is not None
    ]
    return min(bounds) if bounds else None


def receipt_completion_range(end: RequestEnd) -> tuple[int, int | None]:
    """The completion counts a verified receipt may claim and still be recorded normally: (low, high), high
    None when no bound is known. The prompt count must always match exactly: the gateway sends every prompt
    as token ids, so the node's count is their number.
    - a request that ended on its own (the node's done event read as it came, no abort): exactly the
      tokens relayed. The node streams one token event per token and signs its receipt from the same
      finish event, after the last token event.
    - a request the gateway aborted (client gone, node past the limit) or whose stream broke: at least the
      tokens relayed, at most what the request allows (max_tokens, the context). The node made tokens the
      client never got (in flight when the client left or the stream broke, or made before the node noticed
      the abort): they are not paid, and not held against the node either. Fewer than relayed is a dispute.
    - a reconciled request (its gateway died, so there is no count of its own): up to what it allows."""
    bound = completion_bound(end)
    if end.reconciled:
        return 0, bound
    if end.aborted:
        return end.completion_tokens, bound
    return end.completion_tokens, end.completion_tokens


def judge(end: RequestEnd, receipt: dict) -> str | None:
    """Why this verified receipt is outside the tolerance (None: it is within). For a reconciled request
    it also sets the gateway's completion count from the receipt, capped."""
    np, nc = receipt["prompt_tokens"], receipt["completion_tokens"]
    reasons = []
    if np != end.prompt_tokens:
        reasons.append(f"receipt claims {np} prompt tokens, the gateway sent {end.prompt_tokens}")
    low, high = receipt_completion_range(end)
    if end.reconciled:
        if high is None:  # a row of an older gateway that did not store max_tokens: nothing bounds the claim
            end.completion_tokens = 0
            reasons.append(f"receipt claims {nc} completion tokens and the request's max_tokens is unknown")
        else:
            end.completion_tokens = min(nc, high)
    if nc < low:
        reasons.append(f"receipt claims {nc} completion tokens, fewer than the {low} the gateway relayed")
    elif high is not None and nc > high:
        reasons.append(
            f"receipt claims {nc} completion tokens, "
            + (
                f"the gateway relayed {high} and the request ended on its own"
                if high == low and not end.reconciled
                else f"more than the request allows ({high})"
            )
        )
    return "; ".join(reasons) or None


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


# rows of the request log deleted in one transaction (UsageRecorder.prune): SQLite's write lock, which every
# request needs, is held that briefly
PRUNE_CHUNK = 500


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

    def open(
        self,
        *,
        request_id: str,
        model: str,
        adapter_id: str | None,
        node_id: str | None,
        key_id: int | None,
        prompt_tokens: int,
        max_tokens: int,
        quote: dict[str, int] | None = None,
        reserved_tokens: int = 0,
    ) -> None:
        """Write the request as open before any node sees it (UsageError when the database refuses), with its
        quote (RequestEnd.quote) and the tokens its key reserved, which a reconciliation of it takes back.

        One Core INSERT, not an ORM row through a Session: the write runs beside the request's dispatch, on
        every request, and the ORM's unit of work cost 4-5x the CPU (0.6 ms against 0.15 ms per row on this
        machine) that the event loop relaying to the node competes for. Every column the ORM row would set
        is given, with the model's own defaults."""
        now = utcnow()  # the ORM row's two default_factory calls, made once: finished_at = created_at until closed
        values = dict(
            request_id=request_id,
            key_id=key_id,
            model=model,
            adapter_id=adapter_id,
            node_id=node_id,
            status=RequestStatus.OPEN,
            prompt_tokens=prompt_tokens,
            completion_tokens=0,
            attempts=1,
            max_tokens=max_tokens,
            quote_json=quote_json(quote),
            reserved_tokens=reserved_tokens,
            instance_id=self.instance_id,
            created_at=now,
            finished_at=now,
        )
        try:
            with self._write_lock, self.engine.begin() as conn:
                conn.execute(_INSERT_OPEN, values)
        except SQLAlchemyError as e:
            raise UsageError(f"could not record request {request_id}: {e}") from e

    def prune(self, before: datetime) -> int:
        """Delete the rows of up to PRUNE_CHUNK requests made and closed before `before` (an open one is
        reconciliation's, and one closed since may yet be lowered by its live gateway's late close); returns how
        many. The rows are found outside the write lock."""
        t = CompletionRecord.__table__
        closed_before = (t.c.created_at < before, t.c.finished_at < before, t.c.status != RequestStatus.OPEN)
        try:
            with self.engine.connect() as conn:
                ids = conn.execute(select(t.c.request_id).where(*closed_before).limit(PRUNE_CHUNK)).scalars().all()
            if not ids:
                return 0
            with self._write_lock, self.engine.begin() as conn:
                return conn.execute(delete(t).where(t.c.request_id.in_(ids), *closed_before)).rowcount
        except SQLAlchemyError as e:
            raise UsageError(f"could not prune the request log: {e}") from e

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
        requests too, under the zero adapter id). Returns "recorded", "disputed" (a disputed record is written:
        see end.disputed), "not_served", "no_record" (closed without its usage record: the database refused
        the gateway's own values, logged), or "already_closed" (the request is no longer open: closed by this
        gateway before, or by a sibling's reconciliation; nothing is written); UsageError when the database
        refuses."""
        receipt = None
        usage = None
        result = "not_served"
        # the counts are judged, then made what is billed, on `end` itself (the caller reads them back): a record
        # the outbox refused is recorded again from the same end, and starts again from the gateway's counts
        # (judged against the billed ones, an honest node's receipt was disputed; review)
        if end.counted is None:
            end.counted = (end.prompt_tokens, end.completion_tokens)
        end.prompt_tokens, end.completion_tokens = end.counted
        end.disputed = None
        # what the node said, as far as it reaches the row: a finish reason of the receipt's, an error without
        # NUL (PostgreSQL refused "stop\x00" in every retry of the close: the request stayed open, its dispute
        # unwritten, and reconciliation later billed the node's claim)
        if end.finish_reason not in FINISH_REASONS:
            end.finish_reason = None
        if end.error:
            end.error = end.error.replace("\x00", "")
        if end.served and end.node_id is not None:
            result = "recorded"
            node_counts = (None, None)
            if end.receipt is None and end.node_lost:
                pass  # the node died: billed at the gateway's count, no receipt
            else:
                try:
                    receipt = check_served_receipt(end, self.public_key_of(end.node_id))
                except ReceiptError as e:  # any malformed or unverified receipt: a dispute
                    end.disputed = f"receipt refused: {e}"
                else:
                    node_counts = (receipt["prompt_tokens"], receipt["completion_tokens"])
                    end.disputed = judge(end, receipt)
                    end.finish_reason = end.finish_reason or receipt["finish_reason"]
            if end.misreported:
                end.disputed = "; ".join(filter(None, (end.disputed, end.misreported)))
            if end.disputed:
                result = "disputed"
                self._disputed(end)
            if end.withheld:  # judged above on what was sent and relayed; billed for what was delivered: none
                end.prompt_tokens = end.completion_tokens = 0
            end.completion_tokens -= min(end.unsent, end.completion_tokens)
            if end.ensemble is None and receipt is not None and "ensemble" in receipt:
                end.ensemble = tuple((aid, w) for aid, w in receipt["ensemble"])
            usage = dict(
                request_id=end.request_id,
                adapter_id=BASE_MODEL_ADAPTER_ID if end.adapter_id is None else end.adapter_id,
                node_id=end.node_id,
                prompt_tokens=end.prompt_tokens,
                completion_tokens=end.completion_tokens,
                node_prompt_tokens=node_counts[0],
                node_completion_tokens=node_counts[1],
                receipt_json=receipt,
                node_signature=end.signature if receipt is not None else None,
                status=RecordStatus.DISPUTED if end.disputed else RecordStatus.PENDING,
                error=end.disputed,
                gateway_key_id=end.key_id,
            )
        try:
            try:
                closed = self._close(end, usage)
            except VALUE_ERRORS as e:
                if usage is None:
                    raise
                # the node's values cannot be stored as given: the record is kept disputed at the gateway's
                # counts without them (their claim in the reason), and the request closed all the same
                judged = end.disputed, end.error
                claim = f" (receipt counts {node_counts[0]} + {node_counts[1]})" if receipt is not None else ""
                refused = f"usage record refused{claim}: {e}"[:1000]
                if end.disputed:
                    end.disputed = f"{end.disputed}; {refused}"
                    end.error = f"{end.error}; {refused}"
                else:
                    end.disputed = refused
                    self._disputed(end, logged=False)  # logged once the record says so
                usage |= dict(
                    node_prompt_tokens=None,
                    node_completion_tokens=None,
                    receipt_json=None,
                    node_signature=None,
                    status=RecordStatus.DISPUTED,
                    error=end.disputed,
                )
                try:
                    closed = self._close(end, usage)
                except VALUE_ERRORS as e2:
                    # the gateway's own values are refused (a quote among them): close it without a record.
                    # None of the node's doing, so it is not disputed for it; nor kept out for a judged dispute
                    # no record holds: a mark here alone would lapse at the next sync_disputes anyway
                    end.disputed, end.error = judged
                    log.error("request %s: no usage record can be written: %s", end.request_id[:10], e2)
                    end.error = f"{end.error + '; ' if end.error else ''}no usage record could be written: {e2}"
                    end.error = end.error[:2000]
                    closed = self._close(end, None)
                    result = "no_record"
                else:
                    if not judged[0]:
                        self._log_disputed(end)
                    result = "disputed"
        except (SQLAlchemyError, *VALUE_ERRORS) as e:
            raise UsageError(f"could not record request {end.request_id}: {e}") from e
        if not closed:
            log.warning(
                "request %s was closed already (by a sibling's reconciliation?): its end as %s is not written",
                end.request_id[:10],
                end.status,
            )
            return "already_closed"
        return result

    @staticmethod
    def _disputed(end: RequestEnd, *, logged: bool = True) -> None:
        if logged:
            UsageRecorder._log_disputed(end)
        end.error = f"{end.error + '; ' if end.error else ''}disputed: {end.disputed}"

    @staticmethod
    def _log_disputed(end: RequestEnd) -> None:
        log.error("request %s on node %s disputed: %s", end.request_id[:10], str(end.node_id)[:10], end.disputed)

    def _close(self, end: RequestEnd, usage: dict | None) -> bool:
        """Write the completion record over the open one, with the usage record, in one transaction; False
        (nothing written) when the request is no longer open. A request without an open row gets one."""
        fields = dict(
            key_id=end.key_id,
            model=end.model,
            adapter_id=end.adapter_id,
            node_id=end.node_id,
            status=end.status,
            finish_reason=end.finish_reason,
            prompt_tokens=end.prompt_tokens,
            completion_tokens=end.completion_tokens,
            attempts=end.attempts,
            ttft_ms=end.ttft_ms,
            latency_ms=end.latency_ms,
            error=end.error,
            finished_at=utcnow(),
        )
        with self._write_lock, Session(self.engine) as s:
            # the status condition makes the close one writer's: another close of the same request waits for
            # this one's row lock (PostgreSQL) or the write lock (SQLite), then finds it closed
            stmt = (
                update(CompletionRecord)
                .where(CompletionRecord.request_id == end.request_id)
                .where(CompletionRecord.status == RequestStatus.OPEN)
                .values(**fields)
            )
            if s.connection().execute(stmt).rowcount == 0:
                row = s.get(CompletionRecord, end.request_id)
                if row is not None:
                    if row.status == RequestStatus.RECONCILED and usage is not None and not end.reconciled:
                        self._lower(s, row, usage, end.ensemble)
                    return False
                s.add(
                    CompletionRecord(
                        request_id=end.request_id, max_tokens=end.max_tokens, instance_id=self.instance_id, **fields
                    )
                )
            if usage is not None:
                for one in ensemble_usage(usage, end.ensemble) if end.ensemble is not None else [usage]:
                    add_usage_record(s, **one, quoted_price_per_1k=end.quote.get(one["adapter_id"]))
            s.commit()
        return True

    @staticmethod
    def _lower(s: Session, row: CompletionRecord, usage: dict, ensemble: tuple | None) -> None:
        """A sibling reconciled this request while this gateway was alive after all, billing the node's claim
        (capped at max_tokens): its usage records (an ensemble's one per adapter) are lowered to what this
        gateway delivered, each while it is still pending (not yet in a batch), and never raised. The
        completion record follows them."""
        p, c = usage["prompt_tokens"], usage["completion_tokens"]
        rid = row.request_id
        lowered = 0
        for one in ensemble_usage(usage, ensemble) if ensemble is not None else [usage]:
            op, oc = one["prompt_tokens"], one["completion_tokens"]
            stmt = (
                update(UsageRecord)
                .where(UsageRecord.request_id == one["request_id"])
                .where(UsageRecord.status == RecordStatus.PENDING)
                .where(UsageRecord.prompt_tokens >= op)
                .where(UsageRecord.completion_tokens >= oc)
                .where((UsageRecord.prompt_tokens > op) | (UsageRecord.completion_tokens > oc))
                .values(prompt_tokens=op, completion_tokens=oc)
            )
            lowered += s.connection().execute(stmt).rowcount
        if not lowered:
            return
        s.connection().execute(
            update(CompletionRecord)
            .where(CompletionRecord.request_id == rid)
            .where(CompletionRecord.status == RequestStatus.RECONCILED)
            .values(prompt_tokens=p, completion_tokens=c)
        )
        s.commit()
        log.warning(
            "request %s was reconciled by a sibling while this gateway served it: its pending usage "
            "records are lowered to the %d + %d tokens delivered",
            rid[:10],
            p,
            c,
        )

    # ------------------------------------------------------------------ instances and reconciliation

    def beat(self) -> None:
        """Write this instance's last_seen: proof of life, and the check that the database takes writes."""

        def touch(s: Session) -> None:
            row = s.get(GatewayInstance, self.instance_id) or GatewayInstance(instance_id=self.instance_id)
            row.last_seen = utcnow()
            s.add(row)

        self._write(touch, "(instance heartbeat)")

    def orphaned(
        self, lease_s: float, limit: int = 100, *, overdue_s: float | None = None, holding: Collection[str] = ()
    ) -> list[CompletionRecord]:
        """Open requests of gateway instances that stopped writing `lease_s` seconds ago (or are unknown), and,
        given `overdue_s`, this instance's own opened more than `overdue_s` ago that it no longer holds (their
        end was lost to a bug: a backstop, so the node's tokens are still billed): those never tried first
        (oldest first), then those tried longest ago (see `tried`), so requests that cannot be closed yet do
        not keep the ones after them waiting."""
        now = utcnow()
        cutoff = now - timedelta(seconds=lease_s)
        with Session(self.engine) as s:
            instances = s.exec(select(GatewayInstance)).all()
            alive = {i.instance_id for i in instances if _aware(i.last_seen) > cutoff} | {self.instance_id}
            whose = [CompletionRecord.instance_id.is_(None), CompletionRecord.instance_id.not_in(alive)]
            if overdue_s is not None:
                overdue = now - timedelta(seconds=overdue_s)
                whose.append(
                    (CompletionRecord.instance_id == self.instance_id) & (CompletionRecord.created_at < overdue)
                )
            stmt = (
                select(CompletionRecord)
                .where(CompletionRecord.status == RequestStatus.OPEN)
                .where(or_(*whose))
                .order_by(CompletionRecord.reconcile_attempted_at.asc().nulls_first(), CompletionRecord.created_at)
                .limit(limit)
            )
            # held past the deadline is rare (the deadline ends a request), so filtering here starves nothing
            return [r for r in s.exec(stmt).all() if r.request_id not in holding]

    def tried(self, request_ids: list[str]) -> None:
        """Reconciliation tried these open requests and could not close them yet: they go to the back."""
        if not request_ids:
            return
        stmt = (
            update(CompletionRecord)
            .where(CompletionRecord.request_id.in_(request_ids))
            .where(CompletionRecord.status == RequestStatus.OPEN)
            .values(reconcile_attempted_at=utcnow())
        )
        self._write(lambda s: s.connection().execute(stmt), "(reconciliation attempts)")


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
