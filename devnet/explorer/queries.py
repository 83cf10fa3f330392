"""IndexReads: the questions pages ask of the index database, each one indexed query that reads at most what
it returns (a page of rows, a sum kept by the indexer, one entity by its key).

A page of a list is never found by OFFSET, which walks every row before it: `?page=` in the billions made one
request read a whole table (red team). Lists numbered 1..n without gaps (tables: `seq`, the ordinals the indexer
keeps per adapter, node and address) read the page's window of numbers on an index (`_window`): a page deep in
the list or past its end reads what the first does. Lists in an order no kept number follows (adapters and names
by name, accounts and contributors by rank: a new row or a new sum lands in the middle) answer a page past the
end from a count the indexer keeps, reading nothing (`_clamped`); a page inside them walks the index entries
before it, so these lists (and what an address owns, which anyone can grow by naming it a dataset's payee) are
paged to MAX_LIST_DEPTH rows and no deeper: a page costs at most that walk, however long a stranger made the list.

One IndexReads is one read transaction (devnet.explorer.index_db): a page sees one committed state of the
index, whatever the refresher writes meanwhile.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from sqlalchemy import func, literal_column
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, select

from common.wire import hex0x, id_bytes
from devnet.explorer.tables import (
    ADAPTER_SEARCH,
    ZERO_RANK,
    AccountTotal,
    Accrual,
    AdapterDataset,
    AdapterRow,
    DatasetRow,
    HistoryLine,
    IndexCursor,
    IndexedBatch,
    IndexedMoney,
    IndexedRecord,
    IndexedReward,
    IndexedTx,
    NameRow,
    NodeRow,
    SettlerState,
    Usage,
    UsageBlock,
    from_i64,
)
from ledger.types import MAX_NAME_BYTES


@dataclass(slots=True)
class RecordView:
    """One settled record (from its batch's RecordsSettled log)."""

    request_id: str
    batch_id: str
    adapter_id: str
    node_id: str
    prompt_tokens: int
    completion_tokens: int
    fee: int
    block: int
    tx_hash: str

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class BatchView:
    batch_id: str
    settler: str
    merkle_root: str
    record_count: int
    total_fees: int
    block: int
    tx_hash: str
    timestamp: int | None = None


@dataclass(slots=True)
class RewardView:
    """One RewardAccrued event; role is "node", "adapter_owner" or "dataset"."""

    batch_id: str
    account: str
    adapter_id: str
    role: str
    subject_id: str
    amount: int
    block: int
    tx_hash: str


@dataclass(slots=True)
class MoneyEvent:
    """A deposit, reclaim or withdrawal."""

    kind: str
    account: str
    amount: int
    block: int
    tx_hash: str


@dataclass(slots=True)
class UsageSum:
    records: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    fees: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class AccountRewards:
    """Accrued (RewardAccrued events) and withdrawn (RewardWithdrawn) per address."""

    address: str
    accrued: int = 0
    withdrawn: int = 0
    by_role: dict[str, int] = field(default_factory=dict)


def _account(t: AccountTotal) -> AccountRewards:
    by_role = t.by_role()
    return AccountRewards(t.account, sum(by_role.values()), int(t.withdrawn), by_role)


# Rows of a list in an order no kept number follows that its pages reach: deeper, the name search or an address's
# own page finds what is there. A page past it is answered empty, as one past the end is. Etherscan likewise
# lists a token's first 10,000 holders.
MAX_LIST_DEPTH = 10_000
SEARCH_BUDGET_S = 0.1  # the most a name search reads the trigram index (a real name's search: about 1 ms)
PROGRESS_OPCODES = 1000  # how often (in SQLite's steps) a budgeted statement looks at the clock


@dataclass(frozen=True, slots=True)
class Page:
    """A page of a list: its rows, whether there are more after them, and whether the list goes on past the
    rows its pages reach (MAX_LIST_DEPTH)."""

    rows: list
    number: int
    size: int
    more: bool
    cut: bool = False


def _record(r: IndexedRecord) -> RecordView:
    return RecordView(
        hex0x(r.request_id),
        hex0x(r.batch_id),
        hex0x(r.adapter_id),
        hex0x(r.node_id),
        from_i64(r.prompt_tokens),
        from_i64(r.completion_tokens),
        int(r.fee),
        r.block,
        hex0x(r.tx_hash),
    )


def _batch(b: IndexedBatch) -> BatchView:
    return BatchView(
        b.batch_id, b.settler, b.merkle_root, b.record_count, int(b.total_fees), b.block, b.tx_hash, b.timestamp
    )


def _reward(r: IndexedReward) -> RewardView:
    return RewardView(r.batch_id, r.account, r.adapter_id, r.role, r.subject_id, int(r.amount), r.block, r.tx_hash)


def _usage(u: Usage | None) -> UsageSum:
    if u is None:
        return UsageSum()
    return UsageSum(u.records, int(u.prompt_tokens), int(u.completion_tokens), int(u.fees))


def _page(rows: list, number: int, size: int) -> Page:
    """`rows` as fetched with LIMIT size + 1: the extra row only says there is a next page."""
    return Page(rows[:size], number, size, len(rows) > size)


def _within_depth(fetch, number: int, size: int, length: int | None = None) -> Page:
    """Page `number` of a list paged to MAX_LIST_DEPTH rows, its rows read by fetch(offset, limit) (an OFFSET over
    an index: it walks the entries before the page, never more than the depth). `length`, when the indexer keeps
    it, answers a page past the end without reading. A page past the depth is empty; the last one it reaches says
    whether the list goes on (`cut`)."""
    start = number * size
    take = min(size, MAX_LIST_DEPTH - start)
    if take <= 0:
        return Page([], number, size, False, length is not None and length > MAX_LIST_DEPTH)
    if length is not None and start >= length:
        return _page([], number, size)
    rows = fetch(start, take + 1)
    past, last = len(rows) > take, start + take >= MAX_LIST_DEPTH
    return Page(rows[:take], number, size, past and not last, past and last)


def _window(stmt, number, last: int, page: int, size: int, newest_first: bool):
    """`stmt` limited to a page of rows whose `number` runs 1..last without gaps, the highest first (newest_first)
    or the lowest: the page's first number is a seek on an index of `number`, and the page reads size + 1 rows (the
    extra says there is a next page) whatever its depth; past the end, none."""
    if newest_first:
        return stmt.where(col(number) <= last - page * size).order_by(col(number).desc()).limit(size + 1)
    return stmt.where(col(number) > page * size).order_by(col(number)).limit(size + 1)


class IndexReads:
    """Reads of one snapshot of the index; a context manager that closes its session."""

    def __init__(self, session: Session) -> None:
        self.s = session

    def close(self) -> None:
        self.s.close()

    # ------------------------------------------------------------------ the cursor and totals

    def cursor(self) -> IndexCursor | None:
        return self.s.get(IndexCursor, 1)

    def _count(self, what: str) -> int:
        """A list's length as the indexer counted it on the cursor (IndexCursor: adapters, names, accounts,
        contributors), 0 before the first refresh."""
        c = self.cursor()
        return getattr(c, what) if c else 0

    def _clamped(self, stmt, what: str, page: int, size: int, shown=lambda row: row) -> Page:
        """A page of a list in an order no kept number follows, by OFFSET over its order's index, each row as
        `shown` makes it (_within_depth): a page past the end (the count `what` says so) or the depth reads
        nothing; one inside walks the index entries before it, at most MAX_LIST_DEPTH."""

        def fetch(offset: int, limit: int) -> list:
            return [shown(r) for r in self.s.exec(stmt.offset(offset).limit(limit)).all()]

        return _within_depth(fetch, page, size, self._count(what))

    def _last(self, column, *where) -> int:
        """The highest value of an indexed number column (among the rows `where` picks): one seek."""
        return self.s.exec(select(func.max(column)).where(*where)).one() or 0

    def usage(self, kind: str, key: str = "") -> UsageSum:
        """Settled records summed: kind "all", "adapter", "node", "node_adapter" (key node id + adapter id); kind
        "batches" and "rewards" (tables.Usage)."""
        return _usage(self.s.get(Usage, (kind, key)))

    def usages(self, kind: str, keys: list[str]) -> dict[str, UsageSum]:
        if not keys:
            return {}
        rows = self.s.exec(select(Usage).where(Usage.kind == kind, col(Usage.key).in_(keys))).all()
        return {u.key: _usage(u) for u in rows}

    def node_adapters(self, node_id: str) -> dict[str, UsageSum]:
        """Usage of one node per adapter it served (node_adapter keys start with the node id)."""
        rows = self.s.exec(
            select(Usage).where(Usage.kind == "node_adapter", Usage.key > node_id, Usage.key < node_id + "~")
        ).all()
        return {u.key[len(node_id) :]: _usage(u) for u in rows}

    def batch_totals(self) -> tuple[int, int]:
        """(batches settled, the sum of their totalFees), as the indexer added them up."""
        u = self.usage("batches")
        return u.records, u.fees

    def settlers(self) -> list[str]:
        return list(self.s.exec(select(SettlerState.address).where(SettlerState.active)).all())

    def is_settler(self, address: str) -> bool:
        row = self.s.get(SettlerState, address)
        return bool(row and row.active)

    def counts(self) -> dict[str, int]:
        """Registered adapters (the indexer's count), datasets and nodes (their last seq: numbered without gaps);
        COUNT(*) walked each table on every view of the overview."""
        return {
            "adapters": self._count("adapters"),
            "datasets": self._last(DatasetRow.seq),
            "nodes": self._last(NodeRow.seq),
        }

    # ------------------------------------------------------------------ registry

    def adapter(self, adapter_id: str) -> AdapterRow | None:
        return self.s.get(AdapterRow, adapter_id)

    def adapter_names(self, ids: set[str]) -> dict[str, str]:
        """'name version' of each registered adapter among `ids`."""
        if not ids:
            return {}
        rows = self.s.exec(
            select(AdapterRow.adapter_id, AdapterRow.name, AdapterRow.version).where(
                col(AdapterRow.adapter_id).in_(list(ids))
            )
        ).all()
        return {a: f"{n} {v}" for a, n, v in rows}

    def adapters(self, page: int, size: int) -> Page:
        """By name (a new adapter lands anywhere in it: no kept number, `_clamped`), on its order's index."""
        stmt = select(AdapterRow).order_by(AdapterRow.name, AdapterRow.block, AdapterRow.adapter_id)
        return self._clamped(stmt, "adapters", page, size)

    def name_versions(self, name: str, owner: str) -> tuple[int, AdapterRow | None]:
        """(how many versions the name has, counted to MAX_LIST_DEPTH + 1 at most; the newest one its owner
        registered): a walk of the name's index entries and one seek on (name, publisher). Every version was read
        whole on each view of /adapters, and anyone can register thousands under their name (red team)."""
        some = select(AdapterRow.adapter_id).where(AdapterRow.name == name).limit(MAX_LIST_DEPTH + 1).subquery()
        count = self.s.exec(select(func.count()).select_from(some)).one()
        newest = select(AdapterRow).where(AdapterRow.name == name, AdapterRow.publisher == owner)
        newest = newest.order_by(col(AdapterRow.block).desc(), col(AdapterRow.adapter_id).desc()).limit(1)
        return count, self.s.exec(newest).first()

    def successors(self, adapter_id: str, limit: int) -> list[AdapterRow]:
        """Up to `limit` adapters naming this one their predecessor (anyone may name any), the oldest first."""
        stmt = select(AdapterRow).where(AdapterRow.predecessor == adapter_id)
        return list(self.s.exec(stmt.order_by(AdapterRow.block, AdapterRow.adapter_id).limit(limit)).all())

    def search_adapters(self, text: str, limit: int = 50) -> tuple[list[AdapterRow], bool]:
        """(up to `limit` adapters whose name starts with `text` (any case), in name order, then, from 3 characters
        on, others whose name contains it; whether the second search was cut short). Each is found on an index
        (the names' order, their trigrams: tables.ADAPTER_SEARCH), never by reading every adapter. Names are lower
        case and at most MAX_NAME_BYTES long (the registry's rules): longer text is in none.

        A phrase whose trigrams many names share but none holds in a row walks all of those names (a stranger can
        register a million of "aaa...a0"; 0.8 s a search over 100,000 of them, measured): the trigram search stops
        at SEARCH_BUDGET_S (SQLite's interrupt), and answers what it found by the start of the name."""
        low = text.lower()
        if len(low.encode()) > MAX_NAME_BYTES:
            return [], False
        stmt = select(AdapterRow).where(AdapterRow.name >= low, AdapterRow.name < low + "\U0010ffff")
        found = list(self.s.exec(stmt.order_by(AdapterRow.name, AdapterRow.block).limit(limit)).all())
        if len(found) == limit or len(low) < 3:  # a trigram index finds no shorter words
            return found, False
        phrase = '"' + low.replace('"', '""') + '"'  # the words as one string, FTS5's syntax taken literally
        sql = f"SELECT adapter_id FROM {ADAPTER_SEARCH} WHERE {ADAPTER_SEARCH} MATCH ? LIMIT ?"
        ids = self._within(SEARCH_BUDGET_S, sql, (phrase, limit + len(found)))
        if ids is None:
            return found, True
        seen = {a.adapter_id for a in found}
        more = [i for (i,) in ids if i not in seen][: limit - len(found)]
        if more:
            rows = self.s.exec(select(AdapterRow).where(col(AdapterRow.adapter_id).in_(more))).all()
            found += sorted(rows, key=lambda a: (a.name, a.block, a.adapter_id))
        return found, False

    def _within(self, seconds: float, sql: str, args: tuple) -> list | None:
        """The rows of one statement, or None when it ran past `seconds` and was interrupted (the read transaction
        goes on). SQLite's progress handler checks the clock every PROGRESS_OPCODES steps of this connection's
        statements, FTS5's reads of its own tables included (some 3 ms apart over a long trigram walk, measured),
        in this thread: no timer thread a search."""
        raw = self.s.connection().connection.dbapi_connection
        deadline = time.monotonic() + seconds
        raw.set_progress_handler(lambda: time.monotonic() > deadline, PROGRESS_OPCODES)
        try:
            return list(self.s.connection().exec_driver_sql(sql, args).all())
        except OperationalError as e:
            if "interrupted" not in str(e.orig):
                raise
            return None
        finally:
            raw.set_progress_handler(None, 0)

    def names(self, page: int, size: int) -> Page:
        """In name order (no kept number, `_clamped`), on the primary key."""
        return self._clamped(select(NameRow).order_by(NameRow.name), "names", page, size)

    def name(self, name: str) -> NameRow | None:
        return self.s.get(NameRow, name)

    def name_owners(self, names: set[str]) -> dict[str, str]:
        """The owner of each registered name among `names`, in one query."""
        if not names:
            return {}
        return dict(self.s.exec(select(NameRow.name, NameRow.owner).where(col(NameRow.name).in_(list(names)))).all())

    def history(self, kind: str, key: str, page: int, size: int) -> tuple[Page, int]:
        """(a page of an entity's history lines, the newest first, each (block, tx hash, what); how many it has): a
        window of the lines' ordinals (tables.HistoryLine, 1..n, n the last: one seek on the primary key)."""
        last = self._last(HistoryLine.ord, HistoryLine.kind == kind, HistoryLine.key == key)
        stmt = select(HistoryLine).where(HistoryLine.kind == kind, HistoryLine.key == key)
        rows = self.s.exec(_window(stmt, HistoryLine.ord, last, page, size, newest_first=True)).all()
        return _page([(h.block, h.tx_hash, h.what) for h in rows], page, size), last

    def dataset(self, dataset_id: str) -> DatasetRow | None:
        return self.s.exec(select(DatasetRow).where(DatasetRow.dataset_id == dataset_id)).first()

    def datasets(self, page: int, size: int) -> Page:
        """In registration order: a window of seq (1..n without gaps)."""
        stmt = _window(select(DatasetRow), DatasetRow.seq, 0, page, size, newest_first=False)
        return _page(list(self.s.exec(stmt).all()), page, size)

    def dataset_users(self, ids: list[str]) -> dict[str, int]:
        """How many adapters declare each dataset: its last AdapterDataset.ord (1..n, no gaps), one seek each."""
        return {i: self._last(AdapterDataset.ord, AdapterDataset.dataset_id == i) for i in ids}

    def dataset_adapters(self, dataset_id: str, page: int, size: int) -> tuple[Page, int]:
        """(a page of (adapter, share in bps) declaring the dataset, in registration order; how many do): a window
        of their ordinals (tables.AdapterDataset.ord), where every one was listed (anyone can declare any dataset)."""
        last = self._last(AdapterDataset.ord, AdapterDataset.dataset_id == dataset_id)
        stmt = (
            select(AdapterRow, AdapterDataset.share_bps)
            .join(AdapterDataset, col(AdapterDataset.adapter_id) == col(AdapterRow.adapter_id))
            .where(AdapterDataset.dataset_id == dataset_id)
        )
        rows = self.s.exec(_window(stmt, AdapterDataset.ord, last, page, size, newest_first=False)).all()
        return _page([(a, bps) for a, bps in rows], page, size), last

    def node(self, node_id: str) -> NodeRow | None:
        return self.s.exec(select(NodeRow).where(NodeRow.node_id == node_id)).first()

    def nodes_by_id(self, ids: set[str]) -> dict[str, NodeRow]:
        if not ids:
            return {}
        return {n.node_id: n for n in self.s.exec(select(NodeRow).where(col(NodeRow.node_id).in_(list(ids)))).all()}

    def nodes(self, page: int, size: int) -> Page:
        """In first registration order (a node registered again keeps its row): a window of seq."""
        stmt = _window(select(NodeRow), NodeRow.seq, 0, page, size, newest_first=False)
        return _page(list(self.s.exec(stmt).all()), page, size)

    def owned_by(self, address: str, page: int, size: int) -> Page:
        """What an address owns, is paid for, or operates (adapters, then datasets, then nodes), a page of
        them: anyone can register datasets and name any address their payee, so the list has no bound.

        By OFFSET on each kind's (owner, payee or operator) index, and paged to MAX_LIST_DEPTH (_within_depth):
        owners and payees change, so no number kept per address runs without gaps. The rows of a kind before the
        page are counted only as far as the page's start, so a page walks at most the depth's index entries."""

        def fetch(start: int, limit: int) -> list:
            rows: list = []
            for model, column in (
                (AdapterRow, AdapterRow.owner),
                (DatasetRow, DatasetRow.payee),
                (NodeRow, NodeRow.operator),
            ):
                if start:  # rows of this kind before the page, counted to one past its start: all, or more
                    before = select(column).where(column == address).limit(start + 1).subquery()
                    n = self.s.exec(select(func.count()).select_from(before)).one()
                    if n <= start:
                        start -= n
                        continue
                # in the index's own order (its entries end with the rowid): no sort, and the same order every page
                stmt = select(model).where(column == address).order_by(literal_column("rowid"))
                rows += self.s.exec(stmt.offset(start).limit(limit - len(rows))).all()
                start = 0
                if len(rows) >= limit:
                    break
            return rows

        return _within_depth(fetch, page, size)

    # ------------------------------------------------------------------ records and batches

    def records(
        self,
        *,
        adapter: str | None = None,
        node: str | None = None,
        batch: str | None = None,
        request: str | None = None,
        page: int = 0,
        size: int = 100,
        newest_first: bool = True,
    ) -> Page:
        """Records matching every filter given, newest first (or in settlement order), a page of them.

        A deep page costs no more than the first: without a filter, `seq` (settlement order, 1..n without gaps:
        rows are only ever appended, or all deleted) says where the page starts; filtered by adapter, node or
        both, the record's ordinal among that key's (tables.IndexedRecord, 1..n, n the key's Usage count) does,
        on its (key, ordinal) index. Filtered by a batch (or a request id), the page is an OFFSET among the
        batch's records on the (batch, seq) index: at most a batch's size, which the settler bounds."""
        order = col(IndexedRecord.seq).desc() if newest_first else col(IndexedRecord.seq)
        filters = [
            column == id_bytes(value)
            for column, value in (
                (IndexedRecord.adapter_id, adapter),
                (IndexedRecord.node_id, node),
                (IndexedRecord.batch_id, batch),
                (IndexedRecord.request_id, request),
            )
            if value is not None
        ]
        if batch is None and request is None:
            if adapter and node:
                number, last = IndexedRecord.pair_ord, self.usage("node_adapter", node + adapter).records
            elif adapter or node:
                number = IndexedRecord.adapter_ord if adapter else IndexedRecord.node_ord
                last = self.usage("adapter" if adapter else "node", adapter or node).records
            else:
                number, last = IndexedRecord.seq, self._last(IndexedRecord.seq)
            stmt = _window(select(IndexedRecord).where(*filters), number, last, page, size, newest_first)
            rows = self.s.exec(stmt).all()
        else:
            seqs = select(IndexedRecord.seq).where(*filters).order_by(order).offset(page * size).limit(size + 1)
            rows = self.s.exec(select(IndexedRecord).order_by(order).where(col(IndexedRecord.seq).in_(seqs))).all()
        return _page([_record(r) for r in rows], page, size)

    def record_count(self, *, adapter: str | None, node: str | None, batch: str | None) -> int:
        """How many records match: from the indexer's sums where one answers it, else counted on an index."""
        if batch is None:
            if adapter and node:
                return self.usage("node_adapter", node + adapter).records
            if adapter or node:
                return self.usage("adapter" if adapter else "node", adapter or node).records
            return self.usage("all").records
        stmt = select(func.count()).select_from(IndexedRecord).where(IndexedRecord.batch_id == id_bytes(batch))
        for column, value in ((IndexedRecord.adapter_id, adapter), (IndexedRecord.node_id, node)):
            if value is not None:
                stmt = stmt.where(column == id_bytes(value))
        return self.s.exec(stmt).one()

    def records_of_request(self, request_id: str) -> list[RecordView]:
        return self.records(request=request_id, size=1000, newest_first=False).rows

    def batch_records(self, batch_id: str) -> list[RecordView]:
        """Every record of a batch in leaf order (a batch is bounded by the settler's batch size)."""
        stmt = select(IndexedRecord).where(IndexedRecord.batch_id == id_bytes(batch_id)).order_by(IndexedRecord.seq)
        return [_record(r) for r in self.s.exec(stmt).all()]

    def has_record(self, request_id: str) -> bool:
        stmt = select(IndexedRecord.seq).where(IndexedRecord.request_id == id_bytes(request_id)).limit(1)
        return self.s.exec(stmt).first() is not None

    def batch(self, batch_id: str) -> BatchView | None:
        b = self.s.exec(select(IndexedBatch).where(IndexedBatch.batch_id == batch_id)).first()
        return _batch(b) if b else None

    def batches(self, page: int, size: int) -> Page:
        """The newest first: a window of seq (1..n without gaps) down from the last."""
        stmt = _window(select(IndexedBatch), IndexedBatch.seq, self._last(IndexedBatch.seq), page, size, True)
        return _page([_batch(b) for b in self.s.exec(stmt).all()], page, size)

    def batch_rewards(self, batch_id: str) -> list[RewardView]:
        stmt = select(IndexedReward).where(IndexedReward.batch_id == batch_id).order_by(IndexedReward.id)
        return [_reward(r) for r in self.s.exec(stmt).all()]

    def has_tx(self, tx_hash: str) -> bool:
        return self.s.get(IndexedTx, tx_hash) is not None

    # ------------------------------------------------------------------ rewards and money

    def accruals(self, *, account: str | None = None, adapter: str | None = None, role: str | None = None) -> list:
        stmt = select(Accrual)
        if account is not None:
            stmt = stmt.where(Accrual.account == account)
        if adapter is not None:
            stmt = stmt.where(Accrual.adapter_id == adapter)
        if role is not None:
            stmt = stmt.where(Accrual.role == role)
        return list(self.s.exec(stmt).all())

    def dataset_rewards(self, ids: list[str]) -> dict[str, int]:
        """Rewards accrued to each dataset in `ids`."""
        stmt = select(Accrual.subject_id, Accrual.amount).where(Accrual.role == "dataset")
        stmt = stmt.where(col(Accrual.subject_id).in_(ids))
        out: dict[str, int] = defaultdict(int)
        for subject, amount in self.s.exec(stmt).all():
            out[subject] += int(amount)
        return out

    def accounts(self, page: int, size: int) -> Page:
        """A page of the addresses that earned or withdrew (AccountRewards), the most accrued first: by rank, which
        every reward moves (no kept number, `_clamped`), on the rank's index."""
        stmt = select(AccountTotal).order_by(col(AccountTotal.accrued_rank).desc(), AccountTotal.account)
        return self._clamped(stmt, "accounts", page, size, _account)

    def account_count(self) -> int:
        return self._count("accounts")

    def contributors(self, page: int, size: int) -> Page:
        """A page of (address, wei accrued as a dataset contributor), the most first."""
        stmt = (
            select(AccountTotal.account, AccountTotal.dataset)
            .where(AccountTotal.dataset_rank > ZERO_RANK)
            .order_by(col(AccountTotal.dataset_rank).desc(), AccountTotal.account)
        )
        return self._clamped(stmt, "contributors", page, size, lambda row: (row[0], int(row[1])))  # by rank

    def top_contributors(self, n: int) -> list[str]:
        """The n addresses that accrued the most as adapter owners and dataset contributors."""
        stmt = (
            select(AccountTotal.account)
            .where(AccountTotal.contributor_rank > ZERO_RANK)
            .order_by(col(AccountTotal.contributor_rank).desc(), AccountTotal.account)
        )
        return list(self.s.exec(stmt.limit(n)).all())

    def total_accrued(self) -> int:
        """Every reward accrued (RewardAccrued), summed as they were indexed."""
        return self.usage("rewards").fees

    def account_rewards(self, account: str, page: int, size: int) -> Page:
        """The newest first: a window of the account's ordinals (1..n, n the last, one seek on their index)."""
        last = self._last(IndexedReward.account_ord, IndexedReward.account == account)
        stmt = select(IndexedReward).where(IndexedReward.account == account)
        stmt = _window(stmt, IndexedReward.account_ord, last, page, size, newest_first=True)
        return _page([_reward(r) for r in self.s.exec(stmt).all()], page, size)

    def batches_earned_in(self, account: str) -> int:
        stmt = select(func.count(func.distinct(IndexedReward.batch_id))).where(IndexedReward.account == account)
        return self.s.exec(stmt).one()

    def money(self, account: str, page: int, size: int) -> Page:
        """The newest first: a window of the account's ordinals, as account_rewards (anyone can deposit for a
        settler, a wei at a time)."""
        last = self._last(IndexedMoney.account_ord, IndexedMoney.account == account)
        stmt = select(IndexedMoney).where(IndexedMoney.account == account)
        rows = self.s.exec(_window(stmt, IndexedMoney.account_ord, last, page, size, newest_first=True)).all()
        return _page([MoneyEvent(m.kind, m.account, int(m.amount), m.block, m.tx_hash) for m in rows], page, size)

    # ------------------------------------------------------------------ plots

    def top_adapters(self, n: int) -> list[tuple[str, int]]:
        """The n adapters (ids) that served the most tokens, with their tokens (ties by id): the first n of the
        (kind, tokens_rank, key) index, where every adapter's Usage row was read and sorted."""
        stmt = select(Usage).where(Usage.kind == "adapter").order_by(col(Usage.tokens_rank).desc(), Usage.key).limit(n)
        return [(u.key, int(u.prompt_tokens) + int(u.completion_tokens)) for u in self.s.exec(stmt).all()]

    def tokens_by_block(self, adapter_ids: list[str]) -> list[tuple[str, int, int]]:
        """(adapter, block, tokens) for the given adapters, in block order."""
        if not adapter_ids:
            return []
        stmt = (
            select(UsageBlock.adapter_id, UsageBlock.block, UsageBlock.tokens)
            .where(col(UsageBlock.adapter_id).in_(adapter_ids))
            .order_by(UsageBlock.block)
        )
        return [(a, b, int(t)) for a, b, t in self.s.exec(stmt).all()]

    def contributor_rewards_by_block(self, accounts: list[str]) -> list[tuple[str, str, int, int]]:
        """(account, role, block, amount) of the given accounts' rewards not as node operators (one per batch)."""
        if not accounts:
            return []
        stmt = select(IndexedReward.account, IndexedReward.role, IndexedReward.block, IndexedReward.amount).where(
            col(IndexedReward.account).in_(accounts), IndexedReward.role != "node"
        )
        return [(a, r, b, int(x)) for a, r, b, x in self.s.exec(stmt).all()]

    def block_times(self, blocks: set[int]) -> dict[int, int]:
        if not blocks:
            return {}
        stmt = select(IndexedBatch.block, IndexedBatch.timestamp).where(col(IndexedBatch.block).in_(list(blocks)))
        return {b: t for b, t in self.s.exec(stmt).all() if t is not None}
