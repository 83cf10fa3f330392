"""`loramesh chain deploy` to a chain that is not ours: another chain id, a public chain's 30 gwei base fee."""

from __future__ import annotations

import threading

import pytest
from eth_account import Account
from sqlmodel import Session
from typer.testing import CliRunner

from devnet.anvil import DEV_KEYS, Anvil, AnvilConfig, free_port
from devnet.cli import app
from ledger.chain import ChainClient
from ledger.db import init_db, make_engine
from ledger.deployment import Deployment
from ledger.errors import ChainUnavailable, LedgerError
from ledger.outbox import add_usage_record, count_by_status
from ledger.settler import Settler
from ledger.settler_config import SettlerConfig
from ledger.transport import GWEI, FeeAboveCap, FeePolicy, make_web3
from tests.utils.chain import ChainEnv, rand_id, register_sample

pytestmark = pytest.mark.integration
runner = CliRunner()
BASE_FEE = 30 * GWEI
CHAIN_ID = 555_555


@pytest.fixture
def chain(tmp_path):
    cfg = AnvilConfig(
        port=free_port(), chain_id=CHAIN_ID, block_time=None, base_fee=BASE_FEE, log_file=tmp_path / "a.log"
    )
    anvil = Anvil(cfg).start()
    try:
        yield anvil
    finally:
        anvil.stop()


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "deployer.key"
    path.write_text(DEV_KEYS[0][2:] + "\n")  # a bare hex key, as an operator would keep it
    return path


def _deploy(rpc_url, key_file, out, *extra):
    return runner.invoke(app, ["chain", "deploy", "--rpc", rpc_url, "--key", str(key_file), "--out", str(out), *extra])


def test_deploy_then_settle_a_batch_at_a_30_gwei_base_fee(chain, key_file, tmp_path):
    out = tmp_path / "deployment.json"
    settler = Account.from_key(DEV_KEYS[1])  # rich from genesis: chain deploy funds nobody
    r = _deploy(
        chain.rpc_url,
        key_file,
        out,
        *("--settler", settler.address, "--deposit", "1", "--max-fee-gwei", "100", "--commit-blocks", "3"),
    )
    assert r.exit_code == 0, r.output
    assert f"chain {CHAIN_ID}" in r.output and "100 gwei" in r.output
    deployment = Deployment.load(out)
    assert deployment.chain_id == CHAIN_ID and deployment.funded == []
    client = ChainClient.from_deployment(out, settler)  # checks code and wiring at the addresses
    assert client.is_settler(settler.address) and client.deposit_of(settler.address) == 10**18
    # deployed at a base fee above the 2 gwei max fee deployment used to fix
    assert client.w3.eth.get_block(deployment.deploy_block)["baseFeePerGas"] > 20 * GWEI

    env = ChainEnv(
        chain, deployment, out, Account.from_key(DEV_KEYS[0]), settler, [Account.from_key(k) for k in DEV_KEYS[2:]]
    )
    # a public chain makes blocks by itself (this anvil only on demand): a name's first registration waits
    # for its commitment to be 3 blocks old; with no block coming, it says so in one line instead of waiting
    assert client.registry.functions.minCommitBlocks().call() == 3
    with pytest.raises(LedgerError, match="made no block for 1 s .* --commit-blocks 1"):
        client.commit_registration(rand_id(), "nobody-mines", stall_s=1.0)
    w3 = make_web3(chain.rpc_url)
    stop = threading.Event()

    def produce() -> None:
        while not stop.wait(0.3):
            w3.provider.make_request("evm_mine", [])

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        reg = register_sample(env)
    finally:
        stop.set()
        producer.join()
    engine = make_engine(f"sqlite:///{tmp_path}/outbox.db", immediate=True)
    init_db(engine)
    try:
        ids = [rand_id() for _ in range(3)]
        with Session(engine) as s:
            for rid in ids:
                add_usage_record(
                    s,
                    request_id=rid,
                    adapter_id=reg.adapter_id,
                    node_id=reg.node_id,
                    prompt_tokens=40,
                    completion_tokens=9,
                    receipt_json={"request_id": rid},
                    node_signature="sig",
                )
            s.commit()
        # a max fee below the base fee: the settler sends nothing and waits, none of its records set aside
        client.tx.fee_policy = FeePolicy(max_fee=GWEI // 10)
        settler_ = Settler(engine, client, SettlerConfig(batch_size=3))
        with pytest.raises(FeeAboveCap, match="above the max fee 0.1 gwei"):
            settler_.step(force=True)
        with Session(engine) as s:
            assert set(count_by_status(s)) <= {"pending", "submitted"}  # waiting, none set aside
        client.tx.fee_policy = FeePolicy()
        assert settler_.drain() == 3
        with Session(engine) as s:
            assert count_by_status(s) == {"settled": 3}
    finally:
        engine.dispose()
    assert sorted(r.request_id for r in client.settled_records()) == sorted(ids)


def test_cap_below_the_base_fee_is_one_line_and_sends_nothing(chain, key_file, tmp_path):
    out = tmp_path / "deployment.json"
    r = _deploy(chain.rpc_url, key_file, out, "--max-fee-gwei", "10")
    assert r.exit_code != 0
    assert isinstance(r.exception, FeeAboveCap) and isinstance(r.exception, ChainUnavailable)
    msg = str(r.exception)
    assert "\n" not in msg and "30 gwei" in msg and "10 gwei" in msg, msg
    assert not out.exists()
    w3 = make_web3(chain.rpc_url)
    assert w3.eth.get_transaction_count(Account.from_key(DEV_KEYS[0]).address, "pending") == 0
    assert w3.eth.block_number == 0


def test_an_existing_deployment_file_is_kept(chain, key_file, tmp_path):
    out = tmp_path / "deployment.json"
    out.write_text("{}")
    r = _deploy(chain.rpc_url, key_file, out)
    assert r.exit_code != 0 and "--force" in r.output
    assert out.read_text() == "{}"


@pytest.mark.parametrize(
    ("settler", "said"),
    [
        ("0x123", "'0x123' is not an address"),
        ("0x70997970c51812dc3A010C7d01b50e0d17dc79C8", "checksum"),  # one letter's case changed: a typo
    ],
    ids=["short", "bad-checksum"],
)
def test_a_bad_settler_address_is_refused_before_anything_is_sent(chain, key_file, tmp_path, settler, said):
    # it deployed both contracts (gas spent, nonce +2), then failed on the address and wrote no deployment file:
    # the contracts' addresses were lost
    out = tmp_path / "deployment.json"
    good = Account.from_key(DEV_KEYS[1]).address
    r = _deploy(chain.rpc_url, key_file, out, "--settler", good, "--settler", settler)
    assert r.exit_code == 2, r.output
    assert "Usage:" in r.output and "--settler" in r.output and said in r.output, r.output
    assert "Unknown format" not in r.output and "Traceback" not in r.output
    assert not out.exists()
    w3 = make_web3(chain.rpc_url)
    assert w3.eth.get_transaction_count(Account.from_key(DEV_KEYS[0]).address, "pending") == 0
    assert w3.eth.block_number == 0


def test_deploy_checks_every_address_before_it_sends(chain):
    from devnet.deploy import deploy

    for kwargs in ({"settlers": ["0x123"]}, {"fund": ["notanaddress"]}):
        with pytest.raises(ValueError, match="is not an address"):
            deploy(chain.rpc_url, **kwargs)
    w3 = make_web3(chain.rpc_url)
    assert w3.eth.get_transaction_count(Account.from_key(DEV_KEYS[0]).address, "pending") == 0


def test_a_failure_after_the_contracts_are_deployed_keeps_their_addresses(chain, key_file, tmp_path):
    # a settler deposit the deployer cannot pay failed after both contracts were deployed: the file that names
    # them was never written
    out = tmp_path / "deployment.json"
    settler = Account.from_key(DEV_KEYS[1]).address
    r = _deploy(chain.rpc_url, key_file, out, "--settler", settler, "--deposit", "1000000000")
    assert r.exit_code != 0
    deployment = Deployment.load(out)
    # and the error says so (review): else the user deploys again over them with --force
    said = str(r.exception) + r.output
    assert f"contracts deployed (registry {deployment.registry}" in said and f"written to {out}" in said, said
    ChainClient.from_deployment(out)  # the contracts are there, at the addresses the file names
    assert deployment.chain_id == CHAIN_ID
