"""The gateway's own tables: API keys with their limits and adapter grants, and the completion record of
every request, written in the same transaction as its usage record (ledger's outbox row)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger
from sqlmodel import Field, SQLModel

from ledger.models import utcnow


class ApiKey(SQLModel, table=True):
    """A gateway API key, stored hashed (sha256 hex of the secret)."""

    __tablename__ = "api_keys"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=200)
    key_hash: str = Field(max_length=66, unique=True, index=True)
    prefix: str = Field(default="", max_length=16)  # first characters, to recognise a key in listings
    rate_limit_per_minute: int | None = Field(default=None, sa_type=BigInteger)
    created_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None


class KeyPolicy(SQLModel, table=True):
    """Limits of one API key beyond its request rate: tokens per minute and the highest price it may pay."""

    __tablename__ = "gateway_key_policies"
    __table_args__ = {"info": {"migrate_columns": True}}  # ledger.db.init_db adds the columns it lacks

    key_id: int = Field(primary_key=True)  # ApiKey.id
    tokens_per_minute: int | None = Field(default=None, sa_type=BigInteger)
    # wei per 1,000 tokens, decimal string (prices pass 2**63); None: the gateway's default limit
    max_price_per_1k_tokens: str | None = None


class AdapterGrant(SQLModel, table=True):
    """A private adapter (by name) listed to one key; an adapter name with any grant is private."""

    __tablename__ = "gateway_adapter_grants"

    key_id: int = Field(primary_key=True)
    adapter_name: str = Field(primary_key=True, index=True)


class RateBucket(SQLModel, table=True):
    """A key's token bucket (gateway/ratelimit.py), shared by every gateway on the database."""

    __tablename__ = "gateway_rate_buckets"

    key_id: int = Field(primary_key=True)  # ApiKey.id
    kind: str = Field(primary_key=True, max_length=16)  # "requests" | "tokens"
    capacity: int = Field(
        sa_type=BigInteger
    )  # units per minute the bucket was filled for (a changed limit starts a fresh bucket)
    level: float  # units left at `stamp`; negative after tokens charged past it
    stamp: float  # unix time of `level`


class RequestStatus:
    OPEN = "open"  # dispatched to a node, not ended yet (or the gateway died: closed by reconciliation)
    OK = "ok"  # finished: stop or length
    CLIENT_CLOSED = "client_closed"  # the client went away; the node was aborted
    NODE_FAILED = "node_failed"  # the node failed after the first token
    # the request's own grammar failed it after the first token (the node's word, believed of a guided request):
    # the client is answered with an error: a stream is billed the tokens it was sent, a whole answer nothing
    GRAMMAR_FAILED = "grammar_failed"
    NOT_SERVED = "not_served"  # no node produced a token (all failed, or the node refused the request)
    RECONCILED = "reconciled"  # its gateway died mid-request; closed later from the node's stored receipt
    LOST = "lost"  # its gateway died mid-request and the node never produced a receipt for it (see error)


class CompletionRecord(SQLModel, table=True):
    """One request: written "open" when it is dispatched (with the gateway's prompt count and max_tokens),
    closed when it ends, in the same transaction as its usage record. prompt_tokens/completion_tokens are
    the gateway's own counts. An open row whose gateway instance is gone is closed by reconciliation."""

    __tablename__ = "gateway_requests"
    __table_args__ = {"info": {"migrate_columns": True}}  # ledger.db.init_db adds the columns it lacks

    request_id: str = Field(primary_key=True, max_length=66)
    key_id: int | None = Field(default=None, index=True)
    model: str
    adapter_id: str | None = Field(default=None, max_length=66, index=True)
    node_id: str | None = Field(default=None, max_length=66, index=True)
    status: str = Field(max_length=16, index=True)
    finish_reason: str | None = None
    prompt_tokens: int = Field(default=0, sa_type=BigInteger)
    completion_tokens: int = Field(default=0, sa_type=BigInteger)
    attempts: int = 1
    ttft_ms: float | None = None
    latency_ms: float | None = None
    error: str | None = None
    max_tokens: int | None = Field(default=None, sa_type=BigInteger)
    # the request's quote (gateway.usage.RequestEnd.quote) as JSON, for a reconciliation of it after its
    # gateway died: {adapter id: wei per 1,000 tokens as a decimal string}
    quote_json: str | None = Field(default=None, max_length=4000)
    # tokens taken from the key's tokens per minute before it ran (Admission.reserve; 0: none), which a
    # reconciliation settles as the dead gateway would have (None: a row of a gateway that did not store it)
    reserved_tokens: int | None = Field(default=None, sa_type=BigInteger)
    instance_id: str | None = Field(default=None, max_length=64, index=True)  # the gateway process that opened it
    created_at: datetime = Field(default_factory=utcnow, index=True)
    finished_at: datetime = Field(default_factory=utcnow)  # when it was opened, until it is closed
    # open, its gateway gone: when reconciliation last tried to close it (None: never); the least recently
    # tried go first, so requests that cannot be closed yet do not hold back the others
    reconcile_attempted_at: datetime | None = None


class GatewayInstance(SQLModel, table=True):
    """A running gateway process, alive while it keeps `last_seen` fresh. Its write of `last_seen` is also
    the check that the outbox can be written; the open requests of an instance that stopped writing are
    reconciled by the others (or by its own restart)."""

    __tablename__ = "gateway_instances"

    instance_id: str = Field(primary_key=True, max_length=64)
    started_at: datetime = Field(default_factory=utcnow)
    last_seen: datetime = Field(default_factory=utcnow, index=True)


class NodeReadmission(SQLModel, table=True):
    """An operator's judgement that a disputed node may serve again (gateway.disputes): its disputed records
    up to `through_record_id` (UsageRecord.id) no longer keep it out of routing; a later dispute does. The
    records themselves stay disputed, never settled."""

    __tablename__ = "gateway_node_readmissions"

    node_id: str = Field(primary_key=True, max_length=66)
    through_record_id: int = Field(sa_type=BigInteger)
    readmitted_at: datetime = Field(default_factory=utcnow)
    note: str = Field(default="", max_length=500)
