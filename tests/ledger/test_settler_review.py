"""Attacks on the settler, against a real anvil:
- a revert the settler does not expect (an owner pricing its adapter at 2**255 so that the ledger's
  `price * tokens` overflows) never stops settlement: the batch is split until the records at fault are
  found and set aside, the rest settle.
- no chain call is made while the settler holds the SQLite write lock (the gateway would give up
  on it and answer 503 while the chain is slow).
- a batch is abandoned only once every account that ever sent it is quiet.
- a claim of a process on another machine (same host name, same initial pid namespace) is never
  taken for a dead local one.
- records naming an adapter (or node) not registered yet are set aside, re-checked, and settle once
  it is registered (an RPC node lagging behind the chain is no permanent rejection)."""

import sqlite3
import time

import pytest
from sqlmodel import Session, select

from ledger import errors as E
from ledger import settler as settler_mod
from ledger.models import BatchStatus, RecordStatus, SettlementBatch, UsageRecord
from ledger.outbox import add_usage_record, count_by_status
from ledger.settler import DEPOSIT_SHORT, REVERTED, UNREGISTERED, Settler
from ledger.settler_config import SettlerConfig
from tests.ledger.audit import record_settled_counts
from tests.ledger.test_settler import add_records, outbox_rows
from tests.utils.chain import ETHER, rand_id, register_sample

pytestmark = pytest.mark.integration


def _batches(engine) -> list[SettlementBatch]:
    with Session(engine) as s:
        return list(s.exec(select(SettlementBatch).order_by(SettlementBatch.id)))


def _steps(settler: Settler, n: int = 40) -> None:
    """Step until nothing is left (a step may raise: what it raises is not the point, the end state is)."""
    for _ in range(n):
        try:
            settler.step(force=True)
        except E.LedgerError:
            pass
        if not settler.has_work():
            return
    raise AssertionError(f"still work after {n} steps: {_status(settler.engine)}")


def _status(engine) -> dict:
    with Session(engine) as s:
        return count_by_status(s)


# ---------------------------------------------------------------------- an unexpected revert


@pytest.mark.parametrize("how", ["unknown_adapter", "panic"])
def test_unexpected_revert_sets_aside_the_records_at_fault_and_the_rest_settle(anvil_chain, engine, monkeypatch, how):
    """4 honest records batched with 2 that make settleBatch revert for a reason the settler does not
    expect. Without a fix the batch stays open, is resumed first every step and fails again: nothing
    ever settles. unknown_adapter: a real revert on chain (UnknownAdapter: an RPC node that says the
    adapter is registered when the chain does not know it). panic: the send raises Panic 0x11
    (UnknownRevert), what `price * tokens` overflowing gave before the registry capped prices."""
    env = anvil_chain
    good = register_sample(env, price=10**12)
    bad = rand_id()
    client = env.client(env.settler)
    start = client.block_number() + 1
    ids = []
    for _ in range(2):
        ids += add_records(engine, [good], 1)
        with Session(engine) as s:
            add_usage_record(
                s,
                request_id=(rid := rand_id()),
                adapter_id=bad,
                node_id=good.node_id,
                prompt_tokens=10,
                completion_tokens=2,
                receipt_json="{}",
                node_signature="s",
            )
            s.commit()
        ids.append(rid)
        ids += add_records(engine, [good], 1)
    bad_ids = {r.request_id for r in outbox_rows(engine) if r.adapter_id == bad}
    assert len(bad_ids) == 2 and len(ids) == 6
    adapter_price, send = client.adapter_price, client.send_settle_batch

    def lying_adapter_price(adapter_id):  # the bad adapter looks registered, priced like the good one
        return adapter_price(good.adapter_id if adapter_id == bad else adapter_id)

    def panicking_send(batch_id, root, records, **kw):
        if any(r.adapter_id == bad for r in records):
            raise E.UnknownRevert("UnknownRevert", {"data": bytes.fromhex("4e487b71") + (0x11).to_bytes(32, "big")})
        return send(batch_id, root, records, **kw)

    monkeypatch.setattr(client, "adapter_price", lying_adapter_price)
    if how == "panic":
        monkeypatch.setattr(client, "send_settle_batch", panicking_send)
    settler = Settler(engine, client, SettlerConfig(batch_size=6, interval=0))
    _steps(settler)
    assert _status(engine) == {"settled": 4, "set_aside": 2}
    aside = outbox_rows(engine, RecordStatus.SET_ASIDE)
    assert {r.request_id for r in aside} == bad_ids
    reason = (UNREGISTERED, "UnknownAdapter") if how == "unknown_adapter" else (REVERTED, "UnknownRevert")
    assert all(r.error.startswith(reason[0]) and reason[1] in r.error and r.batch_id is None for r in aside), [
        r.error for r in aside
    ]
    assert {b.status for b in _batches(engine)} <= {BatchStatus.SETTLED, BatchStatus.ABANDONED}
    on_chain = record_settled_counts(client.w3, env.deployment.ledger, start)
    assert set(on_chain) == set(ids) - bad_ids and set(on_chain.values()) == {1}


def test_a_record_caught_twice_alone_is_set_aside(anvil_chain, engine, monkeypatch):
    """A batch of one record that reverts for no reason the settler knows: abandoned and priced again
    the first time, set aside the second; the records after it settle all the while."""
    env = anvil_chain
    reg = register_sample(env)
    client = env.client(env.settler)
    culprit = add_records(engine, [reg], 1)[0]
    rest = add_records(engine, [reg], 3)
    original = client.send_settle_batch
    seen = []

    def send(batch_id, root, records, **kw):
        if any(r.request_id == culprit for r in records):
            seen.append(len(records))
            raise E.UnknownRevert("UnknownRevert", {"data": b""})
        return original(batch_id, root, records, **kw)

    monkeypatch.setattr(client, "send_settle_batch", send)
    _steps(Settler(engine, client, SettlerConfig(batch_size=1, interval=0)))
    rows = {r.request_id: r for r in outbox_rows(engine)}
    assert rows[culprit].status == RecordStatus.SET_ASIDE and rows[culprit].error.startswith(REVERTED)
    assert seen == [1, 1]
    assert all(rows[r].status == RecordStatus.SETTLED for r in rest)


def test_split_halves_that_settle_lose_their_mark(anvil_chain, engine, monkeypatch):
    """A batch split to isolate a record at fault marks all its records; the halves that settle were
    not at fault, and their records settle unmarked. The culprit, alone, is set aside."""
    env = anvil_chain
    reg = register_sample(env)
    client = env.client(env.settler)
    culprit, *rest = add_records(engine, [reg], 4)
    original = client.send_settle_batch

    def send(batch_id, root, records, **kw):
        if any(r.request_id == culprit for r in records):
            raise E.UnknownRevert("UnknownRevert", {"data": b""})
        return original(batch_id, root, records, **kw)

    monkeypatch.setattr(client, "send_settle_batch", send)
    _steps(Settler(engine, client, SettlerConfig(batch_size=4, interval=0)))
    rows = {r.request_id: r for r in outbox_rows(engine)}
    assert rows[culprit].status == RecordStatus.SET_ASIDE and rows[culprit].error.startswith(REVERTED)
    assert all(rows[r].status == RecordStatus.SETTLED and rows[r].error is None for r in rest), [
        rows[r].error for r in rest
    ]


# ---------------------------------------------------------------------- no chain call under the write lock


def test_chain_calls_never_hold_the_sqlite_write_lock(anvil_chain, engine, monkeypatch):
    """Every chain read the settler makes (prices, registrations, the deposit, receipts) is slow here
    (0.3 s); while it waits, another connection must get the write lock within 1 s."""
    env = anvil_chain
    reg = register_sample(env)
    client = env.client(env.settler)
    path = engine.url.database
    blocked: list[str] = []

    def check(what):
        con = sqlite3.connect(path, timeout=1.0, isolation_level=None)
        try:
            t0 = time.monotonic()
            con.execute("BEGIN IMMEDIATE")
            con.execute("ROLLBACK")
            if time.monotonic() - t0 > 0.9:
                blocked.append(what)
        except sqlite3.OperationalError as e:
            blocked.append(f"{what}: {e}")
        finally:
            con.close()

    for name in ("call", "raw_call"):
        orig = getattr(client.tx, name)

        def slow(*a, _orig=orig, _name=name, **k):
            check(_name)
            time.sleep(0.05)
            return _orig(*a, **k)

        monkeypatch.setattr(client.tx, name, slow)
    add_records(engine, [reg], 5)
    with Session(engine) as s:  # one set aside for the deposit: the settler looks at the deposit to requeue it
        add_usage_record(
            s,
            request_id=rand_id(),
            adapter_id=reg.adapter_id,
            node_id=reg.node_id,
            prompt_tokens=3,
            completion_tokens=1,
            receipt_json="{}",
            node_signature="s",
        )
        s.commit()
        r = s.exec(select(UsageRecord).order_by(UsageRecord.id.desc())).first()
        r.status, r.error, r.fee_wei = RecordStatus.SET_ASIDE, f"{DEPOSIT_SHORT}: test", "1"
        s.add(r)
        s.commit()
    assert Settler(engine, client, SettlerConfig(batch_size=3, interval=0)).drain() == 6
    assert not blocked, blocked


# ---------------------------------------------------------------------- recording a send


@pytest.mark.parametrize("before", [None, "", "0x00000000000000000000000000000000000000aa"])
def test_a_send_is_recorded_with_each_sender_once(anvil_chain, engine, before):
    """_record_sent writes the batch's senders in one SQL expression: this account is added once, after the
    accounts that sent it before, however often it sends; the detached batch object follows the row."""
    x = Settler(engine, anvil_chain.client(anvil_chain.settler), SettlerConfig(batch_size=2, interval=0))
    with Session(engine, expire_on_commit=False) as s:
        batch = SettlementBatch(batch_id=rand_id(), merkle_root=rand_id(), record_count=2, senders=before)
        s.add(batch)
        s.commit()
    for n in (1, 2):
        x._record_sent(batch, "0x" + f"{n:02x}" * 32)
    (row,) = _batches(engine)
    assert row.senders == (f"{before},{x.address}" if before else x.address)
    assert (row.status, row.attempts, row.tx_hash, row.settler) == (BatchStatus.SENT, 2, "0x" + "02" * 32, x.address)
    assert (batch.senders, batch.status, batch.attempts, batch.tx_hash) == (
        row.senders,
        row.status,
        row.attempts,
        row.tx_hash,
    )


def test_a_batch_formed_a_while_ago_is_not_sent_once_its_lease_is_taken(anvil_chain, engine, monkeypatch):
    """A batch formed moments ago is sent on the lease it was written with; one whose forming lies more than
    a quarter of a lease back renews first, and a lease another settler took meanwhile stops the send."""
    env = anvil_chain
    add_records(engine, [register_sample(env)], 2)
    x = Settler(engine, env.client(env.settler), SettlerConfig(batch_size=2, interval=0, lease=4.0))
    form, sent = x._form_batch, []

    def formed_long_ago(*a, **k):
        w = form(*a, **k)
        if w is not None:
            w.formed_at -= x.config.lease  # as if the step had been held up that long since
            with Session(engine) as s:  # and another settler had taken the expired lease meanwhile
                row = s.get(SettlementBatch, w.batch.id)
                row.claimed_by = "someone-else"
                s.add(row)
                s.commit()
        return w

    monkeypatch.setattr(x, "_form_batch", formed_long_ago)
    monkeypatch.setattr(x.client, "send_settle_batch", lambda *a, **k: sent.append(a) or "0x" + "ab" * 32)
    assert x.step() == 0
    (batch,) = _batches(engine)
    assert sent == [] and batch.claimed_by == "someone-else" and batch.status == BatchStatus.CREATED


# ---------------------------------------------------------------------- abandoning a batch


def test_abandon_waits_for_every_account_that_sent_the_batch(anvil_chain, engine, monkeypatch):
    """X sends a batch (its transaction stays unseen), Y resumes it and sends it unsimulated; Y's
    transaction reverts (Y has no deposit). Y must not abandon the batch while X's transaction may still
    be mined: the records would be batched again and settled twice."""
    env = anvil_chain
    reg = register_sample(env)
    y_acct = env.new_account(10 * ETHER)
    env.client(env.admin).grant_settler(y_acct.address)
    add_records(engine, [reg], 2)
    cfg = SettlerConfig(batch_size=2, interval=0, receipt_timeout=0.5)
    x = Settler(engine, env.client(env.settler), cfg)
    monkeypatch.setattr(x.client, "send_settle_batch", lambda *a, **k: "0x" + "ab" * 32)  # lost in the mempool
    with pytest.raises(E.TransactionFailed):
        x.step()
    assert x.release() == 1

    y = Settler(engine, env.client(y_acct), cfg)
    y._probe = False  # the pipe is open: Y sends without simulating
    y.client.adapter_price(reg.adapter_id)  # its datasets, part of the batch's shape
    # (records, adapter entries, adapters, nodes, datasets paid)
    y.client._settle_gas[(2, 1, 1, 1, len(reg.dataset_ids))] = 2_000_000
    x_busy = []
    quiet = y._senders_quiet
    monkeypatch.setattr(
        y, "_senders_quiet", lambda addrs: not (x_busy and env.settler.address in addrs) and quiet(addrs)
    )
    send = y.client.send_settle_batch

    def y_send(*a, **k):
        h = send(*a, **k)
        x_busy.append(1)  # X's transaction shows up in the mempool again
        return h

    monkeypatch.setattr(y.client, "send_settle_batch", y_send)
    with pytest.raises(E.InsufficientDeposit):
        y.step()
    (batch,) = _batches(engine)
    assert batch.status in (BatchStatus.CREATED, BatchStatus.SENT), batch.last_error
    assert _status(engine) == {"submitted": 2}
    assert set(batch.senders.split(",")) == {env.settler.address, y_acct.address}
    x_busy.clear()  # X is quiet: now Y may give it up
    try:
        y.step()
    except E.LedgerError:
        pass
    assert _batches(engine)[0].status == BatchStatus.ABANDONED
    assert all(r.status != RecordStatus.SUBMITTED or r.batch_id != batch.batch_id for r in outbox_rows(engine))


# ---------------------------------------------------------------------- claims of other machines


def test_a_claim_from_another_boot_is_not_taken_for_dead(anvil_chain, engine, monkeypatch):
    """Same host name, same (initial) pid namespace, a pid that is not running here: on another machine
    (another boot id) that process may be alive, so its claim holds until its lease expires."""
    env = anvil_chain
    reg = register_sample(env)
    add_records(engine, [reg], 2)
    client = env.client(env.settler)
    here = Settler(engine, client, SettlerConfig(batch_size=2, interval=0, lease=60))
    dead_pid = 2**22 + 12345  # above pid_max's default: never a running process here
    with monkeypatch.context() as m:
        m.setattr(settler_mod.os, "getpid", lambda: dead_pid)
        m.setattr(settler_mod, "_boot_id", lambda: "another-machine")
        elsewhere = Settler(engine, client, here.config)
    with monkeypatch.context() as m:
        m.setattr(settler_mod.os, "getpid", lambda: dead_pid)
        local_dead = Settler(engine, client, here.config)
    with Session(engine) as s:
        assert here._dead_claims(s) == []
    monkeypatch.setattr(client, "send_settle_batch", lambda *a, **k: (_ for _ in ()).throw(E.ChainUnavailable("x")))
    with pytest.raises(E.ChainUnavailable):
        here.step()
    for other, dead in ((elsewhere, False), (local_dead, True)):
        with Session(engine) as s:
            b = s.exec(select(SettlementBatch)).one()
            b.claimed_by = other.instance
            s.add(b)
            s.commit()
        with Session(engine) as s:
            assert (here._dead_claims(s) == [other.instance]) is dead, other.instance


# ---------------------------------------------------------------------- unregistered ids


def test_records_of_an_adapter_registered_late_settle_once_it_is(anvil_chain, engine, monkeypatch):
    env = anvil_chain
    reg = register_sample(env)
    client = env.client(env.settler)
    late = rand_id()
    good = add_records(engine, [reg], 2)
    with Session(engine) as s:
        add_usage_record(
            s,
            request_id=(rid := rand_id()),
            adapter_id=late,
            node_id=reg.node_id,
            prompt_tokens=10,
            completion_tokens=2,
            receipt_json="{}",
            node_signature="s",
        )
        s.commit()
    settler = Settler(engine, client, SettlerConfig(batch_size=3, interval=0))
    assert settler.drain() == 2
    (aside,) = outbox_rows(engine, RecordStatus.SET_ASIDE)
    assert aside.request_id == rid and aside.error.startswith(UNREGISTERED) and late in aside.error
    assert settler.step() == 0  # not looked at again before the re-check interval
    assert outbox_rows(engine, RecordStatus.SET_ASIDE)
    env.client(reg.owner).register_adapter(
        late, name=f"late-{late[2:8]}", version="1.0.0", base_model=reg.base_model, price_per_1k_tokens=10**12
    )
    with Session(engine) as s:  # rejected by an older settler (it rejected only unregistered ones): looked at too
        add_usage_record(
            s,
            request_id=(old := rand_id()),
            adapter_id=late,
            node_id=reg.node_id,
            prompt_tokens=10,
            completion_tokens=2,
            receipt_json="{}",
            node_signature="s",
        )
        s.commit()
        r = s.exec(select(UsageRecord).where(UsageRecord.request_id == old)).one()
        r.status, r.error = RecordStatus.REJECTED, f"adapter {late} is not registered on chain"
        s.add(r)
        s.commit()
    monkeypatch.setattr(settler_mod, "UNREGISTERED_RECHECK_EVERY", 0.0)
    settler._next_recheck = 0.0
    assert settler.drain() == 2
    assert _status(engine) == {"settled": 4}
    row = {r.request_id: r for r in outbox_rows(engine)}[rid]
    assert row.error is None and int(row.fee_wei) == 10**12 * 12 // 1000
    assert set(record_settled_counts(client.w3, env.deployment.ledger, 0)[r] for r in good + [rid]) == {1}


def test_an_old_batch_failing_on_its_own_never_keeps_new_batches_from_forming(anvil_chain, engine, monkeypatch):
    """A resumed batch that fails every time for a reason of its own (here the database and the chain
    disagree about it: SettlementError) is retried, but new records still form batches and settle."""
    env = anvil_chain
    reg = register_sample(env)
    client = env.client(env.settler)
    add_records(engine, [reg], 2)
    settler = Settler(engine, client, SettlerConfig(batch_size=2, interval=0))
    send = settler._send
    monkeypatch.setattr(settler, "_send", lambda w: (_ for _ in ()).throw(E.ChainUnavailable("down (test)")))
    with pytest.raises(E.ChainUnavailable):
        settler.step()
    (old,) = _batches(engine)

    def failing(w):
        if w.batch.batch_id == old.batch_id:
            raise settler_mod.SettlementError("the chain disagrees about this batch (test)")
        return send(w)

    monkeypatch.setattr(settler, "_send", failing)
    new = add_records(engine, [reg], 4)
    for _ in range(4):
        with pytest.raises(settler_mod.SettlementError):
            settler.step()
    rows = {r.request_id: r for r in outbox_rows(engine)}
    assert all(rows[r].status == RecordStatus.SETTLED for r in new)
    assert _status(engine) == {"settled": 4, "submitted": 2}
