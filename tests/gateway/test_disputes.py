"""A disputed node is kept out of routing by every gateway on the database until its operator judges it and
readmits it (`loramesh gateway disputes`); its disputed records stay unpaid, and a later dispute keeps it
out again. Running gateways see both within registry_sync_s, without a restart.

Real parts: SQLite files, the gateways in real uvicorn servers, a rogue node as its own process
(tests/utils/rogue_node.py), the CLI through typer."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import httpx
import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

from common.identity import Identity
from devnet.cli import app as cli
from gateway import disputes
from gateway.chain_registry import RegistryView
from gateway.directory import NodeDirectory
from gateway.disputes import DisputeError, kept_out, node_disputes, readmit
from gateway.keys import create_key
from gateway.main import create_app
from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings
from gateway.tables import RequestStatus
from gateway.usage import UsageRecorder
from gateway.usage_book import UsageBook
from ledger.db import init_db, make_engine
from ledger.models import RecordStatus, UsageRecord
from ledger.outbox import add_usage_record
from node.adapters.basemodel import base_model_id
from tests.gateway import TINY
from tests.gateway.test_usage import ADAPTER, end_for, rows
from tests.utils.gateway import add_node, make_db, poll, start_script_node
from tests.utils.postgres import postgres  # noqa: F401 - the fixture
from tests.utils.servers import ServerThread


@pytest.fixture(params=["sqlite", "postgres"])
def book(request, tmp_path):
    """A database (SQLite, PostgreSQL), two node identities and a recorder that knows their keys."""
    if request.param == "sqlite":
        engine = make_db(tmp_path / "d.db")
    else:
        engine = make_engine(request.getfixturevalue("postgres").new_database("disputes"))
        init_db(engine)
    a, b = Identity.generate(), Identity.generate()
    keys = {i.node_id: i.node_public_key for i in (a, b)}
    yield engine, a, b, UsageRecorder(engine, keys.get, instance_id="me")
    engine.dispose()


def dispute(rec, ident, claimed=(3, 99)) -> None:
    assert rec.record(end_for(ident, claimed=claimed)) == "disputed"


def test_a_readmitted_node_is_let_in_until_its_next_dispute(book):
    engine, a, b, rec = book
    dispute(rec, a)
    dispute(rec, a)
    dispute(rec, b)
    assert set(kept_out(engine)) == {a.node_id, b.node_id}
    assert "99" in kept_out(engine)[a.node_id]  # the reason of its latest dispute

    got = readmit(engine, a.node_id, note="client-forced bytes, judged honest")
    assert (got.node_id, got.open) == (a.node_id, 2)
    assert set(kept_out(engine)) == {b.node_id}
    # the records stay disputed: readmission lets the node serve again, it does not pay what was disputed
    with Session(engine) as s:
        statuses = s.exec(select(UsageRecord.status).where(UsageRecord.node_id == a.node_id)).all()
    assert statuses == [RecordStatus.DISPUTED] * 2

    dispute(rec, a)  # disputed again after readmission: out again
    assert set(kept_out(engine)) == {a.node_id, b.node_id}
    rows = {d.node_id: d for d in node_disputes(engine, include_readmitted=True)}
    assert (rows[a.node_id].records, rows[a.node_id].open) == (3, 1)
    assert rows[a.node_id].readmitted_at is not None and rows[a.node_id].note.startswith("client-forced")
    assert readmit(engine, a.node_id).open == 1  # readmitted once more: the row is replaced
    assert [d.node_id for d in node_disputes(engine)] == [b.node_id]
    assert {d.node_id for d in node_disputes(engine, include_readmitted=True)} == {a.node_id, b.node_id}


def dispute_in_flight(engine, ident) -> tuple[Session, int]:
    """A disputed record inserted (its id drawn) in a transaction left open: the session and the id."""
    s = Session(engine)
    row = add_usage_record(
        s,
        request_id="0x" + f"{time.time_ns():064x}",
        adapter_id="0x" + "aa" * 32,
        node_id=ident.node_id,
        prompt_tokens=3,
        completion_tokens=4,
        status=RecordStatus.DISPUTED,
        error="written by a gateway that has not committed yet",
    )
    s.flush()
    return s, row.id


def test_a_readmission_waits_for_a_dispute_being_written(postgres):
    # PostgreSQL draws a record's id when it is inserted, not when it commits: a dispute inserted before the
    # readmission reads the node's highest id and committed after it has a lower id than that, so it would
    # be readmitted unseen. The readmission waits for it instead, and counts it among those it readmits.
    engine = make_engine(postgres.new_database("readmit_race"))
    init_db(engine)
    a = Identity.generate()
    rec = UsageRecorder(engine, {a.node_id: a.node_public_key}.get, instance_id="me")
    late, late_id = dispute_in_flight(engine, a)
    dispute(rec, a)  # committed first, with a higher id
    assert node_disputes(engine)[0].last_record_id > late_id
    done = {}

    def operator() -> None:
        done["got"] = readmit(engine, a.node_id, note="judged honest")
        done["at"] = time.monotonic()

    thread = threading.Thread(target=operator)
    thread.start()
    time.sleep(0.5)
    committed_at = time.monotonic()
    late.commit()
    late.close()
    thread.join(10)
    try:
        assert not thread.is_alive()
        assert done["at"] > committed_at  # it waited for the dispute in flight
        assert (done["got"].records, done["got"].open) == (2, 2)  # and the operator is told it readmitted both
        assert kept_out(engine) == {}
        dispute(rec, a)
        assert set(kept_out(engine)) == {a.node_id}
    finally:
        engine.dispose()


def test_a_readmission_waits_for_writers_a_bounded_time(postgres, monkeypatch):
    # the gateways' writes queue behind its lock while it waits: a writer that never commits costs them
    # READMIT_LOCK_WAIT_S at most, and the operator is told to try again
    monkeypatch.setattr(disputes, "READMIT_LOCK_WAIT_S", 0.3)
    engine = make_engine(postgres.new_database("readmit_wait"))
    init_db(engine)
    a = Identity.generate()
    dispute(UsageRecorder(engine, {a.node_id: a.node_public_key}.get, instance_id="me"), a)
    stuck, _ = dispute_in_flight(engine, a)
    try:
        with pytest.raises(DisputeError, match="for over 0.3 s: nothing readmitted, try again"):
            readmit(engine, a.node_id)
        stuck.rollback()
        assert readmit(engine, a.node_id).open == 1
        assert kept_out(engine) == {}
    finally:
        stuck.close()
        engine.dispose()


def test_readmit_names_one_kept_out_node(book):
    engine, a, b, rec = book
    with pytest.raises(DisputeError, match="no disputed node"):
        readmit(engine, a.node_id)  # nothing disputed yet
    dispute(rec, a)
    with pytest.raises(DisputeError, match="no disputed node"):
        readmit(engine, b.node_id)
    with pytest.raises(DisputeError, match="at least 6"):
        readmit(engine, "0x")
    assert readmit(engine, a.node_id[2:10]).node_id == a.node_id  # a prefix, with or without 0x
    with pytest.raises(DisputeError, match="not kept out"):
        readmit(engine, a.node_id)
    dispute(rec, b)
    dispute(rec, a)
    common = _common_prefix(a.node_id, b.node_id)
    if len(common) >= 8:  # 1 in 2^24 identities: nothing to test
        with pytest.raises(DisputeError, match="more than one"):
            readmit(engine, common)


def _common_prefix(x: str, y: str) -> str:
    n = 0
    while x[n] == y[n]:
        n += 1
    return x[:n]


def test_the_cli_lists_and_readmits(tmp_path):
    engine = make_db(tmp_path / "d.db")
    a, b = Identity.generate(), Identity.generate()
    rec = UsageRecorder(engine, {a.node_id: a.node_public_key}.get, instance_id="me")
    db = ["--db", f"sqlite:///{tmp_path / 'd.db'}"]
    dispute(rec, a)
    run = CliRunner().invoke
    out = run(cli, ["gateway", "disputes", "list", *db], env={"COLUMNS": "400"})
    assert out.exit_code == 0, out.output
    assert a.node_id in out.output and "99" in out.output and b.node_id not in out.output

    out = run(cli, ["gateway", "disputes", "readmit", a.node_id[:12], "--note", "checked by hand", *db])
    assert out.exit_code == 0, out.output
    assert a.node_id[:12] in out.output and "1 disputed record" in out.output
    assert kept_out(engine) == {}
    out = run(cli, ["gateway", "disputes", "list", *db])
    assert out.exit_code == 0 and "no node is kept out" in out.output
    out = run(cli, ["gateway", "disputes", "list", "--all", *db], env={"COLUMNS": "400"})
    assert a.node_id in out.output and "checked by hand" in out.output

    bad = run(cli, ["gateway", "disputes", "readmit", b.node_id, *db])
    assert bad.exit_code == 2 and "no disputed node" in bad.output


@pytest.mark.integration
def test_running_gateways_follow_disputes_and_readmissions(tiny_base, tmp_path):
    db_path = tmp_path / "gw.db"
    engine = make_db(db_path)
    key, _ = create_key(engine, name="app")
    base = base_model_id(tiny_base)

    def gateway():
        s = GatewaySettings(db_url=f"sqlite:///{db_path}", bases=[tiny_base], registry_sync_s=0.3, heartbeat_ttl_s=60)
        return ServerThread(create_app(s)).start()

    first, second = gateway(), gateway()
    rogue, ident, url = start_script_node(tmp_path, "rogue", first.url, base, mode="rogue")
    add_node(engine, node_id=ident.node_id, base_model=base, api_url=url)

    def health(gw) -> dict:
        return httpx.get(gw.url + "/health", timeout=5).json()

    def ask(gw) -> httpx.Response:
        return httpx.post(
            gw.url + "/v1/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": TINY, "prompt": "hello", "max_tokens": 4},
            timeout=30,
        )

    def disputed(gw) -> list[str]:
        return [d["node_id"] for d in health(gw)["disputed_nodes"]]

    try:
        poll(lambda: health(first)["live_nodes"] == 1, timeout=60, interval=0.2)
        r = ask(first)
        assert r.status_code == 200 and r.headers["x-loramesh-node"] == ident.node_id
        assert disputed(first) == [ident.node_id] and health(first)["live_nodes"] == 0
        # the other gateway on the database keeps it out too, without a restart
        poll(lambda: disputed(second) == [ident.node_id], timeout=10, interval=0.1)

        readmit(engine, ident.node_id, note="test")
        poll(lambda: disputed(first) == [] and health(first)["live_nodes"] == 1, timeout=10, interval=0.1)
        poll(lambda: disputed(second) == [], timeout=10, interval=0.1)
        assert ident.node_id not in httpx.get(first.url + "/metrics", timeout=5).text
        r = ask(first)  # routed to it again; it lies again, and is out again
        assert r.status_code == 200 and r.headers["x-loramesh-node"] == ident.node_id
        assert disputed(first) == [ident.node_id]
        assert (
            f'loramesh_gateway_disputed_node{{node_id="{ident.node_id}"}} 1.0' in httpx.get(first.url + "/metrics").text
        )
        assert [(d.records, d.open) for d in node_disputes(engine)] == [(2, 1)]
    finally:
        if rogue.poll() is None:
            rogue.kill()
            rogue.wait(10)
        first.stop()
        second.stop()
        engine.dispose()


def test_a_database_that_cannot_be_read_keeps_the_known_disputes_and_says_so_once(book, caplog):
    engine, a, _, rec = book
    dispute(rec, a)
    ub = UsageBook(rec, NodeDirectory(RegistryView(engine)), GatewayMetrics(), probe_s=1)
    asyncio.run(ub.sync_disputes())
    assert list(ub.directory.disputed) == [a.node_id]
    rec.engine = make_engine("sqlite:////nonexistent/folder/gw.db")  # every read fails
    with caplog.at_level(logging.ERROR, logger="gateway.usage_book"):
        for _ in range(3):
            asyncio.run(ub.sync_disputes())
    assert list(ub.directory.disputed) == [a.node_id]  # kept out still
    assert sum("could not read disputed nodes" in r.getMessage() for r in caplog.records) == 1
    rec.engine = engine
    readmit(engine, a.node_id)
    asyncio.run(ub.sync_disputes())
    assert ub.directory.disputed == {}


@pytest.mark.parametrize("price", [2**256, -1], ids=["2**256", "negative"])
def test_a_quote_the_database_refuses_does_not_dispute_the_node(book, price):
    # the quote is the gateway's own value (a registry mirror fed by a buggy or hostile source): a record it
    # makes unwritable is the gateway's failure, not the node's. The request is closed without a record, and
    # the node, which served as it should, is not kept out (locally, with no disputed row behind it, until
    # the next sync forgot it)
    engine, a, _, rec = book
    ub = UsageBook(rec, NodeDirectory(RegistryView(engine)), GatewayMetrics(), probe_s=1)
    assert asyncio.run(ub.record(end_for(a, quote={ADAPTER: price}))) == "no_record"
    assert ub.directory.disputed == {} and kept_out(engine) == {}
    (done,), records = rows(engine)
    assert done.status == RequestStatus.OK and records == []
    assert "no usage record could be written" in done.error and "disputed" not in done.error


def test_the_list_prints_a_node_chosen_reason_as_text(tmp_path):
    # a rogue node's receipt text ends up in the reason: rich markup in it must not crash or restyle the list
    engine = make_db(tmp_path / "d.db")
    a = Identity.generate()
    with Session(engine) as s:
        add_usage_record(
            s,
            request_id="0x" + "12" * 32,
            adapter_id="0x" + "aa" * 32,
            node_id=a.node_id,
            prompt_tokens=3,
            completion_tokens=4,
            status=RecordStatus.DISPUTED,
            error="receipt refused: finish_reason '[/x][link=http://evil]'",
        )
        s.commit()
    readmit(engine, a.node_id, note="[bold]ok")
    out = CliRunner().invoke(
        cli, ["gateway", "disputes", "list", "--all", "--db", f"sqlite:///{tmp_path / 'd.db'}"], env={"COLUMNS": "400"}
    )
    assert out.exit_code == 0, out.output
    assert "[bold]ok" in out.output
