"""ChainClient refuses deployments that do not match the chain, and reports an unreachable chain."""

import json
import re

import pytest
from eth_account import Account

from common.wire import id_bytes, to_id
from devnet.anvil import Anvil, AnvilConfig, free_port
from ledger.chain import ChainClient
from ledger.deployment import Deployment
from ledger.errors import ChainUnavailable, DeploymentMismatch, LedgerError

pytestmark = pytest.mark.integration


def test_matching_deployment_loads_from_file_dict_and_object(anvil_chain):
    env = anvil_chain
    for source in (env.deployment_path, str(env.deployment_path), env.deployment.to_dict(), env.deployment):
        assert ChainClient.from_deployment(source).block_number() >= env.deployment.deploy_block


def test_wrong_chain_id(anvil_chain):
    d = anvil_chain.deployment.to_dict() | {"chain_id": 1}
    with pytest.raises(DeploymentMismatch, match="chain id"):
        ChainClient.from_deployment(d)


def test_chain_without_the_contracts(anvil_chain, tmp_path):
    fresh = Anvil(AnvilConfig(port=free_port(), block_time=None)).start()
    try:
        with pytest.raises(DeploymentMismatch, match="no AdapterRegistry code"):
            ChainClient.from_deployment(anvil_chain.deployment.to_dict(), rpc_url=fresh.rpc_url)
    finally:
        fresh.stop()


def test_ledger_wired_to_another_registry(anvil_chain):
    d = anvil_chain.deployment.to_dict()
    d["contracts"]["AdapterRegistry"] = d["contracts"]["AttributionLedger"]  # has code, wrong wiring
    with pytest.raises(DeploymentMismatch, match="uses registry"):
        ChainClient.from_deployment(d)


def test_contracts_built_from_other_sources(anvil_chain):
    # an older loramesh's devnet (its registry took other arguments): one clear line, not a baffling revert
    d = anvil_chain.deployment.to_dict() | {"sources_sha256": "ab" * 32}
    with pytest.raises(DeploymentMismatch, match="built from other sources .* deploy them again"):
        ChainClient.from_deployment(d)
    assert ChainClient.from_deployment(anvil_chain.deployment.to_dict() | {"sources_sha256": ""})  # not known: let be


def test_malformed_and_missing_files(tmp_path):
    with pytest.raises(DeploymentMismatch, match="does not exist"):
        Deployment.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DeploymentMismatch, match="not valid JSON"):
        Deployment.load(tmp_path / "bad.json")
    # a deployment file is handed around: a stranger's nested, oversized or duplicate-keyed JSON is one clear error
    (tmp_path / "deep.json").write_text("[" * 200_000)
    with pytest.raises(DeploymentMismatch, match="nested deeper than 8 levels"):
        Deployment.load(tmp_path / "deep.json")
    (tmp_path / "big.json").write_bytes(b" " * (2 << 20))
    with pytest.raises(DeploymentMismatch, match="more than the limit"):
        Deployment.load(tmp_path / "big.json")
    (tmp_path / "dup.json").write_text('{"chain_id": 1, "chain_id": 2}')
    with pytest.raises(DeploymentMismatch, match="duplicate key 'chain_id'"):
        Deployment.load(tmp_path / "dup.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DeploymentMismatch, match="not a JSON object"):
        Deployment.load(tmp_path / "list.json")
    (tmp_path / "partial.json").write_text(json.dumps({"chain_id": 1}))
    with pytest.raises(DeploymentMismatch, match="malformed"):
        Deployment.load(tmp_path / "partial.json")
    with pytest.raises(DeploymentMismatch, match="not an address"):
        Deployment(chain_id=1, rpc_url="x", registry="0x12", ledger="0x12", deploy_block=0)


def test_rpc_url_secrets_are_not_in_errors(anvil_chain):
    """Hosted RPC endpoints carry an API key in the path or query, or a password before the host."""
    port = free_port()
    for url in (
        f"http://alice:s3cretpw@127.0.0.1:{port}/v3/APIKEY1234?token=T0KEN",
        f"http://127.0.0.1:{port}/APIKEY1234",
    ):
        d = anvil_chain.deployment.to_dict() | {"rpc_url": url}
        with pytest.raises(ChainUnavailable, match="unreachable") as e:
            ChainClient.from_deployment(d)
        assert f"chain at http://127.0.0.1:{port}/… is unreachable" in str(e.value)
        assert not {"s3cretpw", "APIKEY1234", "T0KEN", "alice"} & set(re.split(r"[^A-Za-z0-9]", str(e.value)))


def test_unreachable_chain(anvil_chain):
    d = anvil_chain.deployment.to_dict() | {"rpc_url": f"http://127.0.0.1:{free_port()}"}
    with pytest.raises(ChainUnavailable, match="unreachable"):
        ChainClient.from_deployment(d)


def test_sending_needs_an_account(anvil_chain):
    with pytest.raises(LedgerError, match="no account"):
        anvil_chain.client().grant_settler(Account.create().address)


def test_deployment_round_trips(anvil_chain, tmp_path):
    anvil_chain.deployment.save(tmp_path / "d.json")
    assert Deployment.load(tmp_path / "d.json") == anvil_chain.deployment


def test_an_account_without_gas_money_is_told_so_and_how_to_fund_it(anvil_chain):
    # `adapter publish` printed "{'code': -32003, 'message': 'Insufficient funds for gas * price + value'}" and
    # `node run` a 75-line traceback
    from eth_account import Account

    from ledger.errors import InsufficientFunds

    broke = Account.create()
    with pytest.raises(InsufficientFunds) as err:
        anvil_chain.client(broke).register_dataset("broke-data")
    assert broke.address in str(err.value) and f"devnet up --fund {broke.address}" in str(err.value)


def test_settler_changes_are_the_role_events_in_chain_order(anvil_chain):
    """What a node's settler roster reads (node.gateway_hello.SettlerRoster)."""
    admin = anvil_chain.client(anvil_chain.admin)
    head, before = admin.settler_changes()
    assert (anvil_chain.settler.address.lower(), True) in before
    a = Account.create().address
    admin.grant_settler(a)
    admin.revoke_settler(a)
    admin.grant_settler(a)
    last, changes = admin.settler_changes(head + 1)
    assert changes == [(a.lower(), True), (a.lower(), False), (a.lower(), True)]
    assert admin.settler_changes(last + 1) == (last, [])
    admin.revoke_settler(a)
    assert admin.settler_changes(last + 1)[1] == [(a.lower(), False)]


def test_event_reads_find_the_span_of_blocks_the_provider_answers(anvil_chain, monkeypatch):
    """A provider that refuses eth_getLogs over more than a few blocks (hosted and public ones cap the range,
    many at 1,000-5,000 blocks) kept every reader from the deploy block (the settler roster, the registry's nodes,
    settled records, rewards) from reading anything once the chain was longer than that: a fixed span of 10,000
    blocks was asked. The span now halves on a refusal, stays under a refused size, and is kept for the next
    read, so a reader pays the refusals once."""
    admin = anvil_chain.client(anvil_chain.admin)
    a = Account.create().address
    for _ in range(3):
        admin.grant_settler(a)
        admin.revoke_settler(a)
    admin.w3.provider.make_request("anvil_mine", [20])
    whole = admin.settler_changes()
    settled = admin.settled_records()
    rewards = admin.events("ledger", "RewardAccrued", filters={"account": anvil_chain.users[1].address})
    cap, asked = 4, []
    real = admin.w3.eth.get_logs

    def capped(params):
        first, last = params["fromBlock"], params["toBlock"]
        asked.append(last - first + 1)
        if last - first >= cap:
            raise ValueError({"code": -32005, "message": f"query exceeds max block range {cap}"})
        return real(params)

    monkeypatch.setattr(admin.w3.eth, "get_logs", capped)
    assert admin.settler_changes() == whole and (a.lower(), False) in whole[1]
    blocks = admin.block_number() - anvil_chain.deployment.deploy_block + 1
    assert blocks > 4 * cap
    refused = [n for n in asked if n > cap]
    # the whole range halved until answered (34, 17, 8 blocks), then the gap to the refused size halved (6, 5)
    assert len(refused) <= 2 * blocks.bit_length() and admin.logs.span == cap
    asked.clear()
    assert admin.settled_records() == settled
    assert admin.events("ledger", "RewardAccrued", filters={"account": anvil_chain.users[1].address}) == rewards
    assert max(asked) == cap and len(asked) == 2 * -(-blocks // cap)  # no refusal: the span was kept


def test_event_filters_go_to_the_provider_as_topics(anvil_chain, monkeypatch):
    """filters name indexed arguments and travel as topics (the provider sends only those logs); one naming an
    argument that is not indexed is a programming error, not a silent read of everything."""
    admin = anvil_chain.client(anvil_chain.admin)
    a = Account.create().address
    admin.grant_settler(a)
    seen = []
    real = admin.w3.eth.get_logs
    monkeypatch.setattr(admin.w3.eth, "get_logs", lambda p: seen.append(p["topics"]) or real(p))
    (got,) = admin.events("ledger", "SettlerGranted", filters={"settler": a})
    assert got["args"]["settler"] == a and seen[0][1] == "0x" + "00" * 12 + a[2:].lower()
    with pytest.raises(ValueError, match="no indexed argument amount"):
        admin.events("ledger", "RewardAccrued", filters={"amount": 1})
    # a bytes32 argument by the id as the project writes it, "0x" and 64 hex digits (or raw bytes)
    admin.register_dataset("topics-a")
    admin.register_dataset("topics-b")
    wanted = admin.dataset_id("topics-b")
    for value in (wanted, wanted.upper().replace("0X", "0x"), id_bytes(wanted)):
        (got,) = admin.events("registry", "DatasetRegistered", filters={"datasetId": value})
        assert to_id(got["args"]["datasetId"]) == wanted and got["args"]["name"] == "topics-b"
    # a provider that answers more than it was asked (the topics and the address ignored): the logs asked for, still
    monkeypatch.setattr(
        admin.w3.eth, "get_logs", lambda p: real({k: v for k, v in p.items() if k not in ("topics", "address")})
    )
    (got,) = admin.events("registry", "DatasetRegistered", filters={"datasetId": wanted})
    assert got["args"]["name"] == "topics-b"
    (got,) = admin.events("ledger", "SettlerGranted", filters={"settler": a.lower()})
    assert got["args"]["settler"] == a
