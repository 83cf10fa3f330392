"""ChainIndex: our two contracts' events, decoded into the explorer's index database, block range by block range.

`refresh()` reads the chain's head, then the logs of every block after the cursor up to head minus
`confirmations` (ledger.log_reader: queries bounded in blocks and logs, their span adapting), and applies
each query's logs in one write transaction that also moves the cursor, so the index always stands at the end
of a whole block and a restart resumes right after it. Before reading on, it checks that the chain still is
the one indexed: another deployment, a head below the cursor (the chain was reset) or a cursor block whose hash changed
(a reorg deeper than the confirmations) empties the index, which is then rebuilt from the deploy block.

Sums the pages show (usage per adapter and node, accruals per account, tokens per block) are added up here,
exactly (Python ints, stored as decimal text), so that no page reads more rows than it shows; so are the numbers a
page of a list is found by (devnet.explorer.tables: ordinals per key, the cursor's counts, the ranks).
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable

from sqlalchemy import func
from sqlalchemy.exc import DataError, IntegrityError, NoResultFound
from sqlmodel import Session, select

from devnet.explorer import decode as D
from devnet.explorer.index_db import IndexDatabase
from devnet.explorer.settings import DEFAULT_CONFIRMATIONS
from devnet.explorer.tables import (
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
    IndexedReward,
    IndexedTx,
    NameRow,
    NodeRow,
    SettlerState,
    Usage,
    UsageBlock,
    add_adapter_name,
    rank,
    to_i64,
)
from ledger import registry_events as RE
from ledger.chain import ChainClient
from ledger.errors import ChainUnavailable
from ledger.log_reader import MAX_LOGS, MAX_SPAN, LogChunk, LogReader, raw_query
from ledger.transport import rpc_guard, shown_url

log = logging.getLogger(__name__)


_INSERT_RECORDS = (
    "INSERT INTO explorer_records (request_id, batch_id, adapter_id, node_id, prompt_tokens, completion_tokens, "
    "fee, block, log_index, tx_hash, adapter_ord, node_ord, pair_ord) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class IndexMoved(Exception):
    """Another explorer on the same data dir moved the cursor meanwhile: this refresh step is dropped."""


class ChainMoved(Exception):
    """The last block of a chunk changed while its logs were read (a reorg): the step is dropped, read again."""


class ChainIndex:
    """Keeps the index database up to the chain's finalized head; the refresher is its only caller."""

    def __init__(
        self,
        client: ChainClient,
        db: IndexDatabase,
        *,
        confirmations: int = DEFAULT_CONFIRMATIONS,
        max_logs: int = MAX_LOGS,
        max_span: int = MAX_SPAN,
    ) -> None:
        if confirmations < 0:
            raise ValueError(f"confirmations must be 0 or more, got {confirmations}")
        self.client = client
        self.db = db
        self.confirmations = confirmations
        self.topics = D.topic_map([client.registry, client.ledger])
        self.web3_events = D.Web3Events([client.registry, client.ledger])
        self.reader = LogReader(client.rpc_url, max_logs=max_logs, max_span=max_span)
        self.query = raw_query(client.w3, client.rpc_url, {"address": [client.registry.address, client.ledger.address]})
        self.head = 0  # the chain's head at the last refresh
        # (last block, its hash) of this thread's latest log query: the refresher and a tool's `refresh` may run at
        # once, and one's query taken for the other's was a reorg that cut a pass short
        self._asked = threading.local()

    # ------------------------------------------------------------------ the cursor

    def cursor(self) -> IndexCursor | None:
        with Session(self.db.reader) as s:
            return s.get(IndexCursor, 1)

    def _fresh_cursor(self) -> IndexCursor:
        d = self.client.deployment
        return IndexCursor(
            chain_id=d.chain_id,
            registry_address=d.registry,
            ledger_address=d.ledger,
            deploy_block=d.deploy_block,
            block=d.deploy_block - 1,
        )

    def _matches(self, c: IndexCursor) -> bool:
        d = self.client.deployment
        return (c.chain_id, c.registry_address, c.ledger_address, c.deploy_block) == (
            d.chain_id,
            d.registry,
            d.ledger,
            d.deploy_block,
        )

    def reset(self, why: str) -> IndexCursor:
        """Empty the index: it is rebuilt from the deploy block."""
        level = logging.INFO if why == "no index yet" else logging.WARNING
        log.log(level, "explorer index: %s; building it from block %d", why, self.client.deployment.deploy_block)
        fresh = self._fresh_cursor()
        fresh.head = self.head  # the chain's head now: an empty index is not "synced" with it
        with Session(self.db.writer) as s, s.begin():
            self.db.clear(s.connection())
            s.add(fresh)
        return self.cursor()

    # ------------------------------------------------------------------ refresh

    def refresh(self, stop: Callable[[], bool] = lambda: False) -> int:
        """Index every block up to head - confirmations; returns the last block indexed."""
        with rpc_guard(self.client.rpc_url):
            self.head = self.client.w3.eth.block_number
        cursor = self.cursor()
        if cursor is None or not self._matches(cursor):
            cursor = self.reset("it was built from another deployment" if cursor else "no index yet")
        elif cursor.block > self.head:
            cursor = self.reset(f"the chain's head {self.head} is below indexed block {cursor.block} (chain reset)")
        elif not self.on_canonical_chain(cursor):
            cursor = self.reset(f"block {cursor.block} is not the one indexed (a reorg)")
        if cursor.span:
            self.reader.span = min(cursor.span, self.reader.max_span)
        target = self.head - self.confirmations
        last = cursor.block
        try:
            for chunk in self.reader.chunks(cursor.block + 1, target, self._pinned_query, stop):
                last = self._apply(chunk, expected=last)
        except IndexMoved:
            log.info("explorer index: moved by another explorer on the same data dir; reading on from there")
            return self.cursor().block
        except ChainMoved as e:
            log.info("explorer index: %s; the next refresh reads those blocks again", e)
            return last
        if last == cursor.block and cursor.head != self.head:
            with Session(self.db.writer) as s, s.begin():
                row = s.get(IndexCursor, 1)
                row.head = self.head
        return last

    def on_canonical_chain(self, cursor: IndexCursor) -> bool:
        """Whether the cursor's block is still the chain's block at that height (False after a reorg there)."""
        return not cursor.block_hash or self._block(cursor.block)[0] == cursor.block_hash

    def _pinned_query(self, start: int, end: int) -> list:
        """The logs of start..end, with the hash `end` had just before they were asked: _apply reads it again
        after, as ledger.mirror.sync_registry does. Read after the logs alone, a reorg between the two reads
        kept the dropped blocks' logs under the new chain's hash, which every later reorg check then passed."""
        self._asked.query = (end, self._block_hash(end))
        return self.query(start, end)

    def _block_hash(self, number: int) -> str | None:
        """A block's hash, None when the chain has no such block (it got shorter)."""
        found = self._block_or_none(number)
        return found[0] if found else None

    def _block(self, number: int) -> tuple[str, int]:
        """(hash, timestamp) of a block."""
        found = self._block_or_none(number)
        if found is None:
            raise ChainUnavailable(f"chain at {shown_url(self.client.rpc_url)} has no block {number}")
        return found

    def _block_or_none(self, number: int) -> tuple[str, int] | None:
        with rpc_guard(self.client.rpc_url):
            answer = self.client.w3.provider.make_request("eth_getBlockByNumber", [hex(number), False])
        block = answer.get("result")
        return (block["hash"], int(block["timestamp"], 16)) if block else None

    # ------------------------------------------------------------------ applying one chunk

    def _apply(self, chunk: LogChunk, *, expected: int) -> int:
        """Apply the logs of one query and move the cursor to its last block, in one write transaction; ChainMoved
        when that block is not the one it was before the logs were read (they may be of a dropped chain)."""
        last_hash = self._block_hash(chunk.last)
        if last_hash is None or getattr(self._asked, "query", None) != (chunk.last, last_hash):
            raise ChainMoved(f"block {chunk.last} changed while its logs were read (a reorg)")
        step = _Step(self)
        for lg in chunk.logs:
            step.add(lg)
        with Session(self.db.writer) as s, s.begin():
            cursor = s.get(IndexCursor, 1)
            if cursor is None or cursor.block != expected:
                raise IndexMoved
            step.write(s)
            cursor.block, cursor.block_hash, cursor.head = chunk.last, last_hash, self.head
            if step.last_log is not None and step.last_log[0] == chunk.last:
                cursor.log_index = step.last_log[1]
            else:
                cursor.log_index = -1
            cursor.span = self.reader.span
            cursor.records += len(step.records)
            cursor.batches += len(step.batches)
            for what, n in step.added.items():  # the lists' counts (tables.IndexCursor)
                setattr(cursor, what, getattr(cursor, what) + n)
        return chunk.last


class _Step:
    """The rows and sums of one chunk of logs, gathered before the write transaction opens."""

    def __init__(self, index: ChainIndex) -> None:
        self.index = index
        self.records: list[tuple] = []
        self.record_keys: list[tuple[str, str]] = []  # each record's (adapter, node), for its ordinals
        self.added: dict[str, int] = defaultdict(int)  # rows added to the lists the cursor counts
        # (adapter, node, block) -> [records, prompt, completion, fees]: every usage sum derives from these
        self.usage: dict[tuple[str, str, int], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self.batches: list[dict] = []
        self.rewards: list[dict] = []
        self.money: list[IndexedMoney] = []
        self.settlers: dict[str, bool] = {}
        self.registry: list[tuple[RE.RegistryUpdate, int, str]] = []
        self.txs: dict[str, tuple[int, dict[str, int]]] = {}
        self.timestamps: dict[int, int] = {}
        self.last_log: tuple[int, int] | None = None
        self._prev = (-1, -1)

    def add(self, lg: dict) -> None:
        topics = lg.get("topics")
        name = self.index.topics.get(topics[0].lower()) if topics else None
        if name is None:
            return
        block, log_index, tx = int(lg["blockNumber"], 16), int(lg["logIndex"], 16), lg["transactionHash"].lower()
        if (block, log_index) <= self._prev:
            raise D.IndexDecodeError(f"the node returned logs out of order at block {block}, log {log_index}")
        self._prev = self.last_log = (block, log_index)
        seen = self.txs.get(tx)
        if seen is None:
            seen = self.txs[tx] = (block, {})
        seen[1][name] = seen[1].get(name, 0) + 1
        if name == "RecordsSettled":  # every record of a batch, in leaf order (rows keep it: seq ascends)
            tx_bytes = bytes.fromhex(tx[2:])
            for r in D.records_settled(lg):
                self.records.append(
                    (
                        r.request_id,
                        r.batch_id,
                        bytes.fromhex(r.adapter_hex[2:]),
                        bytes.fromhex(r.node_hex[2:]),
                        to_i64(r.prompt_tokens),
                        to_i64(r.completion_tokens),
                        str(r.fee),
                        block,
                        log_index,
                        tx_bytes,
                    )
                )
                self.record_keys.append((r.adapter_hex, r.node_hex))
                u = self.usage[(r.adapter_hex, r.node_hex, block)]
                u[0] += 1
                u[1] += r.prompt_tokens
                u[2] += r.completion_tokens
                u[3] += r.fee
        elif name == "RewardAccrued":
            self.rewards.append(D.reward_accrued(lg) | {"block": block, "tx_hash": tx})
        elif name == "BatchSettled":
            ts = lg.get("blockTimestamp")
            if ts is not None:
                self.timestamps[block] = int(ts, 16)
            self.batches.append(D.batch_settled(lg) | {"block": block, "tx_hash": tx})
        elif name in ("Deposited", "DepositReclaimed", "RewardWithdrawn"):
            kind, account, amount = D.money(lg, name)
            self.money.append(IndexedMoney(kind=kind, account=account, amount=str(amount), block=block, tx_hash=tx))
        elif name in ("SettlerGranted", "SettlerRevoked"):
            self.settlers[D.settler_of(lg, name)] = name == "SettlerGranted"
        elif name in RE.REGISTRY_EVENTS:
            ev = self.index.web3_events.decode_raw(lg)
            update = RE.registry_update(ev) if ev is not None else None
            if update is not None:
                self.registry.append((update, block, tx))

    # ------------------------------------------------------------------ writing

    def write(self, s: Session) -> None:
        conn = s.connection()
        if self.records:
            conn.exec_driver_sql(_INSERT_RECORDS, self._numbered_records(s))
        for b in self.batches:
            if b["block"] not in self.timestamps:
                self.timestamps[b["block"]] = self.index._block(b["block"])[1]
            s.add(
                IndexedBatch(
                    **{**b, "total_fees": str(b["total_fees"])},
                    timestamp=self.timestamps[b["block"]],
                )
            )
        self._write_rewards(s)
        self._write_totals(s)
        self._write_usage(s)
        last = _last_ordinals(s, IndexedMoney, {m.account for m in self.money})
        for m in self.money:
            last[m.account] += 1
            m.account_ord = last[m.account]
        s.add_all(self.money)
        for address, active in self.settlers.items():
            s.merge(SettlerState(address=address, active=active))
        for tx, (block, names) in self.txs.items():
            shown = ",".join(n if k == 1 else f"{n}×{k}" for n, k in names.items())
            row = s.get(IndexedTx, tx)
            if row is None:
                s.add(IndexedTx(tx_hash=tx, block=block, events=shown))
            else:  # a transaction split over two chunks cannot happen (blocks are whole); kept for safety
                row.events = f"{row.events},{shown}"
        for update, block, tx in self.registry:
            # each in a savepoint of its own: an update naming a row a left-out event never wrote (a dataset
            # registered with a name that is not UTF-8, then its payee changed) failed the whole chunk, and the
            # index stopped at that block for good; it is logged and skipped, as the gateway's mirror does
            try:
                with s.begin_nested():
                    _apply_registry(s, update, block, tx)
                    s.flush()
                if isinstance(update, RE.AdapterRegistered):
                    self.added["adapters"] += 1
                elif isinstance(update, RE.NameRegistered):
                    self.added["names"] += 1
            except (NoResultFound, AttributeError, IntegrityError, DataError) as e:
                why = (str(e).splitlines() or [type(e).__name__])[0][:300]
                log.error(
                    "registry %s at block %d (tx %s) cannot be indexed and is skipped: %s",
                    type(update).__name__,
                    block,
                    tx,
                    why,
                )

    def _write_totals(self, s: Session) -> None:
        """Each address's running totals (AccountTotal): this chunk's rewards by role, and its withdrawals."""
        adds: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for rw in self.rewards:
            adds[rw["account"]][rw["role"]] += rw["amount"]
        for m in self.money:
            if m.kind == "withdrawal":
                adds[m.account]["withdrawn"] += int(m.amount)
        for account, amounts in adds.items():
            row = s.get(AccountTotal, account)
            if row is None:
                row = AccountTotal(account=account)
                s.add(row)
                self.added["accounts"] += 1
            was_contributor = row.dataset_rank > ZERO_RANK
            # each a role (decode.reward_accrued takes only the ledger's three) or "withdrawn"
            for what, amount in amounts.items():
                row.add(what, amount)
            if row.dataset_rank > ZERO_RANK and not was_contributor:  # sums only grow: it stays one
                self.added["contributors"] += 1

    def _numbered_records(self, s: Session) -> list[tuple]:
        """The records' rows with their ordinals among their adapter's, their node's and their adapter's on
        their node (tables.IndexedRecord): counted on from the Usage sums of those keys, which this step's
        records are added to after (_write_usage), so the numbers run 1, 2, ... without gaps."""
        last: dict[tuple[str, str], int] = {}
        out = []
        for row, (adapter, node) in zip(self.records, self.record_keys):
            ords = []
            for key in (("adapter", adapter), ("node", node), ("node_adapter", node + adapter)):
                if key not in last:
                    u = s.get(Usage, key)
                    last[key] = u.records if u else 0
                last[key] += 1
                ords.append(last[key])
            out.append((*row, *ords))
        return out

    def _write_rewards(self, s: Session) -> None:
        sums: dict[tuple[str, str, str, str], list[int]] = defaultdict(lambda: [0, 0])
        last = _last_ordinals(s, IndexedReward, {rw["account"] for rw in self.rewards})
        for rw in self.rewards:
            last[rw["account"]] += 1
            s.add(IndexedReward(**{**rw, "amount": str(rw["amount"])}, account_ord=last[rw["account"]]))
            acc = sums[(rw["account"], rw["adapter_id"], rw["role"], rw["subject_id"])]
            acc[0] += rw["amount"]
            acc[1] += 1
        for (account, adapter, role, subject), (amount, count) in sums.items():
            row = s.get(Accrual, (account, adapter, role, subject))
            if row is None:
                s.add(
                    Accrual(
                        account=account,
                        adapter_id=adapter,
                        role=role,
                        subject_id=subject,
                        amount=str(amount),
                        batches=count,
                    )
                )
            else:
                row.amount, row.batches = str(int(row.amount) + amount), row.batches + count

    def _write_usage(self, s: Session) -> None:
        sums: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        blocks: dict[tuple[str, int], int] = defaultdict(int)
        for (adapter, node, block), u in self.usage.items():
            for key in (("all", ""), ("adapter", adapter), ("node", node), ("node_adapter", node + adapter)):
                acc = sums[key]
                for i in range(4):
                    acc[i] += u[i]
            blocks[(adapter, block)] += u[1] + u[2]
        if self.batches:
            sums[("batches", "")][0] += len(self.batches)
            sums[("batches", "")][3] += sum(b["total_fees"] for b in self.batches)
        if self.rewards:
            sums[("rewards", "")][0] += len(self.rewards)
            sums[("rewards", "")][3] += sum(rw["amount"] for rw in self.rewards)
        for (kind, key), (n, p, c, f) in sums.items():
            row = s.get(Usage, (kind, key))
            if row is None:
                row = Usage(kind=kind, key=key)
                s.add(row)
            row.records += n
            row.prompt_tokens = str(int(row.prompt_tokens) + p)
            row.completion_tokens = str(int(row.completion_tokens) + c)
            row.fees = str(int(row.fees) + f)
            row.tokens_rank = rank(int(row.prompt_tokens) + int(row.completion_tokens))
        for (adapter, block), tokens in blocks.items():
            row = s.get(UsageBlock, (adapter, block))
            if row is None:
                s.add(UsageBlock(adapter_id=adapter, block=block, tokens=str(tokens)))
            else:
                row.tokens = str(int(row.tokens) + tokens)


def _last_ordinals(s: Session, model, accounts: set[str]) -> dict[str, int]:
    """The last account_ord of each account's rows of `model` (IndexedReward, IndexedMoney), 0 for none: one seek
    each on its (account, account_ord) index. Asked before this step's rows are added."""
    return {a: s.exec(select(func.max(model.account_ord)).where(model.account == a)).one() or 0 for a in accounts}


def _history(s: Session, kind: str, key: str, block: int, tx: str, what: str) -> None:
    """Append a line to an entity's history (tables.HistoryLine), numbered on from its last: one seek on the
    primary key and one insert, never a read or rewrite of the lines before (a JSON list rewritten whole on each
    event made 10,000 price changes of one adapter take 232 s to index, red team). The last number is read, not
    counted in the step: a line of an event skipped in its savepoint leaves no gap."""
    last = s.exec(select(func.max(HistoryLine.ord)).where(HistoryLine.kind == kind, HistoryLine.key == key)).one()
    s.add(HistoryLine(kind=kind, key=key, ord=(last or 0) + 1, block=block, tx_hash=tx, what=what))


def _declare(s: Session, dataset_id: str, adapter_id: str, bps: int) -> None:
    """An adapter declares a dataset: numbered on from the dataset's last (tables.AdapterDataset.ord), one seek."""
    row = s.get(AdapterDataset, (dataset_id, adapter_id))
    if row is not None:  # named twice in one registration: the last share, as a merge kept it
        row.share_bps = bps
        return
    last = s.exec(select(func.max(AdapterDataset.ord)).where(AdapterDataset.dataset_id == dataset_id)).one()
    s.add(AdapterDataset(dataset_id=dataset_id, adapter_id=adapter_id, share_bps=bps, ord=(last or 0) + 1))


def _apply_registry(s: Session, u: RE.RegistryUpdate, block: int, tx: str) -> None:
    """A registry event's update (ledger.registry_events, as the gateway's mirror applies it) on the index's
    registry rows, with a line of history for the entity's page."""
    if isinstance(u, RE.DatasetRegistered):
        d = u.dataset
        s.add(
            DatasetRow(
                dataset_id=d.dataset_id,
                content_hash=d.content_hash,
                payee=d.payee,
                block=block,
                tx_hash=tx,
                name=d.name,
                contributor=d.contributor,
            )
        )
        _history(s, "dataset", d.dataset_id, block, tx, f"registered by its contributor {d.contributor} as {d.name!r}")
    elif isinstance(u, RE.DatasetPayeeChanged):
        d = s.exec(select(DatasetRow).where(DatasetRow.dataset_id == u.dataset_id)).one()
        d.payee = u.payee
        _history(s, "dataset", d.dataset_id, block, tx, f"payee changed to {u.payee}")
    elif isinstance(u, RE.AdapterRegistered):
        ad = u.adapter
        s.add(
            AdapterRow(
                adapter_id=ad.adapter_id,
                owner=ad.owner,
                name=ad.name,
                version=ad.version,
                predecessor=ad.predecessor,
                base_model=ad.base_model,
                price=str(ad.price_per_1k_tokens),
                datasets=[[ds, bps] for ds, bps in zip(ad.dataset_ids, ad.shares_bps)],
                block=block,
                tx_hash=tx,
                publisher=ad.publisher,
            )
        )
        _history(s, "adapter", ad.adapter_id, block, tx, f"registered by {ad.publisher}")
        add_adapter_name(s, ad.adapter_id, ad.name)
        for ds, bps in zip(ad.dataset_ids, ad.shares_bps):
            _declare(s, ds, ad.adapter_id, bps)
    elif isinstance(u, RE.NameRegistered):
        s.add(NameRow(name=u.name, owner=u.owner, block=block, tx_hash=tx))
        _history(s, "name", u.name, block, tx, f"name registered by {u.owner}")
    elif isinstance(u, RE.NameTransferred):
        n = s.get(NameRow, u.name)
        n.owner = u.new_owner
        _history(s, "name", u.name, block, tx, f"name transferred from {u.previous_owner} to {u.new_owner}")
    elif isinstance(u, RE.AdapterPriceChanged):
        ad = s.get(AdapterRow, u.adapter_id)
        ad.price = str(u.price_per_1k_tokens)
        _history(s, "adapter", u.adapter_id, block, tx, f"price changed to {u.price_per_1k_tokens} wei per 1k tokens")
    elif isinstance(u, RE.AdapterOwnershipTransferred):
        ad = s.get(AdapterRow, u.adapter_id)
        ad.owner = u.new_owner
        _history(s, "adapter", u.adapter_id, block, tx, f"ownership moved from {u.previous_owner} to {u.new_owner}")
    elif isinstance(u, RE.NodeRegistered):
        n = u.node
        old = s.exec(select(NodeRow).where(NodeRow.node_id == n.node_id)).first()
        if old is None:  # registered again: the key holder moved it to another operator; its history stays
            old = NodeRow(
                node_id=n.node_id,
                block=block,
                tx_hash=tx,
                active=True,
                operator="",
                base_model="",
                peer_id="",
                api_url="",
            )
            s.add(old)
        old.operator, old.active, old.base_model, old.peer_id, old.api_url = (
            n.operator,
            n.active,
            n.base_model,
            n.peer_id,
            n.api_url,
        )
        old.multiaddrs, old.public_key = list(n.multiaddrs), n.public_key
        _history(s, "node", n.node_id, block, tx, f"registered by {n.operator} with its key's proof")
    elif isinstance(u, RE.NodeUpdated):
        n = s.exec(select(NodeRow).where(NodeRow.node_id == u.node_id)).one()
        n.base_model, n.peer_id, n.api_url = u.base_model, u.peer_id, u.api_url
        n.multiaddrs = list(u.multiaddrs)
        _history(s, "node", u.node_id, block, tx, f"updated: peer {u.peer_id}, API {u.api_url}")
    elif isinstance(u, RE.NodeActiveChanged):
        n = s.exec(select(NodeRow).where(NodeRow.node_id == u.node_id)).one()
        n.active = u.active
        _history(s, "node", u.node_id, block, tx, "activated" if u.active else "deactivated")
