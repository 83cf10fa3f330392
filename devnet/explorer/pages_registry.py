"""Pages of the registry: adapters (versions, datasets, usage), datasets and their contributors, nodes."""

from __future__ import annotations

from common.wire import ZERO_ID
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
from devnet.explorer.queries import MAX_LIST_DEPTH
from devnet.explorer.service import View

RECENT = 50  # latest records on an adapter's or a node's page (all of them: /records, paginated)
HISTORY_SIZE = 50  # history lines a page of an adapter's, a dataset's or a node's history shows
VERSIONS_SHOWN = 20  # predecessors and successors an adapter's page names (the last one's page goes on)


def _history(ex: View, kind: str, key: str, page_no: int, keep=()) -> str:
    """A page of the entity's history, the newest first, with links to the older pages: anyone can change their
    adapter's price as often as they like, and the page showed every change (10,000 lines, 2.8 MB, red team)."""
    lines, total = ex.q.history(kind, key, page_no, HISTORY_SIZE)
    rows = ([num(b), tx_link(tx), esc(what)] for b, tx, what in lines.rows)
    shown = table(["block", "transaction", "change"], rows, table_id=f"{kind}-history")
    return "<h2>History</h2>" + shown + pager(f"/{kind}s/{key}", lines, param="history_page", keep=keep, total=total)


def _more(ids: list[str], limit: int) -> str:
    """The version links, then, when there were more than `limit`, a link to the last one's page, which goes on."""
    if len(ids) <= limit:
        return ""
    return " " + link(f"/adapters/{ids[limit - 1]}", "more on that version's page", cls="more-versions")


def _later_unlisted(ids: list[str]) -> str:
    """Successors past VERSIONS_SHOWN are only said to exist: the last one's page would list its own successors,
    not this version's others (only the name's owner registers versions, so they are its own to find)."""
    return ' <span class="muted">and more</span>' if len(ids) > VERSIONS_SHOWN else ""


def _predecessors(a, versions: list[str], ids: list[str]) -> str:
    if versions:
        return " ← ".join(versions[:VERSIONS_SHOWN]) + _more(ids, VERSIONS_SHOWN)
    if a.predecessor == ZERO_ID:
        return '<span class="muted">none (first version)</span>'
    return mono(a.predecessor) + ' <span class="muted">(not registered here)</span>'


def _name_owner(ex: View, name: str) -> str:
    n = ex.q.name(name)
    if n is None:
        return '<span class="muted">unknown</span>'
    return (
        address_link(n.owner, full=True) + ' <span class="muted">(only the name\'s owner registers its versions)</span>'
    )


def records_table(ex: View, records, *, table_id: str) -> str:
    ex.learn_names(r.adapter_id for r in records)
    rows = []
    for r in records:
        rows.append(
            [
                record_link(r.request_id),
                adapter_link(r.adapter_id, ex.adapter_name(r.adapter_id)),
                id_link("nodes", r.node_id),
                num(r.prompt_tokens),
                num(r.completion_tokens),
                eth(r.fee),
                id_link("batches", r.batch_id),
                num(r.block),
            ]
        )
    return table(
        ["request", "adapter", "node", "prompt", "completion", "fee", "batch", "block"],
        rows,
        numeric=(3, 4, 5, 7),
        empty="no settled records yet",
        table_id=table_id,
    )


def adapters_page(ex: View, *, page_no: int = 0, names_page: int = 0) -> str:
    listed = ex.q.adapters(page_no, PAGE_SIZE)
    usage = ex.q.usages("adapter", [a.adapter_id for a in listed.rows])
    rows = []
    for a in listed.rows:
        u = usage.get(a.adapter_id)
        rows.append(
            [
                adapter_link(a.adapter_id, a.name),
                esc(a.version),
                address_link(a.owner),
                eth(int(a.price)),
                num(len(a.datasets)),
                num(u.records if u else 0),
                num(u.tokens if u else 0),
                eth(u.fees if u else 0),
            ]
        )
    body = table(
        ["name", "version", "owner", "price / 1k tokens", "datasets", "records", "tokens", "fees"],
        rows,
        numeric=(3, 4, 5, 6, 7),
        empty="no adapters registered",
        table_id="adapters",
    ) + pager("/adapters", listed, keep=(("names_page", str(names_page) if names_page else None),))
    names = ex.q.names(names_page, PAGE_SIZE)
    name_rows = []
    for n in names.rows:
        count, newest = ex.q.name_versions(n.name, n.owner)
        name_rows.append(
            [
                esc(n.name),
                address_link(n.owner),
                adapter_link(newest.adapter_id, newest.version) if newest else '<span class="muted">none</span>',
                num(count) if count <= MAX_LIST_DEPTH else f"{num(MAX_LIST_DEPTH)}+",
            ]
        )
    body += (
        '<h2>Names</h2><p class="muted">A name belongs to its first registrant (or whom they handed it '
        "to); it resolves to the newest version its owner registered.</p>"
        + table(["name", "owner", "resolves to", "versions"], name_rows, numeric=(3,), table_id="names")
        + pager("/adapters", names, param="names_page", keep=(("page", str(page_no) if page_no else None),))
    )
    return page("Adapters", body)


def adapter_page(ex: View, adapter_id: str, *, history_page: int = 0) -> str:
    a = ex.q.adapter(adapter_id)
    u = ex.q.usage("adapter", adapter_id)
    # one more than shown of each: whether to link on
    before = ex.predecessors(adapter_id, VERSIONS_SHOWN + 1)
    after = ex.successors(adapter_id, VERSIONS_SHOWN + 1)
    ex.learn_names(before + after)
    versions = [adapter_link(p, ex.adapter_name(p)) for p in before]
    later = [adapter_link(s, ex.adapter_name(s)) for s in after[:VERSIONS_SHOWN]]
    info = kv(
        [
            ("adapter id", mono(a.adapter_id)),
            ("name", esc(a.name)),
            ("version", esc(a.version)),
            ("owner", address_link(a.owner, full=True)),
            ("publisher", address_link(a.publisher or a.owner, full=True)),
            ("name owner", _name_owner(ex, a.name)),
            ("price per 1k tokens", eth(int(a.price))),
            ("base model", mono(a.base_model)),
            ("predecessors", _predecessors(a, versions, before)),
            ("successors", (", ".join(later) + _later_unlisted(after)) or '<span class="muted">none</span>'),
            ("registered", f"block {num(a.block)}, tx {tx_link(a.tx_hash)}"),
        ],
        dl_id="adapter-info",
    )
    ds_rows = []
    for ds, bps in a.datasets:
        d = ex.q.dataset(ds)
        ds_rows.append([id_link("datasets", ds), address_link(d.payee if d else None), f"{bps / 100:.2f}%"])
    shares = table(
        ["dataset", "contributor (payee)", "share of the non-node part"],
        ds_rows,
        numeric=(2,),
        empty="no datasets declared",
    )
    node_pct, ds_pct = ex.client.node_share_bps() / 100, sum(b for _, b in a.datasets) / 100
    shares += (
        f'<p class="muted" id="fee-split">Each fee: the serving node operator gets {node_pct:.2f}%; '
        f"of the rest, the datasets get their shares above and the owner the remaining {100 - ds_pct:.2f}%.</p>"
    )
    earned: dict[tuple[str, str], int] = {}
    for rw in ex.q.accruals(adapter=adapter_id):
        earned[(rw.account, rw.role)] = earned.get((rw.account, rw.role), 0) + int(rw.amount)
    earned_rows = [[address_link(acc), role(r), eth(v)] for (acc, r), v in sorted(earned.items())]
    records = ex.q.records(adapter=adapter_id, size=RECENT).rows
    more = link(f"/records?adapter={adapter_id}", "all records of this adapter")
    body = (
        card(info)
        + stats(
            [
                ("records", num(u.records)),
                ("tokens", num(u.tokens)),
                ("fees", eth(u.fees)),
            ]
        )
        + "<h2>Datasets and shares</h2>"
        + shares
        + "<h2>Rewards from this adapter</h2>"
        + table(["account", "role", "accrued"], earned_rows, numeric=(2,))
        + f"<h2>Latest records</h2><p>{more}</p>"
        + records_table(ex, records, table_id="adapter-records")
        + _history(ex, "adapter", adapter_id, history_page)
    )
    return page(f"Adapter {a.name} {a.version}", body)


def datasets_page(ex: View, *, page_no: int = 0) -> str:
    listed = ex.q.datasets(page_no, PAGE_SIZE)
    ids = [d.dataset_id for d in listed.rows]
    earned = ex.q.dataset_rewards(ids)
    users = ex.q.dataset_users(ids)
    rows = [
        [
            id_link("datasets", d.dataset_id),
            esc(d.name),
            address_link(d.payee),
            mono(d.content_hash[:18] + "…"),
            num(users.get(d.dataset_id, 0)),
            eth(earned.get(d.dataset_id, 0)),
        ]
        for d in listed.rows
    ]
    body = table(
        ["dataset", "name", "contributor (payee)", "content hash", "adapters", "rewards accrued"],
        rows,
        numeric=(4, 5),
        empty="no datasets registered",
        table_id="datasets",
    ) + pager("/datasets", listed)
    # contributors: the addresses dataset rewards accrued to, the most first (a page of their running totals)
    shown = ex.q.contributors(page_no, PAGE_SIZE).rows
    crow = [[address_link(p, full=True), eth(v)] for p, v in shown]
    body += "<h2>Contributors</h2>" + table(["address", "dataset rewards accrued"], crow, numeric=(1,))
    return page("Datasets and contributors", body)


def dataset_page(ex: View, dataset_id: str, *, history_page: int = 0, adapters_page: int = 0) -> str:
    d = ex.q.dataset(dataset_id)
    info = kv(
        [
            ("dataset id", mono(d.dataset_id)),
            ("name", esc(d.name)),
            (
                "contributor",
                address_link(d.contributor or d.payee, full=True)
                + ' <span class="muted">(the id is bound to this address)</span>',
            ),
            ("payee", address_link(d.payee, full=True)),
            ("content hash", mono(d.content_hash)),
            ("registered", f"block {num(d.block)}, tx {tx_link(d.tx_hash)}"),
            ("rewards accrued", eth(ex.q.dataset_rewards([dataset_id]).get(dataset_id, 0))),
        ],
        dl_id="dataset-info",
    )
    declared, total = ex.q.dataset_adapters(dataset_id, adapters_page, PAGE_SIZE)
    rows = [
        [adapter_link(a.adapter_id, f"{a.name} {a.version}"), address_link(a.owner), f"{bps / 100:.2f}%"]
        for a, bps in declared.rows
    ]
    # each list's pager carries the other's page
    keep_history = (("history_page", str(history_page) if history_page else None),)
    keep_adapters = (("adapters_page", str(adapters_page) if adapters_page else None),)
    body = (
        card(info)
        + "<h2>Adapters trained on it</h2>"
        + table(
            ["adapter", "owner", "share"],
            rows,
            numeric=(2,),
            empty="no adapter declares it",
            table_id="dataset-adapters",
        )
        + pager(f"/datasets/{dataset_id}", declared, param="adapters_page", keep=keep_history, total=total)
        + _history(ex, "dataset", dataset_id, history_page, keep_adapters)
    )
    return page(f"Dataset {d.dataset_id[:18]}…", body)


def nodes_page(ex: View, *, page_no: int = 0) -> str:
    listed = ex.q.nodes(page_no, PAGE_SIZE)
    usage = ex.q.usages("node", [n.node_id for n in listed.rows])
    rows = []
    for n in listed.rows:
        u = usage.get(n.node_id)
        rows.append(
            [
                id_link("nodes", n.node_id),
                address_link(n.operator),
                mono(n.peer_id),
                esc(n.api_url),
                "active" if n.active else '<span class="bad">inactive</span>',
                num(u.records if u else 0),
                num(u.tokens if u else 0),
            ]
        )
    body = table(
        ["node", "operator", "peer id", "API URL", "state", "records", "tokens served"],
        rows,
        numeric=(5, 6),
        empty="no nodes registered",
        table_id="nodes",
    ) + pager("/nodes", listed)
    return page("Nodes", body)


def node_page(ex: View, node_id: str, *, history_page: int = 0) -> str:
    n = ex.q.node(node_id)
    u = ex.q.usage("node", node_id)
    info = kv(
        [
            ("node id", mono(n.node_id)),
            ("operator", address_link(n.operator, full=True)),
            ("public key", mono(n.public_key) + ' <span class="muted">(proved on registration)</span>'),
            ("peer id", mono(n.peer_id)),
            ("API URL", esc(n.api_url)),
            ("multiaddrs", "<br>".join(mono(m) for m in n.multiaddrs) or "none"),
            ("base model", mono(n.base_model)),
            ("state", "active" if n.active else "inactive"),
            ("registered", f"block {num(n.block)}, tx {tx_link(n.tx_hash)}"),
        ],
        dl_id="node-info",
    )
    per_adapter = ex.q.node_adapters(node_id)
    ex.learn_names(per_adapter)
    rows = [[adapter_link(a, ex.adapter_name(a)), num(s.records), num(s.tokens)] for a, s in per_adapter.items()]
    records = ex.q.records(node=node_id, size=RECENT).rows
    more = link(f"/records?node={node_id}", "all records of this node")
    body = (
        card(info)
        + stats([("records", num(u.records)), ("tokens served", num(u.tokens))])
        + "<h2>Served per adapter</h2>"
        + table(["adapter", "records", "tokens"], rows, numeric=(1, 2))
        + f"<h2>Latest records</h2><p>{more}</p>"
        + records_table(ex, records, table_id="node-records")
        + _history(ex, "node", node_id, history_page)
    )
    return page(f"Node {n.node_id[:18]}…", body)
