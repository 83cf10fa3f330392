"""A page of the explorer reads what it shows, not the chain's history: anyone can register datasets, and every
settled batch adds rewards, so a page that read every dataset, accrual or reward on each view grew slower with
the chain for everyone (red team: /datasets read every dataset on any page, /accounts every accrual, the
overview every contributor's reward and every accrual).

Real anvil, the explorer under real uvicorn in this process, its reads of the index counted row by row."""

import httpx
import pytest

from devnet.explorer import ExplorerConfig, create_app, service
from devnet.explorer.queries import IndexReads
from ledger.types import SettleRecord
from tests.devnet.explorer.test_pages import ids_in
from tests.utils.chain import rand_id, register_sample
from tests.utils.servers import ServerThread

pytestmark = pytest.mark.integration


class _Rows(list):
    def all(self):
        return list(self)

    def first(self):
        return self[0] if self else None

    def one(self):
        (row,) = self
        return row


class _CountedSession:
    """A session whose exec results are read whole and counted."""

    def __init__(self, session, seen: list[int]) -> None:
        self._s, self._seen = session, seen

    def exec(self, stmt):
        rows = _Rows(self._s.exec(stmt))
        self._seen[0] += len(rows)
        return rows

    def __getattr__(self, name):
        return getattr(self._s, name)


@pytest.fixture(scope="module")
def counted(anvil_chain, world):
    seen = [0]

    class Counted(IndexReads):
        def __init__(self, session) -> None:
            super().__init__(_CountedSession(session, seen))

    mp = pytest.MonkeyPatch()
    mp.setattr(service, "IndexReads", Counted)
    app = create_app(ExplorerConfig(deployment=anvil_chain.deployment_path, db_url=world.db_url))
    try:
        with ServerThread(app) as server:
            app.state.explorer.wait_synced()

            def rows_read(path: str) -> tuple[int, str]:
                seen[0] = 0
                r = httpx.get(server.url + path, timeout=30)
                assert r.status_code == 200, (path, r.text[:300])
                return seen[0], r.text

            yield app.state.explorer, rows_read
    finally:
        mp.undo()


def _settle(anvil_chain, *, price: int, batches: int) -> None:
    """Nine new contributors (fresh payees of eight datasets and the adapter's owner), paid in `batches`."""
    payees = tuple(anvil_chain.new_account(10**17) for _ in range(8))
    owner = anvil_chain.new_account(10**17)
    reg = register_sample(anvil_chain, price=price, shares=(1000,) * 8, payees=payees, owner=owner)
    settler = anvil_chain.client(anvil_chain.settler)
    for _ in range(batches):
        settler.settle_batch(None, None, [SettleRecord(rand_id(), reg.adapter_id, reg.node_id, 10, 10)])


def test_list_pages_and_the_overview_read_no_more_as_the_chain_grows(anvil_chain, counted):
    ex, rows_read = counted
    _settle(anvil_chain, price=10**15, batches=2)  # the contributors the rewards plot shows
    ex.refresh()
    paths = ("/datasets?page=1000", "/accounts?page=1000", "/")
    before = {p: rows_read(p)[0] for p in paths}
    spammer = anvil_chain.client(anvil_chain.new_account(10**18))
    for i in range(120):  # a stranger's datasets: cheap to register, shown in no page but their own
        spammer.register_dataset(f"spam-{i}", rand_id())
    _settle(anvil_chain, price=10**6, batches=10)  # nine small contributors, ninety rewards, none plotted
    ex.refresh()
    after = {p: rows_read(p)[0] for p in paths}
    assert after["/datasets?page=1000"] == before["/datasets?page=1000"]  # read 120 more datasets before
    assert after["/accounts?page=1000"] == before["/accounts?page=1000"]  # read every accrual before
    # the overview reads what it plots and lists (the top contributors' rewards, the top adapters' tokens: the new
    # adapter's ten points and their block times, and the latest batches), not every reward and accrual, which
    # added 127 rows before (the ninety rewards, the new accruals)
    assert after["/"] - before["/"] <= 50, (before, after)


def test_the_contributors_and_accounts_lists_come_in_rank_order_a_page_at_a_time(anvil_chain, counted):
    ex, rows_read = counted
    client = anvil_chain.client()
    earned: dict[str, int] = {}
    accrued: dict[str, int] = {}
    for e in client.events("ledger", "RewardAccrued"):
        accrued[e["args"]["account"]] = accrued.get(e["args"]["account"], 0) + e["args"]["amount"]
        if e["args"]["role"] == 2:  # a dataset's payee
            earned[e["args"]["account"]] = earned.get(e["args"]["account"], 0) + e["args"]["amount"]
    assert earned and len(accrued) > len(earned)
    _, html = rows_read("/datasets")
    shown = html.split("<h2>Contributors</h2>")[1]
    ranked = sorted(earned, key=lambda a: (-earned[a], a))
    assert [a for a in ranked if a in shown] == ranked and all(f'title="{earned[a]} wei"' in shown for a in ranked)
    positions = [shown.index(a) for a in ranked]
    assert positions == sorted(positions)
    _, html = rows_read("/accounts")
    assert ids_in(html, "address") == set(accrued)
    table = html.split('id="accounts"')[1]
    order = sorted(accrued, key=lambda a: (-accrued[a], a))
    assert [table.index(a) for a in order] == sorted(table.index(a) for a in order)


def test_ranks_order_amounts_exactly():
    """The ranks were floats: 10**18 + 30 and 10**18 + 10 wei were one float, and the address decided the order."""
    from devnet.explorer.tables import AccountTotal

    more, less = AccountTotal(account="0xB"), AccountTotal(account="0xA")
    more.add("dataset", 10**18 + 30)
    less.add("dataset", 10**18 + 10)
    assert more.dataset_rank > less.dataset_rank and more.accrued_rank > less.accrued_rank
    less.add("node", 2**255)
    assert less.accrued_rank > more.accrued_rank and less.contributor_rank < more.contributor_rank
