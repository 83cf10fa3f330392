"""Pages about who and what happened: accounts and their rewards, transactions, search, errors."""

from __future__ import annotations

from common.wire import ZERO_ID, hex0x
from devnet.explorer.layout import (
    PAGE_SIZE,
    adapter_link,
    address_link,
    card,
    esc,
    eth,
    id_link,
    kv,
    link,
    mono,
    num,
    page,
    pager,
    record_link,
    role,
    stats,
    table,
    tx_link,
)
from devnet.explorer.queries import Page
from devnet.explorer.service import View
from devnet.explorer.tables import ROLES, AdapterRow, DatasetRow
from ledger.merkle import unpack_records


def accounts_page(ex: View, *, page_no: int = 0) -> str:
    listed = ex.q.accounts(page_no, PAGE_SIZE)
    rows = []
    for acc in listed.rows:
        rows.append(
            [
                address_link(acc.address, full=True),
                *(eth(acc.by_role.get(r, 0)) for r in ROLES),
                eth(acc.accrued),
                eth(acc.withdrawn),
                eth(acc.accrued - acc.withdrawn),
            ]
        )
    body = table(
        [
            "address",
            "as node operator",
            "as adapter owner",
            "as dataset contributor",
            "accrued",
            "withdrawn",
            "available",
        ],
        rows,
        numeric=(1, 2, 3, 4, 5, 6),
        empty="nobody has earned yet",
        table_id="accounts",
    ) + pager("/accounts", listed, total=ex.q.account_count())
    return page("Accounts and rewards", body)


def address_page(ex: View, address: str, *, page_no: int = 0, money_page: int = 0, owned_page: int = 0) -> str:
    """Rewards of one address (rewardsOf at the indexed block, split by its accruals), each accrual by batch
    (paginated), its deposits and withdrawals (paginated) and what it registered (paginated)."""
    s = ex.rewards_summary(address)
    top = stats(
        [
            ("accrued", eth(s.accrued)),
            ("withdrawn", eth(s.withdrawn)),
            ("available", eth(s.available)),
            ("balance", eth(ex.balance(address))),
        ]
    )
    check = "" if s.adds_up else '<p class="bad">accrued events and rewardsOf do not add up for this address</p>'
    ex.learn_names(s.by_adapter)
    by_adapter = []
    for adapter_id, roles in sorted(s.by_adapter.items()):
        by_adapter.append(
            [
                adapter_link(adapter_id, ex.adapter_name(adapter_id)),
                *(eth(roles.get(r, 0)) for r in ROLES),
                eth(sum(roles.values())),
            ]
        )
    by_adapter.append(["<b>all adapters</b>", *(eth(s.by_role.get(r, 0)) for r in ROLES), eth(s.accrued)])
    rewards = table(
        ["adapter", "as node operator", "as adapter owner", "as dataset contributor", "total"],
        by_adapter if s.by_adapter else [],
        numeric=(1, 2, 3, 4),
        empty="nothing accrued",
        table_id="rewards-by-adapter",
    )
    kept = {"page": page_no, "money_page": money_page, "owned_page": owned_page}

    def keep(but: str) -> tuple[tuple[str, str | None], ...]:  # the other lists' page numbers, for a pager's links
        return tuple((k, str(v) if v else None) for k, v in kept.items() if k != but)

    accruals = ex.q.account_rewards(s.address, page_no, PAGE_SIZE)
    accrual_rows = [
        [
            id_link("batches", r.batch_id),
            adapter_link(r.adapter_id, ex.adapter_name(r.adapter_id)),
            role(r.role),
            eth(r.amount),
            num(r.block),
            tx_link(r.tx_hash),
        ]
        for r in accruals.rows
    ]
    money = ex.q.money(s.address, money_page, PAGE_SIZE)
    money_rows = [[esc(m.kind), eth(m.amount), num(m.block), tx_link(m.tx_hash)] for m in money.rows]
    registered = ex.q.owned_by(s.address, owned_page, PAGE_SIZE)
    owned = [_owned(row) for row in registered.rows]
    if ex.q.is_settler(s.address) and not registered.more:
        owned.append(["AttributionLedger", "settler (gateway)"])
    path = f"/address/{s.address}"
    body = (
        card(kv([("address", mono(s.address)), ("batches earned in", num(s.batches))]))
        + top
        + check
        + "<h2>Rewards by adapter and role</h2>"
        + rewards
        + "<h2>Rewards accrued, by batch</h2>"
        + table(
            ["batch", "adapter", "role", "amount", "block", "transaction"],
            accrual_rows,
            numeric=(3, 4),
            empty="nothing accrued",
            table_id="address-accruals",
        )
        + pager(path, accruals, keep=keep("page"))
        + "<h2>Withdrawals and deposits</h2>"
        + table(
            ["kind", "amount", "block", "transaction"],
            money_rows,
            numeric=(1, 2),
            empty="none",
            table_id="address-money",
        )
        + pager(path, money, param="money_page", keep=keep("money_page"))
        + "<h2>Registered</h2>"
        + table(["what", "role"], owned, empty="nothing registered", table_id="address-registered")
        + pager(path, registered, param="owned_page", keep=keep("owned_page"))
    )
    return page(f"Address {s.address}", body)


def _owned(row) -> list[str]:
    """One row of an address's registered list: what it is, and the address's role in it."""
    if isinstance(row, AdapterRow):
        return [id_link("adapters", row.adapter_id, f"{row.name} {row.version}"), "adapter owner"]
    if isinstance(row, DatasetRow):
        return [id_link("datasets", row.dataset_id), "dataset payee"]
    return [id_link("nodes", row.node_id), "node operator"]


def _arg(ex: View, name: str, value) -> str:
    """One event argument, linked where it names something the explorer has a page for."""
    if isinstance(value, (bytes, bytearray)):
        h = hex0x(value)
        if h == ZERO_ID:
            return adapter_link(h) if name == "adapterId" else mono(h)  # adapterId zero: the base model
        kinds = {
            "adapterId": "adapters",
            "predecessor": "adapters",
            "datasetId": "datasets",
            "nodeId": "nodes",
            "batchId": "batches",
        }
        if name == "requestId":
            return record_link(h, full=True)
        if name in kinds:
            return adapter_link(h, ex.adapter_name(h)) if kinds[name] == "adapters" else id_link(kinds[name], h, h)
        if name == "subjectId":
            for kind, known in (("adapters", ex.q.adapter), ("datasets", ex.q.dataset), ("nodes", ex.q.node)):
                if known(h) is not None:
                    return id_link(kind, h, full=True)
        return mono(h)
    if isinstance(value, str) and value.startswith("0x") and len(value) == 42:
        return address_link(value, full=True)
    if isinstance(value, bool):
        return esc(value)
    if isinstance(value, int):
        if name == "role":
            return role(ROLES[value]) if 0 <= value < len(ROLES) else esc(value)
        return num(value) if name not in ("amount", "fee", "totalFees") else eth(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_arg(ex, name, v) for v in value) + "]"
    if hasattr(value, "items"):
        return "{" + ", ".join(f"{esc(k)}: {_arg(ex, k, v)}" for k, v in value.items()) + "}"
    return esc(value)


def _records_arg(args) -> str:
    """RecordsSettled's packed records, one line each: sequence number, request (linked), tokens, fee."""
    try:
        recs = unpack_records(args["adapterIds"], args["nodeIds"], bytes(args["records"]))
    except ValueError as e:
        return f'<span class="bad">{esc(e)}</span>'
    price = list(args["prices"])
    first = args["firstSequence"]
    lines = []
    for i, (rid, _a, _n, p, c, a_index) in enumerate(recs):
        fee = price[a_index] * (p + c) // 1000
        lines.append(f"#{num(first + i)} {record_link(hex0x(rid))} {num(p)} + {num(c)} tokens, {eth(fee)}")
    return f"{num(len(recs))} records<br>" + "<br>".join(lines)


def tx_page(ex: View, tx_hash: str, tx, receipt, events: Page, total: int) -> str:
    """A transaction: where it went, whether it succeeded, and our contracts' events in it, decoded (a page of
    them: a batch's transaction holds one per record)."""
    ok = receipt is not None and receipt["status"] == 1
    info = kv(
        [
            ("hash", mono(tx_hash)),
            ("status", "pending" if receipt is None else ("success" if ok else '<span class="bad">reverted</span>')),
            ("block", num(tx["blockNumber"]) if tx.get("blockNumber") is not None else "pending"),
            ("from", address_link(tx["from"], full=True)),
            ("to", address_link(tx.get("to"), full=True)),
            ("value", eth(tx.get("value", 0))),
            ("gas used", num(receipt["gasUsed"]) if receipt else "—"),
            ("events of ours", num(total)),
        ],
        dl_id="tx-info",
    )
    ids = {hex0x(v) for ev in events.rows for k, v in ev["args"].items() if k in ("adapterId", "predecessor")}
    ex.learn_names(ids)

    def shown(event: str, args) -> str:
        return "<br>".join(
            f"{esc(k)}: {_records_arg(args) if (event, k) == ('RecordsSettled', 'records') else _arg(ex, k, v)}"
            for k, v in args.items()
        )

    rows = [[esc(ev["event"]), shown(ev["event"], ev["args"])] for ev in events.rows]
    body = (
        card(info)
        + "<h2>Events of the loramesh contracts</h2>"
        + table(["event", "arguments"], rows, empty="no loramesh events", table_id="tx-events")
        + pager(f"/tx/{tx_hash}", events, total=total)
    )
    return page("Transaction", body)


def search_page(query: str, hits: list[tuple[str, str, str]], cut: bool = False) -> str:
    """`cut`: the search by part of an adapter's name stopped early (devnet.explorer.queries.SEARCH_BUDGET_S)."""
    if not query.strip():
        body = "<p>Type a request id, an adapter id or name, an address or a transaction hash.</p>"
    elif not hits:
        body = f'<p id="search-empty">Nothing matches <code>{esc(query)}</code>.</p>'
    else:
        body = table(["kind", "match"], ([esc(k), link(url, label)] for k, label, url in hits), table_id="search-hits")
    if cut:
        body += (
            '<p id="search-cut">The search inside adapters\' names stopped early (too many names share these '
            "letters): the list holds the names that start with them. Type more of a name, or its start.</p>"
        )
    return page("Search", body, query=query)


def error_page(status: int, message: str) -> str:
    body = card(f'<p id="error-message" class="bad">{esc(message)}</p><p>{link("/", "back to the overview")}</p>')
    title = {
        400: "Bad request",
        404: "Not found",
        405: "Method not allowed",
        413: "Request too large",
        500: "Server error",
    }.get(status, "Unavailable")
    return page(title, body)
