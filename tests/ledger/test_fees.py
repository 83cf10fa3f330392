"""EIP-1559 fees from the chain (ledger.transport.FeePolicy), on real anvils with a public chain's base fee."""

from __future__ import annotations

import threading

import pytest
from eth_account import Account

from devnet.anvil import DEV_KEYS, Anvil, AnvilConfig, free_port
from ledger.errors import ChainUnavailable
from ledger.transport import GWEI, FeeAboveCap, FeePolicy, RevertDecoder, Transactor, make_web3

BASE_FEE = 30 * GWEI  # a busy public chain's
CHAIN_ID = 777_001  # not the devnet's, not anvil's default


@pytest.fixture
def chain(tmp_path):
    """A fresh anvil per test (instant mining, 30 gwei genesis base fee): fee history starts empty."""
    anvil = Anvil(
        AnvilConfig(
            port=free_port(), chain_id=CHAIN_ID, block_time=None, base_fee=BASE_FEE, log_file=tmp_path / "a.log"
        )
    ).start()
    try:
        yield anvil
    finally:
        anvil.stop()


def _raw(w3, method, params=()):
    return w3.provider.make_request(method, list(params))["result"]


def _send_with_tip(w3, key: str, tip: int, nonce: int) -> None:
    """A transfer signed by hand with this tip, mined at once (anvil's instant mining)."""
    acct = Account.from_key(key)
    tx = {
        "to": acct.address,
        "value": 0,
        "gas": 21_000,
        "chainId": CHAIN_ID,
        "type": 2,
        "nonce": nonce,
        "maxPriorityFeePerGas": tip,
        "maxFeePerGas": 200 * GWEI,
    }
    w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(acct.sign_transaction(tx).raw_transaction))


def test_fees_follow_fee_history(chain):
    w3 = make_web3(chain.rpc_url)
    # one transaction a block: the per-block 50th-percentile rewards are 2, 3, 7, 3, 9 gwei; their median is 3
    for nonce, tip in enumerate((2, 3, 7, 3, 9)):
        _send_with_tip(w3, DEV_KEYS[3], tip * GWEI, nonce)
    next_base = int(_raw(w3, "eth_feeHistory", ["0xa", "latest", [50]])["baseFeePerGas"][-1], 16)
    assert 0 < next_base < BASE_FEE  # blocks far below target lower the base fee by up to 12.5% each

    tip, max_fee = FeePolicy().fees(w3)
    assert tip == 3 * GWEI
    assert max_fee == 2 * next_base + 3 * GWEI

    # the tip is clamped to the configured max tip, the max fee to the cap
    assert FeePolicy(max_tip=2 * GWEI).fees(w3) == (2 * GWEI, 2 * next_base + 2 * GWEI)
    cap = next_base + GWEI
    assert FeePolicy(max_fee=cap).fees(w3) == (3 * GWEI, cap)


def test_empty_history_falls_back_to_the_node_tip(chain):
    w3 = make_web3(chain.rpc_url)
    node_tip = int(_raw(w3, "eth_maxPriorityFeePerGas"), 16)
    tip, max_fee = FeePolicy().fees(w3)  # only the genesis block: no block paid a tip yet
    assert tip == min(node_tip, FeePolicy().max_tip)
    assert max_fee == 2 * BASE_FEE + tip


def test_base_fee_above_cap_is_one_line_and_sends_nothing(chain):
    w3 = make_web3(chain.rpc_url)
    admin = Account.from_key(DEV_KEYS[0])
    tx = Transactor(w3, RevertDecoder([]), CHAIN_ID, admin, fee_policy=FeePolicy(max_fee=20 * GWEI))
    for send in (
        lambda: tx.send_value(Account.create().address, 1),
        lambda: tx.send_data(admin.address, b"", gas=30_000),
    ):
        with pytest.raises(FeeAboveCap) as err:
            send()
        assert isinstance(err.value, ChainUnavailable)  # the settler waits instead of setting records aside
        msg = str(err.value)
        assert "\n" not in msg and "30 gwei" in msg and "20 gwei" in msg, msg
    assert w3.eth.get_transaction_count(admin.address, "pending") == 0
    assert w3.eth.block_number == 0


def test_from_env_reads_gwei_and_refuses_garbage():
    p = FeePolicy.from_env({"LORAMESH_MAX_FEE_GWEI": "12.5", "LORAMESH_MAX_TIP_GWEI": "0.5"})
    assert (p.max_fee, p.max_tip) == (12_500_000_000, 500_000_000)
    assert FeePolicy.from_env({}) == FeePolicy()
    with pytest.raises(ValueError, match="LORAMESH_MAX_FEE_GWEI must be a number of gwei"):
        FeePolicy.from_env({"LORAMESH_MAX_FEE_GWEI": "lots"})
    with pytest.raises(ValueError, match="0..1e9"):
        FeePolicy.from_env({"LORAMESH_MAX_TIP_GWEI": "-1"})


def test_stuck_transaction_is_replaced_with_bumped_fees(chain):
    w3 = make_web3(chain.rpc_url)
    admin, to = Account.from_key(DEV_KEYS[0]), Account.create().address
    tx = Transactor(w3, RevertDecoder([]), CHAIN_ID, admin)
    _raw(w3, "evm_setAutomine", [False])  # nothing is mined until the test says so: the transfer is stuck
    first = tx.send_value(to, 1)
    old = w3.eth.get_transaction(first)
    miner = threading.Timer(1.5, lambda: _raw(w3, "evm_mine"))
    miner.start()
    try:
        rcpt = tx.wait(first, timeout=20, replace_after=0.1)
    finally:
        miner.join()
    mined = w3.eth.get_transaction(rcpt["transactionHash"])
    assert rcpt["status"] == 1 and mined["hash"] != old["hash"] and mined["nonce"] == old["nonce"]
    assert mined["maxFeePerGas"] * 8 > old["maxFeePerGas"] * 9  # more than 12.5% up, both fees
    assert mined["maxPriorityFeePerGas"] * 8 > old["maxPriorityFeePerGas"] * 9
    assert w3.eth.get_balance(to) == 1  # one of the versions was mined, once
    assert tx.receipt(first) is None


def test_replacement_stops_at_the_cap(chain):
    w3 = make_web3(chain.rpc_url)
    admin = Account.from_key(DEV_KEYS[0])
    cap = FeePolicy().fees(w3)[1]  # the first send already pays the cap: no room to bump
    tx = Transactor(w3, RevertDecoder([]), CHAIN_ID, admin, fee_policy=FeePolicy(max_fee=cap))
    _raw(w3, "evm_setAutomine", [False])
    first = tx.send_value(Account.create().address, 1)
    assert w3.eth.get_transaction(first)["maxFeePerGas"] == cap
    assert tx.replace(first) is None
    assert int(_raw(w3, "txpool_status")["pending"], 16) == 1  # nothing else was sent
