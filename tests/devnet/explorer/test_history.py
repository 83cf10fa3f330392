"""A registry entity's history is a table of its own, one row appended per event, and its page shows a page of it.

Anyone can change their own adapter's price as often as they like: each change rewrote the adapter row's whole JSON
history, so indexing 10,000 changes of one adapter took 232 s (quadratic), and its page listed all 10,000 lines
(2.8 MB, red team). No timing here: one more event is shown to run the same statements, binding the same bytes and
taking the same SQLite steps after 2,000 events of the entity as after 200."""

import re
from contextlib import contextmanager

import httpx
import pytest
from sqlalchemy import event
from sqlmodel import Session

from devnet.explorer import Explorer, create_app
from devnet.explorer.index import _Step
from devnet.explorer.index_db import IndexDatabase
from devnet.explorer.store import LedgerStore, open_ledger_db
from ledger import registry_events as RE
from ledger.db import init_db, make_engine
from ledger.types import AdapterInfo
from tests.utils.chain import rand_id, register_sample
from tests.utils.servers import ServerThread

ADAPTER = "0x" + "ab" * 32
OWNER = "0x" + "11" * 20
TX = "0x" + "cd" * 32


def _write(db: IndexDatabase, updates: list, block: int) -> None:
    """Apply registry updates as one refresh step does (_Step.write: each in its savepoint, flushed)."""
    step = _Step(None)  # the index is asked for nothing but batches' timestamps
    step.registry = [(u, block, TX) for u in updates]
    with Session(db.writer) as s, s.begin():
        step.write(s)


def _registered(db: IndexDatabase) -> None:
    info = AdapterInfo(ADAPTER, OWNER, "spam/prices", "1.0.0", "0x" + "00" * 32, rand_id(), 1, (), (), OWNER)
    _write(db, [RE.AdapterRegistered(info)], block=1)


@contextmanager
def _watched(db: IndexDatabase):
    """What the writer runs meanwhile: [(statement, bytes bound)] and [SQLite VM steps]."""
    statements: list[tuple[str, int]] = []
    steps = [0]

    def bound(params) -> int:
        if isinstance(params, (list, tuple)) and params and isinstance(params[0], (list, tuple, dict)):
            return sum(bound(p) for p in params)  # executemany
        values = params.values() if isinstance(params, dict) else params or ()
        return sum(len(str(v)) for v in values)

    def before(conn, _cursor, statement, params, _context, _many) -> None:
        statements.append((statement, bound(params)))

    def on_begin(conn) -> None:
        conn.connection.dbapi_connection.set_progress_handler(lambda: steps.__setitem__(0, steps[0] + 1), 1)

    event.listen(db.writer, "before_cursor_execute", before)
    event.listen(db.writer, "begin", on_begin)
    try:
        yield statements, steps
    finally:
        event.remove(db.writer, "before_cursor_execute", before)
        event.remove(db.writer, "begin", on_begin)


def _one_more(db: IndexDatabase, n: int) -> tuple[list[tuple[str, int]], int]:
    """After n price changes of the adapter, what the (n + 1)th one's step runs: statements, bytes, steps."""
    with _watched(db) as (statements, steps):
        _write(db, [RE.AdapterPriceChanged(ADAPTER, 10**12 + n)], block=n + 2)
    return statements, steps[0]


def test_one_more_event_costs_what_it_did_at_a_tenth_of_the_history(tmp_path):
    db = IndexDatabase(tmp_path)
    try:
        _registered(db)
        _write(db, [RE.AdapterPriceChanged(ADAPTER, i) for i in range(200)], block=2)
        small, small_steps = _one_more(db, 200)
        _write(db, [RE.AdapterPriceChanged(ADAPTER, i) for i in range(1799)], block=3)
        large, large_steps = _one_more(db, 2000)
        assert [sql for sql, _ in large] == [sql for sql, _ in small]
        # the same values bound, but for a number's digits (an event's ordinal, its block, the price)
        assert sum(b for _, b in large) <= sum(b for _, b in small) + 16, (small, large)
        assert large_steps <= small_steps + 20, (small_steps, large_steps)
        with db.reader.connect() as conn:
            lines = conn.exec_driver_sql(
                "SELECT count(*), min(ord), max(ord) FROM explorer_history WHERE kind = 'adapter' AND key = ?",
                (ADAPTER,),
            ).one()
        assert tuple(lines) == (2002, 1, 2002)  # registered, then 2,001 price changes: one row each, no gaps
    finally:
        db.dispose()


def _price_changes(env, reg, n: int) -> None:
    """n setAdapterPrice calls by the adapter's owner (an unlocked dev account), mined in one block."""
    w3, registry = env.client().w3, env.client().registry
    w3.provider.make_request("evm_setAutomine", [False])
    try:
        for i in range(n):
            data = registry.functions.setAdapterPrice(reg.adapter_id, 10**12 + i)._encode_transaction_data()
            tx = {"from": reg.owner.address, "to": registry.address, "data": data, "gas": hex(200_000)}
            assert "result" in w3.provider.make_request("eth_sendTransaction", [tx])
        w3.provider.make_request("evm_mine", [])
    finally:
        w3.provider.make_request("evm_setAutomine", [True])


@pytest.mark.integration
def test_a_long_history_is_paged_newest_first(anvil_chain, tmp_path):
    reg = register_sample(anvil_chain, shares=(100,))
    _price_changes(anvil_chain, reg, 120)  # with its registration: 121 lines, pages of 50
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    init_db(make_engine(db_url))
    ex = Explorer(anvil_chain.client(), LedgerStore(open_ledger_db(db_url)), data_dir=tmp_path / "index")
    path = f"/adapters/{reg.adapter_id}"
    with ServerThread(create_app(explorer=ex)) as server:
        ex.wait_synced()

        def lines(page: int) -> tuple[list[str], str]:
            html = httpx.get(f"{server.url}{path}?history_page={page}", timeout=30).text
            table = html.split('id="adapter-history"')[1].split("</table>")[0] if "adapter-history" in html else ""
            return re.findall(r"<td>([^<]*(?:price changed|registered by)[^<]*)</td>", table), html

        (first, html0), (second, html1), (third, html2) = lines(0), lines(1), lines(2)
        assert [len(first), len(second), len(third)] == [50, 50, 21]
        prices = [int(re.search(r"changed to (\d+)", line)[1]) - 10**12 for line in first + second + third[:-1]]
        assert prices == list(range(119, -1, -1)) and third[-1].startswith("registered by")  # the newest first
        assert "1–50 of 121" in html0 and f'href="{path}?history_page=1"' in html0 and "← newer" not in html0
        assert f'href="{path}?history_page=0"' in html1 and f'href="{path}?history_page=2"' in html1
        assert "older →" not in html2 and "101–121 of 121" in html2
        assert lines(3)[0] == []  # past the end: nothing, not an error
        # a dataset's and a node's page show theirs the same way
        node_html = httpx.get(f"{server.url}/nodes/{reg.node_id}", timeout=30).text
        assert 'id="node-history"' in node_html and "with its key&#x27;s proof" in node_html
        dataset_html = httpx.get(f"{server.url}/datasets/{reg.dataset_ids[0]}", timeout=30).text
        assert 'id="dataset-history"' in dataset_html and "registered by its contributor" in dataset_html
