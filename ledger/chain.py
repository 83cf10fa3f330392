"""ChainClient: typed bindings to AdapterRegistry and AttributionLedger, built from the artifacts."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from eth_utils import function_signature_to_4byte_selector, to_checksum_address

from common.wire import ZERO_ID, hex0x, id_bytes, node_id_of, to_id
from ledger.artifacts import load_artifact
from ledger.deployment import Deployment
from ledger.errors import DeploymentMismatch, TransactionFailed
from ledger.merkle import encode_record
from ledger.transport import GAS_MARGIN, GasTooLow, RevertDecoder, Transactor, make_web3, rpc_guard, shown_url
from ledger.types import (
    AdapterInfo,
    AdapterRegistration,
    BatchInfo,
    DatasetInfo,
    Domain,
    NodeInfo,
    RewardBalance,
    SettleRecord,
    dataset_id_for,
    node_proof_message,
)

log = logging.getLogger(__name__)


SETTLE_SELECTOR = function_signature_to_4byte_selector(
    "settleBatch(bytes32,bytes32,(bytes32,bytes32,bytes32,uint64,uint64)[],uint256)"
)
GET_BATCH_SELECTOR = function_signature_to_4byte_selector("getBatch(bytes32)")
_WORD = 32
NO_FEE_LIMIT = 2**256 - 1  # settleBatch's maxFees when the caller priced nothing (tests, tools)


def settle_calldata(batch_id: str, merkle_root: str, encoded: Sequence[bytes], max_fees: int = NO_FEE_LIMIT) -> bytes:
    """Calldata of settleBatch(batchId, merkleRoot, records, maxFees) from records already encoded."""
    head = (
        id_bytes(batch_id)
        + id_bytes(merkle_root)
        + (4 * _WORD).to_bytes(_WORD, "big")
        + max_fees.to_bytes(_WORD, "big")
    )
    return SETTLE_SELECTOR + head + len(encoded).to_bytes(_WORD, "big") + b"".join(encoded)


class ChainClient:
    """One deployment, one (optional) signing account. Reverts raise ledger.errors classes."""

    def __init__(
        self, deployment: Deployment, account=None, *, rpc_url: str | None = None, receipt_timeout: float = 60.0
    ) -> None:
        self.deployment = deployment
        self.rpc_url = rpc_url or deployment.rpc_url
        self.w3 = make_web3(self.rpc_url)
        reg_abi = load_artifact("AdapterRegistry")["abi"]
        led_abi = load_artifact("AttributionLedger")["abi"]
        self.registry = self.w3.eth.contract(address=deployment.registry, abi=reg_abi)
        self.ledger = self.w3.eth.contract(address=deployment.ledger, abi=led_abi)
        self.decoder = RevertDecoder([reg_abi, led_abi])
        self.tx = Transactor(self.w3, self.decoder, deployment.chain_id, account, receipt_timeout)
        # settleBatch gas limit by record count: one estimate per count, raised when a batch needs more
        self._settle_gas: dict[int, int] = {}

    @classmethod
    def from_deployment(
        cls, deployment: str | Path | dict | Deployment, account=None, *, rpc_url: str | None = None, check: bool = True
    ) -> ChainClient:
        """Client for a deployment file/dict; check=True verifies the chain matches it."""
        if isinstance(deployment, (str, Path)):
            deployment = Deployment.load(deployment)
        elif isinstance(deployment, dict):
            deployment = Deployment.from_dict(deployment)
        client = cls(deployment, account, rpc_url=rpc_url)
        if check:
            client.check_deployment()
        return client

    @property
    def account(self):
        return self.tx.account

    @property
    def address(self) -> str:
        return self.tx.account.address

    def with_account(self, account) -> ChainClient:
        """The same deployment, signing as another account."""
        return ChainClient(self.deployment, account, rpc_url=self.rpc_url, receipt_timeout=self.tx.receipt_timeout)

    def check_deployment(self) -> None:
        """Raise DeploymentMismatch unless chain id, contract code and wiring match the file."""
        d = self.deployment
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
        return self.tx.transact(self.registry.functions.registerAdapter(id_bytes(reg.adapter_id), reg.spec(), sig))

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
        return self.tx.call(self.ledger.functions.basePricePer1kTokens())

    def transfer_admin(self, new_admin: str):
        return self.tx.transact(self.ledger.functions.transferAdmin(to_checksum_address(new_admin)))

    def is_settler(self, address: str) -> bool:
        return self.tx.call(self.ledger.functions.isSettler(to_checksum_address(address)))

    def node_share_bps(self) -> int:
        return self.tx.call(self.ledger.functions.nodeShareBps())

    def deposit_for(self, settler: str, amount: int):
        """Prepay `amount` wei of fees for a settler."""
        return self.tx.transact(self.ledger.functions.depositFor(to_checksum_address(settler)), value=amount)

    def reclaim_deposit(self, amount: int):
        return self.tx.transact(self.ledger.functions.reclaimDeposit(amount))

    def deposit_of(self, settler: str) -> int:
        return self.tx.call(self.ledger.functions.depositOf(to_checksum_address(settler)))

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

    def _settle_fn(self, batch_id: str, merkle_root: str, records: Sequence[SettleRecord], max_fees: int):
        return self.ledger.functions.settleBatch(
            id_bytes(batch_id), id_bytes(merkle_root), [r.as_tuple() for r in records], max_fees
        )

    def send_settle_batch(
        self,
        batch_id: str,
        merkle_root: str,
        records: Sequence[SettleRecord],
        *,
        simulate: bool = True,
        max_fees: int = NO_FEE_LIMIT,
    ) -> str:
        """Send settleBatch; returns the tx hash. simulate=True estimates it first (a duplicate raises
        BatchAlreadySettled, any revert its typed error); simulate=False sends at once with the gas
        limit learned for this record count (estimating only the first batch of each count) and the
        managed nonce: a revert then shows in wait_settle_batch, a too-low limit as GasTooLow.
        max_fees: what the caller priced the records at; the ledger refuses to charge more
        (FeesAboveQuote)."""
        data = settle_calldata(batch_id, merkle_root, [encode_record(r) for r in records], max_fees)
        n = len(records)
        if simulate or n not in self._settle_gas:
            need = int(self.tx.estimate(self.ledger.address, data) * GAS_MARGIN) + 10_000
            self._settle_gas[n] = max(self._settle_gas.get(n, 0), need)
        return self.tx.send_data(self.ledger.address, data, gas=self._settle_gas[n])

    def wait_settle_batch(
        self,
        tx_hash: str,
        batch_id: str,
        merkle_root: str,
        records: Sequence[SettleRecord],
        timeout: float | None = None,
        *,
        light: bool = False,
        max_fees: int = NO_FEE_LIMIT,
    ):
        """Wait for a settleBatch receipt (light=True: Transactor.light_receipt's fields only, much
        cheaper); a reverted one raises its decoded reason, one that ran out of gas
        raises GasTooLow (and the next batch of that size is estimated again)."""

        def replay() -> dict:  # only a reverted receipt needs the calldata again
            return {
                "to": self.ledger.address,
                "data": settle_calldata(batch_id, merkle_root, [encode_record(r) for r in records], max_fees),
            }

        try:
            return self.tx.wait(tx_hash, timeout, replay=replay, light=light)
        except GasTooLow:
            self._settle_gas.pop(len(records), None)
            raise

    def settle_batch(
        self, batch_id: str, merkle_root: str, records: Sequence[SettleRecord], *, max_fees: int = NO_FEE_LIMIT
    ):
        """Send and wait; returns the receipt."""
        return self.tx.transact(self._settle_fn(batch_id, merkle_root, records, max_fees))

    def is_settled(self, batch_id: str) -> bool:
        return self.tx.call(self.ledger.functions.isSettled(id_bytes(batch_id)))

    def get_batch(self, batch_id: str) -> BatchInfo | None:
        """The settled batch, or None when this id was never settled."""
        out = self.tx.raw_call(self.ledger.address, GET_BATCH_SELECTOR + id_bytes(batch_id))
        if len(out) != 5 * _WORD:
            raise DeploymentMismatch(f"getBatch at {self.ledger.address} returned {len(out)} bytes, not {5 * _WORD}")
        root, settler, block, count, fees = (out[i : i + _WORD] for i in range(0, 5 * _WORD, _WORD))
        if not any(block):
            return None
        return BatchInfo(
            to_id(batch_id),
            hex0x(root),
            to_checksum_address(settler[12:]),
            int.from_bytes(block, "big"),
            int.from_bytes(count, "big"),
            int.from_bytes(fees, "big"),
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
        max_fees: int = NO_FEE_LIMIT,
    ) -> BatchInfo:
        """Wait until `batch_id` is settled (by tx_hash or any other transaction) and return it; when
        tx_hash is mined without settling it, raise as wait_settle_batch does. Polls getBatch, a few
        hundred bytes, rather than the receipt, which carries one log per record."""
        limit = timeout if timeout is not None else self.tx.receipt_timeout
        deadline = time.monotonic() + limit
        while (info := self.get_batch(batch_id)) is None:
            rcpt = self.tx.light_receipt(tx_hash)
            if rcpt is not None:  # mined after our getBatch, or failed (a failed receipt has no logs)
                if rcpt["status"] == 1 and (info := self.get_batch(batch_id)) is not None:
                    return info
                self.wait_settle_batch(
                    tx_hash, batch_id, merkle_root, records, timeout=0, light=True, max_fees=max_fees
                )
                raise TransactionFailed(f"transaction {tx_hash} succeeded but batch {batch_id} is not settled")
            if time.monotonic() > deadline:
                raise TransactionFailed(f"no receipt for {tx_hash} within {limit:.0f}s")
            time.sleep(poll)
        return info

    def leaf_of(self, record: SettleRecord) -> str:
        """The leaf as the contract computes it (for cross-checks)."""
        return hex0x(self.tx.call(self.ledger.functions.leafOf(record.as_tuple())))

    def verify_record(self, batch_id: str, leaf: str, proof: Sequence[str]) -> bool:
        fn = self.ledger.functions.verifyRecord(id_bytes(batch_id), id_bytes(leaf), [id_bytes(p) for p in proof])
        return self.tx.call(fn)

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
        """Decoded logs of one event ("registry" or "ledger"), from the deploy block by default."""
        c = self.registry if contract == "registry" else self.ledger
        start = self.deployment.deploy_block if from_block is None else from_block
        with rpc_guard(self.rpc_url):
            return list(
                getattr(c.events, event)().get_logs(
                    from_block=start, to_block=to_block, argument_filters=filters or None
                )
            )
