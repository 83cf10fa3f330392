"""The settler under a price's grace (contracts/src/PriceGrace.sol), against a real anvil whose prices have one: a
raise no longer strands the records admitted before it (they settle at their quotes, in the same batch as the
records of the other prices), a raise under a batch in flight is charged at the price the batch was priced at, and
once the grace is over a record quoted below the price waits, set aside, as it always did."""

import json

import pytest
from sqlmodel import Session, select

from ledger.errors import ChainUnavailable
from ledger.merkle import MAX_ADAPTERS_PER_BATCH
from ledger.models import BatchStatus, RecordStatus, SettlementBatch
from ledger.settler import PRICE_ABOVE_QUOTE, Settler
from ledger.settler_config import SettlerConfig
from tests.ledger.audit import ledger_transactions, record_settled_counts
from tests.ledger.test_settler import add_records, outbox_rows
from tests.utils.chain import ETHER, PRICE_GRACE_S, register_sample

pytestmark = pytest.mark.integration

GRACE = PRICE_GRACE_S


def _settler(env):
    acct = env.new_account(10 * ETHER)
    env.client(env.admin).grant_settler(acct.address)
    env.client(env.admin).deposit_for(acct.address, ETHER)
    return env.client(acct)


def _fee(price: int, row) -> int:
    return price * (row.prompt_tokens + row.completion_tokens) // 1000


def _batches(engine) -> list[SettlementBatch]:
    with Session(engine) as s:
        return list(s.exec(select(SettlementBatch).order_by(SettlementBatch.id)))


def test_records_admitted_before_a_raise_settle_at_their_quotes(grace_chain, engine):
    env = grace_chain
    client = _settler(env)
    start = client.block_number() + 1
    reg, other = register_sample(env, price=10**12), register_sample(env, price=5 * 10**11)
    owner = env.client(reg.owner)
    before = add_records(engine, [reg, other], 6, quote=10**12)  # `other`'s quoted at 10**12 > its price
    owner.set_adapter_price(reg.adapter_id, 2 * 10**12)
    between = add_records(engine, [reg], 2, quote=2 * 10**12)
    owner.set_adapter_price(reg.adapter_id, 3 * 10**12)  # a second raise in the grace: the floor stays 10**12
    after = add_records(engine, [reg], 2, quote=3 * 10**12)

    assert Settler(engine, client, SettlerConfig(batch_size=100, interval=0)).drain() == 10
    rows = {r.request_id: r for r in outbox_rows(engine)}
    assert {r.status for r in rows.values()} == {RecordStatus.SETTLED}
    for ids, price in ((before[0::2], 10**12), (between, 2 * 10**12), (after, 3 * 10**12), (before[1::2], 5 * 10**11)):
        assert all(int(rows[i].fee_wei) == _fee(price, rows[i]) for i in ids)
    # one batch for all three prices: the ledger's table names the adapter once per price it is charged
    batches = _batches(engine)
    assert [b.status for b in batches] == [BatchStatus.SETTLED]
    assert json.loads(batches[0].prices_priced) == {reg.adapter_id: str(3 * 10**12), other.adapter_id: str(5 * 10**11)}
    (log,) = client.ledger.events.RecordsSettled().get_logs(from_block=start)
    assert sorted(log["args"]["prices"]) == [5 * 10**11, 10**12, 2 * 10**12, 3 * 10**12]
    assert sum(int(b.total_fees) for b in batches) == sum(int(r.fee_wei) for r in rows.values())
    assert set(record_settled_counts(client.w3, env.deployment.ledger, start).values()) == {1}
    assert all(t.status == 1 for t in ledger_transactions(client.w3, env.deployment.ledger, start))
    # what the payees got is what the chain charged: the deposit went down by the quotes' fees
    assert client.deposit_of(client.address) == ETHER - sum(int(r.fee_wei) for r in rows.values())


def test_a_raise_under_a_batch_in_flight_is_charged_at_the_price_it_was_priced_at(grace_chain, engine, monkeypatch):
    """Without a grace, a raise mined before the batch got it refused and re-priced, and its records set aside
    until the price came back down. With one, the batch settles at the price the settler saw."""
    env = grace_chain
    client = _settler(env)
    reg = register_sample(env, price=10**12)
    add_records(engine, [reg], 3, quote=10**12)
    original = client.send_settle_batch

    def send(*args, **kwargs):
        env.client(reg.owner).set_adapter_price(reg.adapter_id, 9 * 10**12)
        return original(*args, **kwargs)

    monkeypatch.setattr(client, "send_settle_batch", send)
    assert Settler(engine, client, SettlerConfig(batch_size=3, interval=0)).drain() == 3
    (batch,) = _batches(engine)
    assert batch.status == BatchStatus.SETTLED and batch.last_error is None
    assert all(int(r.fee_wei) == _fee(10**12, r) for r in outbox_rows(engine))


def test_after_the_grace_a_record_quoted_below_the_price_is_set_aside(grace_chain, engine):
    env = grace_chain
    client = _settler(env)
    reg = register_sample(env, price=10**12)
    quoted = add_records(engine, [reg], 2, quote=10**12)
    env.client(reg.owner).set_adapter_price(reg.adapter_id, 2 * 10**12)
    w3 = client.w3
    w3.provider.make_request("evm_increaseTime", [GRACE - 60])  # inside the grace, but not by the settler's margin
    w3.provider.make_request("evm_mine", [])
    assert Settler(engine, client, SettlerConfig(batch_size=100, interval=0)).drain() == 0
    rows = outbox_rows(engine)
    assert {r.request_id for r in rows} == set(quoted)
    assert all(r.status == RecordStatus.SET_ASIDE and r.error.startswith(PRICE_ABOVE_QUOTE) for r in rows)
    assert all("grace" in r.error for r in rows)
    assert _batches(engine) == []  # nothing sent: nothing reverted


def test_an_owner_repricing_between_requests_costs_no_batch_per_price(grace_chain, engine):
    """An owner who moves its price between requests gives each of its records its own quote. The ledger charged
    an adapter one price a batch, so each quote took a batch of its own (a settleBatch's gas, about 200,000, paid
    by the gateway for each of the owner's price changes), and the rows held back had to be read past so as not
    to crowd other adapters out (red team). Now the adapter's entry appears once per price: the batches are as
    many as the records need, in outbox order, until the ledger's table of MAX_ADAPTERS_PER_BATCH entries is
    full."""
    env = grace_chain
    client = _settler(env)
    reg, other = register_sample(env, price=10**12), register_sample(env, price=10**12)
    owner = env.client(reg.owner)
    n = MAX_ADAPTERS_PER_BATCH + 8  # more quotes than one batch's table holds
    for i in range(n):
        add_records(engine, [reg], 1, quote=10**12 + i)
        owner.set_adapter_price(reg.adapter_id, 10**12 + i + 1)
    others = add_records(engine, [other], 4, quote=10**12)
    assert Settler(engine, client, SettlerConfig(batch_size=500, interval=0)).drain() == n + 4
    rows = {r.request_id: r for r in outbox_rows(engine)}
    assert {r.status for r in rows.values()} == {RecordStatus.SETTLED}
    assert all(int(r.fee_wei) == _fee(int(r.quoted_price_per_1k), r) for r in rows.values())
    first, second = _batches(engine)  # the first holds a full table of the owner's quotes, the rest the second
    assert (first.record_count, second.record_count) == (MAX_ADAPTERS_PER_BATCH, 8 + 4)
    assert {rows[i].batch_id for i in others} == {second.batch_id}


def test_an_id_spelled_two_ways_and_read_at_two_prices_is_charged_what_it_was_priced(grace_chain, engine, monkeypatch):
    """Found by the red team: a step's prices are read by each row's spelling of its adapter id, and serve all of the
    step's batches. An owner raising its price between the reads of two spellings gave one batch two readings of
    one adapter's price; the batch's bounds follow one (_record_bounds), so a row priced at the new price was sent
    bounded at the old one, and the chain charged it that (the outbox saying otherwise). One batch takes one
    reading of a price now: the other spelling's rows wait for the next batch."""
    from sqlalchemy import update

    from ledger.models import UsageRecord

    env = grace_chain
    client = _settler(env)
    warm, reg = register_sample(env, price=10**12), register_sample(env, price=10**12)
    add_records(engine, [warm], 1)
    settler = Settler(engine, client, SettlerConfig(batch_size=2, interval=0, max_in_flight=4))
    assert settler.step(force=True) == 1  # a settler's first step sends one batch: the pipe is open after it
    first = add_records(engine, [reg], 2, quote=10**12)  # the step's first batch reads the lower-case spelling
    shouted = add_records(engine, [reg], 1, quote=3 * 10**12)
    late = add_records(engine, [reg], 1)  # no quote: bounded by the price as read for its spelling
    with Session(engine) as s:
        s.execute(
            update(UsageRecord)
            .where(UsageRecord.request_id.in_(shouted))
            .values(adapter_id="0x" + reg.adapter_id[2:].upper())
        )
        s.commit()
    original, raised = client.send_settle_batch, []

    def send(*args, **kwargs):  # the owner raises between the step's first and second batch
        if not raised:
            raised.append(env.client(reg.owner).set_adapter_price(reg.adapter_id, 3 * 10**12))
        return original(*args, **kwargs)

    monkeypatch.setattr(client, "send_settle_batch", send)
    settler.step(force=True)
    monkeypatch.undo()
    settler.drain()
    rows = {r.request_id: r for r in outbox_rows(engine)}
    ours = [*first, *shouted, *late]
    assert all(rows[i].status == RecordStatus.SETTLED for i in ours)
    on_chain = {rec.request_id: rec.fee for rec in client.settled_records()}
    assert {i: int(rows[i].fee_wei) for i in ours} == {i: on_chain[i] for i in ours}
    assert int(rows[shouted[0]].fee_wei) == _fee(3 * 10**12, rows[shouted[0]])


@pytest.mark.parametrize("grace", [1, 599, 30 * 86_400 + 1])
def test_a_grace_no_honest_settler_could_use_is_refused_at_deployment(grace, tmp_path):
    """Found by the red team: a grace of 200 s was taken, but the settler prices at a quote only while the grace
    outlasts the next block by GRACE_MARGIN_S (300 s): it served only a settler paying old prices on purpose."""
    from typer.testing import CliRunner

    from devnet.cli import app
    from devnet.deploy import check_fees

    with pytest.raises(ValueError, match="price_grace_s must be 0"):
        check_fees(None, None, grace)
    key = tmp_path / "k"
    key.write_text("0x" + "11" * 32)
    r = CliRunner().invoke(
        app, ["chain", "deploy", "--rpc", "http://127.0.0.1:9", "--key", str(key), "--price-grace-s", str(grace)]
    )
    assert r.exit_code == 2 and "--price-grace-s" in r.output


def test_a_grace_priced_batch_resumed_by_another_process_keeps_its_id(grace_chain, engine, monkeypatch):
    """A batch priced at a quote under a grace, written but never sent (the chain went away), is resumed by a
    fresh settler from prices_priced: the same maxPrices, so the same id (no BatchIdMismatch, no split)."""
    env = grace_chain
    client = _settler(env)
    reg = register_sample(env, price=10**12)
    add_records(engine, [reg], 2, quote=10**12)
    env.client(reg.owner).set_adapter_price(reg.adapter_id, 3 * 10**12)
    add_records(engine, [reg], 2, quote=3 * 10**12)

    def down(*args, **kwargs):
        raise ChainUnavailable("gone")

    monkeypatch.setattr(client, "send_settle_batch", down)
    first = Settler(engine, client, SettlerConfig(batch_size=100, interval=0, lease=1))
    with pytest.raises(ChainUnavailable):
        first.step(force=True)
    first.release()
    (b,) = _batches(engine)
    monkeypatch.undo()
    second = Settler(engine, env.client(client.account), SettlerConfig(batch_size=100, interval=0))
    assert second.drain() == 4
    batches = _batches(engine)
    assert batches[0].batch_id == b.batch_id and batches[0].status == BatchStatus.SETTLED
    assert all(bt.status == BatchStatus.SETTLED for bt in batches)
    assert {r.status for r in outbox_rows(engine)} == {RecordStatus.SETTLED}
