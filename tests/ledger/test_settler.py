"""The settler in-process against a real anvil: 1,000 records, triggers, rejections, duplicates,
unauthorised settler, missing deposit, and the chain stopped then restarted."""

import json
import threading
import time

import pytest
from sqlmodel import Session, select

from ledger import errors as E
from ledger.batching import to_settle_record
from ledger.merkle import MerkleTree, batch_id_for
from ledger.models import BatchStatus, SettlementBatch, UsageRecord
from ledger.outbox import add_usage_record, batch_records, count_by_status
from ledger.settler import Settler
from ledger.settler_config import SettlerConfig
from ledger.types import BASE_MODEL_ADAPTER_ID, SettleRecord
from tests.utils.chain import ETHER, rand_id, register_sample
from tests.utils.crashing_settler import CrashHook

pytestmark = pytest.mark.integration


def add_records(engine, regs, n, *, tokens=(40, 9), quote: int | None = None) -> list[str]:
    ids = []
    with Session(engine) as s:
        for i in range(n):
            reg = regs[i % len(regs)]
            rid = rand_id()
            ids.append(rid)
            add_usage_record(
                s,
                request_id=rid,
                adapter_id=reg.adapter_id,
                node_id=reg.node_id,
                prompt_tokens=tokens[0] + i % 13,
                completion_tokens=tokens[1],
                receipt_json={"request_id": rid},
                node_signature="sig",
                quoted_price_per_1k=quote,
            )
        s.commit()
    return ids


def outbox_rows(engine, status=None) -> list[UsageRecord]:
    """The outbox's rows in order (those in `status` only, when given)."""
    with Session(engine) as s:
        stmt = select(UsageRecord).order_by(UsageRecord.id)
        if status:
            stmt = stmt.where(UsageRecord.status == status)
        return list(s.exec(stmt))


def settled_on_chain(client, request_ids) -> dict[str, int]:
    """How many times each request id was settled (the RecordsSettled logs, decoded in bulk)."""
    wanted = set(request_ids)
    counts = {r: 0 for r in wanted}
    for rec in client.settled_records():
        if rec.request_id in wanted:
            counts[rec.request_id] += 1
    return counts


def test_thousand_records_settle_once_in_batches(anvil_chain, engine):
    env = anvil_chain
    regs = [register_sample(env, price=10**12), register_sample(env, price=7 * 10**11, shares=(2500,))]
    ids = add_records(engine, regs, 1000)
    client = env.client(env.settler)
    totals_before = client.totals()
    settler = Settler(engine, client, SettlerConfig(batch_size=100))
    assert settler.drain() == 1000
    with Session(engine) as s:
        assert count_by_status(s) == {"settled": 1000}
        batches = s.exec(select(SettlementBatch).order_by(SettlementBatch.id)).all()
        assert [b.record_count for b in batches] == [100] * 10
        assert all(b.status == BatchStatus.SETTLED and b.block_number for b in batches)
        # in outbox order, with a deterministic id and the root of its records
        first = batch_records(s, batches[0].batch_id)
        assert [r.request_id for r in first] == ids[:100]
        settle = [to_settle_record(r) for r in first]
        bounds = {a: int(p) for a, p in json.loads(batches[0].prices_priced).items()}
        assert bounds == {regs[0].adapter_id: 10**12, regs[1].adapter_id: 7 * 10**11}
        assert batches[0].batch_id == batch_id_for(settle, max_prices=bounds)
        assert batches[0].merkle_root == MerkleTree.from_records(settle, batches[0].first_seq).root_hex
        # one gapless sequence: each batch starts where the one before ended
        assert [b.first_seq for b in batches] == [batches[0].first_seq + 100 * i for i in range(10)]
        assert client.next_sequence() == batches[-1].first_seq + 100
    assert set(settled_on_chain(client, ids).values()) == {1}
    fees = 0
    with Session(engine) as s:
        for r in s.exec(select(UsageRecord)).all():
            reg = regs[0] if r.adapter_id == regs[0].adapter_id else regs[1]
            fees += reg.price * (r.prompt_tokens + r.completion_tokens) // 1000
        assert sum(int(b.total_fees) for b in s.exec(select(SettlementBatch)).all()) == fees
    assert client.totals()["accrued"] - totals_before["accrued"] == fees


def test_partial_batch_waits_for_interval(anvil_chain, engine):
    env = anvil_chain
    reg = register_sample(env)
    add_records(engine, [reg], 5)
    client = env.client(env.settler)
    slow = Settler(engine, client, SettlerConfig(batch_size=10, interval=3600))
    assert slow.step() == 0  # neither N records nor T seconds yet
    add_records(engine, [reg], 5)
    assert slow.step() == 10  # N reached
    add_records(engine, [reg], 3)
    quick = Settler(engine, client, SettlerConfig(batch_size=10, interval=0.2))
    time.sleep(0.3)
    assert quick.step() == 3  # T passed: the partial batch goes out
    with Session(engine) as s:
        assert count_by_status(s) == {"settled": 13}


def test_records_of_unregistered_adapters_are_set_aside_not_blocking(anvil_chain, engine):
    """Set aside (re-checked every minute: test_settler_review), never rejected for good."""
    env = anvil_chain
    reg = register_sample(env)
    good = add_records(engine, [reg], 3)
    with Session(engine) as s:
        add_usage_record(
            s,
            request_id=rand_id(),
            adapter_id=rand_id(),
            node_id=reg.node_id,
            prompt_tokens=1,
            completion_tokens=1,
            receipt_json="{}",
            node_signature="s",
        )
        add_usage_record(
            s,
            request_id=rand_id(),
            adapter_id=reg.adapter_id,
            node_id=rand_id(),
            prompt_tokens=1,
            completion_tokens=1,
            receipt_json="{}",
            node_signature="s",
        )
        s.commit()
    good += add_records(engine, [reg], 3)
    assert Settler(engine, env.client(env.settler)).drain() == 6
    with Session(engine) as s:
        assert count_by_status(s) == {"settled": 6, "set_aside": 2}
        errors = sorted(r.error for r in s.exec(select(UsageRecord).where(UsageRecord.status == "set_aside")))
        assert errors[0].startswith("unregistered: adapter ") and errors[1].startswith("unregistered: node ")
    assert set(settled_on_chain(env.client(), good).values()) == {1}


def test_base_model_records_settle_with_adapter_records(anvil_chain, engine):
    env = anvil_chain
    reg = register_sample(env, price=10**12)
    client = env.client(env.settler)
    base_price = client.base_price()
    assert base_price > 0
    ids = add_records(engine, [reg], 4)
    with Session(engine) as s:  # a base-model request: adapter id zero, not looked up in the registry
        for i in range(3):
            rid = rand_id()
            ids.append(rid)
            add_usage_record(
                s,
                request_id=rid,
                adapter_id=BASE_MODEL_ADAPTER_ID,
                node_id=reg.node_id,
                prompt_tokens=30 + i,
                completion_tokens=8,
                receipt_json={"request_id": rid},
                node_signature="sig",
            )
        s.commit()
    operator_before = client.rewards_of(reg.operator.address).accrued
    assert Settler(engine, client).drain() == 7
    with Session(engine) as s:
        assert count_by_status(s) == {"settled": 7}
        rows = s.exec(select(UsageRecord)).all()
        fees = {
            r.request_id: (base_price if r.adapter_id == BASE_MODEL_ADAPTER_ID else reg.price)
            * (r.prompt_tokens + r.completion_tokens)
            // 1000
            for r in rows
        }
        assert sum(int(b.total_fees) for b in s.exec(select(SettlementBatch)).all()) == sum(fees.values())
    assert set(settled_on_chain(client, ids).values()) == {1}
    base_fees = sum(f for rid, f in fees.items() if rid in ids[4:])
    node_cut = sum(f * client.node_share_bps() // 10_000 for rid, f in fees.items() if rid in ids[:4])
    assert client.rewards_of(reg.operator.address).accrued - operator_before == base_fees + node_cut


def test_batch_settled_elsewhere_counts_as_settled(anvil_chain, engine):
    """The contract refuses the duplicate (BatchAlreadySettled) and the settler reads that as done."""
    env = anvil_chain
    reg = register_sample(env)
    ids = add_records(engine, [reg], 4)
    client = env.client(env.settler)
    with Session(engine) as s:
        records = [
            to_settle_record(r)
            for r in s.exec(select(UsageRecord).where(UsageRecord.request_id.in_(ids)).order_by(UsageRecord.id))
        ]
    bounds = {reg.adapter_id: client.adapter_price(reg.adapter_id)}  # as the settler prices them
    batch_id = batch_id_for(records, max_prices=bounds)
    first = client.next_sequence()
    client.settle_batch(batch_id, None, records, first_sequence=first, max_prices=bounds)
    settler = Settler(engine, client, SettlerConfig(batch_size=4))
    with pytest.raises(E.BatchAlreadySettled):
        client.send_settle_batch(
            batch_id, MerkleTree.from_records(records, first).root_hex, records, first_sequence=first, max_prices=bounds
        )
    assert settler.drain() == 4
    assert set(settled_on_chain(client, ids).values()) == {1}


def test_a_batch_another_settler_copied_and_settled_first_keeps_our_sequence_going(anvil_chain, engine):
    """Another settler copies our batch (its id names its records) from the mempool and settles it first, from
    its own sequence: our records are paid once, and the batch is recorded in that settler's sequence, not
    ours. Left under our address with the copier's numbers, every later batch of ours started past them and
    failed SequenceMismatch, for good."""
    env = anvil_chain
    reg = register_sample(env, price=10**12)
    mallory = env.new_account(ETHER)
    env.client(env.admin).grant_settler(mallory.address)
    env.client(env.admin).deposit_for(mallory.address, ETHER)
    copier = env.client(mallory)
    copier.settle_batch(None, None, [SettleRecord(rand_id(), reg.adapter_id, reg.node_id, 1, 1) for _ in range(7)])
    client = env.client(env.settler)
    first = client.next_sequence()
    ids = add_records(engine, [reg], 3)

    def copy_it(point: str) -> None:
        if point == "before_send" and copier.next_sequence() == 7:
            with Session(engine) as s:
                (batch,) = s.exec(select(SettlementBatch)).all()
                ours = [to_settle_record(r) for r in batch_records(s, batch.batch_id)]
            bounds = {a: int(p) for a, p in json.loads(batch.prices_priced).items()}  # the calldata's maxPrices
            copier.settle_batch(batch.batch_id, None, ours, max_prices=bounds)

    settler = Settler(engine, client, SettlerConfig(batch_size=100), on_point=copy_it)
    assert settler.drain() == 3 and copier.next_sequence() == 10 and client.next_sequence() == first
    with Session(engine) as s:
        (batch,) = s.exec(select(SettlementBatch)).all()
        assert (batch.settler, batch.first_seq, batch.status) == (mallory.address, 7, BatchStatus.SETTLED)
    later = add_records(engine, [reg], 2)
    assert settler.drain() == 2 and client.next_sequence() == first + 2
    assert set(settled_on_chain(client, ids + later).values()) == {1}


def test_a_copy_settled_at_our_own_sequence_number_is_recorded_as_the_copiers(anvil_chain, engine):
    """A copier first settles junk of its own until its next sequence number equals ours (public), then copies our
    batch from the mempool and settles it from that number: its root is ours, and our row kept our account and
    numbers although the chain never gave them to us. Every later batch of ours then started past them and failed
    SequenceMismatch, for good."""
    env = anvil_chain
    reg = register_sample(env, price=10**12)
    client = env.client(env.settler)
    client.settle_batch(None, None, [SettleRecord(rand_id(), reg.adapter_id, reg.node_id, 1, 1) for _ in range(5)])
    mallory = env.new_account(ETHER)
    env.client(env.admin).grant_settler(mallory.address)
    env.client(env.admin).deposit_for(mallory.address, ETHER)
    copier = env.client(mallory)
    junk = register_sample(env, price=0, shares=(), owner=env.users[6], operator=env.users[7])
    first = client.next_sequence()
    ids = add_records(engine, [reg], 3)

    def copy_it(point: str) -> None:
        if point != "before_send" or copier.next_sequence() >= first:
            return
        gap = first - copier.next_sequence()
        copier.settle_batch(
            None, None, [SettleRecord(rand_id(), junk.adapter_id, junk.node_id, 0, 0) for _ in range(gap)]
        )
        with Session(engine) as s:
            (batch,) = s.exec(select(SettlementBatch).where(SettlementBatch.status != BatchStatus.SETTLED)).all()
            ours = [to_settle_record(r) for r in batch_records(s, batch.batch_id)]
        bounds = {a: int(p) for a, p in json.loads(batch.prices_priced).items()}
        copier.settle_batch(batch.batch_id, None, ours, max_prices=bounds)  # our id, our numbers: our root

    settler = Settler(engine, client, SettlerConfig(batch_size=100, interval=0), on_point=copy_it)
    assert settler.drain() == 3
    assert client.next_sequence() == first and copier.next_sequence() == first + 3
    with Session(engine) as s:
        (batch,) = s.exec(select(SettlementBatch)).all()
        assert (batch.settler, batch.first_seq, batch.status) == (mallory.address, first, BatchStatus.SETTLED)
    later = add_records(engine, [reg], 4)
    assert settler.drain() == 4 and client.next_sequence() == first + 4
    assert set(settled_on_chain(client, ids + later).values()) == {1}


def test_unauthorised_settler_leaves_records_waiting(anvil_chain, engine):
    env = anvil_chain
    reg = register_sample(env)
    add_records(engine, [reg], 3)
    stranger = env.new_account(ETHER)
    env.client(env.admin).deposit_for(stranger.address, ETHER)  # anyone may be funded; only settlers settle
    settler = Settler(engine, env.client(stranger), SettlerConfig(batch_size=3))
    with pytest.raises(E.NotSettler):
        settler.step()
    with Session(engine) as s:
        assert count_by_status(s) == {"submitted": 3}
        assert s.exec(select(SettlementBatch)).one().status == BatchStatus.CREATED
    env.client(env.admin).grant_settler(stranger.address)
    assert settler.drain() == 3


def test_missing_deposit_waits_then_resumes(anvil_chain, engine):
    """Without a deposit the records are set aside for it (they never block the outbox) and go back
    by themselves once it is paid in."""
    env = anvil_chain
    gateway = env.new_account(ETHER)
    env.client(env.admin).grant_settler(gateway.address)
    reg = register_sample(env, price=10**15)
    add_records(engine, [reg], 5)
    settler = Settler(engine, env.client(gateway), SettlerConfig(batch_size=5, poll=0.05, max_backoff=0.2))
    stop = threading.Event()
    t = threading.Thread(target=settler.run, args=(stop,))
    t.start()
    try:
        _wait_for(lambda: _status(engine) == {"set_aside": 5}, 20)  # nothing can settle them without the deposit
        with Session(engine) as s:
            assert all(r.error.startswith("deposit short") for r in s.exec(select(UsageRecord)))
        env.client(env.admin).deposit_for(gateway.address, ETHER)
        _wait_for(lambda: _status(engine) == {"settled": 5}, 20)
    finally:
        stop.set()
        t.join(10)


def test_chain_down_then_back(fresh_chain, engine):
    """Records wait while anvil is stopped; after it restarts (same state), all settle exactly once."""
    env = fresh_chain
    reg = register_sample(env)
    first = add_records(engine, [reg], 30)
    settler = Settler(
        engine, env.client(env.settler), SettlerConfig(batch_size=10, interval=0, poll=0.05, max_backoff=0.3)
    )
    stop = threading.Event()
    t = threading.Thread(target=settler.run, args=(stop,))
    t.start()
    try:
        _wait_for(lambda: _status(engine) == {"settled": 30}, 30)
        env.anvil.stop()
        later = add_records(engine, [reg], 25)
        with pytest.raises(E.ChainUnavailable):
            env.client().block_number()
        time.sleep(1.0)
        assert _status(engine).get("settled") == 30  # nothing lost, nothing settled while down
        env.restart()
        _wait_for(lambda: _status(engine) == {"settled": 55}, 30)
    finally:
        stop.set()
        t.join(10)
        engine.dispose()
    assert set(settled_on_chain(env.client(), first + later).values()) == {1}


def _status(engine) -> dict:
    with Session(engine) as s:
        return count_by_status(s)


def _wait_for(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.1)


def test_settler_config_is_checked():
    with pytest.raises(ValueError):
        SettlerConfig(batch_size=0)
    with pytest.raises(ValueError):
        CrashHook("sometimes")
    with pytest.raises(ValueError):
        SettlerConfig(poll=0)
