"""SQLModel tables: the usage-record outbox, settlement batches, API keys and registry mirrors.

Big on-chain integers (prices, fees in wei) are stored as decimal strings: SQLite integers stop at 2**63.
Timestamps are timezone-aware UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, Column, Index, Text
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    """Aware UTC now."""
    return datetime.now(UTC)


class RecordStatus:
    PENDING = "pending"  # in the outbox, not yet in a batch
    SUBMITTED = "submitted"  # in a written batch that is not known settled yet
    SETTLED = "settled"  # its batch is settled on chain
    # written only by older settlers (an unregistered adapter or node); today's set such records aside and
    # re-check them, and put these back in the outbox once registered
    REJECTED = "rejected"
    DISPUTED = "disputed"  # the node's receipt disagrees with the gateway's count beyond tolerance; never settled
    # cannot be paid as it stands (price or tokens out of bounds, deposit short, not registered yet,
    # reverted twice); see `error`. Deposit-short and unregistered ones return to pending by themselves
    SET_ASIDE = "set_aside"


class BatchStatus:
    CREATED = "created"  # written with its records; maybe sent (a crash can hide that), not settled
    SENT = "sent"  # a transaction hash is recorded
    SETTLED = "settled"  # the chain says isSettled(batch_id)
    ABANDONED = "abandoned"  # never settled and never will be (re-priced after InsufficientDeposit); records left it


class UsageRecord(SQLModel, table=True):
    """One inference, written by the gateway in the same transaction as the request's completion.

    prompt_tokens / completion_tokens are what is billed: the gateway's own count (it tokenized the
    prompt and relayed every token). node_*_tokens are the node's signed receipt's counts, kept beside
    them; a record without a receipt (the node died mid-stream) has None there and is billed at the
    gateway's count."""

    __tablename__ = "usage_records"
    # a batch's records in one state: the settler's moves (submitted -> settled, back to pending) and reads
    # of a batch. With only single-column indexes SQLite picked the status one and scanned every record in
    # flight for each batch (tens of thousands when pipelining); batch_id alone is this index's prefix.
    __table_args__ = (Index("ix_usage_records_batch_status", "batch_id", "status"),)

    id: int | None = Field(default=None, primary_key=True)  # outbox order
    request_id: str = Field(max_length=66, unique=True, index=True)
    adapter_id: str = Field(max_length=66, index=True)
    node_id: str = Field(max_length=66, index=True)
    prompt_tokens: int = Field(sa_type=BigInteger)
    completion_tokens: int = Field(sa_type=BigInteger)
    node_prompt_tokens: int | None = Field(default=None, sa_type=BigInteger)
    node_completion_tokens: int | None = Field(default=None, sa_type=BigInteger)
    receipt_json: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # the node's signed receipt
    node_signature: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    fee_wei: str | None = None  # decimal string; the settler's price of this record when it was batched
    # wei per 1,000 tokens, decimal string: the price the gateway showed and admitted the request at (the key's
    # limit was checked against it). The settler never settles the record at a dearer one. None: not known
    # (no chain at the gateway, or written by an older one)
    quoted_price_per_1k: str | None = Field(default=None, max_length=80)
    gateway_key_id: int | None = Field(default=None, index=True)
    created_at: datetime = Field(default_factory=utcnow, index=True)
    status: str = Field(default=RecordStatus.PENDING, max_length=16, index=True)
    batch_id: str | None = Field(default=None, max_length=66)  # indexed with status (__table_args__)
    leaf_index: int | None = Field(default=None, sa_type=BigInteger)  # position in its batch's Merkle tree
    error: str | None = None


class SettlementBatch(SQLModel, table=True):
    """A batch of records with a deterministic id; written before any transaction is sent."""

    __tablename__ = "batches"
    __table_args__ = (Index("ix_batches_settler_first_seq", "settler", "first_seq"),)

    id: int | None = Field(default=None, primary_key=True)
    batch_id: str = Field(max_length=66, unique=True, index=True)
    merkle_root: str = Field(max_length=66)
    record_count: int = Field(sa_type=BigInteger)
    status: str = Field(default=BatchStatus.CREATED, max_length=16, index=True)
    tx_hash: str | None = Field(default=None, max_length=66)
    block_number: int | None = Field(default=None, sa_type=BigInteger)
    total_fees: str | None = None  # wei, decimal string, as settled on chain
    attempts: int = 0
    last_error: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    sent_at: datetime | None = None
    settled_at: datetime | None = None
    # Many settlers, one database: `settler` is the account that formed (or took over) the batch and
    # whose deposit pays it; fees_priced (wei, decimal string) is what the settler priced its records
    # at, counted against that deposit while the batch is in flight. claimed_by/lease_expires: the
    # settler process working on the batch, until when (ledger.settler: the lease). senders: every
    # account that ever sent a transaction of the batch, comma-separated (it is abandoned only once
    # none of them has a transaction still waiting to be mined).
    settler: str | None = Field(default=None, max_length=42, index=True)
    fees_priced: str | None = None
    # The highest price per 1k tokens the batch charges each adapter's records (JSON object: adapter id ->
    # decimal string; the zero id: the base price): its price, or below it where every record was admitted at a
    # lower quote (a raise's grace). Each record's settleBatch bound is the lower of this and its quote
    # (ledger.settler._record_bounds), sent on every send, so that the ledger refuses the batch when a price rose
    # past it since. NULL for a batch written before these were kept.
    prices_priced: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    claimed_by: str | None = Field(default=None, max_length=200)
    lease_expires: datetime | None = None
    senders: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # The sequence number of the batch's first record in its settler's sequence (AttributionLedger accepts
    # the batch only when it is that settler's nextSequence): record i of the batch is first_seq + i, and
    # its Merkle leaf binds that number. Set when the batch is written, before any send, and never changed:
    # every resend after a crash carries the same numbers, so no two sends of a record can both settle.
    first_seq: int | None = Field(default=None, sa_type=BigInteger)
    # The hash of the block a settled batch is in, kept while the batch is not final yet (fewer than the
    # settler's `confirmations` blocks on top of it): a reorg that drops that block changes the canonical hash
    # at block_number, and the batch goes back to be sent again. NULL once final, and for every batch of a
    # settler with confirmations = 0 (final at its receipt).
    block_hash: str | None = Field(default=None, max_length=66)


class DatasetMirror(SQLModel, table=True):
    """AdapterRegistry dataset, as of `updated_block`; its id is bound to `contributor` and `name`."""

    __tablename__ = "datasets"

    dataset_id: str = Field(max_length=66, primary_key=True)
    content_hash: str = Field(max_length=66)
    payee: str = Field(max_length=42, index=True)
    contributor: str = Field(default="", max_length=42, index=True)
    name: str = ""
    registered_block: int = Field(sa_type=BigInteger)
    updated_block: int = Field(sa_type=BigInteger)


class NameMirror(SQLModel, table=True):
    """AdapterRegistry adapter name and its current owner (the only one who registers its versions)."""

    __tablename__ = "adapter_names"

    name: str = Field(primary_key=True)
    owner: str = Field(max_length=42, index=True)
    registered_block: int = Field(sa_type=BigInteger)
    updated_block: int = Field(sa_type=BigInteger)


class AdapterMirror(SQLModel, table=True):
    """AdapterRegistry adapter, as of `updated_block`; datasets_json = [[dataset_id, share_bps], ...]."""

    __tablename__ = "adapters"

    adapter_id: str = Field(max_length=66, primary_key=True)
    owner: str = Field(max_length=42, index=True)  # paid the owner share; transferAdapter moves it
    publisher: str = Field(default="", max_length=42, index=True)  # registered and signed it; never changes
    name: str = Field(index=True)
    version: str
    predecessor: str = Field(max_length=66)
    base_model: str = Field(max_length=66, index=True)
    price_per_1k_tokens: str  # wei, decimal string
    datasets_json: str = Field(sa_column=Column(Text, nullable=False))
    registered_block: int = Field(sa_type=BigInteger)
    updated_block: int = Field(sa_type=BigInteger)


class NodeMirror(SQLModel, table=True):
    """AdapterRegistry node, as of `updated_block`; multiaddrs_json = ["/ip4/...", ...]."""

    __tablename__ = "nodes"

    node_id: str = Field(max_length=66, primary_key=True)
    operator: str = Field(max_length=42, index=True)
    public_key: str = ""  # hex of the raw Ed25519 key the registration proved (node id = its sha256)
    active: bool = True
    base_model: str = Field(max_length=66, index=True)
    peer_id: str
    api_url: str
    multiaddrs_json: str = Field(sa_column=Column(Text, nullable=False))
    registered_block: int = Field(sa_type=BigInteger)
    updated_block: int = Field(sa_type=BigInteger)


class SyncCursor(SQLModel, table=True):
    """Last block whose events a mirror has applied, and its hash then (block_ref, "<block>:<hash>", so that a
    writer that moves the block alone leaves no hash of another block behind): a reorg under the cursor changes
    it."""

    __tablename__ = "sync_cursors"

    name: str = Field(primary_key=True, max_length=64)
    block: int = Field(sa_type=BigInteger)
    block_ref: str | None = Field(default=None, max_length=96)
