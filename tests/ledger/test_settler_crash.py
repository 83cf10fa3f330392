"""Kill the settler process at each crash point, restart it: every record settles exactly once.

Runs the settler as its own process against anvil with 1-second blocks (so a transaction sent just before
the crash may still be in the mempool when the settler restarts): the crashing run through
tests.utils.crashing_settler (the settler of `loramesh settler run` with a crash hook), the restart as
`python -m ledger.cli settler run`."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlmodel import Session, select

from ledger.db import init_db, make_engine
from ledger.models import BatchStatus, SettlementBatch
from ledger.outbox import count_by_status
from tests.ledger.test_settler import add_records, settled_on_chain
from tests.utils.chain import register_sample
from tests.utils.crashing_settler import CRASH_EXIT_CODE

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def run_settler(
    env, db_url: str, key_file: Path, crash_at: str | None, batch_size: int = 20
) -> subprocess.CompletedProcess:
    entry = ["tests.utils.crashing_settler", crash_at] if crash_at else ["ledger.cli", "settler", "run"]
    cmd = [
        sys.executable,
        "-m",
        *entry,
        "--db",
        db_url,
        "--deployment",
        str(env.deployment_path),
        "--key",
        str(key_file),
        "--batch-size",
        str(batch_size),
        "--interval",
        "0",
        "--drain",
    ]
    child_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=child_env, capture_output=True, text=True, timeout=120)


def outbox_with_records(env, tmp_path, n: int):
    """A SQLite outbox holding `n` records of a registered adapter and node, and the settler's key file."""
    db_url = f"sqlite:///{tmp_path}/outbox.db"
    engine = make_engine(db_url)
    init_db(engine)
    ids = add_records(engine, [register_sample(env)], n)
    key_file = tmp_path / "settler.key"
    key_file.write_text(env.settler.key.hex())
    return db_url, engine, ids, key_file, env.client()


@pytest.mark.parametrize("crash_at", ["before_send", "after_send", "after_receipt"])
def test_crash_and_restart_settles_exactly_once(slow_chain, tmp_path, crash_at):
    env = slow_chain
    db_url, engine, ids, key_file, client = outbox_with_records(env, tmp_path, 50)
    start = client.next_sequence(env.settler.address)

    crashed = run_settler(env, db_url, key_file, crash_at)
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr[-2000:]
    with Session(engine) as s:
        batch = s.exec(select(SettlementBatch).order_by(SettlementBatch.id)).first()
        assert count_by_status(s) == {"submitted": 20, "pending": 30}
    if crash_at == "before_send":
        assert batch.status == BatchStatus.CREATED and not client.is_settled(batch.batch_id)
    elif crash_at == "after_send":
        assert batch.status == BatchStatus.CREATED and batch.tx_hash is None  # sent, but the DB never heard
        _wait(lambda: client.is_settled(batch.batch_id))  # the transaction lands anyway
    else:
        assert batch.status == BatchStatus.SENT and client.is_settled(batch.batch_id)

    done = run_settler(env, db_url, key_file, None)
    assert done.returncode == 0, done.stderr[-2000:]
    with Session(engine) as s:
        assert count_by_status(s) == {"settled": 50}
        assert [b.status for b in s.exec(select(SettlementBatch))] == [BatchStatus.SETTLED] * 3
    assert set(settled_on_chain(client, ids).values()) == {1}
    _assert_sequence_intact(engine, client, env.settler.address, start, ids)
    engine.dispose()


@pytest.mark.parametrize(
    ("crash_at", "sent_with_hash", "statuses"),
    [
        # the probe batch settled, then four batches sent in one step, none awaited
        ("in_flight@2", 4, {"settled": 10, "submitted": 40}),
        # the probe batch settled, then the second batch sent and recorded, the third sent unrecorded
        ("after_send@3", 1, {"settled": 10, "submitted": 20, "pending": 20}),
    ],
)
def test_crash_with_several_batches_in_flight(slow_chain, tmp_path, crash_at, sent_with_hash, statuses):
    env = slow_chain
    db_url, engine, ids, key_file, client = outbox_with_records(env, tmp_path, 50)
    start = client.next_sequence(env.settler.address)

    crashed = run_settler(env, db_url, key_file, crash_at, batch_size=10)
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr[-2000:]
    with Session(engine) as s:
        batches = list(s.exec(select(SettlementBatch).order_by(SettlementBatch.id)))
        assert count_by_status(s) == statuses
    assert batches[0].status == BatchStatus.SETTLED
    assert [b.status for b in batches[1:]].count(BatchStatus.SENT) == sent_with_hash
    assert all(b.tx_hash for b in batches[1 : 1 + sent_with_hash])
    if crash_at.startswith("after_send"):
        assert batches[2].status == BatchStatus.CREATED and batches[2].tx_hash is None
        _wait(lambda: client.is_settled(batches[2].batch_id))  # sent before the crash: it lands anyway

    done = run_settler(env, db_url, key_file, None, batch_size=10)
    assert done.returncode == 0, done.stderr[-2000:]
    with Session(engine) as s:
        assert count_by_status(s) == {"settled": 50}
        assert [b.status for b in s.exec(select(SettlementBatch))] == [BatchStatus.SETTLED] * 5
    assert set(settled_on_chain(client, ids).values()) == {1}
    _assert_sequence_intact(engine, client, env.settler.address, start, ids)
    engine.dispose()


def _assert_sequence_intact(engine, client, settler: str, start: int, ids: list[str]) -> None:
    """The settler's sequence after the crash and restart: its batches cover start .. start + len(ids) - 1
    without gap or overlap, in the database and on chain, and every request id has exactly one number."""
    with Session(engine) as s:
        batches = sorted(s.exec(select(SettlementBatch)), key=lambda b: b.first_seq)
    expected, at = [], start
    for b in batches:
        expected.append(at)
        at += b.record_count
    assert [b.first_seq for b in batches] == expected and at == start + len(ids)
    assert client.next_sequence(settler) == start + len(ids)
    on_chain = [r for r in client.settled_records(settler=settler) if r.sequence >= start]
    assert [r.sequence for r in on_chain] == list(range(start, start + len(ids)))
    assert sorted(r.request_id for r in on_chain) == sorted(ids)


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)
