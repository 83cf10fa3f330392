"""Many settlers, one database, one ledger: two `loramesh settler run` processes (real subprocesses,
each with its own settler key) on one PostgreSQL database and on one SQLite file, with records being
written while they run. Afterwards every request is on chain exactly once (raw eth_getLogs of
RecordSettled), none is lost, and no settlement transaction reverted (the receipt of every
transaction sent to the ledger)."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlmodel import Session, select

from ledger.db import init_db, make_engine
from ledger.models import BatchStatus, SettlementBatch, UsageRecord
from ledger.outbox import add_usage_record, count_by_status
from tests.ledger.audit import ledger_transactions, record_settled_counts, stop_settlers
from tests.utils.chain import ETHER, rand_id, register_sample
from tests.utils.postgres import postgres  # noqa: F401 - fixture

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
RECORDS = 300


def start_settler(env, db_url: str, key_file: Path, log_file: Path, **opts) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "ledger.cli",
        "settler",
        "run",
        "--db",
        db_url,
        "--deployment",
        str(env.deployment_path),
        "--key",
        str(key_file),
    ]
    for k, v in {"batch-size": 20, "interval": 0.3, "max-in-flight": 4, **opts}.items():
        cmd += [f"--{k}", str(v)]
    child_env = {**os.environ, "PYTHONPATH": str(ROOT), "LORAMESH_LOG_LEVEL": "INFO"}
    return subprocess.Popen(cmd, cwd=ROOT, env=child_env, stdout=subprocess.DEVNULL, stderr=log_file.open("w"))


def write_records(db_url: str, regs, n: int, chunk: int, pause: float, out: list[str]) -> None:
    """The gateway's side: records committed a few at a time while the settlers run."""
    engine = make_engine(db_url)
    try:
        for start in range(0, n, chunk):
            with Session(engine) as s:
                for i in range(start, min(start + chunk, n)):
                    reg, rid = regs[i % len(regs)], rand_id()
                    add_usage_record(
                        s,
                        request_id=rid,
                        adapter_id=reg.adapter_id,
                        node_id=reg.node_id,
                        prompt_tokens=30 + i % 17,
                        completion_tokens=7 + i % 5,
                        receipt_json={"request_id": rid},
                        node_signature="sig",
                    )
                    out.append(rid)
                s.commit()
            time.sleep(pause)
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/outbox.db"
    return request.getfixturevalue("postgres").new_database(f"outbox_{os.getpid()}_{time.monotonic_ns()}")


def test_two_settler_processes_settle_each_record_once(slow_chain, tmp_path, db_url):
    env = slow_chain
    client = env.client()
    regs = [register_sample(env, price=10**12), register_sample(env, price=3 * 10**12, shares=(2000,))]
    second = env.new_account(10 * ETHER)
    env.client(env.admin).grant_settler(second.address)
    env.client(env.admin).deposit_for(second.address, 10 * ETHER)
    keys = []
    for name, acct in (("a", env.settler), ("b", second)):
        keys.append(tmp_path / f"settler-{name}.key")
        keys[-1].write_text(acct.key.hex())
    engine = make_engine(db_url)
    init_db(engine)
    start_block = client.block_number() + 1
    ids: list[str] = []
    write_records(db_url, regs, 60, 60, 0, ids)  # some waiting before the settlers start

    procs = [start_settler(env, db_url, k, tmp_path / f"settler-{i}.log") for i, k in enumerate(keys)]
    try:
        writer = threading.Thread(target=write_records, args=(db_url, regs, RECORDS - 60, 8, 0.05, ids))
        writer.start()
        writer.join(60)
        deadline = time.monotonic() + 45
        while True:
            with Session(engine) as s:
                counts = count_by_status(s)
            if counts == {"settled": RECORDS}:
                break
            assert all(p.poll() is None for p in procs), [
                (tmp_path / f"settler-{i}.log").read_text()[-3000:] for i in range(2)
            ]
            assert time.monotonic() < deadline, f"not all settled in time: {counts}"
            time.sleep(0.2)
    finally:
        stop_settlers(procs)
    logs = [(tmp_path / f"settler-{i}.log").read_text() for i in range(2)]
    assert [p.returncode for p in procs] == [0, 0], [t[-3000:] for t in logs]

    # on chain: every request exactly once, nothing else
    on_chain = record_settled_counts(client.w3, env.deployment.ledger, start_block)
    assert len(ids) == RECORDS and set(on_chain) == set(ids)
    assert set(on_chain.values()) == {1}
    txs = ledger_transactions(client.w3, env.deployment.ledger, start_block, [env.settler.address, second.address])
    reverted = [t for t in txs if t.status != 1]
    assert not reverted, (reverted, [t[-3000:] for t in logs])
    # both settlers did part of the work, each batch once, records in exactly their batch
    with Session(engine) as s:
        batches = list(s.exec(select(SettlementBatch)))
        rows = list(s.exec(select(UsageRecord)))
    assert {b.status for b in batches} == {BatchStatus.SETTLED}
    assert {t.sender for t in txs} == {env.settler.address.lower(), second.address.lower()}
    assert len(txs) == len(batches) == len({b.batch_id for b in batches})
    assert sum(b.record_count for b in batches) == RECORDS
    assert all(r.fee_wei is not None and int(r.fee_wei) > 0 for r in rows)
    by_batch = {b.batch_id: int(b.total_fees) for b in batches}
    assert all(int(b.fees_priced) == by_batch[b.batch_id] for b in batches)  # priced exactly as charged
    engine.dispose()


def test_unfinished_batch_is_resumed_by_one_settler_once_its_lease_expires(anvil_chain, db_url, monkeypatch):
    """In-process: settler A writes a batch and fails to send it (chain error); B cannot take it while
    A's lease runs, takes it once it has expired, and settles it from its own deposit. A handing its
    claims back (release) frees them at once."""
    env = anvil_chain
    from ledger import errors as E
    from ledger.settler import Settler
    from ledger.settler_config import SettlerConfig

    reg = register_sample(env)
    other = env.new_account(10 * ETHER)
    env.client(env.admin).grant_settler(other.address)
    env.client(env.admin).deposit_for(other.address, ETHER)
    engine = make_engine(db_url, immediate=True)
    init_db(engine)
    cfg = SettlerConfig(batch_size=5, interval=0, lease=1.5)
    a = Settler(engine, env.client(env.settler), cfg)
    b = Settler(engine, env.client(other), cfg)

    def down(*_a, **_k):
        raise E.ChainUnavailable("chain down (test)")

    ids: list[str] = []
    write_records(db_url, [reg], 5, 5, 0, ids)
    monkeypatch.setattr(a.client, "send_settle_batch", down)
    with pytest.raises(E.ChainUnavailable):
        a.step()
    with Session(engine) as s:
        batch = s.exec(select(SettlementBatch)).one()
    assert (
        batch.claimed_by == a.instance and batch.status == BatchStatus.CREATED and batch.settler == env.settler.address
    )
    assert b.step() == 0  # A's lease still runs: B leaves the batch alone
    time.sleep(1.7)
    assert b.step() == 5  # expired: B takes it over, sends it, and its deposit pays
    with Session(engine) as s:
        batch = s.exec(select(SettlementBatch)).one()
    assert batch.status == BatchStatus.SETTLED and batch.claimed_by == b.instance and batch.settler == other.address
    assert env.client().get_batch(batch.batch_id).settler == other.address
    assert a.step() == 0  # nothing left for A, and no second send

    write_records(db_url, [reg], 5, 5, 0, ids)
    with pytest.raises(E.ChainUnavailable):
        a.step()
    assert a.release() == 1  # handed back: B may resume it at once
    assert b.step() == 5
    on_chain = record_settled_counts(env.client().w3, env.deployment.ledger, 0)
    assert all(on_chain[r] == 1 for r in ids)
    engine.dispose()
