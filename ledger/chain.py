"""ChainClient: typed bindings to AdapterRegistry and AttributionLedger, built from the artifacts."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_abi.exceptions import DecodingError
from eth_utils import function_signature_to_4byte_selector, keccak, to_checksum_address
from web3.exceptions import TransactionNotFound, Web3Exception

from common.wire import ZERO_ID, hex0x, id_bytes, node_id_of, to_id
from ledger.artifacts import load_artifact
from ledger.deployment import Deployment
from ledger.errors import ChainUnavailable, DeploymentMismatch, LedgerError, SequenceMismatch, TransactionFailed
from ledger.log_reader import MAX_SPAN, LogReader, web3_query
from ledger.merkle import MaxPrices, MerkleTree, batch_id_for, pack_records, record_bounds, unpack_records
from ledger.transport import (
    FeeAboveCap,
    FeePolicy,
    GasTooLow,
    RevertDecoder,
    Transactor,
    make_web3,
    rpc_guard,
    shown_url,
)
from ledger.types import (
    AdapterInfo,
    AdapterRegistration,
    BatchInfo,
    DatasetInfo,
    Domain,
    NodeInfo,
    PriceFloor,
    RewardBalance,
    SettledRecord,
    SettleRecord,
    dataset_id_for,
    node_proof_message,
)

log = logging.getLogger(__name__)


SETTLE_SIGNATURE = "settleBatch(bytes32,bytes32,uint64,bytes32[],bytes32[],bytes,uint256[])"
SETTLE_SELECTOR = function_signature_to_4byte_selector(SETTLE_SIGNATURE)
GET_BATCH_SELECTOR = function_signature_to_4byte_selector("getBatch(bytes32)")
NEXT_SEQUENCE_SELECTOR = function_signature_to_4byte_selector("nextSequence(address)")
DEPOSIT_OF_SELECTOR = function_signature_to_4byte_selector("depositOf(address)")
BASE_PRICE_SELECTOR = function_signature_to_4byte_selector("basePricePer1kTokens()")
ADAPTER_SPLIT_SELECTOR = function_signature_to_4byte_selector("adapterSplit(bytes32)")
PRICE_FLOOR_SELECTOR = function_signature_to_4byte_selector("priceFloor(bytes32)")
BASE_PRICE_FLOOR_SELECTOR = function_signature_to_4byte_selector("basePriceFloor()")
RECORDS_SETTLED_SIGNATURE = "RecordsSettled(bytes32,address,uint64,bytes32[],bytes32[],uint256[],bytes)"
RECORDS_SETTLED_TOPIC = hex0x(keccak(text=RECORDS_SETTLED_SIGNATURE))
RECORDS_SETTLED_DATA = ("uint64", "bytes32[]", "bytes32[]", "uint256[]", "bytes")
# A storage slot written from zero costs 20,000 gas, one that holds a value 2,900: an account a batch pays for the
# first time (or after it withdrew all it had) costs this much more than the estimate of a batch of the same shape
# whose accounts held rewards. The limit learned for a shape allows it for each account the shape pays (_gas_key):
# gas not used is not paid for, and a batch out of gas had the batches pipelined behind it revert (red team)
FRESH_SLOT_GAS = 17_100
_WORD = 32
_BATCH_WORDS = 6  # getBatch: merkleRoot, settler, settledBlock, recordCount, totalFees, firstSequence


def settle_calldata(
    batch_id: str,
    merkle_root: str,
    first_sequence: int,
    records: Sequence[SettleRecord],
    max_prices: MaxPrices = None,
) -> bytes:
    """Calldata of settleBatch(batchId, merkleRoot, firstSequence, adapterIds, nodeIds, records, maxPrices).
    max_prices: the most each record may cost per 1k tokens (ledger.merkle.MaxPrices: by adapter, by record, or
    None for no bound)."""
    packed = pack_records(records, max_prices)
    return SETTLE_SELECTOR + abi_encode(
        ["bytes32", "bytes32", "uint64", "bytes32[]", "bytes32[]", "bytes", "uint256[]"],
        [
            id_bytes(batch_id),
            id_bytes(merkle_root),
            first_sequence,
            [id_bytes(a) for a in packed.adapter_ids],
            [id_bytes(n) for n in packed.node_ids],
            packed.records,
            list(packed.max_prices),
        ],
    )


def _address_word(address: str) -> bytes:
    return bytes(12) + bytes.fromhex(to_checksum_address(address)[2:])


def _gas_key(
    records: Sequence[SettleRecord], max_prices: MaxPrices, datasets: dict[str, int]
) -> tuple[int, int, int, int, int] | None:
    """A batch's shape, which its gas follows: records, adapter entries, adapters (an entry repeating an adapter
    reads no split from the registry: far cheaper than another adapter's), nodes, and the datasets its entries pay
    (each a payee credited: up to 16 an entry, the most of a batch's gas; one limit for every batch of the other
    four ran a batch of adapters with 16 datasets out of gas, and every batch pipelined behind it reverted: red
    team). `datasets`: adapter id -> its datasets, as read (adapter_price); None when one is not known."""
    entries = set(zip((to_id(r.adapter_id) for r in records), record_bounds(records, max_prices), strict=True))
    paid = [datasets.get(a) for a, _ in entries]
    if None in paid:
        return None
    return len(records), len(entries), len({a for a, _ in entries}), len({r.node_id for r in records}), sum(paid)


def decode_records_settled(log: dict) -> list[SettledRecord]:
    """The records of one RecordsSettled log (a raw eth_getLogs entry or web3's), in leaf order, each
    with its sequence number and fee. Raises ValueError on a log of another shape."""
    topics = [t if isinstance(t, str) else hex0x(bytes(t)) for t in log["topics"]]
    if len(topics) != 3 or topics[0].lower() != RECORDS_SETTLED_TOPIC:
        raise ValueError("not a RecordsSettled log")
    data = log["data"]
    data = bytes.fromhex(data[2:]) if isinstance(data, str) else bytes(data)
    first, adapters, nodes, prices, packed = abi_decode(RECORDS_SETTLED_DATA, data)
    if len(prices) != len(adapters):
        raise ValueError("RecordsSettled: prices and adapters differ in length")
    batch_id = topics[1].lower()
    settler = to_checksum_address("0x" + topics[2][-40:])
    block = log["blockNumber"]
    block = int(block, 16) if isinstance(block, str) else int(block)
    return [
        SettledRecord(
            batch_id,
            settler,
            first + i,
            hex0x(rid),
            hex0x(a),
            hex0x(n),
            p,
            c,
            prices[k] * (p + c) // 1000,
            block,
            i,
        )
        for i, (rid, a, n, p, c, k) in enumerate(unpack_records(adapters, nodes, packed))
    ]


def _asked_for(lg, params: dict) -> bool:
    """Whether a log is of the contract and topics asked for (a provider may answer with more than it was asked;
    topics compared as bytes, so a filter's value matches however it was written: an address in any case, an id as
    hex). A log without them is not one asked for."""
    try:
        got = [bytes(t) for t in lg["topics"]]
        same_contract = str(lg["address"]).lower() == params["address"].lower()
    except (KeyError, TypeError, ValueError):
        return False
    topics = params["topics"]
    return (
        same_contract
        and len(got) >= len(topics)
        and all(w is None or g == bytes.fromhex(w[2:]) for g, w in zip(got, topics))
    )


def _topics(topic: str, event_abi: dict, filters: dict) -> list:
    """eth_getLogs topics for an event (`topic`, its signature's hash) and values of some of its indexed
    arguments (static types only: the others' topics are hashes)."""
    topics: list = [topic]
    indexed = [i for i in event_abi["inputs"] if i.get("indexed")]
    unknown = set(filters) - {i["name"] for i in indexed}
    if unknown:
        raise ValueError(f"{event_abi['name']} has no indexed argument {', '.join(sorted(unknown))}")
    for arg in indexed:
        if arg["name"] not in filters:
            topics.append(None)
        elif arg["type"] in ("string", "bytes") or arg["type"].endswith("]") or arg["type"].startswith("tuple"):
            raise ValueError(f"{event_abi['name']}.{arg['name']} is hashed in its topic; filter after reading")
        else:
            value = filters[arg["name"]]
            if arg["type"] == "bytes32" and isinstance(value, str):
                value = id_bytes(value)  # an id as the project writes it ("0x" + 64 hex digits)
            topics.append(hex0x(abi_encode([arg["type"]], [value])))
    while topics[-1] is None:
        topics.pop()
    return topics


class ChainClient:
    """One deployment, one (optional) signing account. Reverts raise ledger.errors classes."""

    def __init__(
        self,
        deployment: Deployment,
        account=None,
        *,
        rpc_url: str | None = None,
        receipt_timeout: float = 60.0,
        fee_policy: FeePolicy | None = None,
    ) -> None:
        """fee_policy: the fees every transaction pays and their caps (default: FeePolicy.from_env())."""
        self.deployment = deployment
        self.rpc_url = rpc_url or deployment.rpc_url
        self.w3 = make_web3(self.rpc_url)
        reg_abi = load_artifact("AdapterRegistry")["abi"]
        led_abi = load_artifact("AttributionLedger")["abi"]
        self.registry = self.w3.eth.contract(address=deployment.registry, abi=reg_abi)
        self.ledger = self.w3.eth.contract(address=deployment.ledger, abi=led_abi)
        self.decoder = RevertDecoder([reg_abi, led_abi])
        self.tx = Transactor(self.w3, self.decoder, deployment.chain_id, account, receipt_timeout, fee_policy)
        # settleBatch gas limit by shape (_gas_key): one estimate per shape, raised when a batch needs more
        self._settle_gas: dict[tuple, int] = {}
        # adapter id -> the datasets its records pay, as adapterSplit said (an adapter's datasets never change)
        self._datasets: dict[str, int] = {ZERO_ID: 0}
        # events and settled records, read in spans the provider answers (the widest first: most allow it)
        self.logs = LogReader(self.rpc_url, span=MAX_SPAN)

    @classmethod
    def from_deployment(
        cls,
        deployment: str | Path | dict | Deployment,
        account=None,
        *,
        rpc_url: str | None = None,
        check: bool = True,
        fee_policy: FeePolicy | None = None,
    ) -> ChainClient:
        """Client for a deployment file/dict; check=True verifies the chain matches it."""
        if isinstance(deployment, (str, Path)):
            deployment = Deployment.load(deployment)
        elif isinstance(deployment, dict):
            deployment = Deployment.from_dict(deployment)
        client = cls(deployment, account, rpc_url=rpc_url, fee_policy=fee_policy)
        if check:
            client.check_deployment()
        return client

    @property
    def account(self):
        return self.tx.account

    @property
    def address(self) -> str:
        return self.tx.account.address

    def with_account(self, account, *, fee_policy: FeePolicy | None = None) -> ChainClient:
        """The same deployment, signing as another account (paying this client's fees unless told others)."""
        return ChainClient(
            self.deployment,
            account,
            rpc_url=self.rpc_url,
            receipt_timeout=self.tx.receipt_timeout,
            fee_policy=fee_policy or self.tx.fee_policy,
        )

    def check_deployment(self) -> None:
        """Raise DeploymentMismatch unless chain id, contract code and wiring match the file, and the contracts
        were built from the sources this client's ABI comes from (when the file says which)."""
        d = self.deployment
        built = load_artifact("AttributionLedger").get("sourcesSha256", "")
        if d.sources_sha256 and built and d.sources_sha256 != built:
            raise DeploymentMismatch(
                f"the contracts at {d.registry} and {d.ledger} were built from other sources than this loramesh's "
                f"(sources {d.sources_sha256[:12]}, here {built[:12]}): deploy them again (a devnet: loramesh "
                "devnet down, remove its folder, loramesh devnet up)"
            )
        with rpc_guard(self.rpc_url):
            chain_id = self.w3.eth.chain_id
            if chain_id != d.chain_id:
                raise DeploymentMismatch(
                    f"chain at {shown_url(self.rpc_url)} has chain id {chain_id}, the deployment file says {d.chain_id}"
                )
            for name, addr in (("AdapterRegistry", d.registry), ("AttributionLedger", d.ledger)):
                if len(self.w3.eth.get_code(addr)) == 0:
                    raise DeploymentMismatch(
                        f"no {name} code at {addr} on {shown_url(self.rpc_url)}: the chain was reset or the file is "
                        "stale (remove the devnet folder and run loramesh devnet up again)"
                    )
            wired = self.ledger.functions.registry().call()
        if to_checksum_address(wired) != d.registry:
            raise DeploymentMismatch(f"AttributionLedger at {d.ledger} uses registry {wired}, not {d.registry}")

    # ------------------------------------------------------------------ chain basics

    def block_number(self) -> int:
        with rpc_guard(self.rpc_url):
            return self.w3.eth.block_number

    def chain_time(self) -> int:
        """The latest block's timestamp: the clock a price's grace (PriceFloor.grace_ends) is read against."""
        with rpc_guard(self.rpc_url):
            return int(self.w3.eth.get_block("latest")["timestamp"])

    def block_hash(self, number: int) -> str | None:
        """The hash of the canonical block at `number` now, None when the chain is not that long (a reorg
        that shortened it). A raw request: the settler asks for every block holding a batch not yet final."""
        with rpc_guard(self.rpc_url):
            resp = self.w3.provider.make_request("eth_getBlockByNumber", [hex(number), False])
        if resp.get("error"):
            raise ChainUnavailable(
                f"chain at {shown_url(self.rpc_url)} answered eth_getBlockByNumber with {str(resp['error'])[:200]}"
            )
        block = resp.get("result")
        return block["hash"] if block else None

    def balance(self, address: str) -> int:
        with rpc_guard(self.rpc_url):
            return self.w3.eth.get_balance(to_checksum_address(address))

    def fund(self, addresses: Iterable[str], amount: int) -> None:
        """Send `amount` wei to each address from this client's account, waiting for every receipt."""
        hashes = [self.tx.send_value(to_checksum_address(a), amount) for a in addresses]
        for h in hashes:
            self.tx.wait(h)

    @property
    def domain(self) -> Domain:
        """The EIP-712 domain of this deployment's registry (its chain id and address)."""
        return Domain(self.deployment.chain_id, self.deployment.registry)

    # ------------------------------------------------------------------ registry: datasets

    def dataset_id(self, name: str, contributor: str | None = None) -> str:
        """The id of `contributor`'s (default: the sender's) dataset `name`."""
        return dataset_id_for(contributor or self.address, name)

    def register_dataset(self, name: str, content_hash: str = ZERO_ID):
        """Register the sender's dataset `name` (id = dataset_id(name), payee = the sender); returns the receipt."""
        fn = self.registry.functions.registerDataset(name, id_bytes(content_hash))
        return self.tx.transact(fn)

    def set_dataset_payee(self, dataset_id: str, payee: str):
        fn = self.registry.functions.setDatasetPayee(id_bytes(dataset_id), to_checksum_address(payee))
        return self.tx.transact(fn)

    def get_dataset(self, dataset_id: str) -> DatasetInfo:
        content, payee, contributor, name = self.tx.call(self.registry.functions.getDataset(id_bytes(dataset_id)))
        return DatasetInfo(to_id(dataset_id), hex0x(content), payee, contributor, name)

    # ------------------------------------------------------------------ registry: names and adapters

    def name_owner(self, name: str) -> str | None:
        """The owner of an adapter name, None when nobody registered it."""
        owner = self.tx.call(self.registry.functions.nameOwner(name))
        return None if int(owner, 16) == 0 else to_checksum_address(owner)

    def transfer_name(self, name: str, new_owner: str):
        return self.tx.transact(self.registry.functions.transferName(name, to_checksum_address(new_owner)))

    def register_adapter(
        self,
        adapter_id: str | AdapterRegistration,
        *,
        name: str | None = None,
        version: str | None = None,
        base_model: str | None = None,
        price_per_1k_tokens: int = 0,
        datasets: Sequence[tuple[str, int]] = (),
        predecessor: str = ZERO_ID,
        signature: str | bytes | None = None,
    ):
        """Register an adapter published and owned by the sender; datasets = [(dataset_id, share_bps)].
        Takes an AdapterRegistration or its fields. `signature` is the publisher's EIP-712 signature of
        it under this registry's domain (a package's signature.json); None: this client's account signs."""
        if isinstance(adapter_id, AdapterRegistration):
            reg = adapter_id
        else:
            reg = AdapterRegistration.of(
                adapter_id,
                name=name,
                version=version,
                base_model=base_model,
                price_per_1k_tokens=price_per_1k_tokens,
                datasets=datasets,
                predecessor=predecessor,
            )
        if signature is None:
            signature = reg.sign(self.account, self.domain)
        sig = (
            bytes.fromhex(signature[2:] if signature.startswith("0x") else signature)
            if isinstance(signature, str)
            else bytes(signature)
        )
        salt = self.commit_registration(reg.adapter_id, reg.name)
        fn = self.registry.functions.registerAdapter(id_bytes(reg.adapter_id), reg.spec(), sig, salt)
        # a commitment is revealed from the block after it at the earliest: the gas is estimated in that one
        return self.tx.transact(fn, estimate_in="pending")

    def commit_registration(
        self, adapter_id: str, name: str, *, timeout: float = 600.0, stall_s: float = 60.0
    ) -> bytes:
        """Commit to registering `adapter_id` under `name` (AdapterRegistry.commitRegistration) with a fresh
        secret salt, and wait until the commitment may be revealed: the next block is minCommitBlocks past
        it. Returns the salt. The commitment hides both, so a registration seen waiting to be mined cannot be
        copied and outbid, for its name or its id: the copier's own commitment would be too recent. LedgerError
        when that takes longer than `timeout`, or the chain makes no block for `stall_s` (one that mines only
        on transactions never gets there)."""
        salt = os.urandom(32)
        registrant = self.account.address
        commitment = self.tx.call(
            self.registry.functions.registrationCommitment(id_bytes(adapter_id), name, registrant, salt)
        )
        self.tx.transact(self.registry.functions.commitRegistration(commitment))
        committed = self.tx.call(self.registry.functions.commitBlock(commitment))
        usable = committed + self.tx.call(self.registry.functions.minCommitBlocks())
        start = time.monotonic()
        last, moved_at = self.block_number(), start
        if last + 1 < usable:
            log.info("%s (%s) committed at block %d; registering it from block %d", name, adapter_id, committed, usable)
        while last + 1 < usable:  # the registration lands in the next block at the earliest
            now = time.monotonic()
            if now - moved_at > stall_s:
                raise LedgerError(
                    f"the chain made no block for {stall_s:.0f} s while {name!r} waits for block {usable}: a chain "
                    "that mines only on transactions needs a registry deployed with --commit-blocks 1"
                )
            if now - start > timeout:
                raise LedgerError(f"the chain did not reach block {usable} within {timeout:.0f} s to register {name!r}")
            time.sleep(min(1.0, stall_s / 4))
            block = self.block_number()
            if block != last:
                last, moved_at = block, time.monotonic()
        return salt

    def adapter_price(self, adapter_id: str) -> int:
        """The adapter's price per 1,000 tokens as settlement reads it (the registry's adapterSplit);
        UnknownAdapter when it is not registered. One raw eth_call: the settler prices every batch."""
        out = self.tx.raw_call(self.registry.address, ADAPTER_SPLIT_SELECTOR + id_bytes(adapter_id))
        if len(out) < 3 * _WORD:
            raise DeploymentMismatch(f"adapterSplit at {self.registry.address} returned {len(out)} bytes")
        at = int.from_bytes(out[2 * _WORD : 3 * _WORD], "big")  # where datasetIds' length is
        if at + _WORD <= len(out):  # (the settlement's gas key: _gas_key)
            self._datasets[to_id(adapter_id)] = int.from_bytes(out[at : at + _WORD], "big")
        return int.from_bytes(out[_WORD : 2 * _WORD], "big")

    def price_floor(self, adapter_id: str) -> PriceFloor:
        """How far below its price settlement may charge an adapter's records now (the registry's priceFloor; the
        base model, the zero id: the ledger's basePriceFloor); UnknownAdapter when it is not registered."""
        if to_id(adapter_id) == ZERO_ID:
            out = self.tx.raw_call(self.ledger.address, BASE_PRICE_FLOOR_SELECTOR)
        else:
            out = self.tx.raw_call(self.registry.address, PRICE_FLOOR_SELECTOR + id_bytes(adapter_id))
        if len(out) != 4 * _WORD:
            raise DeploymentMismatch(f"priceFloor returned {len(out)} bytes, not four words")
        return PriceFloor(*(int.from_bytes(out[i : i + _WORD], "big") for i in range(0, 4 * _WORD, _WORD)))

    def adapter_digest(self, registration: AdapterRegistration) -> str:
        """The EIP-712 digest as the contract computes it (for cross-checks)."""
        fn = self.registry.functions.adapterDigest(id_bytes(registration.adapter_id), registration.spec())
        return hex0x(self.tx.call(fn))

    def set_adapter_price(self, adapter_id: str, price_per_1k_tokens: int):
        return self.tx.transact(self.registry.functions.setAdapterPrice(id_bytes(adapter_id), price_per_1k_tokens))

    def transfer_adapter(self, adapter_id: str, new_owner: str):
        fn = self.registry.functions.transferAdapter(id_bytes(adapter_id), to_checksum_address(new_owner))
        return self.tx.transact(fn)

    def get_adapter(self, adapter_id: str) -> AdapterInfo:
        a = self.tx.call(self.registry.functions.getAdapter(id_bytes(adapter_id)))
        owner, publisher, pred, base, price, name, version, ds, shares = a
        return AdapterInfo(
            to_id(adapter_id),
            owner,
            name,
            version,
            hex0x(pred),
            hex0x(base),
            price,
            tuple(hex0x(d) for d in ds),
            tuple(shares),
            publisher,
        )

    # ------------------------------------------------------------------ registry: nodes

    def node_nonce(self, node_id: str) -> int:
        """How many times the node was registered (0: never): the nonce its next registration proof names."""
        return self.tx.call(self.registry.functions.nodeNonce(id_bytes(node_id)))

    def node_proof_message(self, node_id: str, operator: str | None = None, *, nonce: int | None = None) -> bytes:
        """What the key of `node_id` signs to let `operator` (default: the sender) register it on this
        registry now: the message names the node's current nonce (read from the chain unless given), so the
        proof is good for the next registration only."""
        if nonce is None:
            nonce = self.node_nonce(node_id)
        return node_proof_message(self.deployment.chain_id, self.deployment.registry, operator or self.address, nonce)

    def register_node(self, node_key, *, peer_id: str, multiaddrs: Sequence[str], api_url: str, base_model: str):
        """Register the node whose Ed25519 key is `node_key` (a cryptography Ed25519PrivateKey), operated by
        the sender and active from the start: the key signs the proof for the sender and the node's current
        nonce. Registering a node another operator holds moves it to the sender."""
        from cryptography.hazmat.primitives import serialization

        public_key = node_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        node_id = node_id_of(public_key)
        signature = node_key.sign(self.node_proof_message(node_id))
        return self.register_node_with_proof(
            node_id,
            public_key,
            signature,
            peer_id=peer_id,
            multiaddrs=multiaddrs,
            api_url=api_url,
            base_model=base_model,
        )

    def register_node_with_proof(
        self,
        node_id: str,
        public_key: bytes,
        signature: bytes,
        *,
        peer_id: str,
        multiaddrs: Sequence[str],
        api_url: str,
        base_model: str,
    ):
        """registerNode with a proof made elsewhere: `signature` (64 bytes, r || s) by `public_key` of
        node_proof_message(node_id, sender) at the node's current nonce."""
        if len(public_key) != 32 or len(signature) != 64:
            raise ValueError("a node proof is a 32-byte Ed25519 public key and a 64-byte signature")
        proof = (bytes(public_key), bytes(signature[:32]), bytes(signature[32:]))
        fn = self.registry.functions.registerNode(
            id_bytes(node_id), proof, peer_id, list(multiaddrs), api_url, id_bytes(base_model)
        )
        return self.tx.transact(fn)

    def update_node(self, node_id: str, *, peer_id: str, multiaddrs: Sequence[str], api_url: str, base_model: str):
        fn = self.registry.functions.updateNode(
            id_bytes(node_id), peer_id, list(multiaddrs), api_url, id_bytes(base_model)
        )
        return self.tx.transact(fn)

    def set_node_active(self, node_id: str, active: bool):
        return self.tx.transact(self.registry.functions.setNodeActive(id_bytes(node_id), bool(active)))

    def get_node(self, node_id: str) -> NodeInfo:
        operator, active, key, base, peer_id, api_url, addrs = self.tx.call(
            self.registry.functions.getNode(id_bytes(node_id))
        )
        return NodeInfo(to_id(node_id), operator, active, hex0x(base), peer_id, api_url, tuple(addrs), hex0x(key))

    # ------------------------------------------------------------------ ledger: admin and deposits

    def grant_settler(self, settler: str):
        return self.tx.transact(self.ledger.functions.grantSettler(to_checksum_address(settler)))

    def revoke_settler(self, settler: str):
        return self.tx.transact(self.ledger.functions.revokeSettler(to_checksum_address(settler)))

    def set_node_share_bps(self, bps: int):
        return self.tx.transact(self.ledger.functions.setNodeShareBps(bps))

    def set_base_price(self, price_per_1k_tokens: int):
        """Fee per 1,000 tokens of base-model records (adapter id zero), in wei."""
        return self.tx.transact(self.ledger.functions.setBasePricePer1kTokens(price_per_1k_tokens))

    def base_price(self) -> int:
        return self._uint_call(BASE_PRICE_SELECTOR)

    def transfer_admin(self, new_admin: str):
        return self.tx.transact(self.ledger.functions.transferAdmin(to_checksum_address(new_admin)))

    def is_settler(self, address: str) -> bool:
        return self.tx.call(self.ledger.functions.isSettler(to_checksum_address(address)))

    def settler_changes(self, from_block: int | None = None) -> tuple[int, list[tuple[str, bool]]]:
        """The block read up to and the settler role's changes since `from_block` (the deploy block by
        default), in chain order: (lowercase address, granted)."""
        head = self.block_number()
        if from_block is not None and from_block > head:
            return head, []
        logs = [
            (ev, name == "SettlerGranted")
            for name in ("SettlerGranted", "SettlerRevoked")
            for ev in self.events("ledger", name, from_block=from_block, to_block=head)
        ]
        logs.sort(key=lambda x: (x[0]["blockNumber"], x[0]["logIndex"]))
        return head, [(ev["args"]["settler"].lower(), granted) for ev, granted in logs]

    def node_share_bps(self) -> int:
        return self.tx.call(self.ledger.functions.nodeShareBps())

    def deposit_for(self, settler: str, amount: int):
        """Prepay `amount` wei of fees for a settler."""
        return self.tx.transact(self.ledger.functions.depositFor(to_checksum_address(settler)), value=amount)

    def reclaim_deposit(self, amount: int):
        return self.tx.transact(self.ledger.functions.reclaimDeposit(amount))

    def deposit_of(self, settler: str, *, block: int | str = "latest") -> int:
        return self._uint_call(DEPOSIT_OF_SELECTOR + _address_word(settler), block)

    def _uint_call(self, data: bytes, block: int | str = "latest") -> int:
        """A view of the ledger returning one uint, called with our own encoding: the settler reads the
        deposit, the base price and its next sequence number before every batch, and web3's contract
        call costs tens of milliseconds (it asks the node for the chain id each time)."""
        out = self.tx.raw_call(self.ledger.address, data, hex(block) if isinstance(block, int) else block)
        if len(out) != _WORD:
            raise DeploymentMismatch(f"ledger at {self.ledger.address} returned {len(out)} bytes, not one word")
        return int.from_bytes(out, "big")

    def totals(self) -> dict[str, int]:
        """Ledger-wide money counters (deposited, accrued, withdrawn, reclaimed) and its balance."""
        f = self.ledger.functions
        out = {
            k: self.tx.call(getattr(f, "total" + k.capitalize())())
            for k in ("deposited", "accrued", "withdrawn", "reclaimed")
        }
        out["balance"] = self.balance(self.ledger.address)
        return out

    # ------------------------------------------------------------------ ledger: settlement

    def next_sequence(self, settler: str | None = None) -> int:
        """The sequence number the settler's (default: this account's) next batch must start at."""
        return self._uint_call(NEXT_SEQUENCE_SELECTOR + _address_word(settler or self.address))

    def send_settle_batch(
        self,
        batch_id: str,
        merkle_root: str,
        records: Sequence[SettleRecord],
        *,
        first_sequence: int,
        simulate: bool = True,
        max_prices: MaxPrices = None,
    ) -> str:
        """Send settleBatch; returns the tx hash. simulate=True estimates it first (a duplicate raises
        BatchAlreadySettled, a batch not starting at this account's next sequence number
        SequenceMismatch, any revert its typed error); simulate=False sends at once with the gas limit
        learned for this shape of batch (records, adapter entries, adapters, nodes: estimating only the first
        batch of each; one pipelined behind batches still in flight is estimated as if numbered from the chain's
        nextSequence) and the managed nonce: a revert then shows in wait_settle_batch, a too-low limit as
        GasTooLow. max_prices: what the caller priced the records at (settle_calldata); the
        ledger refuses the batch when one costs more now (PriceAboveQuote)."""
        data = settle_calldata(batch_id, merkle_root, first_sequence, records, max_prices)
        key = _gas_key(records, max_prices, self._datasets)
        if simulate or key not in self._settle_gas:
            try:
                estimate = self.tx.estimate(self.ledger.address, data)
            except SequenceMismatch as e:
                expected = e.args_by_name.get("expected")
                if simulate or not isinstance(expected, int) or expected > first_sequence:
                    raise
                # pipelined behind our batches still in flight, it cannot run on the chain as it is now; the
                # same batch numbered from where the chain is costs the same gas (storage, loop, tables)
                root = MerkleTree.from_records(records, expected).root_hex
                estimate = self.tx.estimate(
                    self.ledger.address, settle_calldata(batch_id, root, expected, records, max_prices)
                )
            if key is None:  # a shape not known whole: estimated every time
                return self.tx.send_data(self.ledger.address, data, gas=self.tx.gas_limit(estimate))
            _, _, adapters, nodes, datasets = key  # each an account paid: an owner, an operator, a payee
            need = self.tx.gas_limit(estimate + FRESH_SLOT_GAS * (adapters + nodes + datasets))
            self._settle_gas[key] = max(self._settle_gas.get(key, 0), need)
        return self.tx.send_data(self.ledger.address, data, gas=self._settle_gas[key])

    def wait_settle_batch(
        self,
        tx_hash: str,
        batch_id: str,
        merkle_root: str,
        records: Sequence[SettleRecord],
        timeout: float | None = None,
        *,
        first_sequence: int,
        light: bool = False,
        max_prices: MaxPrices = None,
    ):
        """Wait for a settleBatch receipt (light=True: Transactor.light_receipt's fields only, much
        cheaper); a reverted one raises its decoded reason, one that ran out of gas
        raises GasTooLow (and the next batch of that size is estimated again)."""

        def replay() -> dict:  # only a reverted receipt needs the calldata again
            return {
                "to": self.ledger.address,
                "data": settle_calldata(batch_id, merkle_root, first_sequence, records, max_prices),
            }

        try:
            return self.tx.wait(tx_hash, timeout, replay=replay, light=light)
        except GasTooLow:
            self._settle_gas.pop(_gas_key(records, max_prices, self._datasets), None)
            raise

    def settle_batch(
        self,
        batch_id: str | None,
        merkle_root: str | None,
        records: Sequence[SettleRecord],
        *,
        first_sequence: int | None = None,
        max_prices: MaxPrices = None,
    ):
        """Send and wait; returns the receipt. batch_id None: the id of `records` at `max_prices` (batch_id_for,
        salt 0);
        first_sequence None: this account's next sequence number (read from the chain); merkle_root None: the
        root of `records` from there."""
        if batch_id is None:
            batch_id = batch_id_for(records, max_prices=max_prices)
        if first_sequence is None:
            first_sequence = self.next_sequence()
        if merkle_root is None:
            merkle_root = MerkleTree.from_records(records, first_sequence).root_hex
        data = settle_calldata(batch_id, merkle_root, first_sequence, records, max_prices)
        gas = self.tx.gas_limit(self.tx.estimate(self.ledger.address, data))
        return self.tx.wait(self.tx.send_data(self.ledger.address, data, gas=gas))

    def is_settled(self, batch_id: str) -> bool:
        return self.tx.call(self.ledger.functions.isSettled(id_bytes(batch_id)))

    def get_batch(self, batch_id: str) -> BatchInfo | None:
        """The settled batch, or None when this id was never settled."""
        out = self.tx.raw_call(self.ledger.address, GET_BATCH_SELECTOR + id_bytes(batch_id))
        if len(out) != _BATCH_WORDS * _WORD:
            raise DeploymentMismatch(
                f"getBatch at {self.ledger.address} returned {len(out)} bytes, not {_BATCH_WORDS * _WORD}"
            )
        root, settler, block, count, fees, first = (out[i : i + _WORD] for i in range(0, _BATCH_WORDS * _WORD, _WORD))
        if not any(block):
            return None
        return BatchInfo(
            to_id(batch_id),
            hex0x(root),
            to_checksum_address(settler[12:]),
            int.from_bytes(block, "big"),
            int.from_bytes(count, "big"),
            int.from_bytes(fees, "big"),
            int.from_bytes(first, "big"),
        )

    def await_settled_batch(
        self,
        tx_hash: str,
        batch_id: str,
        merkle_root: str,
        records: Sequence[SettleRecord],
        timeout: float | None = None,
        poll: float = 0.05,
        *,
        first_sequence: int,
        max_prices: MaxPrices = None,
        replace_after: float | None = None,
        on_replace: Callable[[str], None] | None = None,
    ) -> BatchInfo:
        """Wait until `batch_id` is settled (by tx_hash or any other transaction) and return it; when
        tx_hash is mined without settling it, raise as wait_settle_batch does. Polls getBatch, a few
        hundred bytes, rather than the receipt. replace_after: every so many seconds unmined, the newest
        version of the transaction is replaced (Transactor.replace: same nonce, fees bumped, never above the
        max fee) and on_replace(new hash) called, so the caller can record it."""
        limit = timeout if timeout is not None else self.tx.receipt_timeout
        now = time.monotonic()
        deadline = now + limit
        next_replace = now + replace_after if replace_after else float("inf")
        hashes = [tx_hash]  # every version sent with this nonce; at most one is mined
        while (info := self.get_batch(batch_id)) is None:
            rcpt = next((r for h in reversed(hashes) if (r := self.tx.light_receipt(h)) is not None), None)
            if rcpt is not None:  # mined after our getBatch, or failed (a failed receipt has no logs)
                tx_hash = rcpt["transactionHash"]
                if rcpt["status"] == 1 and (info := self.get_batch(batch_id)) is not None:
                    return info
                self.wait_settle_batch(
                    tx_hash,
                    batch_id,
                    merkle_root,
                    records,
                    timeout=0,
                    light=True,
                    first_sequence=first_sequence,
                    max_prices=max_prices,
                )
                raise TransactionFailed(f"transaction {tx_hash} succeeded but batch {batch_id} is not settled")
            now = time.monotonic()
            if now > deadline:
                raise TransactionFailed(f"no receipt for {hashes[-1]} within {limit:.0f}s")
            if now >= next_replace:
                next_replace = now + replace_after
                try:
                    new = self.tx.replace(hashes[-1])  # logs one line when the bump would pass the max fee
                except FeeAboveCap as e:
                    log.warning("settle transaction %s is stuck and not replaced: %s", hashes[-1], e)
                    new = None
                except TransactionNotFound as e:
                    # dropped from the node's pool (anvil drops what cannot pay a block's base fee): waiting
                    # longer is useless; the settler's next step finds it gone and sends the batch again
                    raise TransactionFailed(f"transaction {hashes[-1]} was dropped from the node's pool") from e
                if new is not None and new not in hashes:
                    hashes.append(new)
                    if on_replace is not None:
                        on_replace(new)
            time.sleep(poll)
        return info

    def leaf_of(self, record: SettleRecord, sequence: int) -> str:
        """The leaf as the contract computes it (for cross-checks)."""
        return hex0x(self.tx.call(self.ledger.functions.leafOf(sequence, *record.as_tuple())))

    def verify_record(self, batch_id: str, leaf: str, proof: Sequence[str]) -> bool:
        fn = self.ledger.functions.verifyRecord(id_bytes(batch_id), id_bytes(leaf), [id_bytes(p) for p in proof])
        return self.tx.call(fn)

    def settled_records(
        self,
        *,
        from_block: int | None = None,
        to_block: int | str = "latest",
        batch_id: str | None = None,
        settler: str | None = None,
    ) -> list[SettledRecord]:
        """Every record settled in the block range (from the deploy block by default), decoded in bulk
        from the RecordsSettled logs (one per batch), in settlement order."""
        topics: list = [RECORDS_SETTLED_TOPIC, to_id(batch_id) if batch_id else None]
        if settler:
            topics.append("0x" + "00" * 12 + to_checksum_address(settler)[2:].lower())
        params = {"address": self.ledger.address, "topics": topics}
        logs = [lg for chunk in self._chunks(from_block, to_block, params) for lg in chunk.logs]
        out: list[SettledRecord] = []
        for lg in sorted(logs, key=lambda x: (x["blockNumber"], x["logIndex"])):
            out.extend(decode_records_settled(lg))
        return out

    # ------------------------------------------------------------------ ledger: rewards

    def withdraw(self):
        """Withdraw everything accrued to the sender."""
        return self.tx.transact(self.ledger.functions.withdraw())

    def withdraw_amount(self, amount: int):
        return self.tx.transact(self.ledger.functions.withdrawAmount(amount))

    def rewards_of(self, address: str) -> RewardBalance:
        return RewardBalance(*self.tx.call(self.ledger.functions.rewardsOf(to_checksum_address(address))))

    # ------------------------------------------------------------------ events

    def events(
        self,
        contract: str,
        event: str,
        *,
        from_block: int | None = None,
        to_block: int | str = "latest",
        filters: dict | None = None,
    ) -> list:
        """Decoded logs of one event ("registry" or "ledger"), from the deploy block by default, read in spans of
        blocks the provider answers (ledger.log_reader: hosted providers refuse a long eth_getLogs range, and a
        reader from the deploy block then never read anything once the chain was that long). `filters` name
        indexed arguments. A log that does not decode is logged and left out: anyone can emit a registry event
        whose string is not UTF-8, and decoding the whole range at once failed on it, which stopped every reader
        at that block for good."""
        c = self.registry if contract == "registry" else self.ledger
        ev = getattr(c.events, event)()
        params = {"address": c.address, "topics": _topics(ev.topic, ev.abi, filters or {})}
        out = []
        for chunk in self._chunks(from_block, to_block, params):
            for lg in chunk.logs:
                if not _asked_for(lg, params):
                    continue
                try:
                    got = ev.process_log(lg)
                except (ValueError, DecodingError, Web3Exception) as e:  # UnicodeDecodeError is a ValueError
                    log.warning(
                        "%s log %s of tx %s does not decode (%s); left out",
                        event,
                        lg.get("logIndex"),
                        hex0x(bytes(lg.get("transactionHash") or b"")),
                        type(e).__name__,
                    )
                    continue
                out.append(got)
        return out

    def _chunks(self, from_block: int | None, to_block: int | str, params: dict):
        """The logs matching `params` over the block range (from the deploy block by default; "latest" read now)."""
        start = self.deployment.deploy_block if from_block is None else from_block
        end = self.block_number() if to_block == "latest" else int(to_block)
        return self.logs.chunks(start, end, web3_query(self.w3, self.rpc_url, params))
