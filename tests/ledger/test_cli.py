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
