"""Explorer: the chain client, the ledger database, the index (kept up by its refresher) and the checks;
View: one page's questions, answered from one snapshot of the index.

Pages never refresh the index: the refresher does, in the background, and each page reads what the index
holds when it is asked. Chain values shown beside the index's (ledger totals, rewardsOf, balances) are read
at the indexed block, so that they add up with the events shown.
"""

from __future__ import annotations

import logging
import tempfile
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from eth_utils import is_hex_address, to_checksum_address
from sqlmodel import Session
from web3.exceptions import TransactionNotFound

from common.wire import is_id
from devnet.explorer.decode import Web3Events
from devnet.explorer.index import ChainIndex
from devnet.explorer.index_db import IndexDatabase
from devnet.explorer.layout import short, when
from devnet.explorer.plots import MAX_SERIES, Point
from devnet.explorer.proof import ProofCheck, check_record_proof
from devnet.explorer.queries import IndexReads, Page, RecordView
from devnet.explorer.refresher import Refresher
from devnet.explorer.settings import DEFAULT_CONFIRMATIONS, ExplorerConfig
from devnet.explorer.signature import SignatureCheck, check_record_signature
from devnet.explorer.store import LedgerStore, open_ledger_db
from ledger.chain import ChainClient
from ledger.deployment import Deployment
from ledger.log_reader import MAX_LOGS, MAX_SPAN
from ledger.models import UsageRecord
from ledger.rewards import RewardsSummary
from ledger.transport import rpc_guard
from ledger.types import BASE_MODEL_ADAPTER_ID, RewardBalance, SettleRecord

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RecordDetail:
    """Everything known about one request id: on chain (maybe several events) and in the database."""

    request_id: str
    chain: list[RecordView]
    row: UsageRecord | None
    proof: ProofCheck | None
    signature: SignatureCheck | None


class _Lazy(Sequence):
    """A list built on first use: the settled records of a batch explain a failed proof only, and building
    them (a SettleRecord per record) is most of a verified record page's time otherwise."""

    def __init__(self, load: Callable[[], list]) -> None:
        self._load, self._items = load, None

    def _all(self) -> list:
        if self._items is None:
            self._items = self._load()
        return self._items

    def __len__(self) -> int:
        return len(self._all())

    def __getitem__(self, i):
        return self._all()[i]


def _named(adapter, owner: str | None) -> str:
    """A search hit's label: the name, its version and whose name it is (a stranger's "alice/capitals-pro" read as
    alice's without it)."""
    return f"{adapter.name} {adapter.version} (name owner {short(owner, 6) if owner else 'unknown'})"


class Explorer:
    """One deployment, one ledger database, one index. `start()` runs the refresher; `view()` opens a page's
    snapshot. Without a data dir the index lives in a temporary folder, rebuilt at each start."""

    def __init__(
        self,
        client: ChainClient,
        store: LedgerStore,
        *,
        data_dir: Path | None = None,
        confirmations: int = DEFAULT_CONFIRMATIONS,
        refresh_interval: float = 1.0,
        max_logs: int = MAX_LOGS,
        max_span: int = MAX_SPAN,
    ) -> None:
        self.client = client
        self.store = store
        self._tmp = tempfile.TemporaryDirectory(prefix="loramesh-explorer-") if data_dir is None else None
        self.db = IndexDatabase(Path(self._tmp.name) if self._tmp else Path(data_dir))
        self.index = ChainIndex(client, self.db, confirmations=confirmations, max_logs=max_logs, max_span=max_span)
        self.refresher = Refresher(self.index, refresh_interval)
        self.events = Web3Events([client.registry, client.ledger])
        # what depends on the index alone (the plots), by the index's position: one entry per name
        self.by_position: dict[str, tuple[tuple, str]] = {}

    @classmethod
    def open(cls, config: ExplorerConfig) -> Explorer:
        """Check the chain matches the deployment file and the database is a ledger database."""
        deployment = Deployment.load(config.deployment)
        client = ChainClient.from_deployment(deployment, rpc_url=config.rpc_url, check=True)
        return cls(
            client,
            LedgerStore(open_ledger_db(config.db_url)),
            data_dir=config.index_dir,
            confirmations=config.confirmations,
            refresh_interval=config.refresh_interval,
        )

    def start(self) -> None:
        self.refresher.start()

    def close(self) -> None:
        self.refresher.stop()
        self.db.dispose()
        self.store.engine.dispose()
        if self._tmp is not None:
            self._tmp.cleanup()

    def refresh(self) -> int:
        """Index new blocks now, in this thread (tools and tests; pages never call it)."""
        return self.index.refresh()

    def wait_synced(self, timeout: float = 60.0) -> None:
        self.refresher.wait_synced(timeout)

    @contextmanager
    def view(self) -> Iterator[View]:
        """One page's snapshot of the index (one read transaction), closed after the page is rendered."""
        self.refresher.wake()
        with Session(self.db.reader) as s:
            yield View(self, IndexReads(s))


class View:
    """What one page asks: the index's snapshot `q`, the chain client and the ledger database."""

    def __init__(self, explorer: Explorer, q: IndexReads) -> None:
        self.explorer = explorer
        self.client = explorer.client
        self.store = explorer.store
        self.q = q
        self._names: dict[str, str | None] = {}

    # ------------------------------------------------------------------ the index's position

    def cached(self, name: str, render: Callable[[], str]) -> str:
        """`render()`, or what it gave at the same position of the index (the plots: the index only grows, so
        its position says whether they changed)."""
        c = self.q.cursor()
        position = (c.block, c.block_hash, c.records, c.batches) if c else None
        hit = self.explorer.by_position.get(name)
        if hit is not None and hit[0] == position:
            return hit[1]
        out = render()
        self.explorer.by_position[name] = (position, out)
        return out

    @property
    def indexed_block(self) -> int:
        c = self.q.cursor()
        return c.block if c else self.client.deployment.deploy_block - 1

    @property
    def head(self) -> int:
        c = self.q.cursor()
        return c.head if c else 0

    @property
    def confirmations(self) -> int:
        return self.explorer.index.confirmations

    @property
    def refresh_error(self) -> str | None:
        return self.explorer.refresher.last_error

    # ------------------------------------------------------------------ chain values at the indexed block

    def _at(self, fn):
        """A contract call at the indexed block (the latest one before the first pass)."""
        block = self.indexed_block
        with rpc_guard(self.client.rpc_url):
            return fn.call(block_identifier=block if block >= self.client.deployment.deploy_block else "latest")

    def totals(self) -> dict[str, int]:
        """The ledger's money counters and balance, at the indexed block."""
        f = self.client.ledger.functions
        out = {
            k: self._at(getattr(f, "total" + k.capitalize())())
            for k in ("deposited", "accrued", "withdrawn", "reclaimed")
        }
        out["balance"] = self.balance(self.client.ledger.address)
        return out

    def balance(self, address: str) -> int:
        block = self.indexed_block
        with rpc_guard(self.client.rpc_url):
            return self.client.w3.eth.get_balance(
                to_checksum_address(address), block if block >= self.client.deployment.deploy_block else "latest"
            )

    def rewards_summary(self, address: str) -> RewardsSummary:
        """rewardsOf at the indexed block, split by the index's accruals (as ledger.rewards.rewards_summary
        does from every event)."""
        address = to_checksum_address(address)
        bal = RewardBalance(*self._at(self.client.ledger.functions.rewardsOf(address)))
        by_role: dict[str, int] = defaultdict(int)
        by_adapter: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for a in self.q.accruals(account=address):
            by_role[a.role] += int(a.amount)
            by_adapter[a.adapter_id][a.role] += int(a.amount)
        return RewardsSummary(
            address,
            bal.available,
            bal.accrued,
            bal.withdrawn,
            dict(by_role),
            {k: dict(v) for k, v in by_adapter.items()},
            self.q.batches_earned_in(address),
        )

    # ------------------------------------------------------------------ names

    def adapter_name(self, adapter_id: str) -> str | None:
        """The adapter's "name version" if registered ("base model" for the zero id), else None."""
        if adapter_id == BASE_MODEL_ADAPTER_ID:
            return "base model"
        if adapter_id not in self._names:
            self._names.update(dict.fromkeys([adapter_id]) | self.q.adapter_names({adapter_id}))
        return self._names[adapter_id]

    def learn_names(self, adapter_ids) -> None:
        """Look up the names of many adapters in one query (a page of records names each adapter it shows)."""
        missing = {a for a in adapter_ids if a not in self._names and a != BASE_MODEL_ADAPTER_ID}
        if missing:
            self._names.update(dict.fromkeys(missing) | self.q.adapter_names(missing))

    def predecessors(self, adapter_id: str, limit: int) -> list[str]:
        """Adapter ids this one descends from, nearest first, at most `limit` (one query each, and anyone can register
        thousands of versions: a page shows some and links on); stops at unknown ids and cycles."""
        chain, seen = [], {adapter_id}
        cur = self.q.adapter(adapter_id)
        while cur is not None and cur.predecessor not in seen and len(chain) < limit:
            nxt = self.q.adapter(cur.predecessor)
            if nxt is None:
                break
            chain.append(cur.predecessor)
            seen.add(cur.predecessor)
            cur = nxt
        return chain

    def successors(self, adapter_id: str, limit: int) -> list[str]:
        return [a.adapter_id for a in self.q.successors(adapter_id, limit)]

    # ------------------------------------------------------------------ plot series

    def tokens_series(self) -> dict[str, list[Point]]:
        """Cumulative tokens served per adapter, one point per settlement block (top adapters)."""
        top = [a for a, _ in self.q.top_adapters(MAX_SERIES)]
        per_block: dict[str, dict[int, int]] = {a: defaultdict(int) for a in top}
        for adapter, block, tokens in self.q.tokens_by_block(top):
            per_block[adapter][block] += tokens
        self.learn_names(top)
        return self._cumulative(per_block, lambda a: self.adapter_name(a) or a[:10])

    def rewards_series(self) -> dict[str, list[Point]]:
        """Cumulative rewards in ETH per contributor (adapter owners and dataset payees), the top MAX_SERIES."""
        per_block: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        roles: dict[str, set[str]] = defaultdict(set)
        top = self.q.top_contributors(MAX_SERIES)
        for account, role, block, amount in self.q.contributor_rewards_by_block(top):
            per_block[account][block] += amount
            roles[account].add("owner" if role == "adapter_owner" else "dataset")

        def label(a: str) -> str:
            return f"{a[:6]}…{a[-4:]} ({', '.join(sorted(roles[a]))})"

        return self._cumulative(per_block, label, scale=1e-18)

    def _cumulative(self, per_block, label, scale: float = 1.0) -> dict[str, list[Point]]:
        top = sorted(per_block, key=lambda k: -sum(per_block[k].values()))[:MAX_SERIES]
        times = self.q.block_times({b for k in top for b in per_block[k]})
        out = {}
        for key in top:
            total, pts = 0, []
            for block in sorted(per_block[key]):
                total += per_block[key][block]
                note = f", {when(times[block])}" if times.get(block) else ""
                pts.append(Point(block, total * scale, note))
            out[label(key)] = pts
        return out

    # ------------------------------------------------------------------ records

    def record_detail(self, request_id: str) -> RecordDetail | None:
        """A request's on-chain events, database row, proof check and signature check; None if unknown."""
        chain = self.q.records_of_request(request_id)
        row = self.store.record(request_id)
        if not chain and row is None:
            return None
        proof = signature = None
        if row is not None:
            node = self.q.node(row.node_id)
            signature = check_record_signature(row, node.peer_id if node else None)
            batch = self.q.batch(row.batch_id) if row.batch_id else None
            batch_rows = self.store.batch_records(row.batch_id) if row.batch_id else []
            batch_id = row.batch_id
            settled = _Lazy(
                lambda: [
                    SettleRecord(r.request_id, r.adapter_id, r.node_id, r.prompt_tokens, r.completion_tokens)
                    for r in (self.q.batch_records(batch_id) if batch is not None else [])
                ]
            )
            proof = check_record_proof(self.client, row, batch_rows, batch.merkle_root if batch else None, settled)
        return RecordDetail(request_id, chain, row, proof, signature)

    # ------------------------------------------------------------------ search

    def search(self, query: str) -> tuple[str | None, list[tuple[str, str, str]], bool]:
        """(a URL when exactly one thing matches, the matches as (kind, label, url), whether the search by part of
        an adapter's name was cut short: IndexReads.search_adapters)."""
        # no control characters: SQLite's LIKE ends its pattern at a NUL, so "\0" matched every adapter
        q = "".join(ch for ch in query if unicodedata.category(ch) != "Cc").strip()
        hits: list[tuple[str, str, str]] = []
        low = q.lower()
        if is_hex_address(q):  # any case; a wrong checksum is most likely a hand-typed address
            addr = to_checksum_address(q.lower())
            hits.append(("address", addr, f"/address/{addr}"))
        elif is_id(low):
            if self.q.has_record(low) or self.store.record(low) is not None:
                hits.append(("record", low, f"/records/{low}"))
            for kind, found, prefix in (
                ("adapter", self.q.adapter(low), "adapters"),
                ("dataset", self.q.dataset(low), "datasets"),
                ("node", self.q.node(low), "nodes"),
                ("batch", self.q.batch(low), "batches"),
            ):
                if found is not None:
                    hits.append((kind, low, f"/{prefix}/{low}"))
            if self.q.has_tx(low) or self.store.batch_by_tx(low) is not None:
                hits.append(("transaction", low, f"/tx/{low}"))
            elif not hits and self._is_tx(low):
                hits.append(("transaction", low, f"/tx/{low}"))
        cut = False
        if q and not hits:
            adapters, cut = self.q.search_adapters(low)
            owners = self.q.name_owners({a.name for a in adapters})
            for a in adapters:
                hits.append(("adapter", _named(a, owners.get(a.name)), f"/adapters/{a.adapter_id}"))
        return (hits[0][2] if len(hits) == 1 and not cut else None), hits, cut

    def transaction(self, tx_hash: str, *, page: int = 0, size: int = 100):
        """(transaction, receipt or None while pending, a Page of our decoded events), or None when unknown.
        The receipt is read raw and only the page's events are decoded: a batch's transaction holds one
        event per record."""
        w3 = self.client.w3
        with rpc_guard(self.client.rpc_url):
            try:
                tx = w3.eth.get_transaction(tx_hash)
            except TransactionNotFound:
                return None
            answer = w3.provider.make_request("eth_getTransactionReceipt", [tx_hash])
        raw = answer.get("result")
        receipt = None
        ours: list[dict] = []
        if raw:
            receipt = {"status": int(raw["status"], 16), "gasUsed": int(raw["gasUsed"], 16)}
            addresses = {self.client.registry.address.lower(), self.client.ledger.address.lower()}
            ours = [lg for lg in raw.get("logs") or [] if lg["address"].lower() in addresses]
        shown = ours[page * size : (page + 1) * size]
        events = [ev for ev in map(self.explorer.events.decode_raw, shown) if ev is not None]
        return tx, receipt, Page(events, page, size, len(ours) > (page + 1) * size), len(ours)

    def _is_tx(self, tx_hash: str) -> bool:
        """Whether the chain knows `tx_hash` (an id: search checks its form first)."""
        try:
            with rpc_guard(self.client.rpc_url):
                return self.client.w3.eth.get_transaction(tx_hash) is not None
        except TransactionNotFound:
            return False
