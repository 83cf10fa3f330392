"""Pipelined settlement against a real anvil: several batches per step, a too-low gas limit,
a revert in the pipe, a nonce taken by another client, a refused transaction."""

import pytest
from eth_account import Account
from sqlmodel import Session, select

from ledger import errors as E
from ledger import settler as settler_module
from ledger.models import BatchStatus, SettlementBatch
from ledger.outbox import count_by_status
from ledger.settler import STEP_ROUNDS, Settler
from ledger.settler_config import SettlerConfig
from ledger.transport import GasTooLow
from tests.ledger.test_settler import add_records, settled_on_chain
from tests.utils.chain import ETHER, register_sample

pytestmark = pytest.mark.integration


def _batches(engine) -> list[SettlementBatch]:
    with Session(engine) as s:
        return list(s.exec(select(SettlementBatch).order_by(SettlementBatch.id)))


def _granted_settler(env):
    """A fresh settler account, granted and prepaid, so tests may revoke it without touching others."""
    acct = env.new_account(10 * ETHER)
    env.client(env.admin).grant_settler(acct.address)
    env.client(env.admin).deposit_for(acct.address, ETHER)
    return acct


def test_probe_then_several_batches_per_step(anvil_chain, engine):
    env = anvil_chain
    reg = register_sample(env)
    ids = add_records(engine, [reg], 40)
    settler = Settler(engine, env.client(env.settler), SettlerConfig(batch_size=5, interval=0, max_in_flight=4))
    assert settler.step() == 5  # probing: one simulated batch
    assert settler.step() == 20  # the pipe is open: max_in_flight batches in one step
    assert settler.drain() == 15
    assert [b.status for b in _batches(engine)] == [BatchStatus.SETTLED] * 8
    assert set(settled_on_chain(env.client(), ids).values()) == {1}


def test_settled_batches_give_their_place_back_within_a_step(anvil_chain, engine, monkeypatch):
    """While a step forms, batches the chain has settled meanwhile (this anvil mines each at once) are
    recorded at the next look and free their places: one step settles more than max_in_flight batches, at
    most STEP_ROUNDS times as many (so the looks at a step's start still come round)."""
    monkeypatch.setattr(settler_module, "REAP_EVERY", 0.0)  # look before every batch
    env = anvil_chain
    reg = register_sample(env)
    ids = add_records(engine, [reg], 50)
    settler = Settler(engine, env.client(env.settler), SettlerConfig(batch_size=5, interval=0, max_in_flight=2))
    send = settler._send

    def send_and_mine(w):
        # anvil mines each transaction at once, but after it has answered: a look that came quicker than
        # the mining (the forming takes about a millisecond) would find nothing to give back yet
        if sent := send(w):
            settler.client.w3.eth.wait_for_transaction_receipt(w.tx_hash, timeout=10)
        return sent

    monkeypatch.setattr(settler, "_send", send_and_mine)
    assert settler.step() == 5  # probing: one simulated batch
    assert settler.step() == 5 * 2 * STEP_ROUNDS
    assert settler.step() == 50 - 5 - 5 * 2 * STEP_ROUNDS
    assert [b.status for b in _batches(engine)] == [BatchStatus.SETTLED] * 10
    assert set(settled_on_chain(env.client(), ids).values()) == {1}


def test_max_in_flight_one_is_sequential(anvil_chain, engine):
    env = anvil_chain
    reg = register_sample(env)
    add_records(engine, [reg], 15)
    settler = Settler(engine, env.client(env.settler), SettlerConfig(batch_size=5, interval=0, max_in_flight=1))
    assert [settler.step(), settler.step(), settler.step(), settler.step()] == [5, 5, 5, 0]


def test_a_batch_paying_more_datasets_is_estimated_not_sent_with_a_cheaper_batchs_limit(anvil_chain, engine):
    """The datasets a batch pays are part of its shape: the limit learned from a batch of one adapter and no
    datasets ran a batch of the same records, adapters and nodes whose adapter pays five datasets out of gas (red
    team: with 16 datasets an adapter, a batch out of gas had every batch pipelined behind it revert)."""
    env = anvil_chain
    cheap = register_sample(env, shares=())
    payees = tuple(env.new_account() for _ in range(5))
    dear = [register_sample(env, shares=(1000,) * 5, payees=payees, operator=env.new_account())]
    first = add_records(engine, [cheap], 4)
    client = env.client(env.settler)
    settler = Settler(engine, client, SettlerConfig(batch_size=4, interval=0, max_in_flight=4))
    assert settler.step() == 4  # probe: the gas limit for 4 records of no datasets comes from this batch
    settler._probe = False  # the pipe is open: a batch of a shape it knows would be sent without estimating
    later = add_records(engine, dear, 4)
    assert settler.step() == 4
    assert [b.attempts for b in _batches(engine)] == [1, 1]
    assert set(settled_on_chain(client, first + later).values()) == {1}


def test_a_batch_whose_payees_are_new_runs_within_the_limit_learned_from_one_whose_payees_were_paid(
    anvil_chain, engine
):
    """The limit learned from a batch whose datasets' payees were paid before is used for a batch of the same
    shape whose payees are new, each a reward slot written from zero: the limit allows that for every account a
    shape pays, so it settles at its first send (before, it ran out of gas, and every batch pipelined behind it
    reverted: red team)."""
    env = anvil_chain
    payees = tuple(env.new_account() for _ in range(5))
    warm = register_sample(env, shares=(1000,) * 5, payees=payees)
    paid_before = register_sample(env, shares=(1000,) * 5, payees=payees, operator=warm.operator)
    fresh = register_sample(env, shares=(1000,) * 5, payees=tuple(env.new_account() for _ in range(5)))
    add_records(engine, [paid_before], 4)
    assert Settler(engine, env.client(env.settler), SettlerConfig(batch_size=4, interval=0)).step() == 4
    first = add_records(engine, [warm], 4)
    client = env.client(env.settler)  # a settler whose limits are learned anew
    settler = Settler(engine, client, SettlerConfig(batch_size=4, interval=0, max_in_flight=4))
    assert settler.step() == 4  # probe: the limit for this shape comes from payees paid before
    settler._probe = False
    later = add_records(engine, [fresh], 4)
    assert settler.step() == 4
    assert [b.attempts for b in _batches(engine)] == [1, 1, 1]
    assert set(settled_on_chain(client, first + later).values()) == {1}


def test_gas_limit_too_low_is_detected_and_resent(anvil_chain, engine):
    """A batch sent with a limit learned for its shape that proves too low (a chain whose costs changed) runs out of
    gas: that is seen, and the next step estimates it again and resends it."""
    env = anvil_chain
    reg = register_sample(env, shares=(1000,) * 5, payees=tuple(env.new_account() for _ in range(5)))
    first = add_records(engine, [reg], 4)
    client = env.client(env.settler)
    settler = Settler(engine, client, SettlerConfig(batch_size=4, interval=0, max_in_flight=4))
    assert settler.step() == 4  # probe: the limit for this shape is learned
    settler._probe = False
    [key] = client._settle_gas
    client._settle_gas[key] = 100_000  # under what the shape needs
    later = add_records(engine, [reg], 4)
    with pytest.raises(GasTooLow):
        settler.step()
    b = _batches(engine)[1]
    assert b.status == BatchStatus.SENT and b.attempts == 1 and not client.is_settled(b.batch_id)
    assert settler.step() == 4  # probing again: estimated, resent, settled
    b = _batches(engine)[1]
    assert b.status == BatchStatus.SETTLED and b.attempts == 2
    assert set(settled_on_chain(client, first + later).values()) == {1}


def test_revert_in_the_pipe_falls_back_to_probing(anvil_chain, engine):
    env = anvil_chain
    reg = register_sample(env)
    acct = _granted_settler(env)
    add_records(engine, [reg], 3)
    settler = Settler(engine, env.client(acct), SettlerConfig(batch_size=3, interval=0))
    assert settler.step() == 3
    env.client(env.admin).revoke_settler(acct.address)
    ids = add_records(engine, [reg], 3)
    with pytest.raises(E.NotSettler):  # sent unsimulated, reverted on chain, reason decoded
        settler.step()
    b = _batches(engine)[1]
    assert (b.status, b.attempts) == (BatchStatus.SENT, 1)
    with pytest.raises(E.NotSettler):  # probing: simulated, refused before anything is sent
        settler.step()
    assert _batches(engine)[1].attempts == 1
    env.client(env.admin).grant_settler(acct.address)
    assert settler.drain() == 3
    assert _batches(engine)[1].attempts == 2
    with Session(engine) as s:
        assert count_by_status(s) == {"settled": 6}
    assert set(settled_on_chain(env.client(), ids).values()) == {1}


def test_nonce_taken_by_another_client_is_read_again(anvil_chain):
    """Two clients of one account: the first one's local nonce goes stale, the node says "nonce too
    low", and it reads the pending nonce again instead of failing."""
    env = anvil_chain
    acct = env.new_account(ETHER)
    to = env.users[0].address
    client = env.client(acct)
    h1 = client.tx.send_data(to, b"", gas=21_000, value=1)
    env.client(acct).fund([to], 1)  # another client of the account takes the next nonce
    h2 = client.tx.send_data(to, b"", gas=21_000, value=1)
    client.tx.wait(h2)
    eth = env.client().w3.eth
    assert eth.get_transaction(h2)["nonce"] == eth.get_transaction(h1)["nonce"] + 2


def test_same_transaction_sent_twice_returns_its_hash(slow_chain):
    """A node that already holds the very transaction (answer lost, sent again) is not an error."""
    env = slow_chain
    acct = env.new_account(ETHER)
    client = env.client(acct)
    h1 = client.tx.send_data(env.users[0].address, b"", gas=21_000, value=1)
    client.tx._nonce -= 1  # as if the node's answer had been lost: the same nonce, fees and data again
    h2 = client.tx.send_data(env.users[0].address, b"", gas=21_000, value=1)
    assert h2 == h1
    assert client.tx.wait(h1, timeout=10)["status"] == 1


def test_refused_transaction_raises_transaction_failed(anvil_chain):
    env = anvil_chain
    broke = Account.create()  # no coin for gas: the node refuses the transaction outright
    client = env.client(broke)
    with pytest.raises(E.TransactionFailed, match="refused"):
        client.tx.send_data(env.deployment.ledger, b"", gas=100_000)
    assert client.tx._nonce is None  # read again from the chain next time


def test_a_batch_near_the_blocks_gas_limit_is_sent_within_it(anvil_chain, engine):
    """A batch is sent with its estimate and a margin, at most the latest block's gas limit: a limit above it is
    refused by every node, on every step (red team: a batch estimated at 28.5M gas, sent with 35.6M on a chain of
    30M blocks, stopped settlement for good)."""
    env = anvil_chain
    reg = register_sample(env, shares=(1000,) * 5, payees=tuple(env.new_account() for _ in range(5)))
    w3 = env.client().w3
    add_records(engine, [reg], 4)
    assert Settler(engine, env.client(env.settler), SettlerConfig(batch_size=4, interval=0)).step() == 4
    add_records(engine, [reg], 4)  # its payees paid now: the same gas as the next batch of it
    assert Settler(engine, env.client(env.settler), SettlerConfig(batch_size=4, interval=0)).step() == 4
    used = w3.eth.get_transaction_receipt(_batches(engine)[1].tx_hash)["gasUsed"]
    was = w3.eth.get_block("latest")["gasLimit"]
    w3.provider.make_request("anvil_setBlockGasLimit", [hex(used * 115 // 100)])  # under used x 1.25
    w3.provider.make_request("evm_mine", [])  # the latest block has it
    try:
        later = add_records(engine, [reg], 4)
        client = env.client(env.settler)  # no limit learned: estimated
        assert Settler(engine, client, SettlerConfig(batch_size=4, interval=0)).step() == 4
        assert set(settled_on_chain(client, later).values()) == {1}
        assert w3.eth.get_transaction(_batches(engine)[2].tx_hash)["gas"] <= used * 115 // 100
    finally:
        w3.provider.make_request("anvil_setBlockGasLimit", [hex(was)])
        w3.provider.make_request("evm_mine", [])


def test_an_account_paid_for_the_first_time_costs_one_storage_slot(anvil_chain, engine):
    """Each dataset payee a batch pays costs the settler about one new storage slot (20,000 gas) and its log, the
    registry's reads and the arithmetic: an account's accrued total is derived (what is available plus what was
    withdrawn), not kept in a second slot. The gas is the settler's, and a stranger's adapter names its datasets:
    with both slots a payee paid for the first time cost 54,000 gas (an adapter of 16 fresh payees added 862,000 to
    a batch of one record; now 505,000)."""
    env = anvil_chain
    w3 = env.client().w3
    warm = register_sample(env, shares=())
    gas = []
    for reg in (
        warm,
        *(register_sample(env, shares=(500,) * k, payees=tuple(env.new_account() for _ in range(k))) for k in (1, 9)),
    ):
        add_records(engine, [reg], 1)  # the first warms the owner and operator every batch pays
        assert Settler(engine, env.client(env.settler), SettlerConfig(batch_size=1, interval=0)).step() == 1
        gas.append(w3.eth.get_transaction_receipt(_batches(engine)[-1].tx_hash)["gasUsed"])
    per_payee = (gas[2] - gas[1]) / 8
    print(f"gas: {gas}, {per_payee:.0f} a fresh payee")
    assert 20_000 < per_payee < 40_000
