"""`rewards show` / `rewards withdraw` (typer, in-process) against a real anvil."""

import json

import pytest
from typer.testing import CliRunner

from ledger import errors as E
from ledger.cli import rewards_app, settler_app
from ledger.keys import load_account
from ledger.types import BASE_MODEL_ADAPTER_ID, SettleRecord
from tests.utils.chain import ETHER, rand_id, register_sample

pytestmark = pytest.mark.integration
runner = CliRunner()


def _settle(env, reg, n):
    records = [SettleRecord(rand_id(), reg.adapter_id, reg.node_id, 500, 100) for _ in range(n)]
    env.client(env.settler).settle_batch(None, None, records)


def test_rewards_show_adds_up(anvil_chain):
    env = anvil_chain
    owner = env.new_account(ETHER)
    reg = register_sample(env, price=10**12, shares=(4000,), owner=owner, payees=(owner,))
    _settle(env, reg, 3)
    _settle(env, reg, 2)
    r = runner.invoke(rewards_app, ["show", owner.address, "--deployment", str(env.deployment_path), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["adds_up"] and out["batches"] == 2
    assert set(out["by_role"]) == {"adapter_owner", "dataset"}
    assert out["accrued"] == env.client().rewards_of(owner.address).accrued > 0
    assert list(out["by_adapter"]) == [reg.adapter_id]
    r = runner.invoke(rewards_app, ["show", owner.address, "--deployment", str(env.deployment_path)])
    assert r.exit_code == 0 and "adds up" in r.output and reg.adapter_id[:10] in r.output
    assert "\u2026" not in r.output  # at 80 columns the adapter id is folded onto two lines, never cut short
    first_line = r.output.splitlines()[0]
    assert first_line.startswith(owner.address) and first_line.endswith(" wei)")  # one line, however long


def test_rewards_show_includes_base_model_earnings(anvil_chain):
    env = anvil_chain
    operator = env.new_account(ETHER)
    reg = register_sample(env, price=10**12, operator=operator)
    _settle(env, reg, 2)
    base = [SettleRecord(rand_id(), BASE_MODEL_ADAPTER_ID, reg.node_id, 500, 100) for _ in range(3)]
    env.client(env.settler).settle_batch(None, None, base)
    want_base = 3 * env.client().base_price() * 600 // 1000
    r = runner.invoke(rewards_app, ["show", operator.address, "--deployment", str(env.deployment_path), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["adds_up"] and out["base_model"] == want_base > 0
    assert out["by_adapter"][BASE_MODEL_ADAPTER_ID] == {"node": want_base}
    assert out["accrued"] == want_base + out["by_adapter"][reg.adapter_id]["node"]
    r = runner.invoke(rewards_app, ["show", operator.address, "--deployment", str(env.deployment_path)])
    assert r.exit_code == 0 and "base model" in r.output and "adds up" in r.output


def test_rewards_withdraw_with_key_file(anvil_chain, tmp_path):
    env = anvil_chain
    owner = env.new_account(ETHER)
    reg = register_sample(env, price=10**12, shares=(), owner=owner)
    key = tmp_path / "owner.key"
    key.write_text(owner.key.hex())
    r = runner.invoke(rewards_app, ["withdraw", "--key", str(key), "--deployment", str(env.deployment_path)])
    assert isinstance(r.exception, E.NothingToWithdraw)
    _settle(env, reg, 2)
    owed = env.client().rewards_of(owner.address).available
    r = runner.invoke(
        rewards_app,
        ["withdraw", "--key", str(key), "--deployment", str(env.deployment_path), "--amount", str(owed + 1)],
    )
    assert isinstance(r.exception, E.InsufficientRewards)
    r = runner.invoke(rewards_app, ["withdraw", "--key", str(key), "--deployment", str(env.deployment_path)])
    assert r.exit_code == 0, r.output
    assert f"withdrew {owed} wei" in r.output
    assert env.client().rewards_of(owner.address).withdrawn == owed
    # the wei in words are what is available now, not what ever accrued
    r = runner.invoke(
        rewards_app, ["show", owner.address, "--deployment", str(env.deployment_path)], env={"COLUMNS": "200"}
    )
    assert r.exit_code == 0 and "available 0.000000 ETH (0 wei)" in r.output, r.output


def test_key_file_errors(tmp_path):
    with pytest.raises(E.LedgerError, match="cannot read key file"):
        load_account(tmp_path / "missing.key")
    (tmp_path / "bin.key").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(E.LedgerError, match="not text"):
        load_account(tmp_path / "bin.key")


def test_settler_app_lists_its_commands():
    r = runner.invoke(settler_app, ["--help"])
    assert r.exit_code == 0 and all(c in r.output for c in ("run", "status", "requeue"))


def _loramesh(args, env=None):
    """The root `loramesh` command as the console script runs it: standalone, its usage errors exit 2."""
    from devnet.cli import app

    return runner.invoke(app, args, env=env)


@pytest.mark.parametrize(
    ("args", "option", "said"),
    [
        (["rewards", "show", "notanaddress"], "'address'", "'notanaddress' is not an address"),
        (["rewards", "show", "0x123"], "'address'", "'0x123' is not an address"),
        (["settler", "status", "--db", "sqlite:///x.db", "--address", "nope"], "--address", "'nope' is not an address"),
        (["rewards", "withdraw", "--key", "k.json", "--amount", "-5"], "--amount", "-5"),
        (["rewards", "withdraw", "--key", "k.json", "--amount", "0"], "--amount", "0"),
    ],
    ids=["show-word", "show-short", "status-address", "withdraw-negative", "withdraw-zero"],
)
def test_bad_addresses_and_amounts_are_usage_errors(tmp_path, args, option, said):
    # web3's internal message ("when sending a str, it must be a hex string"), or "ABI Not Found!", exit 1
    r = _loramesh(args)
    assert r.exit_code == 2, r.output
    assert "Usage:" in r.output and option in r.output and said in r.output, r.output
    assert "hex string" not in r.output and "ABI" not in r.output


def test_an_address_with_a_bad_checksum_is_refused_and_a_lowercase_one_is_taken(anvil_chain):
    env = anvil_chain
    address = env.users[0].address
    typo = address[:2] + address[2:].swapcase()  # every letter's case flipped: mixed case, the checksum wrong
    if typo[2:].lower() == typo[2:] or typo[2:].upper() == typo[2:]:
        pytest.skip("an address without letters")
    r = _loramesh(["rewards", "show", typo, "--deployment", str(env.deployment_path)])
    assert r.exit_code == 2 and "checksum" in r.output, r.output
    r = _loramesh(["rewards", "show", address.lower(), "--deployment", str(env.deployment_path), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["address"] == address


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--batch-size", "0"),
        ("--batch-size", "5001"),
        ("--interval", "-1"),
        ("--replace-after", "-1"),
        ("--replace-after", "0"),
    ],
)
def test_settler_run_bounds_are_usage_errors_naming_the_option(tmp_path, option, value):
    # "interval must be >= 0 and poll > 0, got -1.0, 0.2", exit 1: poll is no setting of the user's
    db = tmp_path / "outbox.db"
    r = _loramesh(["settler", "run", "--db", f"sqlite:///{db}", "--key", "k.json", "--drain", option, value])
    assert r.exit_code == 2, r.output
    assert "Usage:" in r.output and option in r.output and "poll" not in r.output, r.output
    assert not db.exists()


def test_settler_run_bounds_from_the_environment_are_usage_errors(tmp_path):
    r = _loramesh(
        ["settler", "run", "--db", f"sqlite:///{tmp_path / 'o.db'}", "--key", "k.json", "--drain"],
        env={"LORAMESH_SETTLER_INTERVAL": "-1"},
    )
    assert r.exit_code == 2 and "interval" in r.output and "poll" not in r.output, r.output


def test_settler_run_logs_what_it_settles_and_where(anvil_chain, tmp_path):
    """One INFO line at start: the settler's address, the chain (RPC and chain id), the database, the interval."""
    import os
    import subprocess
    import sys

    from ledger.db import init_db, make_engine

    env = anvil_chain
    db = tmp_path / "outbox.db"
    engine = make_engine(f"sqlite:///{db}")
    init_db(engine)
    engine.dispose()
    key = tmp_path / "settler.key"
    key.write_text(env.settler.key.hex())
    r = subprocess.run(
        [sys.executable, "-m", "devnet", "settler", "run", "--db", f"sqlite:///{db}", "--key", str(key)]
        + ["--deployment", str(env.deployment_path), "--interval", "2.5", "--drain"],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("LORAMESH_")},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "settled 0 records"
    [line] = [x for x in r.stderr.splitlines() if env.settler.address in x]
    assert "INFO" in line and env.rpc_url in line and f"chain {env.deployment.chain_id}" in line, line
    assert str(db) in line and "2.5" in line, line
