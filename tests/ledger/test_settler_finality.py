"""Finality on a real anvil: a batch counts as final only after `confirmations` blocks on top of it, and a reorg
that drops settled batches sends their records back, to settle again exactly once (same sequence numbers,
accruals paid once, checked from the chain's RecordsSettled logs and counters). And a settle transaction
stuck in the pool is replaced with bumped fees, never above the max fee."""

import json
import logging
import threading
import time

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner
from web3.exceptions import TransactionNotFound

from ledger.batching import to_settle_record
from ledger.chain import ChainClient
from ledger.cli import settler_app
from ledger.models import BatchStatus, SettlementBatch, UsageRecord
from ledger.outbox import batch_records, count_by_status
from ledger.settler import Settler, settler_status
from ledger.settler_config import SettlerConfig
from ledger.transport import FeePolicy
from ledger.types import SettleRecord
from tests.ledger.test_settler import add_records, settled_on_chain
from tests.utils.chain import ETHER, rand_id, register_sample

pytestmark = pytest.mark.integration
CONFIRMATIONS = 3


def rpc(client, method: str, params: list):
    resp = client.w3.provider.make_request(method, params)
    assert "error" not in resp, resp
    return resp.get("result")


def batches(engine) -> list[SettlementBatch]:
    with Session(engine) as s:
        return list(s.exec(select(SettlementBatch).order_by(SettlementBatch.first_seq)))


def fees_in_db(engine) -> int:
    with Session(engine) as s:
        return sum(int(r.fee_wei) for r in s.exec(select(UsageRecord)))


def test_final_only_after_confirmations(anvil_chain, engine):
    env = anvil_chain
    add_records(engine, [register_sample(env)], 10)
    client = env.client(env.settler)
    settler = Settler(engine, client, SettlerConfig(batch_size=10, interval=0, confirmations=CONFIRMATIONS))
    assert settler.drain() == 10
    (batch,) = batches(engine)
    assert batch.status == BatchStatus.SETTLED and batch.block_hash is not None  # settled, not final
    status = settler_status(engine)
    assert (status["settled"], status["settled_unconfirmed"]) == (10, 10)
    assert status["fees_unconfirmed_wei"] == int(batch.total_fees) > 0
    shown = CliRunner().invoke(settler_app, ["status", "--db", str(engine.url)])
    assert shown.exit_code == 0 and "10 not final yet" in shown.output, shown.output
    rpc(client, "anvil_mine", [hex(CONFIRMATIONS - 1)])
    settler.step()
    assert batches(engine)[0].block_hash is not None  # N - 1 blocks on top: not yet
    rpc(client, "anvil_mine", ["0x1"])
    settler.step()
    assert batches(engine)[0].block_hash is None  # N blocks on top: final
    assert settler_status(engine)["settled_unconfirmed"] == 0


def test_reorg_sends_dropped_batches_again_exactly_once(anvil_chain, engine):
    env = anvil_chain
    ids = add_records(engine, [register_sample(env)], 30)
    client = env.client(env.settler)
    start_seq = client.next_sequence(env.settler.address)
    accrued_before = client.totals()["accrued"]
    settler = Settler(engine, client, SettlerConfig(batch_size=10, interval=0, confirmations=CONFIRMATIONS))
    assert settler.drain() == 30
    first = batches(engine)
    assert [b.status for b in first] == [BatchStatus.SETTLED] * 3
    assert len({b.block_number for b in first}) == 3  # automine: one block each, the last two on top
    head = client.block_number()
    assert first[-1].block_number == head and first[-2].block_number == head - 1

    # drop the two blocks holding the last two batches (replaced by two empty blocks)
    rpc(client, "anvil_reorg", [2, []])
    assert client.block_number() == head
    assert client.next_sequence(env.settler.address) == start_seq + 10
    assert not client.is_settled(first[1].batch_id) and not client.is_settled(first[2].batch_id)

    settler.step()  # sees the reorg, sends both back, resends them in order (same first sequence numbers)
    settler.drain()
    again = batches(engine)
    assert [(b.batch_id, b.first_seq) for b in again] == [(b.batch_id, b.first_seq) for b in first]
    assert all(b.status == BatchStatus.SETTLED for b in again)
    assert again[1].block_number > head - 1 and again[1].block_hash is not None
    with Session(engine) as s:
        assert count_by_status(s) == {"settled": 30}
    # on chain: every record once, the sequence continued once, the accruals equal the fees once
    assert set(settled_on_chain(client, ids).values()) == {1}
    assert client.next_sequence(env.settler.address) == start_seq + 30
    assert client.totals()["accrued"] - accrued_before == fees_in_db(engine)

    rpc(client, "anvil_mine", [hex(CONFIRMATIONS)])
    settler.step()
    assert all(b.block_hash is None for b in batches(engine))


def _settler_account(env):
    """A new account with the settler role and a deposit."""
    account = env.new_account(ETHER)
    env.client(env.admin).grant_settler(account.address)
    env.client(env.admin).deposit_for(account.address, ETHER)
    return account


def _copier(env):
    """Another settler (another gateway's account), whose sequence is 7 numbers ahead of ours."""
    mallory = _settler_account(env)
    reg = register_sample(env, price=0, shares=(), owner=env.users[6], operator=env.users[7])
    copier = env.client(mallory)
    copier.settle_batch(None, None, [SettleRecord(rand_id(), reg.adapter_id, reg.node_id, 1, 1) for _ in range(7)])
    return mallory, copier


def _records_and_a_copier(env, engine):
    """An adapter with 3 records in the outbox, a copier, and our next sequence number."""
    reg = register_sample(env, price=10**12)
    mallory, copier = _copier(env)
    first = env.client(env.settler).next_sequence()
    return reg, mallory, copier, first, add_records(engine, [reg], 3)


def _copy(engine, copier) -> SettlementBatch:
    """Settle, as `copier`, a copy of the database's one batch (its id names its records)."""
    with Session(engine) as s:
        (batch,) = s.exec(select(SettlementBatch)).all()
        records = [to_settle_record(r) for r in batch_records(s, batch.batch_id)]
    copier.settle_batch(
        batch.batch_id, None, records, max_prices={a: int(p) for a, p in json.loads(batch.prices_priced).items()}
    )
    return batch


def test_a_reorg_that_settles_a_copy_of_our_batch_instead_keeps_our_sequence_going(anvil_chain, engine):
    """The block with our batch is replaced by one with another settler's copy of it (its numbers): the batch moved,
    and its row must say whose sequence holds it. Keeping our account and numbers, every later batch of ours
    started past numbers the chain never gave us and failed SequenceMismatch, for good."""
    env = anvil_chain
    reg, mallory, copier, first, ids = _records_and_a_copier(env, engine)
    client = env.client(env.settler)
    settler = Settler(engine, client, SettlerConfig(batch_size=100, interval=0, confirmations=CONFIRMATIONS))
    before = rpc(client, "evm_snapshot", [])
    assert settler.drain() == 3
    rpc(client, "evm_revert", [before])  # the reorg: our block is gone, the copy is mined in its place
    batch = _copy(engine, copier)
    rpc(client, "anvil_mine", ["0x1"])
    assert client.get_batch(batch.batch_id).settler == mallory.address and client.next_sequence() == first

    settler.step()  # follows finality: the batch is in another block, in mallory's sequence
    (row,) = batches(engine)
    assert (row.settler, row.first_seq, row.status) == (mallory.address, 7, BatchStatus.SETTLED)
    later = add_records(engine, [reg], 2)
    assert settler.drain() == 2 and client.next_sequence() == first + 2
    assert set(settled_on_chain(client, ids + later).values()) == {1}


def test_a_copy_settled_first_then_dropped_by_a_reorg_is_sent_again_by_us(anvil_chain, engine):
    """Another settler's copy of our batch is settled before our send (our probe finds the id settled: no
    transaction of ours), and the batch is recorded in that settler's sequence; then a reorg drops the copy. Only
    batches under our own account were followed: the records stayed settled in the database, unpaid on chain."""
    env = anvil_chain
    reg, mallory, copier, first, ids = _records_and_a_copier(env, engine)
    client = env.client(env.settler)
    before = []

    def copy_it(point: str) -> None:
        if point == "before_send" and not before:
            before.append(rpc(client, "evm_snapshot", []))
            _copy(engine, copier)

    cfg = SettlerConfig(batch_size=100, interval=0, confirmations=CONFIRMATIONS)
    settler = Settler(engine, client, cfg, on_point=copy_it)
    assert settler.drain() == 3
    (row,) = batches(engine)
    assert row.settler == mallory.address and row.block_hash is not None  # not final yet
    rpc(client, "evm_revert", [before[0]])  # the reorg drops the copy
    rpc(client, "anvil_mine", [hex(CONFIRMATIONS + 3)])
    assert not client.is_settled(row.batch_id)
    # and the copier keeps a transaction waiting (automine off): a batch is waited for only while an account of ours
    # may still land a send of it, never on a stranger's account
    before_hash = row.tx_hash
    rpc(client, "evm_setAutomine", [False])
    try:
        copier.w3.eth.send_raw_transaction(
            mallory.sign_transaction(
                {
                    "to": mallory.address,
                    "value": 0,
                    "gas": 21000,
                    "maxFeePerGas": 10**9,
                    "maxPriorityFeePerGas": 1,
                    "nonce": copier.w3.eth.get_transaction_count(mallory.address),
                    "chainId": copier.w3.eth.chain_id,
                }
            ).raw_transaction
        )
        thread, _ = _step_in_thread(settler)  # sees the copy gone, sends the batch back and sends it again
        _wait_until(lambda: _sent_hash(engine) not in (None, before_hash))
        rpc(client, "evm_mine", [])
        thread.join(30)
    finally:
        rpc(client, "evm_setAutomine", [True])
    settler.drain()  # numbered again in our sequence and settled by us
    (row,) = batches(engine)
    assert (row.settler, row.first_seq, row.status) == (env.settler.address, first, BatchStatus.SETTLED)
    assert set(settled_on_chain(client, ids).values()) == {1} and client.next_sequence() == first + 3


def test_a_settler_leaves_another_accounts_batches_to_that_accounts_confirmations(anvil_chain, engine):
    """Two settler accounts of one gateway share its outbox, one waiting 6 confirmations, the other 1: the second
    followed every account's batches (to send back a copy a reorg drops), marked the first's final after one block,
    and a 3-block reorg then left its records settled in the database, unpaid on chain."""
    env = anvil_chain
    reg = register_sample(env, price=10**12)
    other = _settler_account(env)
    rpc(env.client(), "anvil_mine", ["0x5"])  # the reorg below reaches none of the set-up
    careful = Settler(engine, env.client(other), SettlerConfig(batch_size=100, interval=0, confirmations=6))
    hasty = Settler(engine, env.client(env.settler), SettlerConfig(batch_size=100, interval=0, confirmations=1))
    ids = add_records(engine, [reg], 3)
    assert careful.drain() == 3
    rpc(env.client(), "anvil_mine", ["0x1"])
    hasty.step()
    assert batches(engine)[0].block_hash is not None  # not final at 1 block: the careful account's to say
    rpc(env.client(), "anvil_reorg", [3, []])
    careful.step()
    careful.drain()
    (row,) = batches(engine)
    assert row.status == BatchStatus.SETTLED and set(settled_on_chain(env.client(), ids).values()) == {1}


def test_a_retired_accounts_batch_a_reorg_drops_is_sent_again_by_the_current_one(anvil_chain, engine):
    """The settler's key is rotated while a batch of the old account is settled, not final: a reorg then drops it,
    and the current account sends it again (no process of the old account runs to do it)."""
    env = anvil_chain
    reg = register_sample(env, price=10**12)
    old = _settler_account(env)
    rpc(env.client(), "anvil_mine", ["0x5"])  # the reorg below reaches none of the set-up
    cfg = SettlerConfig(batch_size=100, interval=0, confirmations=CONFIRMATIONS)
    ids = add_records(engine, [reg], 3)
    assert Settler(engine, env.client(old), cfg).drain() == 3
    current = Settler(engine, env.client(env.settler), cfg)
    rpc(env.client(), "anvil_reorg", [2, []])
    assert set(settled_on_chain(env.client(), ids).values()) == {0}
    current.step()
    current.drain()
    (row,) = batches(engine)
    assert (row.settler, row.status) == (env.settler.address, BatchStatus.SETTLED)
    assert set(settled_on_chain(env.client(), ids).values()) == {1}


def _wait_until(cond, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return value


def _sent_hash(engine) -> str | None:
    with Session(engine) as s:
        b = s.exec(select(SettlementBatch).where(SettlementBatch.status == BatchStatus.SENT)).first()
        return b.tx_hash if b else None


def _replacement_above(client, engine, fee: int) -> str | None:
    """The batch's recorded transaction when it offers more than `fee` per gas (None while it does not; a hash
    read just before the settler replaced it again is gone from the pool)."""
    h = _sent_hash(engine)
    try:
        return h if h and client.w3.eth.get_transaction(h)["maxFeePerGas"] > fee else None
    except TransactionNotFound:
        return None


def _step_in_thread(settler: Settler) -> tuple[threading.Thread, list]:
    out: list = []
    t = threading.Thread(target=lambda: out.append(settler.step(force=True)), daemon=True)
    t.start()
    return t, out


def test_stuck_settle_transaction_is_replaced_and_settles_once(anvil_chain, engine, caplog):
    """Automine off and the next base fee raised above what the first send offered: the settler replaces its
    transaction at the same nonce with bumped fees, records the new hash, and the batch settles once."""
    caplog.set_level(logging.INFO, logger="ledger.transport")
    env = anvil_chain
    ids = add_records(engine, [register_sample(env)], 5)
    client = env.client(env.settler)
    start_seq = client.next_sequence(env.settler.address)
    settler = Settler(engine, client, SettlerConfig(batch_size=5, interval=0, replace_after=1.0, receipt_timeout=30))
    rpc(client, "evm_setAutomine", [False])
    try:
        thread, out = _step_in_thread(settler)
        first = _wait_until(lambda: _sent_hash(engine))
        old = client.w3.eth.get_transaction(first)
        # the next block's base fee above what the first send offered: it could never be mined
        high = old["maxFeePerGas"] * 4
        rpc(client, "anvil_setNextBlockBaseFeePerGas", [hex(high)])
        # a replacement priced for the raised base fee, recorded in the batch row; then the block
        _wait_until(lambda: _replacement_above(client, engine, high))
        rpc(client, "evm_mine", [])
        thread.join(30)
    finally:
        rpc(client, "evm_setAutomine", [True])
    assert out == [5]
    (batch,) = batches(engine)
    assert batch.status == BatchStatus.SETTLED and batch.tx_hash != first
    mined = client.w3.eth.get_transaction(batch.tx_hash)  # the recorded hash is the one mined
    assert client.tx.light_receipt(batch.tx_hash)["status"] == 1
    assert mined["nonce"] == old["nonce"] and client.tx.light_receipt(first) is None
    assert (
        mined["maxFeePerGas"] * 8 > old["maxFeePerGas"] * 9
        and mined["maxPriorityFeePerGas"] * 8 > old["maxPriorityFeePerGas"] * 9
    )
    assert set(settled_on_chain(client, ids).values()) == {1}
    assert client.next_sequence(env.settler.address) == start_seq + 5
    assert "replaced stuck transaction" in caplog.text


def test_stuck_settle_transaction_above_the_max_fee_waits(anvil_chain, engine, caplog):
    """A base fee above the settler's max fee: no replacement, one clear line, and the batch settles once the
    base fee comes back down (its first transaction)."""
    env = anvil_chain
    ids = add_records(engine, [register_sample(env)], 5)
    probe = env.client(env.settler)
    cap = 3 * probe.tx.fee_policy.fees(probe.w3)[1]
    client = ChainClient(env.deployment, env.settler, fee_policy=FeePolicy(max_fee=cap))
    settler = Settler(engine, client, SettlerConfig(batch_size=5, interval=0, replace_after=1.0, receipt_timeout=30))
    rpc(client, "evm_setAutomine", [False])
    try:
        thread, out = _step_in_thread(settler)
        first = _wait_until(lambda: _sent_hash(engine))
        rpc(client, "anvil_setNextBlockBaseFeePerGas", [hex(4 * cap)])  # above the cap: no replacement may be sent
        _wait_until(lambda: "is stuck and not replaced" in caplog.text)
        assert _sent_hash(engine) == first
        rpc(client, "anvil_setNextBlockBaseFeePerGas", ["0x1"])
        rpc(client, "evm_mine", [])
        thread.join(30)
    finally:
        rpc(client, "evm_setAutomine", [True])
    assert out == [5]
    assert batches(engine)[0].tx_hash == first and client.tx.light_receipt(first)["status"] == 1
    assert set(settled_on_chain(client, ids).values()) == {1}
