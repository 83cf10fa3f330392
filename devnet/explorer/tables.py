"""The explorer's own index database: one table per kind of thing its pages show, and the cursor.

The index is a cache of the chain: it lives in its own SQLite file (devnet.explorer.index_db), never in the
gateway's ledger database, and is rebuilt from the chain whenever it does not match (another deployment, a
reset chain, a reorg below the cursor, an older schema). Its tables are on their own SQLModel registry, so
that ledger.db's `init_db` never creates them and this module never creates the ledger's.

How values are stored:
- records (the one table that grows by one row per inference): ids and hashes as 32-byte BLOBs, token
  counts as INTEGER (a uint64 above 2**63 - 1 is stored as its two's complement, see `to_i64`), the fee as
  decimal TEXT; everything else (registry rows, batches, rewards, sums) holds ids as "0x" + hex TEXT.
- wei amounts and sums are decimal TEXT (uint256 does not fit SQLite's 64-bit INTEGER); sums are kept
  exact in Python by the indexer (`usage`, `accruals`, `usage_blocks`), so no page sums over records.
- lists such as an adapter's datasets are a JSON column: a handful of entries (the registry bounds them), read
  whole with the row. A registry row's history is not: anyone changes their adapter's price as often as they
  like, and a JSON column rewritten whole on every change made indexing quadratic (10,000 price changes of one
  adapter: 232 s, red team); it is a table of its own (HistoryLine), one row appended per event.

How a page of a list is found (devnet.explorer.queries): lists that only grow at the end are numbered 1..n without
gaps, and a page is a window of those numbers on an index, never an OFFSET that walks every row before it: `seq`
(datasets, nodes, batches, records; rows are only ever appended, or all deleted, and SQLite numbers a rowid
max + 1), and ordinals the indexer keeps per key (a record's number among its adapter's, its node's, and its
adapter's on its node; a reward's and a deposit's among its address's; a history line's among its entity's).
Lists in an order no number follows (names, ranks, which change in the middle) skip a page past the end with a
count kept on the cursor.
"""

from __future__ import annotations

from sqlalchemy import JSON, Column, Index, LargeBinary, desc
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

# Bump when a table changes: an index of another version is dropped and rebuilt from the chain.
# 2: explorer_account_totals; 3: ordinals of records, rewards and money, the cursor's counts, Usage.tokens_rank, the
# lists' order indexes (a page is a window on an index, never an OFFSET); 4: the version kept in the file's
# user_version (devnet.explorer.index_db), where 1-3 left it 0; 5: the cursor's own copy of it gone; 6: the
# adapters' names in a trigram index (ADAPTER_SEARCH); 7: the registry rows' history in a table of its own
# (HistoryLine), where a JSON column on each row was rewritten whole on every event, AdapterDataset.ord and the
# adapters' (name, publisher) index
SCHEMA_VERSION = 7

U64 = 2**64
I64_MAX = 2**63 - 1


def to_i64(value: int) -> int:
    """A uint64 as SQLite's signed 64-bit INTEGER (two's complement above 2**63 - 1)."""
    return value - U64 if value > I64_MAX else value


def from_i64(value: int) -> int:
    return value + U64 if value < 0 else value


class IndexModel(SQLModel, registry=registry()):
    """Base of the index tables: their own metadata, apart from the ledger's."""


class IndexCursor(IndexModel, table=True):
    """One row: what the index was built from and how far it got. Blocks are indexed whole, so (block,
    log_index) is the last block applied and the index of its last log of ours (-1 when it had none)."""

    __tablename__ = "explorer_cursor"

    id: int = Field(default=1, primary_key=True)
    chain_id: int
    registry_address: str  # ("registry" is the declarative base's own attribute)
    ledger_address: str
    deploy_block: int
    block: int  # last block indexed (deploy_block - 1 before the first)
    block_hash: str = ""  # its hash, to notice a reorg below the cursor
    log_index: int = -1
    head: int = 0  # the chain head when the cursor last moved
    span: int = 0  # blocks per eth_getLogs that last stayed under the log bound (0: not learned yet)
    records: int = 0
    batches: int = 0
    # rows of the lists a page reads in an order no number follows (queries: a page past the end reads nothing)
    adapters: int = 0
    names: int = 0
    accounts: int = 0  # AccountTotal rows
    contributors: int = 0  # AccountTotal rows with dataset rewards (dataset_rank above ZERO_RANK)


class IndexedRecord(IndexModel, table=True):
    """One settled record (of its batch's RecordsSettled log); `seq` is settlement order (block, log index,
    position in the batch); log_index is its batch's log. adapter_ord, node_ord and pair_ord number it among its
    adapter's records, its node's, and its adapter's on its node (1, 2, ... in settlement order, no gaps: the
    indexer counts on from the Usage sums of the same key), so that a page of them is a window of numbers."""

    __tablename__ = "explorer_records"
    __table_args__ = (
        Index("ix_explorer_records_request", "request_id"),
        Index("ix_explorer_records_batch", "batch_id", "seq"),
        Index("ix_explorer_records_adapter", "adapter_id", "adapter_ord"),
        Index("ix_explorer_records_node", "node_id", "node_ord"),
        Index("ix_explorer_records_pair", "node_id", "adapter_id", "pair_ord"),
    )

    seq: int | None = Field(default=None, primary_key=True)
    request_id: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    batch_id: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    adapter_id: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    node_id: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    prompt_tokens: int
    completion_tokens: int
    fee: str
    block: int
    log_index: int
    tx_hash: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    adapter_ord: int
    node_ord: int
    pair_ord: int


class IndexedBatch(IndexModel, table=True):
    """One BatchSettled event."""

    __tablename__ = "explorer_batches"

    seq: int | None = Field(default=None, primary_key=True)
    batch_id: str = Field(unique=True)
    settler: str = Field(index=True)
    merkle_root: str
    record_count: int
    total_fees: str
    block: int = Field(index=True)
    tx_hash: str = Field(index=True)
    timestamp: int | None = None


class IndexedReward(IndexModel, table=True):
    """One RewardAccrued event (one per payee, role and adapter entry in a batch, never one per record);
    account_ord numbers it among its account's (1, 2, ... in indexing order, no gaps)."""

    __tablename__ = "explorer_rewards"
    __table_args__ = (Index("ix_explorer_rewards_account", "account", "account_ord"),)

    id: int | None = Field(default=None, primary_key=True)
    batch_id: str = Field(index=True)
    account: str
    adapter_id: str
    role: str  # "node", "adapter_owner" or "dataset"
    subject_id: str
    amount: str
    block: int
    tx_hash: str
    account_ord: int = 0


class Accrual(IndexModel, table=True):
    """What accrued to an account, summed by adapter, role and subject (node, adapter or dataset id)."""

    __tablename__ = "explorer_accruals"

    account: str = Field(primary_key=True)
    adapter_id: str = Field(primary_key=True, index=True)
    role: str = Field(primary_key=True)
    subject_id: str = Field(primary_key=True, index=True)
    amount: str = "0"
    # RewardAccrued events summed here: one per batch, or per price in a batch where an adapter's records were
    # charged at several (quotes under a raise's grace)
    batches: int = 0


ROLES = ("node", "adapter_owner", "dataset")  # the ledger's Role names, AccountTotal's columns
RANK_DIGITS = 78  # a uint256 in decimal
ZERO_RANK = "0" * RANK_DIGITS


def rank(wei: int) -> str:
    """An amount as text that sorts as the amounts do (AccountTotal's ranks, Usage.tokens_rank)."""
    return f"{wei:0{RANK_DIGITS}d}"


class AccountTotal(IndexModel, table=True):
    """What one address accrued, by role, and withdrew, summed as its rewards and withdrawals are indexed: the
    accounts page, the contributors' table and the rewards plot read a page of these in rank order, where they
    read every accrual and every reward of the chain's history on each view (red team)."""

    __tablename__ = "explorer_account_totals"
    # the lists' orders, ties by address: a page is read off the index in order (a rank alone left the ties to a
    # sort of every row of the list)
    __table_args__ = (
        Index("ix_explorer_account_totals_accrued", desc("accrued_rank"), "account"),
        Index("ix_explorer_account_totals_contributor", desc("contributor_rank"), "account"),
        Index("ix_explorer_account_totals_dataset", desc("dataset_rank"), "account"),
    )

    account: str = Field(primary_key=True)
    node: str = "0"  # wei accrued as a node operator (exact, decimal text)
    adapter_owner: str = "0"
    dataset: str = "0"
    withdrawn: str = "0"
    # the orders pages list addresses in: the exact sums as RANK_DIGITS-digit text, which sorts as the numbers do
    # (floats tied totals a float step apart: 128 wei at 1 ETH, and listed a smaller one first)
    accrued_rank: str = ZERO_RANK  # everything accrued
    contributor_rank: str = ZERO_RANK  # as adapter owner and dataset contributor
    dataset_rank: str = ZERO_RANK  # as dataset contributor

    def add(self, field: str, amount: int) -> None:
        """Add `amount` wei to a role's column or to `withdrawn`, and rank again."""
        setattr(self, field, str(int(getattr(self, field)) + amount))
        owner, dataset = int(self.adapter_owner), int(self.dataset)
        self.accrued_rank = rank(int(self.node) + owner + dataset)
        self.contributor_rank, self.dataset_rank = rank(owner + dataset), rank(dataset)

    def by_role(self) -> dict[str, int]:
        return {r: int(getattr(self, r)) for r in ROLES}


class Usage(IndexModel, table=True):
    """Settled records summed by `kind`: "all" (key ""), "adapter", "node", "node_adapter" (node id + adapter id);
    kind "batches" (key "") counts batches in `records` and sums their totalFees in `fees`; kind "rewards" (key "")
    counts RewardAccrued events in `records` and sums their amounts in `fees`. tokens_rank is prompt + completion
    tokens as text that sorts as the numbers do (`rank`): the tokens plot reads its top adapters off the index."""

    __tablename__ = "explorer_usage"
    __table_args__ = (Index("ix_explorer_usage_tokens", "kind", desc("tokens_rank"), "key"),)

    kind: str = Field(primary_key=True)
    key: str = Field(primary_key=True)
    records: int = 0
    prompt_tokens: str = "0"
    completion_tokens: str = "0"
    fees: str = "0"
    tokens_rank: str = ZERO_RANK


class UsageBlock(IndexModel, table=True):
    """Tokens settled per adapter in one block: the points of the tokens plot."""

    __tablename__ = "explorer_usage_blocks"

    adapter_id: str = Field(primary_key=True)
    block: int = Field(primary_key=True)
    tokens: str = "0"


class IndexedMoney(IndexModel, table=True):
    """A deposit, reclaim or withdrawal; account_ord numbers it among its account's (1, 2, ..., no gaps)."""

    __tablename__ = "explorer_money"
    __table_args__ = (Index("ix_explorer_money_account", "account", "account_ord"),)

    id: int | None = Field(default=None, primary_key=True)
    kind: str
    account: str
    amount: str
    block: int
    tx_hash: str
    account_ord: int = 0


class IndexedTx(IndexModel, table=True):
    """A transaction that emitted events of ours (search finds it)."""

    __tablename__ = "explorer_txs"

    tx_hash: str = Field(primary_key=True)
    block: int
    events: str = ""  # event names, comma-separated, in log order


class SettlerState(IndexModel, table=True):
    __tablename__ = "explorer_settlers"

    address: str = Field(primary_key=True)
    active: bool


class AdapterRow(IndexModel, table=True):
    __tablename__ = "explorer_adapters"
    # the adapters list's order (a name's versions by block, then id), read off the index in order; and a name's
    # newest version by its owner, one seek (a name's versions were all read to find it: anyone can register
    # thousands, red team)
    __table_args__ = (
        Index("ix_explorer_adapters_order", "name", "block", "adapter_id"),
        Index("ix_explorer_adapters_publisher", "name", "publisher", "block", "adapter_id"),
    )

    adapter_id: str = Field(primary_key=True)
    owner: str = Field(index=True)
    name: str
    version: str
    predecessor: str = Field(index=True)
    base_model: str
    price: str
    datasets: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False))  # [[dataset id, bps]]
    block: int
    tx_hash: str
    publisher: str = ""


# Every adapter's name in SQLite's FTS5 trigram index, for the search: a name that contains the words searched for
# is found by the trigrams they share, where LIKE '%words%' read every adapter (0.66 s a search with a million
# registered). No SQLModel table: made and emptied by devnet.explorer.index_db, written by the indexer
# (add_adapter_name), read by IndexReads.search_adapters.
ADAPTER_SEARCH = "explorer_adapter_search"
ADAPTER_SEARCH_DDL = (
    f"CREATE VIRTUAL TABLE IF NOT EXISTS {ADAPTER_SEARCH} USING fts5(name, adapter_id UNINDEXED, tokenize='trigram')"
)


def add_adapter_name(session, adapter_id: str, name: str) -> None:
    """An adapter's name into the search index, in `session`'s transaction."""
    session.connection().exec_driver_sql(
        f"INSERT INTO {ADAPTER_SEARCH} (name, adapter_id) VALUES (?, ?)", (name, adapter_id)
    )


class AdapterDataset(IndexModel, table=True):
    """Which adapters declare a dataset (the dataset page lists them, a page at a time). `ord` numbers the adapter
    among the dataset's (1, 2, ... in registration order, no gaps): anyone can declare anyone's dataset, thousands
    of times, and the page listed every one (red team); a page is a window of the numbers, the last their count."""

    __tablename__ = "explorer_adapter_datasets"
    __table_args__ = (Index("ix_explorer_adapter_datasets_ord", "dataset_id", "ord"),)

    dataset_id: str = Field(primary_key=True)
    adapter_id: str = Field(primary_key=True)
    share_bps: int
    ord: int = 0


class DatasetRow(IndexModel, table=True):
    __tablename__ = "explorer_datasets"

    seq: int | None = Field(default=None, primary_key=True)
    dataset_id: str = Field(unique=True)
    content_hash: str
    payee: str = Field(index=True)
    block: int
    tx_hash: str
    name: str = ""
    contributor: str = ""


class NodeRow(IndexModel, table=True):
    __tablename__ = "explorer_nodes"

    seq: int | None = Field(default=None, primary_key=True)
    node_id: str = Field(unique=True)
    operator: str = Field(index=True)
    active: bool
    base_model: str
    peer_id: str
    api_url: str
    multiaddrs: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    block: int
    tx_hash: str
    public_key: str = ""


class NameRow(IndexModel, table=True):
    __tablename__ = "explorer_names"

    name: str = Field(primary_key=True)
    owner: str
    block: int
    tx_hash: str


class HistoryLine(IndexModel, table=True):
    """One line of a registry entity's history (its page lists them, the newest first, a page at a time): `kind` is
    "adapter", "dataset", "node" or "name", `key` its id (a name: the name). `ord` numbers it among its entity's
    lines (1, 2, ... in indexing order, no gaps), so a page is a window of those numbers on the primary key, and
    appending one costs a seek for the last number and an insert, whatever the history's length."""

    __tablename__ = "explorer_history"

    kind: str = Field(primary_key=True)
    key: str = Field(primary_key=True)
    ord: int = Field(primary_key=True)
    block: int
    tx_hash: str
    what: str
