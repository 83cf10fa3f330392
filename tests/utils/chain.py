"""Chain fixtures: a real anvil with the loramesh contracts deployed, plus small registry factories.

Import into a conftest.py:
    from tests.utils.chain import anvil_chain, fresh_chain  # noqa: F401
`anvil_chain` is module-scoped (one anvil per test module, mining each transaction at once);
`fresh_chain` is per test, with a --state file, for tests that stop and restart the chain.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from eth_account import Account
from eth_account.signers.local import LocalAccount

from common.wire import hex0x, node_id_of
from devnet.anvil import DEV_KEYS, Anvil, AnvilConfig, free_port
from devnet.deploy import deploy
from ledger.chain import ChainClient
from ledger.deployment import Deployment

ETHER = 10**18
SETTLER_DEPOSIT = 100 * ETHER


@dataclass
class ChainEnv:
    """A running anvil with deployed contracts. admin = dev key 0 (ledger admin); settler = granted
    and prefunded; users = dev keys 2..9 (rich from genesis), for owners, operators and payees."""

    anvil: Anvil
    deployment: Deployment
    deployment_path: Path
    admin: LocalAccount
    settler: LocalAccount
    users: list[LocalAccount] = field(default_factory=list)

    @property
    def rpc_url(self) -> str:
        return self.anvil.rpc_url

    def client(self, account: LocalAccount | None = None) -> ChainClient:
        """A client for the deployment signing as `account` (read-only when None)."""
        return ChainClient(self.deployment, account)

    def new_account(self, fund: int = ETHER) -> LocalAccount:
        """A fresh random account with `fund` wei for gas."""
        acct = Account.create()
        if fund:
            self.client(self.admin).fund([acct.address], fund)
        return acct

    def restart(self) -> None:
        """Start anvil again on the same port and state file (after anvil.stop())."""
        self.anvil.start()


def start_chain(
    folder: Path, *, block_time: float | None = None, state: bool = False, price_grace_s: int = 0
) -> ChainEnv:
    """Launch anvil in `folder`, deploy, grant and prefund a settler; the caller stops `env.anvil`.
    price_grace_s: the registry's priceGraceSeconds. 0 here, not the devnet's day: the suite's price tests hold
    the ledger to the price of the moment, as it is once a grace is over; a grace's own tests ask for one."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = AnvilConfig(
        port=free_port(),
        block_time=block_time,
        log_file=folder / "anvil.log",
        state_file=folder / "state.json" if state else None,
    )
    anvil = Anvil(cfg).start()
    try:
        settler = Account.from_key(DEV_KEYS[1])
        deployment = deploy(
            anvil.rpc_url,
            settlers=[settler.address],
            settler_deposit=SETTLER_DEPOSIT,
            fund_amount=0,
            price_grace_s=price_grace_s,
        )
        path = folder / "deployment.json"
        deployment.save(path)
    except BaseException:
        anvil.stop()
        raise
    return ChainEnv(
        anvil, deployment, path, Account.from_key(DEV_KEYS[0]), settler, [Account.from_key(k) for k in DEV_KEYS[2:]]
    )


@pytest.fixture(scope="module")
def anvil_chain(tmp_path_factory):
    """One anvil + deployment per test module (instant mining)."""
    env = start_chain(tmp_path_factory.mktemp("anvil"))
    try:
        yield env
    finally:
        env.anvil.stop()


PRICE_GRACE_S = 3600  # grace_chain's priceGraceSeconds


@pytest.fixture(scope="module")
def grace_chain(tmp_path_factory):
    """One anvil + a deployment whose prices have an hour's grace (PRICE_GRACE_S) per test module: anvil_chain's
    has none."""
    env = start_chain(tmp_path_factory.mktemp("anvil"), price_grace_s=PRICE_GRACE_S)
    try:
        yield env
    finally:
        env.anvil.stop()


@pytest.fixture
def fresh_chain(tmp_path):
    """A private anvil + deployment with a --state file, for stop/restart tests."""
    env = start_chain(tmp_path / "anvil", state=True)
    try:
        yield env
    finally:
        env.anvil.stop()


def rand_id() -> str:
    """A random bytes32 id as "0x"+64 hex."""
    return hex0x(os.urandom(32))


def forge_dataset_logs(env: ChainEnv, account: LocalAccount, name: bytes, new_payee: str) -> tuple[str, str]:
    """A DatasetRegistered log naming the dataset `name` as raw bytes, then a DatasetPayeeChanged of it, both
    at the registry's address in one transaction, as a registry that took any bytes would log them (this one
    refuses such names): contracts/test/RegistryLogForger.sol's code stands at that address for the one
    transaction. Returns (transaction hash, dataset id)."""
    from eth_abi import encode
    from eth_utils import keccak

    from ledger.artifacts import load_artifact

    c = env.client(account)
    registry, w3 = c.registry.address, c.w3
    dataset = hex0x(keccak(encode(["address", "bytes32"], [account.address, keccak(name)])))
    forger = w3.eth.contract(address=registry, abi=load_artifact("RegistryLogForger")["abi"])
    code = w3.eth.get_code(registry).to_0x_hex()
    w3.provider.make_request("anvil_setCode", [registry, load_artifact("RegistryLogForger")["deployedBytecode"]])
    try:
        rcpt = c.tx.transact(forger.functions.datasetThenPayee(bytes.fromhex(dataset[2:]), name, new_payee))
    finally:
        w3.provider.make_request("anvil_setCode", [registry, code])
    assert w3.eth.get_code(registry).to_0x_hex() == code
    return rcpt["transactionHash"].to_0x_hex(), dataset


@dataclass(frozen=True)
class Registered:
    """Ids registered by `register_sample` and who owns what."""

    adapter_id: str
    node_id: str
    dataset_ids: tuple[str, ...]
    base_model: str
    owner: LocalAccount
    operator: LocalAccount
    payees: tuple[LocalAccount, ...]
    price: int


def register_sample(
    env: ChainEnv,
    *,
    price: int = 10**12,
    shares: tuple[int, ...] = (3000, 1500),
    owner: LocalAccount | None = None,
    operator: LocalAccount | None = None,
    payees: tuple[LocalAccount, ...] | None = None,
) -> Registered:
    """Register datasets (one per share), an adapter using them and a node, on fresh random ids."""
    owner = owner or env.users[0]
    operator = operator or env.users[1]
    payees = payees or tuple(env.users[2 + i % 6] for i in range(len(shares)))
    base = rand_id()
    names = tuple(f"ds-{rand_id()[2:14]}" for _ in shares)
    dataset_ids = tuple(env.client().dataset_id(n, payee.address) for n, payee in zip(names, payees))
    for name, payee in zip(names, payees):
        env.client(payee).register_dataset(name, rand_id())
    adapter_id, node_key = rand_id(), Ed25519PrivateKey.generate()
    node_id = node_id_of(node_key.public_key().public_bytes_raw())
    env.client(owner).register_adapter(
        adapter_id,
        name=f"adapter-{adapter_id[2:8]}",
        version="1.0.0",
        base_model=base,
        price_per_1k_tokens=price,
        datasets=list(zip(dataset_ids, shares)),
    )
    env.client(operator).register_node(
        node_key,
        peer_id="12D3KooWtest",
        multiaddrs=["/ip4/127.0.0.1/tcp/4001"],
        api_url="http://127.0.0.1:9000",
        base_model=base,
    )
    return Registered(adapter_id, node_id, dataset_ids, base, owner, operator, tuple(payees), price)
