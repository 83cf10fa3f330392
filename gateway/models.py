"""The gateway's own tables: per-key limits and adapter grants (beside ledger's ApiKey), and the
completion record of every request, written in the same transaction as its usage record."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from ledger.models import utcnow


class KeyPolicy(SQLModel, table=True):
    """Limits of one API key that ledger's ApiKey has no column for."""

    __tablename__ = "gateway_key_policies"

    key_id: int = Field(primary_key=True)  # ApiKey.id
    tokens_per_minute: int | None = None


class AdapterGrant(SQLModel, table=True):
    """A private adapter (by name) listed to one key; an adapter name with any grant is private."""

    __tablename__ = "gateway_adapter_grants"

    key_id: int = Field(primary_key=True)
    adapter_name: str = Field(primary_key=True, index=True)


class RequestStatus:
    OK = "ok"  # finished: stop or length
    CLIENT_CLOSED = "client_closed"  # the client went away; the node was aborted
    NODE_FAILED = "node_failed"  # the node failed after the first token
    UNRECEIPTED = "unreceipted"  # tokens were produced but no valid receipt came back (see error)


class CompletionRecord(SQLModel, table=True):
    """One request as the gateway saw it end."""

    __tablename__ = "gateway_requests"

    request_id: str = Field(primary_key=True, max_length=66)
    key_id: int | None = Field(default=None, index=True)
    model: str
    adapter_id: str | None = Field(default=None, max_length=66, index=True)
    node_id: str | None = Field(default=None, max_length=66, index=True)
    status: str = Field(max_length=16, index=True)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 1
    ttft_ms: float | None = None
    latency_ms: float | None = None
    error: str | None = None
    created_at: datetime = Field(default_factory=utcnow, index=True)
    finished_at: datetime = Field(default_factory=utcnow)
