"""A page of the explorer reads what it shows, not the chain's history: anyone can register datasets, and every
settled batch adds rewards, so a page that read every dataset, accrual or reward on each view grew slower with
the chain for everyone (red team: /datasets read every dataset on any page, /accounts every accrual, the
overview every contributor's reward and every accrual). Nor does a page read the rows before it: every list page
was an OFFSET, so `?page=` in the billions (or the last page of a long list) walked the whole list, and the tokens
plot read every adapter's usage to draw the top few.

Real anvil, the explorer under real uvicorn in this process, its reads of the index counted row by row, and the
steps SQLite took to answer them (what an OFFSET walks and never returns)."""

import threading
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy import event

from common.identity import Identity
from devnet.explorer import ExplorerConfig, create_app, service
from devnet.explorer.plots import MAX_SERIES
from devnet.explorer.queries import IndexReads
from devnet.explorer.tables import ZERO_RANK
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


@dataclass(frozen=True)
class Read:
    """What one page or query read: `rows` its queries returned, `steps` the rows and index entries SQLite walked
    to answer them (its progress handler, called at every step of its virtual machine's loops: a row an OFFSET
    skips is walked and never returned, so the row count alone does not see it)."""

    rows: int
    steps: int
    html: str = ""


@pytest.fixture(scope="module")
def counted(anvil_chain, world):
    """(the explorer, read): read(path) is what a GET of `path` read (Read), read.query(ask) what ask(q) read on one
    snapshot of the index, and its answer."""
    seen = [0, 0]  # rows returned, SQLite steps

    def step() -> int:
        seen[1] += 1
        return 0  # go on

    class Counted(IndexReads):
        def __init__(self, session) -> None:
            conn = session.connection()
            # a new connection's first statement reads the schema (a hundred steps and more): not the page's work
            conn.exec_driver_sql("SELECT 1 FROM explorer_cursor LIMIT 0")
            conn.connection.dbapi_connection.set_progress_handler(step, 1)
            super().__init__(_CountedSession(session, seen))

    def unhook(dbapi_conn, _record) -> None:  # a connection back in the pool counts no more (the refresher's)
        dbapi_conn.set_progress_handler(None, 1)

    mp = pytest.MonkeyPatch()
    mp.setattr(service, "IndexReads", Counted)
    app = create_app(ExplorerConfig(deployment=anvil_chain.deployment_path, db_url=world.db_url))
    reader = app.state.explorer.db.reader
    event.listen(reader, "checkin", unhook)
    try:
        with ServerThread(app) as server:
            app.state.explorer.wait_synced()

            def read(path: str) -> Read:
                seen[0] = seen[1] = 0
                r = httpx.get(server.url + path, timeout=30)
                assert r.status_code == 200, (path, r.text[:300])
                return Read(seen[0], seen[1], r.text)

            def query(ask: Callable[[IndexReads], object]) -> tuple[Read, object]:
                """What ask(q) read, on one snapshot of the index, and its answer."""
                with app.state.explorer.view() as view:
                    seen[0] = seen[1] = 0
                    answer = ask(view.q)
                    return Read(seen[0], seen[1]), answer

            read.query = query
            yield app.state.explorer, read
    finally:
        event.remove(reader, "checkin", unhook)
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
    ex, read = counted
    _settle(anvil_chain, price=10**15, batches=2)  # the contributors the rewards plot shows
    ex.refresh()
    paths = ("/datasets?page=1000", "/accounts?page=1000", "/")
    before = {p: read(p).rows for p in paths}
    spammer = anvil_chain.client(anvil_chain.new_account(10**18))
    for i in range(120):  # a stranger's datasets: cheap to register, shown in no page but their own
        spammer.register_dataset(f"spam-{i}", rand_id())
    _settle(anvil_chain, price=10**6, batches=10)  # nine small contributors, ninety rewards, none plotted
    ex.refresh()
    after = {p: read(p).rows for p in paths}
    assert after["/datasets?page=1000"] == before["/datasets?page=1000"]  # read 120 more datasets before
    assert after["/accounts?page=1000"] == before["/accounts?page=1000"]  # read every accrual before
    # the overview reads what it plots and lists (the top contributors' rewards, the top adapters' tokens: the new
    # adapter's ten points and their block times, and the latest batches), not every reward and accrual, which
    # added 127 rows before (the ninety rewards, the new accruals)
    assert after["/"] - before["/"] <= 50, (before, after)


def test_the_contributors_and_accounts_lists_come_in_rank_order_a_page_at_a_time(anvil_chain, counted):
    _, read = counted
    client = anvil_chain.client()
    earned: dict[str, int] = {}
    accrued: dict[str, int] = {}
    for e in client.events("ledger", "RewardAccrued"):
        accrued[e["args"]["account"]] = accrued.get(e["args"]["account"], 0) + e["args"]["amount"]
        if e["args"]["role"] == 2:  # a dataset's payee
            earned[e["args"]["account"]] = earned.get(e["args"]["account"], 0) + e["args"]["amount"]
    assert earned and len(accrued) > len(earned)
    html = read("/datasets").html
    shown = html.split("<h2>Contributors</h2>")[1]
    ranked = sorted(earned, key=lambda a: (-earned[a], a))
    assert [a for a in ranked if a in shown] == ranked and all(f'title="{earned[a]} wei"' in shown for a in ranked)
    positions = [shown.index(a) for a in ranked]
    assert positions == sorted(positions)
    html = read("/accounts").html
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


# ---------------------------------------------------------------------------------------- pages deep and past the end

PAGE = 3  # rows a page holds in these tests: lists of a few dozen rows are then many pages deep
FAR = 10**9  # the highest page number the routes take


@dataclass(frozen=True)
class Heap:
    """Lists a stranger grows cheaply (datasets, adapters and their names, nodes, deposits for a settler: a wei
    each), and settled batches that grew the others (records of one adapter, of one node and of the two, rewards
    of one address, batches)."""

    stranger: str
    adapters: list[str]
    nodes: list[str]
    settler: str


@pytest.fixture(scope="module")
def heap(anvil_chain, counted) -> Heap:
    ex, _ = counted
    account = anvil_chain.new_account(10**19)
    stranger = anvil_chain.client(account)
    for i in range(30):
        stranger.register_dataset(f"heap-{i}", rand_id())
    base, adapters, nodes = rand_id(), [], []
    for i in range(20):
        adapters.append(rand_id())
        stranger.register_adapter(
            adapters[-1], name=f"heap/{i:02d}", version="1.0.0", base_model=base, price_per_1k_tokens=10**9
        )
    for i in range(50):
        identity = Identity.generate()
        stranger.register_node(
            identity.node_key,
            peer_id="12D3KooWtest",
            multiaddrs=[f"/ip4/127.0.0.1/tcp/{5000 + i}"],
            api_url=f"http://127.0.0.1:{6000 + i}",
            base_model=base,
        )
        nodes.append(identity.node_id)
    settler = anvil_chain.client(anvil_chain.settler)
    for _ in range(25):  # the first node serving the first two adapters: its records, their records, the rewards
        records = [SettleRecord(rand_id(), adapters[0], nodes[0], 10, 10) for _ in range(4)]
        settler.settle_batch(None, None, [*records, SettleRecord(rand_id(), adapters[1], nodes[0], 7, 3)])
    for _ in range(25):
        stranger.deposit_for(anvil_chain.settler.address, 1)
    for _ in range(2):  # accounts and contributors: nine and eight more each time
        _settle(anvil_chain, price=10**12, batches=1)
    ex.refresh()
    return Heap(account.address, adapters, nodes, anvil_chain.settler.address)


# each list a page reads: the question, what tells its rows apart, and the whole list in its order as SQL (the
# reference a page is a slice of)
def _lists(h: Heap) -> dict[str, tuple[Callable, Callable, str, tuple]]:
    record = "SELECT '0x' || lower(hex(request_id)) FROM explorer_records"
    return {
        "datasets": (
            lambda q, p: q.datasets(p, PAGE),
            lambda d: (d.dataset_id,),
            "SELECT dataset_id FROM explorer_datasets ORDER BY seq",
            (),
        ),
        "nodes": (
            lambda q, p: q.nodes(p, PAGE),
            lambda n: (n.node_id,),
            "SELECT node_id FROM explorer_nodes ORDER BY seq",
            (),
        ),
        "batches": (
            lambda q, p: q.batches(p, PAGE),
            lambda b: (b.batch_id,),
            "SELECT batch_id FROM explorer_batches ORDER BY seq DESC",
            (),
        ),
        "records": (
            lambda q, p: q.records(page=p, size=PAGE),
            lambda r: (r.request_id,),
            f"{record} ORDER BY seq DESC",
            (),
        ),
        "records of an adapter": (
            lambda q, p: q.records(adapter=h.adapters[0], page=p, size=PAGE),
            lambda r: (r.request_id,),
            f"{record} WHERE adapter_id = ? ORDER BY seq DESC",
            (bytes.fromhex(h.adapters[0][2:]),),
        ),
        "records of a node": (
            lambda q, p: q.records(node=h.nodes[0], page=p, size=PAGE),
            lambda r: (r.request_id,),
            f"{record} WHERE node_id = ? ORDER BY seq DESC",
            (bytes.fromhex(h.nodes[0][2:]),),
        ),
        "records of an adapter on a node": (
            lambda q, p: q.records(adapter=h.adapters[1], node=h.nodes[0], page=p, size=PAGE, newest_first=False),
            lambda r: (r.request_id,),
            f"{record} WHERE adapter_id = ? AND node_id = ? ORDER BY seq",
            (bytes.fromhex(h.adapters[1][2:]), bytes.fromhex(h.nodes[0][2:])),
        ),
        "an address's rewards": (
            lambda q, p: q.account_rewards(h.stranger, p, PAGE),
            lambda r: (r.batch_id, r.adapter_id, r.role, r.subject_id, r.amount),
            "SELECT batch_id, adapter_id, role, subject_id, amount FROM explorer_rewards WHERE account = ? "
            "ORDER BY id DESC",
            (h.stranger,),
        ),
        "an address's deposits": (
            lambda q, p: q.money(h.settler, p, PAGE),
            lambda m: (m.kind, m.amount, m.block, m.tx_hash),
            "SELECT kind, amount, block, tx_hash FROM explorer_money WHERE account = ? ORDER BY id DESC",
            (h.settler,),
        ),
        # ordered by what no kept sequence follows (names, ranks): a page past the end reads nothing, a page inside
        # walks the rows before it (devnet.explorer.queries says why)
        "adapters": (
            lambda q, p: q.adapters(p, PAGE),
            lambda a: (a.adapter_id,),
            "SELECT adapter_id FROM explorer_adapters ORDER BY name, block, adapter_id",
            (),
        ),
        "names": (
            lambda q, p: q.names(p, PAGE),
            lambda n: (n.name,),
            "SELECT name FROM explorer_names ORDER BY name",
            (),
        ),
        "accounts": (
            lambda q, p: q.accounts(p, PAGE),
            lambda a: (a.address,),
            "SELECT account FROM explorer_account_totals ORDER BY accrued_rank DESC, account",
            (),
        ),
        "contributors": (
            lambda q, p: q.contributors(p, PAGE),
            lambda c: c,
            "SELECT account, dataset FROM explorer_account_totals WHERE dataset_rank > ? "
            "ORDER BY dataset_rank DESC, account",
            (ZERO_RANK,),
        ),
    }


# lists whose page inside is read as a page at the start is: a window of a dense sequence (seq) or of an ordinal the
# indexer keeps per adapter, node, adapter on a node and address ("records", unfiltered, was a window of seq already:
# here as the reference of what the others now cost)
DENSE = (
    "datasets",
    "nodes",
    "batches",
    "records",
    "records of an adapter",
    "records of a node",
    "records of an adapter on a node",
    "an address's rewards",
    "an address's deposits",
)
SLACK = 12  # steps a page's own bounds may cost more than a first page's (the count or ordinal it starts from)


def _whole(ex, sql: str, args: tuple) -> list[tuple]:
    with ex.db.reader.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(sql, args).all()]


@pytest.mark.parametrize("name", list(_lists(Heap("", [""] * 2, [""], "")).keys()))
def test_a_page_far_past_the_end_or_deep_in_a_list_reads_what_a_first_page_does(counted, heap, name):
    """`?page=` in the billions made SQLite walk every row of the list it skipped (OFFSET), and a page near the end
    of a big list every row before it: one request read a whole table."""
    ex, read = counted
    ask, key, sql, args = _lists(heap)[name]
    whole = [tuple(map(str, row)) for row in _whole(ex, sql, args)]
    pages = -(-len(whole) // PAGE)
    assert pages >= 5, (name, len(whole))  # a list many pages long
    first, _ = read.query(lambda q: ask(q, 0))
    far, answer = read.query(lambda q: ask(q, FAR))
    assert answer.rows == [] and not answer.more and answer.number == FAR  # an empty page, as before
    assert far.steps <= first.steps + SLACK, (name, first, far)
    for p in (0, 1, pages // 2, pages - 1, pages, pages + 1, FAR):  # each page the slice of the list it always was
        _, answer = read.query(lambda q, p=p: ask(q, p))
        assert [tuple(map(str, key(r))) for r in answer.rows] == whole[p * PAGE : (p + 1) * PAGE], (name, p)
        assert answer.more == (len(whole) > (p + 1) * PAGE), (name, p)
    if name in DENSE:
        deep, _ = read.query(lambda q: ask(q, pages - 2))  # the last full page
        assert deep.steps <= first.steps + SLACK, (name, first, deep)


ROUTES = (
    "/datasets?page={}",
    "/nodes?page={}",
    "/batches?page={}",
    "/adapters?page={}",
    "/accounts?page={}",
    "/records?node={node}&page={}",
    "/records?adapter={adapter}&node={node}&page={}",
    "/address/{stranger}?page={}",
    "/address/{settler}?money_page={}",
)


@pytest.mark.parametrize("route", ROUTES)
def test_a_route_asked_for_a_page_far_past_the_end_answers_it_empty_reading_less_than_its_first(
    counted, heap, route, monkeypatch
):
    """The attack as a stranger sends it: a page number in the billions, on a list route (pages of one row here,
    so that the list, not the rest of the page, is most of what a page reads)."""
    from devnet.explorer import pages_accounts, pages_ledger, pages_registry

    for module in (pages_accounts, pages_ledger, pages_registry):
        monkeypatch.setattr(module, "PAGE_SIZE", 1)
    monkeypatch.setattr(pages_ledger, "BATCHES_PAGE", 1)
    _, read = counted
    for name, value in (("stranger", heap.stranger), ("settler", heap.settler), ("node", heap.nodes[0])):
        route = route.replace("{" + name + "}", value)
    path = route.replace("{adapter}", heap.adapters[1])
    first, far = read(path.format(0)), read(path.format(FAR))
    assert far.steps <= first.steps, (first.rows, first.steps, far.rows, far.steps)
    assert f"={FAR - 1}" in far.html and "← newer" in far.html  # the way back, as a page past the end always had


def test_the_tokens_plot_reads_its_top_adapters_usage_not_every_adapters(anvil_chain, counted, heap):
    """It read every adapter's Usage row to pick the MAX_SERIES that served the most tokens: one row per adapter
    ever served, on each new position of the index."""
    ex, read = counted

    def plot() -> Read:
        ex.by_position.clear()  # drawn anew, not the drawing kept for this position of the index
        return read("/plots/tokens.svg")

    settler = anvil_chain.client(anvil_chain.settler)
    before = plot()
    settler.settle_batch(  # twenty adapters served, in tokens 11, 12, ..., 30
        None, None, [SettleRecord(rand_id(), a, heap.nodes[1], 10 + i, 1) for i, a in enumerate(heap.adapters)]
    )
    ex.refresh()
    served = _whole(ex, "SELECT key, prompt_tokens + completion_tokens FROM explorer_usage WHERE kind = 'adapter'", ())
    assert len(served) > 2 * MAX_SERIES
    ranked = sorted(served, key=lambda kv: (-kv[1], kv[0]))[:MAX_SERIES]
    top, answer = read.query(lambda q: q.top_adapters(MAX_SERIES))
    assert answer == ranked
    assert top.rows <= MAX_SERIES, top  # read every adapter's row before
    after = plot()
    assert after.html.count('class="series"') == MAX_SERIES
    # a few more points of the top adapters (a block each), not a row for each adapter served
    assert after.rows - before.rows <= MAX_SERIES, (before.rows, after.rows)
    overview = read("/").html.split('id="plot-tokens"')[1].split("</svg>")[0]
    assert overview.count('class="series"') == MAX_SERIES


def test_the_numbers_a_page_is_found_by_run_without_gaps_and_the_kept_counts_are_the_lists_lengths(counted, heap):
    """A window of numbers is the page OFFSET found only while the numbers run 1..n without a gap, and a page past
    the end reads nothing only while the count kept on the cursor is the list's length."""
    ex, read = counted

    def one(sql: str, *args) -> list[tuple]:
        return _whole(ex, sql, args)

    for table in ("explorer_datasets", "explorer_nodes", "explorer_batches", "explorer_records"):
        ((n, low, high),) = one(f"SELECT count(*), min(seq), max(seq) FROM {table}")
        assert n > 20 and (low, high) == (1, n), table
    for table, number, key in (
        ("explorer_records", "adapter_ord", "adapter_id"),
        ("explorer_records", "node_ord", "node_id"),
        ("explorer_records", "pair_ord", "node_id, adapter_id"),
        ("explorer_rewards", "account_ord", "account"),
        ("explorer_money", "account_ord", "account"),
    ):
        per_key = one(
            f"SELECT count(*), count(DISTINCT {number}), min({number}), max({number}) FROM {table} GROUP BY {key}"
        )
        assert max(n for n, *_ in per_key) >= 25 and all((d, low, high) == (n, 1, n) for n, d, low, high in per_key)
    # a record's ordinals count on from its keys' Usage sums: they must be the keys' numbers of records
    adapter, node = "'0x' || lower(hex(adapter_id))", "'0x' || lower(hex(node_id))"
    for kind, key in (("adapter", adapter), ("node", node), ("node_adapter", f"{node} || {adapter}")):
        in_records = one(f"SELECT {key}, count(*) FROM explorer_records GROUP BY 1")
        assert sorted(in_records) == sorted(one("SELECT key, records FROM explorer_usage WHERE kind = ?", kind))
    assert one("SELECT adapters, names, accounts, contributors FROM explorer_cursor") == [
        (
            one("SELECT count(*) FROM explorer_adapters")[0][0],
            one("SELECT count(*) FROM explorer_names")[0][0],
            one("SELECT count(*) FROM explorer_account_totals")[0][0],
            one("SELECT count(*) FROM explorer_account_totals WHERE dataset_rank > ?", ZERO_RANK)[0][0],
        )
    ]
    _, counts = read.query(lambda q: q.counts())
    assert counts == {
        name: one(f"SELECT count(*) FROM explorer_{name}")[0][0] for name in ("adapters", "datasets", "nodes")
    }


# lists in an order no kept number follows, and what an address holds (anyone can name an address the payee of any
# number of datasets): their pages walk the index entries before them, so they reach MAX_LIST_DEPTH rows and no
# deeper (devnet.explorer.queries)
UNKEPT = ("adapters", "names", "accounts", "contributors")
DEPTH = 2 * PAGE + 1  # the last page it reaches holds one row


def _owned(h: Heap) -> tuple:
    return (
        lambda q, p: q.owned_by(h.stranger, p, PAGE),
        lambda row: (getattr(row, "adapter_id", None) or getattr(row, "dataset_id", None) or row.node_id,),
        "SELECT id FROM (SELECT adapter_id AS id, 1 AS kind, rowid AS r FROM explorer_adapters WHERE owner = ?1 "
        "UNION ALL SELECT dataset_id, 2, rowid FROM explorer_datasets WHERE payee = ?1 "
        "UNION ALL SELECT node_id, 3, rowid FROM explorer_nodes WHERE operator = ?1) ORDER BY kind, r",
        (h.stranger,),
    )


@pytest.mark.parametrize("name", [*UNKEPT, "owned"])
def test_a_list_no_kept_number_orders_is_paged_to_a_depth_and_a_page_past_it_reads_nothing(
    counted, heap, name, monkeypatch
):
    """A page of these lists inside them walked every index entry before it: a stranger who registered a million
    adapters, or named an address the payee of a million datasets, made each deep page read a million entries."""
    from devnet.explorer import queries

    ex, read = counted
    ask, key, sql, args = _owned(heap) if name == "owned" else _lists(heap)[name]
    whole = [tuple(map(str, row)) for row in _whole(ex, sql, args)]
    assert len(whole) > DEPTH + PAGE, (name, len(whole))
    first, _ = read.query(lambda q: ask(q, 0))
    monkeypatch.setattr(queries, "MAX_LIST_DEPTH", DEPTH)
    for p in range(DEPTH // PAGE + 1):  # the pages it reaches: the list's slices, the last cut at the depth
        _, answer = read.query(lambda q, p=p: ask(q, p))
        assert [tuple(map(str, key(r))) for r in answer.rows] == whole[p * PAGE : min((p + 1) * PAGE, DEPTH)]
        assert (answer.more, answer.cut) == ((False, True) if p == DEPTH // PAGE else (True, False)), (name, p)
    for p in (DEPTH // PAGE + 1, len(whole) // PAGE, FAR):  # inside the list, past the depth
        deep, answer = read.query(lambda q, p=p: ask(q, p))
        assert answer.rows == [] and not answer.more, (name, p)
        assert deep.steps <= first.steps + SLACK, (name, p, first, deep)
    monkeypatch.setattr(queries, "MAX_LIST_DEPTH", 10**9)
    _, answer = read.query(lambda q: ask(q, len(whole) // PAGE))  # the depth is all that left it out
    assert [tuple(map(str, key(r))) for r in answer.rows] == whole[len(whole) // PAGE * PAGE :][:PAGE]


def test_the_last_page_a_list_reaches_says_the_search_finds_the_rest(counted, heap, monkeypatch):
    from devnet.explorer import pages_registry, queries

    _, read = counted
    monkeypatch.setattr(pages_registry, "PAGE_SIZE", PAGE)
    monkeypatch.setattr(queries, "MAX_LIST_DEPTH", DEPTH)
    last = read(f"/adapters?page={DEPTH // PAGE}").html
    pager = last.split('<p class="pager" data-param="page">')[1].split("</p>")[0]
    assert f"pages reach its first {DEPTH} rows: search finds the rest" in pager
    assert f"page={DEPTH // PAGE + 1}" not in pager and f"page={DEPTH // PAGE - 1}" in pager
    inside = read("/adapters?page=1").html.split('<p class="pager" data-param="page">')[1].split("</p>")[0]
    assert "search finds the rest" not in inside and "page=2" in inside


def test_the_search_finds_names_by_their_start_and_by_words_inside_them_reading_no_adapter_it_does_not_show(
    counted, heap
):
    """The name search was LIKE '%words%' over every adapter: a scan of the whole table on each search, 0.66 s a
    search with a million registered (measured), which anyone can send. Each statement it runs now is planned on
    an index (the names' order, or the trigram index), none as a scan of the adapters."""
    ex, read = counted
    plans: list[str] = []

    def planned(conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            plans.extend(r[-1] for r in cursor.connection.execute("EXPLAIN QUERY PLAN " + statement, parameters))

    names = {a: n for a, n in _whole(ex, "SELECT adapter_id, name FROM explorer_adapters", ())}
    event.listen(ex.db.reader, "before_cursor_execute", planned)
    try:
        cases = {"heap/1": "heap/1", "EAP/0": "eap/0", "p/07": "p/07", "no-such-words": "no-such-words"}
        for asked, words in cases.items():
            _, (found, cut) = read.query(lambda q, asked=asked: q.search_adapters(asked))
            assert not cut
            want = sorted((n, a) for a, n in names.items() if words in n)
            starting = [(n, a) for n, a in want if n.startswith(words)]
            # those named from the words first, in name order, then those with the words inside them
            assert [(a.name, a.adapter_id) for a in found] == starting + [x for x in want if x not in starting], asked
        assert read.query(lambda q: q.search_adapters("07"))[1] == ([], False)  # under 3: the start only
    finally:
        event.remove(ex.db.reader, "before_cursor_execute", planned)
    assert plans and not [p for p in plans if p.startswith("SCAN explorer_adapters")], plans


def _no_thread(self):
    raise AssertionError(f"a thread started: {self!r}")


def test_a_search_inside_names_many_share_the_letters_of_stops_at_its_budget(tmp_path, monkeypatch):
    """Review: a phrase whose trigrams many names hold, but none in a row ("a" * 64 against names "a" * 63 + a
    digit, which anyone may register), walked every such name: 0.8 s a search over 100,000 of them, and more the
    longer the text. Longer than a name can be, the text is in none; otherwise the walk is interrupted at
    SEARCH_BUDGET_S and the search says so."""
    from sqlmodel import Session

    from devnet.explorer import queries
    from devnet.explorer.index_db import IndexDatabase
    from devnet.explorer.pages_accounts import search_page
    from devnet.explorer.tables import ADAPTER_SEARCH

    db = IndexDatabase(tmp_path)
    try:
        with db.writer.begin() as conn:
            conn.exec_driver_sql(
                f"INSERT INTO {ADAPTER_SEARCH} (name, adapter_id) VALUES (?, ?)",
                [("a" * 63 + str(i % 10), f"{i:064x}") for i in range(20_000)],
            )
        with Session(db.reader) as s:
            q = IndexReads(s)
            assert q.search_adapters("a" * 65) == ([], False)  # longer than any name: not searched
            assert q.search_adapters("zzz") == ([], False)  # a trigram no name holds: answered at once
            monkeypatch.setattr(queries, "SEARCH_BUDGET_S", 0.001)  # the walk takes some 0.15 s here
            threads = threading.active_count()
            with monkeypatch.context() as m:
                m.setattr(threading.Thread, "start", _no_thread)  # the budget is kept in this thread
                assert q.search_adapters("a" * 64) == ([], True)  # interrupted
            assert threading.active_count() == threads
            assert q.search_adapters("ab") == ([], False)  # the read transaction goes on after an interruption
    finally:
        db.dispose()
    page = search_page("a" * 64, [], cut=True)
    assert 'id="search-empty"' in page and 'id="search-cut"' in page
