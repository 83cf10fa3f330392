"""IndexReads: the questions pages ask of the index database, each one indexed query that reads at most what
it returns (a page of rows, a sum kept by the indexer, one entity by its key).

One IndexReads is one read transaction (devnet.explorer.index_db): a page sees one committed state of the
index, whatever the refresher writes meanwhile.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from sqlalchemy import func
from sqlmodel import Session, col, select

from common.wire import hex0x, id_bytes
from devnet.explorer.tables import (
    ZERO_RANK,
    AccountTotal,
    Accrual,
    AdapterDataset,
    AdapterRow,
    DatasetRow,
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


@dataclass(frozen=True, slots=True)
class Page:
    """A page of a list: its rows, and whether there are more after them."""

    rows: list
    number: int
    size: int
    more: bool


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


class IndexReads:
    """Reads of one snapshot of the index; a context manager that closes its session."""

    def __init__(self, session: Session) -> None:
        self.s = session

    def close(self) -> None:
        self.s.close()

    # ------------------------------------------------------------------ the cursor and totals

    def cursor(self) -> IndexCursor | None:
        return self.s.get(IndexCursor, 1)

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
        """Registered adapters, datasets and nodes."""
        return {
            name: self.s.exec(select(func.count()).select_from(table)).one()
            for name, table in (("adapters", AdapterRow), ("datasets", DatasetRow), ("nodes", NodeRow))
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
        stmt = select(AdapterRow).order_by(AdapterRow.name, AdapterRow.block, AdapterRow.adapter_id)
        return _page(list(self.s.exec(stmt.offset(page * size).limit(size + 1)).all()), page, size)

    def adapters_named(self, name: str) -> list[AdapterRow]:
        return list(self.s.exec(select(AdapterRow).where(AdapterRow.name == name)).all())

    def successors(self, adapter_id: str) -> list[AdapterRow]:
        return list(self.s.exec(select(AdapterRow).where(AdapterRow.predecessor == adapter_id)).all())

    def search_adapters(self, text: str, limit: int = 50) -> list[AdapterRow]:
        """Adapters whose name contains `text` (any case)."""
        pattern = "%" + text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        stmt = select(AdapterRow).where(func.lower(AdapterRow.name).like(pattern, escape="\\"))
        return list(self.s.exec(stmt.order_by(AdapterRow.name, AdapterRow.block).limit(limit)).all())

    def names(self, page: int, size: int) -> Page:
        stmt = select(NameRow).order_by(NameRow.name).offset(page * size).limit(size + 1)
        return _page(list(self.s.exec(stmt).all()), page, size)

    def name(self, name: str) -> NameRow | None:
        return self.s.get(NameRow, name)

    def dataset(self, dataset_id: str) -> DatasetRow | None:
        return self.s.exec(select(DatasetRow).where(DatasetRow.dataset_id == dataset_id)).first()

    def datasets(self, page: int, size: int) -> Page:
        stmt = select(DatasetRow).order_by(DatasetRow.seq).offset(page * size).limit(size + 1)
        return _page(list(self.s.exec(stmt).all()), page, size)

    def dataset_users(self, ids: list[str]) -> dict[str, int]:
        """How many adapters declare each dataset."""
        if not ids:
            return {}
        stmt = (
            select(AdapterDataset.dataset_id, func.count())
            .where(col(AdapterDataset.dataset_id).in_(ids))
            .group_by(AdapterDataset.dataset_id)
        )
        return dict(self.s.exec(stmt).all())

    def dataset_adapters(self, dataset_id: str) -> list[tuple[AdapterRow, int]]:
        stmt = (
            select(AdapterRow, AdapterDataset.share_bps)
            .join(AdapterDataset, col(AdapterDataset.adapter_id) == col(AdapterRow.adapter_id))
            .where(AdapterDataset.dataset_id == dataset_id)
            .order_by(AdapterRow.block)
        )
        return [(a, bps) for a, bps in self.s.exec(stmt).all()]

    def node(self, node_id: str) -> NodeRow | None:
        return self.s.exec(select(NodeRow).where(NodeRow.node_id == node_id)).first()

    def nodes_by_id(self, ids: set[str]) -> dict[str, NodeRow]:
        if not ids:
            return {}
        return {n.node_id: n for n in self.s.exec(select(NodeRow).where(col(NodeRow.node_id).in_(list(ids)))).all()}

    def nodes(self, page: int, size: int) -> Page:
        stmt = select(NodeRow).order_by(NodeRow.seq).offset(page * size).limit(size + 1)
        return _page(list(self.s.exec(stmt).all()), page, size)

    def owned_by(self, address: str, page: int, size: int) -> Page:
        """What an address owns, is paid for, or operates (adapters, then datasets, then nodes), a page of
        them: anyone can register datasets and name any address their payee, so the list has no bound."""
        start, rows = page * size, []
        for model, column in (
            (AdapterRow, AdapterRow.owner),
            (DatasetRow, DatasetRow.payee),
            (NodeRow, NodeRow.operator),
        ):
            if start:  # rows of this kind before the page: counted only when the page does not start here
                n = self.s.exec(select(func.count()).select_from(model).where(column == address)).one()
                if start >= n:
                    start -= n
                    continue
            rows += self.s.exec(select(model).where(column == address).offset(start).limit(size + 1 - len(rows))).all()
            start = 0
            if len(rows) > size:
                break
        return _page(rows, page, size)

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
        rows are only ever appended, or all deleted) says where the page starts; with filters, the page's
        `seq`s are found on the filter's (id, seq) index alone, then only those rows are read."""
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
        stmt = select(IndexedRecord).order_by(order).limit(size + 1)
        if not filters:
            total = self.s.exec(select(func.max(IndexedRecord.seq))).one() or 0
            start = total - page * size if newest_first else page * size + 1
            bound = col(IndexedRecord.seq) <= start if newest_first else col(IndexedRecord.seq) >= start
            rows = self.s.exec(stmt.where(bound)).all()
        else:
            seqs = select(IndexedRecord.seq).where(*filters).order_by(order).offset(page * size).limit(size + 1)
            rows = self.s.exec(stmt.where(col(IndexedRecord.seq).in_(seqs))).all()
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
        stmt = select(IndexedBatch).order_by(col(IndexedBatch.seq).desc()).offset(page * size).limit(size + 1)
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
        """A page of the addresses that earned or withdrew (AccountRewards), the most accrued first."""
        stmt = select(AccountTotal).order_by(col(AccountTotal.accrued_rank).desc(), AccountTotal.account)
        return _page([_account(t) for t in self.s.exec(stmt.offset(page * size).limit(size + 1)).all()], page, size)

    def account_count(self) -> int:
        return self.s.exec(select(func.count()).select_from(AccountTotal)).one()

    def contributors(self, page: int, size: int) -> Page:
        """A page of (address, wei accrued as a dataset contributor), the most first."""
        stmt = (
            select(AccountTotal.account, AccountTotal.dataset)
            .where(AccountTotal.dataset_rank > ZERO_RANK)
            .order_by(col(AccountTotal.dataset_rank).desc(), AccountTotal.account)
        )
        rows = self.s.exec(stmt.offset(page * size).limit(size + 1)).all()
        return _page([(a, int(d)) for a, d in rows], page, size)

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
        stmt = (
            select(IndexedReward)
            .where(IndexedReward.account == account)
            .order_by(col(IndexedReward.id).desc())
            .offset(page * size)
            .limit(size + 1)
        )
        return _page([_reward(r) for r in self.s.exec(stmt).all()], page, size)

    def batches_earned_in(self, account: str) -> int:
        stmt = select(func.count(func.distinct(IndexedReward.batch_id))).where(IndexedReward.account == account)
        return self.s.exec(stmt).one()

    def money(self, account: str, page: int, size: int) -> Page:
        stmt = (
            select(IndexedMoney)
            .where(IndexedMoney.account == account)
            .order_by(col(IndexedMoney.id).desc())
            .offset(page * size)
            .limit(size + 1)
        )
        rows = self.s.exec(stmt).all()
        return _page([MoneyEvent(m.kind, m.account, int(m.amount), m.block, m.tx_hash) for m in rows], page, size)

    # ------------------------------------------------------------------ plots

    def top_adapters(self, n: int) -> list[tuple[str, int]]:
        """The n adapters (ids) that served the most tokens, with their tokens."""
        rows = self.s.exec(select(Usage).where(Usage.kind == "adapter")).all()
        ranked = sorted(((u.key, int(u.prompt_tokens) + int(u.completion_tokens)) for u in rows), key=lambda kv: -kv[1])
        return ranked[:n]

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
