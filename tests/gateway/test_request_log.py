"""The gateway's request log (gateway_requests, one row per request) is kept request_log_days, then deleted: it
used to grow by a row a request for good. Rows of open requests are reconciliation's and stay; the usage
records (the outbox, the money) are never touched."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func
from sqlmodel import Session, select

from gateway.settings import GatewaySettings
from gateway.tables import CompletionRecord, RequestStatus
from gateway.usage import PRUNE_CHUNK, UsageRecorder
from ledger.models import UsageRecord, utcnow
from ledger.outbox import add_usage_record
from tests.utils.chain import rand_id
from tests.utils.gateway import make_db, poll
from tests.utils.stack import start_gateway


def _rows(engine, n: int, *, days_ago: float, status: str = RequestStatus.OK, closed_days_ago=None) -> list[str]:
    ids = [rand_id() for _ in range(n)]
    at = utcnow() - timedelta(days=days_ago)
    closed = at if closed_days_ago is None else utcnow() - timedelta(days=closed_days_ago)
    with Session(engine) as s:
        for rid in ids:
            s.add(CompletionRecord(request_id=rid, model="m", status=status, created_at=at, finished_at=closed))
        s.commit()
    return ids


def _left(engine) -> set[str]:
    with Session(engine) as s:
        return set(s.exec(select(CompletionRecord.request_id)))


def test_prune_deletes_closed_rows_made_before_the_cut_in_chunks(tmp_path):
    engine = make_db(tmp_path / "g.db")
    old = _rows(engine, PRUNE_CHUNK + 7, days_ago=40)
    lost = _rows(engine, 2, days_ago=40, status=RequestStatus.LOST)
    still_open = _rows(engine, 3, days_ago=40, status=RequestStatus.OPEN)
    recent = _rows(engine, 4, days_ago=1)
    # open for long, closed (reconciled) just now: its live gateway's late close may still lower its bill
    reconciled = _rows(engine, 1, days_ago=40, status=RequestStatus.RECONCILED, closed_days_ago=0)
    with Session(engine) as s:
        add_usage_record(
            s,
            request_id=old[0],
            adapter_id="0x" + "11" * 32,
            node_id="0x" + "22" * 32,
            prompt_tokens=3,
            completion_tokens=4,
            receipt_json={"r": 1},
            node_signature="s",
        )
        s.commit()
    recorder = UsageRecorder(engine, lambda _: None)
    cut = utcnow() - timedelta(days=30)
    assert recorder.prune(cut) == PRUNE_CHUNK  # one bounded transaction at a time
    assert recorder.prune(cut) == 7 + 2
    assert recorder.prune(cut) == 0
    assert _left(engine) == {*still_open, *recent, *reconciled}
    with Session(engine) as s:
        assert s.exec(select(func.count()).select_from(UsageRecord)).one() == 1
    assert not set(old) & _left(engine) and not set(lost) & _left(engine)


def test_settings_keep_the_log_thirty_days_and_zero_keeps_it_for_good():
    assert GatewaySettings().request_log_days == 30
    for bad in (-1, 10**9):  # 10^9 days passed the check, then overflowed the pruning's date arithmetic
        with pytest.raises(ValueError):
            GatewaySettings(request_log_days=bad)


def test_a_running_gateway_prunes_its_log_at_start(tmp_path, tiny_base):
    (tmp_path / "gw").mkdir()
    engine = make_db(tmp_path / "gw" / "gateway.db")
    old = _rows(engine, 5, days_ago=3)
    kept = _rows(engine, 2, days_ago=1)
    gw = start_gateway(tmp_path / "gw", tiny_base, request_log_days=2)
    try:
        poll(lambda: _left(engine) == set(kept), timeout=20)
        assert not set(old) & _left(engine)
    finally:
        gw.stop()
