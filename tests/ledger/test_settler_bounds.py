"""Prices bounded on the settler's side, against a real anvil: a record claiming 10^12 tokens and
adapters priced at 10^30 wei (or in whole coins) are set aside with their reasons while the rest
settle; a deposit too small for everything settles what it can and sets the rest aside (and says
so in `settler status`); a price raised between pricing and mining makes the batch re-priced, never
retried forever."""

import json
import logging

import pytest
from sqlalchemy import update
from sqlmodel import Session, select
from typer.testing import CliRunner

from ledger.cli import settler_app
from ledger.errors import ContractError
from ledger.models import BatchStatus, RecordStatus, SettlementBatch, UsageRecord
from ledger.outbox import add_usage_record, count_by_status
from ledger.settler import (
    DEPOSIT_SHORT,
    ID_UNREADABLE,
    PRICE_ABOVE_QUOTE,
    PRICE_MOVING,
    PRICE_TOO_HIGH,
    QUOTE_UNREADABLE,
    REPRICED,
    TOKENS_UNREADABLE,
    TOO_MANY_TOKENS,
    Settler,
)
from ledger.settler_config import SettlerConfig
from tests.ledger.audit import ledger_transactions, record_settled_counts
from tests.ledger.test_settler import add_records, outbox_rows
from tests.utils.chain import ETHER, rand_id, register_sample

pytestmark = pytest.mark.integration
runner = CliRunner()
FEE = 10**12 * 50 // 1000  # one record of add_records(tokens=(40, 10)) at 10^12 wei per 1k tokens


def _status(engine) -> dict:
    with Session(engine) as s:
        return count_by_status(s)


def _funded_settler(env, deposit: int):
    acct = env.new_account(10 * ETHER)
    env.client(env.admin).grant_settler(acct.address)
    if deposit:
        env.client(env.admin).deposit_for(acct.address, deposit)
    return acct


def test_out_of_bounds_records_are_set_aside_while_the_rest_settle(anvil_chain, engine):
    env = anvil_chain
    client = env.client(env.settler)
    start = client.block_number() + 1
    good = register_sample(env, price=10**12)
    absurd = register_sample(env, price=10**30)  # 10^30 wei per 1k tokens
    whole_coins = register_sample(env, price=3 * ETHER)  # "3" meant as coins, entered in wei units of 10^18
    ids = add_records(engine, [good], 5)
    with Session(engine) as s:
        huge = rand_id()
        add_usage_record(
            s,
            request_id=huge,
            adapter_id=good.adapter_id,
            node_id=good.node_id,
            prompt_tokens=10**12,
            completion_tokens=3,
            receipt_json={"r": 1},
            node_signature="s",
        )
        s.commit()
    dear = add_records(engine, [absurd, whole_coins], 4)
    ids += add_records(engine, [good], 5)

    settler = Settler(engine, client, SettlerConfig(batch_size=4, interval=0))
    assert settler.drain() == 10
    with Session(engine) as s:
        assert count_by_status(s) == {"settled": 10, "set_aside": 5}
    aside = {r.request_id: r for r in outbox_rows(engine, RecordStatus.SET_ASIDE)}
    assert aside[huge].error.startswith(TOO_MANY_TOKENS) and "1000000000003 tokens" in aside[huge].error
    for rid in dear:
        assert aside[rid].error.startswith(PRICE_TOO_HIGH) and aside[rid].batch_id is None
    assert str(10**30) in aside[dear[0]].error and str(3 * ETHER) in aside[dear[1]].error
    r0 = aside[dear[0]]
    assert int(r0.fee_wei) == 10**30 * (r0.prompt_tokens + r0.completion_tokens) // 1000
    # the rest settled exactly once, the set-aside ones never, and nothing reverted
    on_chain = record_settled_counts(client.w3, env.deployment.ledger, start)
    assert set(on_chain) == set(ids) and set(on_chain.values()) == {1}
    assert all(t.status == 1 for t in ledger_transactions(client.w3, env.deployment.ledger, start))
    for r in outbox_rows(engine, RecordStatus.SETTLED):
        assert int(r.fee_wei) == 10**12 * (r.prompt_tokens + r.completion_tokens) // 1000
    # an operator who raises the bounds puts them back, and they are priced again
    r = runner.invoke(settler_app, ["requeue", "--db", str(engine.url), "--reason", TOO_MANY_TOKENS])
    assert r.exit_code == 0 and "1 set-aside records back" in r.output, r.output
    assert Settler(engine, client, SettlerConfig(max_record_tokens=2 * 10**12, max_price_per_1k=10**30)).drain() == 0
    assert outbox_rows(engine, RecordStatus.SET_ASIDE)[0].error.startswith(
        DEPOSIT_SHORT
    )  # 10^12 tokens: no deposit pays that


def test_a_record_is_never_settled_above_the_price_its_request_was_admitted_at(anvil_chain, engine):
    """The gateway keeps on each record the price it showed and admitted the request at (the key's limit was
    checked against it); an owner who raises the price before the record settles gets it set aside, not
    charged at the new price, until the price is back at or below the quote."""
    env = anvil_chain
    client = env.client(env.settler)
    start = client.block_number() + 1
    reg = register_sample(env, price=10**12)
    quoted = add_records(engine, [reg], 3, quote=10**12)
    older = add_records(engine, [reg], 2)  # an older gateway's records: no quote, only the settler's own bound
    env.client(reg.owner).set_adapter_price(reg.adapter_id, 3 * 10**12)  # raised after the requests

    assert Settler(engine, client, SettlerConfig(batch_size=4, interval=0)).drain() == 2
    aside = {r.request_id: r for r in outbox_rows(engine, RecordStatus.SET_ASIDE)}
    assert set(aside) == set(quoted)
    for r in aside.values():
        assert r.error.startswith(PRICE_ABOVE_QUOTE) and str(3 * 10**12) in r.error and str(10**12) in r.error
        assert r.batch_id is None and r.quoted_price_per_1k == str(10**12)
    settled = {r.request_id: r for r in outbox_rows(engine, RecordStatus.SETTLED)}
    assert set(settled) == set(older)
    assert all(int(r.fee_wei) == 3 * 10**12 * (r.prompt_tokens + r.completion_tokens) // 1000 for r in settled.values())
    on_chain = record_settled_counts(client.w3, env.deployment.ledger, start)
    assert set(on_chain) == set(older)

    # lowered below the quote: the records go back (a settler's start, then every PRICE_MOVING_RETRY_EVERY)
    # and settle at the lower price
    env.client(reg.owner).set_adapter_price(reg.adapter_id, 10**12 // 2)
    assert Settler(engine, client, SettlerConfig(batch_size=4, interval=0)).drain() == 3
    for r in outbox_rows(engine, RecordStatus.SETTLED):
        if r.request_id in quoted:
            assert int(r.fee_wei) == 10**12 // 2 * (r.prompt_tokens + r.completion_tokens) // 1000
    assert set(record_settled_counts(client.w3, env.deployment.ledger, start).values()) == {1}


@pytest.mark.parametrize("bad", ["abc", "-1", "1e5", " 7", "9" * 79])
def test_a_quote_the_settler_cannot_read_sets_its_record_aside_and_settlement_goes_on(anvil_chain, engine, bad):
    """The outbox only writes quotes in [0, 2**256), but the database is shared (another writer, an older
    release, a hand edit). A quote that is not one is its record's fault alone: set aside with the reason,
    never retried as a moving price, while the records around it settle. It used to raise in every step
    (settlement stopped for everyone) or, negative, be set aside as above the quote and retried forever."""
    env = anvil_chain
    client = env.client(env.settler)
    reg = register_sample(env, price=10**12)
    before = add_records(engine, [reg], 2, quote=10**12)
    odd = add_records(engine, [reg], 1, quote=10**12)[0]
    after = add_records(engine, [reg], 2)
    with Session(engine) as s:
        s.execute(update(UsageRecord).where(UsageRecord.request_id == odd).values(quoted_price_per_1k=bad))
        s.commit()
    assert Settler(engine, client, SettlerConfig(batch_size=5, interval=0)).drain() == 4
    rows = {r.request_id: r for r in outbox_rows(engine)}
    assert all(rows[r].status == RecordStatus.SETTLED for r in before + after)
    assert rows[odd].status == RecordStatus.SET_ASIDE and rows[odd].error.startswith(QUOTE_UNREADABLE)
    assert repr(bad) in rows[odd].error


def test_short_deposit_settles_what_it_can_and_shows_in_status(anvil_chain, engine, caplog):
    env = anvil_chain
    reg = register_sample(env, price=10**12)
    acct = _funded_settler(env, 10 * FEE + FEE // 2)  # ten records' worth and a half
    client = env.client(acct)
    start = client.block_number() + 1
    ids = add_records(engine, [reg], 30, tokens=(40, 10))
    assert all(r.prompt_tokens + r.completion_tokens >= 50 for r in outbox_rows(engine))
    # add_records varies prompt tokens (40 + i % 13): price them as the contract will
    with caplog.at_level(logging.WARNING, logger="ledger.settler"):
        settled = Settler(engine, client, SettlerConfig(batch_size=4, interval=0)).drain()
    assert 0 < settled < 10
    statuses = _status(engine)
    assert statuses == {"settled": settled, "set_aside": 30 - settled}
    aside = outbox_rows(engine, RecordStatus.SET_ASIDE)
    assert all(r.error.startswith(DEPOSIT_SHORT) and r.batch_id is None for r in aside)
    left = client.deposit_of(acct.address)
    assert all(int(r.fee_wei) > left for r in aside)  # set aside only what the deposit cannot pay
    assert "deposit is low" in caplog.text
    with Session(engine) as s:
        batches = list(s.exec(select(SettlementBatch)))
    assert sum(int(b.total_fees) for b in batches) == 10 * FEE + FEE // 2 - left
    assert all(t.status == 1 for t in ledger_transactions(client.w3, env.deployment.ledger, start))

    r = runner.invoke(
        settler_app,
        [
            "status",
            "--db",
            str(engine.url),
            "--address",
            acct.address,
            "--deployment",
            str(env.deployment_path),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    st = json.loads(r.output)
    assert (st["settled"], st["set_aside"], st["set_aside_deposit_short"]) == (settled, 30 - settled, 30 - settled)
    assert st["deposit_wei"] == left and st["deposit_left_wei"] == left and st["deposit_low"] is True
    assert st["fees_pending_wei"] == 0 and st["fees_set_aside_wei"] == sum(int(r.fee_wei) for r in aside)
    assert (st["pending"], st["in_flight"], st["disputed"]) == (0, 0, 0)
    r = runner.invoke(
        settler_app,
        ["status", "--db", str(engine.url), "--address", acct.address, "--deployment", str(env.deployment_path)],
    )
    assert r.exit_code == 0 and "LOW DEPOSIT" in r.output, r.output

    # topped up: the set-aside records go back by themselves and settle, each once
    env.client(env.admin).deposit_for(acct.address, ETHER)
    assert Settler(engine, client, SettlerConfig(batch_size=4, interval=0)).drain() == 30 - settled
    assert _status(engine) == {"settled": 30}
    on_chain = record_settled_counts(client.w3, env.deployment.ledger, start)
    assert set(on_chain) == set(ids) and set(on_chain.values()) == {1}
    st = runner.invoke(
        settler_app,
        [
            "status",
            "--db",
            str(engine.url),
            "--address",
            acct.address,
            "--deployment",
            str(env.deployment_path),
            "--json",
        ],
    ).output
    assert json.loads(st)["deposit_low"] is False


def _raise_price_before_sends(monkeypatch, client, owner_client, adapter_id, prices):
    """Wrap client.send_settle_batch: before each of the first len(prices) sends, the adapter's owner
    sets the next price (mined first: the batch was priced at the old one)."""
    original, queue = client.send_settle_batch, list(prices)

    def send(*args, **kwargs):
        if queue:
            owner_client.set_adapter_price(adapter_id, queue.pop(0))
        return original(*args, **kwargs)

    monkeypatch.setattr(client, "send_settle_batch", send)


def test_price_raised_before_a_simulated_send_is_repriced(anvil_chain, engine, monkeypatch):
    env = anvil_chain
    reg = register_sample(env, price=10**12)
    acct = _funded_settler(env, ETHER)
    client = env.client(acct)
    start = client.block_number() + 1
    ids = add_records(engine, [reg], 4, tokens=(50, 0))  # 50..53 tokens
    # 10^19 wei per 1k tokens (allowed here): a record costs ~0.5 ETH, the deposit pays for one
    _raise_price_before_sends(monkeypatch, client, env.client(reg.owner), reg.adapter_id, [10**19])
    settler = Settler(engine, client, SettlerConfig(batch_size=4, interval=0, max_price_per_1k=10**20))
    assert settler.drain() == 1
    with Session(engine) as s:
        batches = list(s.exec(select(SettlementBatch).order_by(SettlementBatch.id)))
    assert [b.status for b in batches] == [BatchStatus.ABANDONED, BatchStatus.SETTLED]
    assert "PriceAboveQuote" in batches[0].last_error and batches[1].record_count == 1
    assert _status(engine) == {"settled": 1, "set_aside": 3}
    assert all(r.error.startswith(DEPOSIT_SHORT) for r in outbox_rows(engine, RecordStatus.SET_ASIDE))
    settled = outbox_rows(engine, RecordStatus.SETTLED)[0]
    assert settled.error.startswith(REPRICED) and int(settled.fee_wei) == 10**19 * settled.prompt_tokens // 1000
    on_chain = record_settled_counts(client.w3, env.deployment.ledger, start)
    assert set(on_chain) == {settled.request_id} and set(on_chain.values()) == {1} and settled.request_id in ids
    assert all(t.status == 1 for t in ledger_transactions(client.w3, env.deployment.ledger, start, [acct.address]))


def test_price_raised_under_an_unsimulated_send_reverts_once_then_is_set_aside(anvil_chain, engine, monkeypatch):
    """With the pipe open the batch is sent unsimulated and reverts on chain (PriceAboveQuote,
    decoded): abandoned, its records priced again. Raised once more under the re-formed batch, its
    record is set aside (the price keeps moving): never retried forever."""
    env = anvil_chain
    reg = register_sample(env, price=10**12)
    acct = _funded_settler(env, ETHER)
    client = env.client(acct)
    add_records(engine, [reg], 2, tokens=(50, 0))
    settler = Settler(engine, client, SettlerConfig(batch_size=2, interval=0, max_price_per_1k=10**30))
    assert settler.step() == 2  # the probe settles: the pipe opens
    start = client.block_number() + 1
    first, second = add_records(engine, [reg], 2, tokens=(50, 0))  # 50 and 51 tokens
    # before send 1 (unsimulated): 1.2e19 per 1k, the pair costs 1.21 ETH > the deposit -> reverts on chain;
    # re-formed at that price only the first fits; before send 2 (simulated): 2.5e19, it costs 1.25 ETH
    _raise_price_before_sends(monkeypatch, client, env.client(reg.owner), reg.adapter_id, [12 * 10**18, 25 * 10**18])
    for _ in range(5):
        try:
            settler.step()
        except Exception:  # noqa: BLE001 - what a step raises is not the point: the end state is
            pass
        if not settler.has_work():
            break
    assert not settler.has_work()
    with Session(engine) as s:
        batches = list(s.exec(select(SettlementBatch).order_by(SettlementBatch.id)))[1:]
    assert [b.status for b in batches] == [BatchStatus.ABANDONED, BatchStatus.ABANDONED]
    assert [b.record_count for b in batches] == [2, 1]
    assert all("PriceAboveQuote" in b.last_error for b in batches)
    rows = {r.request_id: r for r in outbox_rows(engine)}
    assert rows[first].status == RecordStatus.SET_ASIDE and rows[first].error.startswith(PRICE_MOVING)
    assert rows[second].status == RecordStatus.SET_ASIDE and rows[second].error.startswith(DEPOSIT_SHORT)
    txs = ledger_transactions(client.w3, env.deployment.ledger, start, [acct.address])
    assert [t.status for t in txs] == [0]  # the one revert the first raise caused, nothing after
    assert record_settled_counts(client.w3, env.deployment.ledger, start) == {}


def test_owner_raising_its_price_twice_never_sets_aside_other_adapters_records(anvil_chain, engine, monkeypatch):
    """Batches are mixed: an adapter owner who front-runs them (raising its price before each send)
    gets only its own records struck. The other adapter's records in the same refused batches go back
    to the outbox unmarked and settle; the owner's are set aside on the second raise."""
    env = anvil_chain
    attacker = register_sample(env, price=10**12)
    innocent = register_sample(env, price=10**12)
    acct = _funded_settler(env, ETHER)
    client = env.client(acct)
    start = client.block_number() + 1
    ids = add_records(engine, [attacker, innocent], 6)  # interleaved: every batch holds both adapters
    theirs, ours = ids[0::2], ids[1::2]
    _raise_price_before_sends(
        monkeypatch, client, env.client(attacker.owner), attacker.adapter_id, [2 * 10**12, 3 * 10**12]
    )
    settler = Settler(engine, client, SettlerConfig(batch_size=6, interval=0))
    assert settler.drain() == 3
    rows = {r.request_id: r for r in outbox_rows(engine)}
    for rid in ours:
        assert rows[rid].status == RecordStatus.SETTLED and rows[rid].error is None, rows[rid].error
        assert int(rows[rid].fee_wei) == 10**12 * (rows[rid].prompt_tokens + rows[rid].completion_tokens) // 1000
    for rid in theirs:
        assert rows[rid].status == RecordStatus.SET_ASIDE and rows[rid].error.startswith(PRICE_MOVING)
    with Session(engine) as s:
        batches = list(s.exec(select(SettlementBatch).order_by(SettlementBatch.id)))
    assert [b.status for b in batches] == [BatchStatus.ABANDONED, BatchStatus.ABANDONED, BatchStatus.SETTLED]
    assert all("PriceAboveQuote" in b.last_error for b in batches[:2])
    on_chain = record_settled_counts(client.w3, env.deployment.ledger, start)
    assert set(on_chain) == set(ours) and set(on_chain.values()) == {1}


def test_a_raise_offset_by_a_cut_in_the_same_batch_never_settles_above_the_quote(anvil_chain, engine, monkeypatch):
    """The red team's attack: one owner, two adapters in one batch; before the send it raises A fivefold and
    drops B to nothing, so the batch costs less than priced. Bounded by the batch's total, A's records
    settled at five times the price their keys were shown. Bounded per adapter, the batch is refused; A's
    records, priced again above their quote, are set aside; B's settle at its new price."""
    env = anvil_chain
    a = register_sample(env, price=10**12)
    b = register_sample(env, price=10**13, owner=a.owner)
    acct = _funded_settler(env, ETHER)
    client = env.client(acct)
    start = client.block_number() + 1
    ids = add_records(engine, [a], 1, quote=10**12) + add_records(engine, [b], 1, quote=10**13)
    owner, queue = env.client(a.owner), [True]
    original = client.send_settle_batch

    def send(*args, **kwargs):
        if queue:  # before the first send only: mined first, the batch was priced at the old prices
            queue.pop()
            owner.set_adapter_price(a.adapter_id, 5 * 10**12)
            owner.set_adapter_price(b.adapter_id, 0)
        return original(*args, **kwargs)

    monkeypatch.setattr(client, "send_settle_batch", send)
    settler = Settler(engine, client, SettlerConfig(batch_size=2, interval=0))
    assert settler.drain() == 1
    rows = {r.request_id: r for r in outbox_rows(engine)}
    assert rows[ids[0]].status == RecordStatus.SET_ASIDE and rows[ids[0]].error.startswith(PRICE_ABOVE_QUOTE)
    assert rows[ids[1]].status == RecordStatus.SETTLED and rows[ids[1]].fee_wei == "0"
    with Session(engine) as s:
        first = s.exec(select(SettlementBatch).order_by(SettlementBatch.id)).first()
    assert first.status == BatchStatus.ABANDONED and "PriceAboveQuote" in first.last_error
    assert json.loads(first.prices_priced) == {a.adapter_id: str(10**12), b.adapter_id: str(10**13)}
    assert set(record_settled_counts(client.w3, env.deployment.ledger, start)) == {ids[1]}


def test_an_owner_raising_around_each_send_and_restoring_after_is_struck(anvil_chain, engine, monkeypatch):
    """The red team's stall: the owner front-runs each settleBatch with a raise of 1 wei and back-runs it with
    the old price. Every batch holding its record reverted, and by the time the settler looked the price was
    back: nobody was struck, the record headed the next batch again, for ever, each round a reverted
    transaction. The adapter the ledger names is struck whatever its price when the settler looks: its record
    is set aside on the second refusal and the others settle."""
    env = anvil_chain
    attacker = register_sample(env, price=10**12)
    innocent = register_sample(env, price=10**12)
    acct = _funded_settler(env, ETHER)
    client = env.client(acct)
    owner = env.client(attacker.owner)
    start = client.block_number() + 1
    mine = add_records(engine, [attacker], 1, quote=10**12)  # oldest in the outbox: it heads every batch
    ours = add_records(engine, [innocent], 9, quote=10**12)
    original = client.tx.send_data

    def sandwiched(to, data, **kw):  # after the settler's simulation, around its broadcast
        if to != client.ledger.address:
            return original(to, data, **kw)
        owner.set_adapter_price(attacker.adapter_id, 10**12 + 1)
        try:
            return original(to, data, **kw)  # mined between the two
        finally:
            owner.set_adapter_price(attacker.adapter_id, 10**12)

    monkeypatch.setattr(client.tx, "send_data", sandwiched)
    settler = Settler(engine, client, SettlerConfig(batch_size=500, interval=0))
    for _ in range(4):
        try:
            settler.step(force=True)
        except ContractError:  # a refusal surfaces from the step that sees it: the end state is the point
            pass
    rows = {r.request_id: r for r in outbox_rows(engine)}
    assert rows[mine[0]].status == RecordStatus.SET_ASIDE and rows[mine[0]].error.startswith(PRICE_MOVING)
    assert all(rows[r].status == RecordStatus.SETTLED for r in ours)
    txs = ledger_transactions(client.w3, env.deployment.ledger, start, [acct.address])
    assert [t.status for t in txs] == [0, 0, 1]  # two refusals, then it settles


def test_a_batch_written_before_prices_were_kept_is_bounded_by_its_records(anvil_chain, engine):
    """A batch the release before wrote (its total priced, no prices per adapter) and left open (crashed
    before sending, stuck, dropped) was sent with no bound at all: a price raised meanwhile was paid unseen.
    It is bounded by the prices its records' fees and quotes allow: refused, its records priced again."""
    env = anvil_chain
    acct = _funded_settler(env, ETHER)
    client = env.client(acct)
    reg = register_sample(env, price=10**12)
    quoted = add_records(engine, [reg], 2, quote=10**12)
    unquoted = add_records(engine, [reg], 2)

    def crash_before_send(point):
        if point == "before_send":
            raise RuntimeError(point)

    first = Settler(engine, client, SettlerConfig(batch_size=4, interval=0), on_point=crash_before_send)
    with pytest.raises(RuntimeError):
        first.step(force=True)
    first.release()
    with Session(engine) as s:  # as the release before left it: fees_priced, no prices_priced
        s.execute(update(SettlementBatch).values(prices_priced=None))
        s.commit()
    env.client(reg.owner).set_adapter_price(reg.adapter_id, 5 * 10**12)  # raised while the batch is open

    assert Settler(engine, client, SettlerConfig(batch_size=4, interval=0)).drain() == 2
    with Session(engine) as s:
        old, new = s.exec(select(SettlementBatch).order_by(SettlementBatch.id)).all()
    assert old.status == BatchStatus.ABANDONED and "PriceAboveQuote" in old.last_error
    rows = {r.request_id: r for r in outbox_rows(engine)}
    assert all(rows[r].status == RecordStatus.SET_ASIDE and rows[r].error.startswith(PRICE_ABOVE_QUOTE) for r in quoted)
    for r in unquoted:  # no quote: priced again at the price the settler now sees, within its own maximum
        row = rows[r]
        assert row.status == RecordStatus.SETTLED and row.batch_id == new.batch_id
        assert int(row.fee_wei) == 5 * 10**12 * (row.prompt_tokens + row.completion_tokens) // 1000


def test_an_adapter_id_spelled_otherwise_settles_and_stalls_nobody(anvil_chain, engine):
    """A record whose adapter id is in upper case (another writer on the shared database, a hand edit) is the
    same adapter: it settles with the rest. Its price bound was kept under the row's spelling and looked up
    under the ledger's, and the KeyError ended the settler at every start."""
    env = anvil_chain
    client = env.client(env.settler)
    reg = register_sample(env, price=10**12)
    other = register_sample(env, price=10**12)
    odd = add_records(engine, [reg], 1, quote=10**12)[0]
    rest = add_records(engine, [other], 4, quote=10**12)
    with Session(engine) as s:
        shouted = "0x" + reg.adapter_id[2:].upper()
        s.execute(update(UsageRecord).where(UsageRecord.request_id == odd).values(adapter_id=shouted))
        s.commit()
    assert Settler(engine, client, SettlerConfig(batch_size=5, interval=0)).drain() == 5
    assert {r.request_id for r in outbox_rows(engine, RecordStatus.SETTLED)} == {odd, *rest}


@pytest.mark.parametrize("column", ["adapter_id", "node_id", "request_id"])
def test_a_record_whose_id_is_not_one_is_set_aside_and_stalls_nobody(anvil_chain, engine, column):
    """A row at the head of the outbox whose request, adapter or node id is not an id (written by something
    other than the outbox): reading its price raised in every step, and no record behind it ever settled."""
    env = anvil_chain
    client = env.client(env.settler)
    reg = register_sample(env, price=10**12)
    bad = add_records(engine, [reg], 1)[0]
    good = add_records(engine, [reg], 4)
    with Session(engine) as s:
        s.execute(update(UsageRecord).where(UsageRecord.request_id == bad).values({column: "0x1234"}))
        s.commit()
    assert Settler(engine, client, SettlerConfig(batch_size=5, interval=0)).drain() == 4
    assert {r.request_id for r in outbox_rows(engine, RecordStatus.SETTLED)} == set(good)
    (aside,) = outbox_rows(engine, RecordStatus.SET_ASIDE)
    assert aside.error.startswith(ID_UNREADABLE) and "'0x1234'" in aside.error


@pytest.mark.parametrize(("prompt", "max_record_tokens"), [(-1, None), (2**32, 2**40)])
def test_a_record_whose_token_count_cannot_be_packed_is_set_aside_and_stalls_nobody(
    anvil_chain, engine, prompt, max_record_tokens
):
    """A row at the head of the outbox with a negative token count (not written by the outbox), or one above what a
    packed record holds (uint32) under a record bound set above it: packing it raised in every step, not a ledger
    error, and no record behind it ever settled."""
    env = anvil_chain
    reg = register_sample(env, price=10**12)
    bad = add_records(engine, [reg], 1)[0]
    good = add_records(engine, [reg], 4)
    with Session(engine) as s:
        s.execute(update(UsageRecord).where(UsageRecord.request_id == bad).values(prompt_tokens=prompt))
        s.commit()
    cfg = SettlerConfig(
        batch_size=5, interval=0, **({"max_record_tokens": max_record_tokens} if max_record_tokens else {})
    )
    assert Settler(engine, env.client(env.settler), cfg).drain() == 4
    assert {r.request_id for r in outbox_rows(engine, RecordStatus.SETTLED)} == set(good)
    (aside,) = outbox_rows(engine, RecordStatus.SET_ASIDE)
    assert aside.error.startswith(TOKENS_UNREADABLE) and str(prompt) in aside.error


def test_deposit_reclaimed_under_batches_strikes_no_record(anvil_chain, engine, monkeypatch):
    """InsufficientDeposit with no price moved is the deposit's fault: twice in a row, no record is
    struck; the records are batched again against the deposit left, and what it cannot pay is set aside
    as deposit-short (back by itself once topped up), never as a moving price."""
    env = anvil_chain
    reg = register_sample(env, price=10**12)
    acct = _funded_settler(env, 100 * FEE)
    client = env.client(acct)
    reclaimer = env.client(acct)  # the settler's own account, reclaiming under its batches
    add_records(engine, [reg], 6, tokens=(50, 0))  # 50..55 tokens: FEE..1.1 FEE each
    original, queue = client.send_settle_batch, [96 * FEE, FEE]  # 4 FEE left (3 records), then 3 FEE

    def send(*args, **kwargs):
        if queue:
            reclaimer.reclaim_deposit(queue.pop(0))
        return original(*args, **kwargs)

    monkeypatch.setattr(client, "send_settle_batch", send)
    settler = Settler(engine, client, SettlerConfig(batch_size=6, interval=0))
    assert settler.drain() == 2
    with Session(engine) as s:
        batches = list(s.exec(select(SettlementBatch).order_by(SettlementBatch.id)))
    assert [b.status for b in batches] == [BatchStatus.ABANDONED, BatchStatus.ABANDONED, BatchStatus.SETTLED]
    assert all("InsufficientDeposit" in b.last_error for b in batches[:2])
    assert all(r.error is None for r in outbox_rows(engine, RecordStatus.SETTLED))
    aside = outbox_rows(engine, RecordStatus.SET_ASIDE)
    assert len(aside) == 4 and all(r.error.startswith(DEPOSIT_SHORT) for r in aside), [r.error for r in aside]
