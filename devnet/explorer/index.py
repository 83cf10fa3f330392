"""ChainIndex: every event of our two contracts, decoded, kept in memory and extended block by block.

The explorer needs only eth_blockNumber, eth_getLogs and a few eth_call/eth_getBlockByNumber, which every
JSON-RPC node answers (anvil included, with no trace or debug API): each page asks for the head, and logs of
blocks not seen yet are fetched in one range query over both contract addresses and decoded by topic.
Registry events are read as ledger.registry_events reads them for the gateway's mirror. A head below the
last indexed block means the chain was reset, so the index starts over.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass, field

from eth_utils import event_abi_to_log_topic

from common.wire import hex0x
from ledger import registry_events as RE
from ledger.chain import ChainClient
from ledger.transport import rpc_guard
from ledger.types import Role

log = logging.getLogger(__name__)

LOG_CHUNK = 50_000  # blocks per eth_getLogs call


def _tx(ev) -> str:
    return hex0x(ev["transactionHash"])


@dataclass(slots=True)
class AdapterView:
    adapter_id: str
    owner: str
    name: str
    version: str
    predecessor: str
    base_model: str
    price: int
    datasets: list[tuple[str, int]]  # (dataset id, share in basis points)
    block: int
    tx_hash: str
    history: list[tuple[int, str, str]] = field(default_factory=list)  # (block, tx, what changed)
    publisher: str = ""  # who registered and signed it (the name's owner then); `owner` is paid its share


@dataclass(slots=True)
class DatasetView:
    dataset_id: str
    content_hash: str
    payee: str
    block: int
    tx_hash: str
    history: list[tuple[int, str, str]] = field(default_factory=list)
    name: str = ""
    contributor: str = ""  # the registering address, which the id is bound to


@dataclass(slots=True)
class NodeView:
    node_id: str
    operator: str
    active: bool
    base_model: str
    peer_id: str
    api_url: str
    multiaddrs: list[str]
    block: int
    tx_hash: str
    history: list[tuple[int, str, str]] = field(default_factory=list)
    public_key: str = ""  # the Ed25519 key the registration proved (node id = its sha256)


@dataclass(slots=True)
class NameView:
    """An adapter name: its owner (the only one who registers its versions) and how it got there."""

    name: str
    owner: str
    block: int
    tx_hash: str
    history: list[tuple[int, str, str]] = field(default_factory=list)


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
class RecordView:
    """One RecordSettled event."""

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


class ChainIndex:
    """Registry state and ledger history rebuilt from events; `refresh()` before reading."""

    def __init__(self, client: ChainClient) -> None:
        self.client = client
        self._lock = threading.Lock()
        self._decoders = {}
        for contract in (client.registry, client.ledger):
            for item in contract.abi:
                if item.get("type") == "event":
                    self._decoders[event_abi_to_log_topic(item)] = getattr(contract.events, item["name"])()
        self._reset()

    def _reset(self) -> None:
        self.last_block = self.client.deployment.deploy_block - 1
        self.adapters: dict[str, AdapterView] = {}
        self.datasets: dict[str, DatasetView] = {}
        self.nodes: dict[str, NodeView] = {}
        self.names: dict[str, NameView] = {}
        self.batches: dict[str, BatchView] = {}  # in settlement order
        self.records: list[RecordView] = []  # in settlement order
        self.records_by_request: dict[str, list[RecordView]] = defaultdict(list)
        self.records_by_batch: dict[str, list[RecordView]] = defaultdict(list)
        self.rewards: list[RewardView] = []
        self.money: list[MoneyEvent] = []
        self.settlers: dict[str, bool] = {}
        self.tx_events: dict[str, list[str]] = defaultdict(list)  # tx hash -> event names, for search

    def refresh(self) -> int:
        """Index blocks up to the head; returns the head block number."""
        with self._lock, rpc_guard(self.client.rpc_url):
            w3 = self.client.w3
            head = w3.eth.block_number
            if head < self.last_block:
                log.warning(
                    "chain head %d is below indexed block %d: the chain was reset, re-indexing", head, self.last_block
                )
                self._reset()
            addresses = [self.client.registry.address, self.client.ledger.address]
            start = self.last_block + 1
            while start <= head:
                end = min(head, start + LOG_CHUNK - 1)
                logs = w3.eth.get_logs({"address": addresses, "fromBlock": start, "toBlock": end})
                for raw in sorted(logs, key=lambda x: (x["blockNumber"], x["logIndex"])):
                    ev = self.decode(raw)
                    if ev is not None:
                        self._apply(ev)
                self.last_block = end
                start = end + 1
            self._fill_timestamps()
            return head

    def decode(self, raw_log):
        """The decoded event of a log from one of our contracts, else None."""
        if raw_log["address"] not in (self.client.registry.address, self.client.ledger.address):
            return None
        decoder = self._decoders.get(bytes(raw_log["topics"][0])) if raw_log["topics"] else None
        return decoder.process_log(raw_log) if decoder is not None else None

    def _fill_timestamps(self) -> None:
        cache: dict[int, int] = {}
        for b in self.batches.values():
            if b.timestamp is None:
                if b.block not in cache:
                    cache[b.block] = int(self.client.w3.eth.get_block(b.block)["timestamp"])
                b.timestamp = cache[b.block]

    # ------------------------------------------------------------------ applying events

    def _apply(self, ev) -> None:
        name, a, block, tx = ev["event"], ev["args"], ev["blockNumber"], _tx(ev)
        self.tx_events[tx].append(name)
        update = RE.registry_update(ev)
        if update is not None:
            self._on_registry(update, block, tx)
            return
        handler = getattr(self, f"_on_{name}", None)
        if handler is not None:
            handler(a, block, tx)

    def _on_registry(self, u: RE.RegistryUpdate, block: int, tx: str) -> None:
        """A registry event's update (ledger.registry_events, as the gateway's mirror applies it), with a
        line of history for the entity's page."""
        if isinstance(u, RE.DatasetRegistered):
            d = u.dataset
            self.datasets[d.dataset_id] = DatasetView(
                d.dataset_id,
                d.content_hash,
                d.payee,
                block,
                tx,
                [(block, tx, f"registered by its contributor {d.contributor} as {d.name!r}")],
                d.name,
                d.contributor,
            )
        elif isinstance(u, RE.DatasetPayeeChanged):
            d = self.datasets[u.dataset_id]
            d.payee = u.payee
            d.history.append((block, tx, f"payee changed to {u.payee}"))
        elif isinstance(u, RE.AdapterRegistered):
            ad = u.adapter
            self.adapters[ad.adapter_id] = AdapterView(
                ad.adapter_id,
                ad.owner,
                ad.name,
                ad.version,
                ad.predecessor,
                ad.base_model,
                ad.price_per_1k_tokens,
                list(zip(ad.dataset_ids, ad.shares_bps)),
                block,
                tx,
                [(block, tx, f"registered by {ad.publisher}")],
                ad.publisher,
            )
        elif isinstance(u, RE.NameRegistered):
            self.names[u.name] = NameView(u.name, u.owner, block, tx, [(block, tx, f"name registered by {u.owner}")])
        elif isinstance(u, RE.NameTransferred):
            n = self.names[u.name]
            n.owner = u.new_owner
            n.history.append((block, tx, f"name transferred from {u.previous_owner} to {u.new_owner}"))
        elif isinstance(u, RE.AdapterPriceChanged):
            ad = self.adapters[u.adapter_id]
            ad.price = u.price_per_1k_tokens
            ad.history.append((block, tx, f"price changed to {ad.price} wei per 1k tokens"))
        elif isinstance(u, RE.AdapterOwnershipTransferred):
            ad = self.adapters[u.adapter_id]
            ad.owner = u.new_owner
            ad.history.append((block, tx, f"ownership moved from {u.previous_owner} to {u.new_owner}"))
        elif isinstance(u, RE.NodeRegistered):
            n = u.node
            old = self.nodes.get(n.node_id)  # registered again: the key holder moved it to another operator
            history = (old.history if old else []) + [(block, tx, f"registered by {n.operator} with its key's proof")]
            self.nodes[n.node_id] = NodeView(
                n.node_id,
                n.operator,
                n.active,
                n.base_model,
                n.peer_id,
                n.api_url,
                list(n.multiaddrs),
                old.block if old else block,
                old.tx_hash if old else tx,
                history,
                n.public_key,
            )
        elif isinstance(u, RE.NodeUpdated):
            n = self.nodes[u.node_id]
            n.base_model, n.peer_id, n.api_url = u.base_model, u.peer_id, u.api_url
            n.multiaddrs = list(u.multiaddrs)
            n.history.append((block, tx, f"updated: peer {u.peer_id}, API {u.api_url}"))
        elif isinstance(u, RE.NodeActiveChanged):
            n = self.nodes[u.node_id]
            n.active = u.active
            n.history.append((block, tx, "activated" if n.active else "deactivated"))

    def _on_SettlerGranted(self, a, block, tx) -> None:
        self.settlers[a["settler"]] = True

    def _on_SettlerRevoked(self, a, block, tx) -> None:
        self.settlers[a["settler"]] = False

    def _on_Deposited(self, a, block, tx) -> None:
        self.money.append(MoneyEvent("deposit", a["settler"], int(a["amount"]), block, tx))

    def _on_DepositReclaimed(self, a, block, tx) -> None:
        self.money.append(MoneyEvent("reclaim", a["settler"], int(a["amount"]), block, tx))

    def _on_RewardWithdrawn(self, a, block, tx) -> None:
        self.money.append(MoneyEvent("withdrawal", a["account"], int(a["amount"]), block, tx))

    def _on_RecordSettled(self, a, block, tx) -> None:
        r = RecordView(
            hex0x(a["requestId"]),
            hex0x(a["batchId"]),
            hex0x(a["adapterId"]),
            hex0x(a["nodeId"]),
            int(a["promptTokens"]),
            int(a["completionTokens"]),
            int(a["fee"]),
            block,
            tx,
        )
        self.records.append(r)
        self.records_by_request[r.request_id].append(r)
        self.records_by_batch[r.batch_id].append(r)

    def _on_RewardAccrued(self, a, block, tx) -> None:
        self.rewards.append(
            RewardView(
                hex0x(a["batchId"]),
                a["account"],
                hex0x(a["adapterId"]),
                Role(a["role"]).name.lower(),
                hex0x(a["subjectId"]),
                int(a["amount"]),
                block,
                tx,
            )
        )

    def _on_BatchSettled(self, a, block, tx) -> None:
        b = hex0x(a["batchId"])
        self.batches[b] = BatchView(
            b, a["settler"], hex0x(a["merkleRoot"]), int(a["recordCount"]), int(a["totalFees"]), block, tx
        )
