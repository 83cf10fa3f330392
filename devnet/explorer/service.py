"""Explorer: the chain index, the ledger database and the checks, behind the questions pages ask."""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass, field

from eth_utils import is_hex_address, to_checksum_address
from web3.exceptions import TransactionNotFound

from common.wire import is_id
from devnet.explorer.index import ChainIndex, RecordView
from devnet.explorer.layout import when
from devnet.explorer.plots import MAX_SERIES, Point
from devnet.explorer.proof import ProofCheck, check_record_proof
from devnet.explorer.settings import ExplorerConfig
from devnet.explorer.signature import SignatureCheck, check_record_signature
from devnet.explorer.store import LedgerStore, open_ledger_db
from ledger.chain import ChainClient
from ledger.deployment import Deployment
from ledger.models import UsageRecord
from ledger.transport import rpc_guard
from ledger.types import BASE_MODEL_ADAPTER_ID, SettleRecord

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Usage:
    records: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    fees: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, r: RecordView) -> None:
        self.records += 1
        self.prompt_tokens += r.prompt_tokens
        self.completion_tokens += r.completion_tokens
        self.fees += r.fee


@dataclass(slots=True)
class AccountRewards:
    """Accrued (from RewardAccrued events) and withdrawn (RewardWithdrawn) per address."""

    address: str
    accrued: int = 0
    withdrawn: int = 0
    by_role: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    by_adapter: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))


@dataclass(slots=True)
class RecordDetail:
    """Everything known about one request id: on chain (maybe several events) and in the database."""

    request_id: str
    chain: list[RecordView]
    row: UsageRecord | None
    proof: ProofCheck | None
    signature: SignatureCheck | None


class Explorer:
    """One deployment and one ledger database. Each request refreshes the index first and reads it holding
    `lock` (devnet.explorer.routes.fresh)."""

    def __init__(self, client: ChainClient, store: LedgerStore) -> None:
        self.client = client
        self.store = store
        self.index = ChainIndex(client)
        self.lock = threading.RLock()  # one request at a time refreshes and reads the index

    @classmethod
    def open(cls, config: ExplorerConfig) -> Explorer:
        """Check the chain matches the deployment file and the database is a ledger database."""
        deployment = Deployment.load(config.deployment)
        client = ChainClient.from_deployment(deployment, rpc_url=config.rpc_url, check=True)
        return cls(client, LedgerStore(open_ledger_db(config.db_url)))

    def close(self) -> None:
        self.store.engine.dispose()

    def refresh(self) -> int:
        """Index new blocks; returns the head block."""
        return self.index.refresh()

    # ------------------------------------------------------------------ aggregates

    def usage_by(self, key: str) -> dict[str, Usage]:
        """Usage summed by a RecordView attribute ("adapter_id" or "node_id")."""
        out: dict[str, Usage] = defaultdict(Usage)
        for r in self.index.records:
            out[getattr(r, key)].add(r)
        return out

    def accounts(self) -> dict[str, AccountRewards]:
        """Every address that earned or withdrew, with its totals."""
        out: dict[str, AccountRewards] = {}
        for rw in self.index.rewards:
            acc = out.setdefault(rw.account, AccountRewards(rw.account))
            acc.accrued += rw.amount
            acc.by_role[rw.role] += rw.amount
            acc.by_adapter[rw.adapter_id][rw.role] += rw.amount
        for m in self.index.money:
            if m.kind == "withdrawal":
                out.setdefault(m.account, AccountRewards(m.account)).withdrawn += m.amount
        return out

    def dataset_rewards(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for rw in self.index.rewards:
            if rw.role == "dataset":
                out[rw.subject_id] += rw.amount
        return out

    def predecessors(self, adapter_id: str) -> list[str]:
        """Adapter ids this one descends from, nearest first (stops at unknown ids and cycles)."""
        chain, seen = [], {adapter_id}
        cur = self.index.adapters.get(adapter_id)
        while cur is not None and cur.predecessor in self.index.adapters and cur.predecessor not in seen:
            chain.append(cur.predecessor)
            seen.add(cur.predecessor)
            cur = self.index.adapters[cur.predecessor]
        return chain

    def successors(self, adapter_id: str) -> list[str]:
        return [a.adapter_id for a in self.index.adapters.values() if a.predecessor == adapter_id]

    def adapter_name(self, adapter_id: str) -> str | None:
        """The adapter's "name version" if registered ("base model" for the zero id), else None."""
        if adapter_id == BASE_MODEL_ADAPTER_ID:
            return "base model"
        a = self.index.adapters.get(adapter_id)
        return f"{a.name} {a.version}" if a else None

    # ------------------------------------------------------------------ plot series

    def tokens_series(self) -> dict[str, list[Point]]:
        """Cumulative tokens served per adapter, one point per settlement block (top adapters)."""
        per_block: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        for r in self.index.records:
            per_block[r.adapter_id][r.block] += r.tokens
        return self._cumulative(per_block, lambda a: self.adapter_name(a) or a[:10])

    def rewards_series(self) -> dict[str, list[Point]]:
        """Cumulative rewards in ETH per contributor (adapter owners and dataset payees)."""
        per_block: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        roles: dict[str, set[str]] = defaultdict(set)
        for rw in self.index.rewards:
            if rw.role != "node":
                per_block[rw.account][rw.block] += rw.amount
                roles[rw.account].add("owner" if rw.role == "adapter_owner" else "dataset")

        def label(a: str) -> str:
            return f"{a[:6]}…{a[-4:]} ({', '.join(sorted(roles[a]))})"

        return self._cumulative(per_block, label, scale=1e-18)

    def _cumulative(self, per_block, label, scale: float = 1.0) -> dict[str, list[Point]]:
        times = {b.block: b.timestamp for b in self.index.batches.values()}
        top = sorted(per_block, key=lambda k: -sum(per_block[k].values()))[:MAX_SERIES]
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
        chain = list(self.index.records_by_request.get(request_id, []))
        row = self.store.record(request_id)
        if not chain and row is None:
            return None
        proof = signature = None
        if row is not None:
            node = self.index.nodes.get(row.node_id)
            signature = check_record_signature(row, node.peer_id if node else None)
            batch = self.index.batches.get(row.batch_id) if row.batch_id else None
            batch_rows = self.store.batch_records(row.batch_id) if row.batch_id else []
            settled = [
                SettleRecord(r.request_id, r.adapter_id, r.node_id, r.prompt_tokens, r.completion_tokens)
                for r in self.index.records_by_batch.get(row.batch_id or "", [])
            ]
            proof = check_record_proof(self.client, row, batch_rows, batch.merkle_root if batch else None, settled)
        return RecordDetail(request_id, chain, row, proof, signature)

    # ------------------------------------------------------------------ search

    def search(self, query: str) -> tuple[str | None, list[tuple[str, str, str]]]:
        """(a URL when exactly one thing matches, the matches as (kind, label, url))."""
        q = query.strip()
        hits: list[tuple[str, str, str]] = []
        low = q.lower()
        if is_hex_address(q):  # any case; a wrong checksum is most likely a hand-typed address
            addr = to_checksum_address(q.lower())
            hits.append(("address", addr, f"/address/{addr}"))
        elif is_id(low):
            idx = self.index
            if low in idx.records_by_request or self.store.record(low) is not None:
                hits.append(("record", low, f"/records/{low}"))
            for kind, table, prefix in (
                ("adapter", idx.adapters, "adapters"),
                ("dataset", idx.datasets, "datasets"),
                ("node", idx.nodes, "nodes"),
                ("batch", idx.batches, "batches"),
            ):
                if low in table:
                    hits.append((kind, low, f"/{prefix}/{low}"))
            if low in idx.tx_events or self.store.batch_by_tx(low) is not None:
                hits.append(("transaction", low, f"/tx/{low}"))
            elif not hits and self._is_tx(low):
                hits.append(("transaction", low, f"/tx/{low}"))
        if q and not hits:
            for a in self.index.adapters.values():
                if low in a.name.lower():
                    hits.append(("adapter", f"{a.name} {a.version}", f"/adapters/{a.adapter_id}"))
        return (hits[0][2] if len(hits) == 1 else None), hits

    def transaction(self, tx_hash: str):
        """(transaction, receipt or None while pending, our decoded events), or None when unknown."""
        w3 = self.client.w3
        with rpc_guard(self.client.rpc_url):
            try:
                tx = w3.eth.get_transaction(tx_hash)
            except TransactionNotFound:
                return None
            try:
                receipt = w3.eth.get_transaction_receipt(tx_hash)
            except TransactionNotFound:
                receipt = None
        events = [ev for ev in map(self.index.decode, receipt["logs"] if receipt else []) if ev is not None]
        return tx, receipt, events

    def _is_tx(self, tx_hash: str) -> bool:
        """Whether the chain knows `tx_hash` (an id: search checks its form first)."""
        try:
            with rpc_guard(self.client.rpc_url):
                return self.client.w3.eth.get_transaction(tx_hash) is not None
        except TransactionNotFound:
            return False
