"""Pages of the ledger: overview with plots, settlement batches, inference records with their checks."""

from __future__ import annotations

import json

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
    status_badge,
    table,
    tx_link,
    when,
)
from devnet.explorer.pages_registry import records_table
from devnet.explorer.plots import step_chart
from devnet.explorer.queries import Page
from devnet.explorer.service import RecordDetail, View
from devnet.explorer.signature import NOT_VERIFIED, UNCHECKED, VERIFIED
from ledger.transport import shown_url

BATCHES_PAGE = 50


def eth_tick(v: float) -> str:
    """An ETH amount for an axis: plain decimals, no exponent."""
    return "0" if v == 0 else f"{v:.8f}".rstrip("0").rstrip(".")


def tokens_plot(ex: View) -> str:
    """SVG: cumulative tokens served per adapter by settlement block."""
    return ex.cached(
        "tokens",
        lambda: step_chart(
            ex.tokens_series(), title="Tokens served per adapter", y_label="tokens", chart_id="plot-tokens"
        ),
    )


def rewards_plot(ex: View) -> str:
    """SVG: cumulative rewards per contributor (adapter owners, dataset payees) by settlement block."""
    return ex.cached(
        "rewards",
        lambda: step_chart(
            ex.rewards_series(),
            title="Rewards per contributor",
            y_label="ETH",
            chart_id="plot-rewards",
            y_format=eth_tick,
        ),
    )


def overview_page(ex: View) -> str:
    q, d = ex.q, ex.client.deployment
    cursor = q.cursor()
    usage = q.usage("all")
    batch_count, fees = q.batch_totals()
    counts = ex.store.counts()
    top = stats(
        [
            ("chain id", str(d.chain_id)),
            ("head block", num(cursor.head if cursor else 0)),
            ("records", num(usage.records)),
            ("tokens", num(usage.tokens)),
            ("fees", eth(fees)),
            ("batches", num(batch_count)),
        ]
    )
    totals = ex.totals()
    accrued = q.total_accrued()
    adds_up = accrued == fees == totals["accrued"]
    check = (
        f'<span id="attribution-check" class="{"" if adds_up else "bad"}">'
        + ("rewards add up: " if adds_up else "rewards do NOT add up: ")
        + f"accrued events {eth(accrued)}, settled fees {eth(fees)}, ledger totalAccrued {eth(totals['accrued'])}"
        + "</span>"
    )
    settlers = ", ".join(address_link(s) for s in q.settlers()) or "none"
    registered = q.counts()
    indexed = ex.indexed_block
    behind = (cursor.head if cursor else 0) - ex.confirmations - indexed
    index_line = f"to block {num(indexed)}" + (f" ({ex.confirmations} confirmations)" if ex.confirmations else "")
    if behind > 0:
        index_line += f', <span class="bad" id="index-behind">{num(behind)} blocks behind, indexing</span>'
    if ex.refresh_error:
        index_line += f' <span class="bad" id="index-error">last refresh failed: {esc(ex.refresh_error)}</span>'
    contracts = kv(
        [
            ("AdapterRegistry", address_link(d.registry, full=True)),
            ("AttributionLedger", address_link(d.ledger, full=True)),
            ("deployed at block", num(d.deploy_block)),
            ("RPC", esc(shown_url(ex.client.rpc_url))),  # never its secrets: a hosted provider's key, a password
            ("indexed", f'<span id="index-state">{index_line}</span>'),
            ("node share", f"{ex.client.node_share_bps() / 100:.2f}% of every fee"),
            ("settlers", settlers),
            (
                "registered",
                f"{num(registered['adapters'])} adapters, {num(registered['datasets'])} datasets, "
                f"{num(registered['nodes'])} nodes",
            ),
            (
                "money",
                f"deposited {eth(totals['deposited'])}, accrued {eth(totals['accrued'])}, withdrawn "
                f"{eth(totals['withdrawn'])}, reclaimed {eth(totals['reclaimed'])}, held {eth(totals['balance'])}",
            ),
            ("attribution", check),
            ("ledger database", ", ".join(f"{esc(k)} {num(v)}" for k, v in sorted(counts.items())) or "empty"),
        ],
        dl_id="contracts",
    )
    plots = f'<div class="plots">{tokens_plot(ex)}{rewards_plot(ex)}</div>'
    latest = q.batches(0, 10).rows
    body = (
        top
        + card(contracts)
        + "<h2>Over time</h2>"
        + plots
        + f"<h2>Latest settlement batches</h2><p>{link('/batches', 'all batches')}</p>"
        + _batches_table(latest)
    )
    return page("Overview", body)


def _batches_table(batches) -> str:
    rows = [
        [
            id_link("batches", b.batch_id),
            num(b.block),
            when(b.timestamp),
            tx_link(b.tx_hash),
            mono(b.merkle_root[:18] + "…"),
            num(b.record_count),
            eth(b.total_fees),
            address_link(b.settler),
        ]
        for b in batches
    ]
    return table(
        ["batch", "block", "time", "transaction", "Merkle root", "records", "fees", "settler"],
        rows,
        numeric=(1, 5, 6),
        empty="no batches settled yet",
        table_id="batches",
    )


def batches_page(ex: View, *, page_no: int = 0) -> str:
    batches = ex.q.batches(page_no, BATCHES_PAGE)
    total, _ = ex.q.batch_totals()
    return page("Settlement batches", _batches_table(batches.rows) + pager("/batches", batches, total=total))


def batch_page(ex: View, batch_id: str, *, page_no: int = 0) -> str:
    b = ex.q.batch(batch_id)
    db = ex.store.batch(batch_id)
    db_line = (
        f"{esc(db.status)}, root {mono(db.merkle_root)}"
        + ("" if db.merkle_root == b.merkle_root else ' <span class="bad">differs from the chain</span>')
        if db
        else '<span class="muted">not in this ledger database</span>'
    )
    info = kv(
        [
            ("batch id", mono(b.batch_id)),
            ("transaction", tx_link(b.tx_hash, full=True)),
            ("block", f"{num(b.block)} ({when(b.timestamp)})"),
            ("Merkle root", mono(b.merkle_root)),
            ("records", num(b.record_count)),
            ("fees", eth(b.total_fees)),
            ("settler", address_link(b.settler)),
            ("ledger database", db_line),
        ],
        dl_id="batch-info",
    )
    records = ex.q.records(batch=batch_id, page=page_no, size=PAGE_SIZE, newest_first=False)
    rewards = ex.q.batch_rewards(batch_id)
    ex.learn_names(r.adapter_id for r in rewards)
    reward_rows = [
        [
            address_link(r.account),
            role(r.role),
            adapter_link(r.adapter_id, ex.adapter_name(r.adapter_id)),
            eth(r.amount),
        ]
        for r in rewards
    ]
    body = (
        card(info)
        + "<h2>Records</h2>"
        + records_table(ex, records.rows, table_id="batch-records")
        + pager(f"/batches/{batch_id}", records, total=b.record_count)
        + "<h2>Rewards accrued</h2>"
        + table(["account", "role", "adapter", "amount"], reward_rows, numeric=(3,))
    )
    return page("Settlement batch", body)


def disputes_page(ex: View, *, page_no: int = 0) -> str:
    """Records the gateway refused to bill at the node's word: the node's signed receipt claimed more
    (or other) tokens than the gateway counted. They are never settled; their nodes get no traffic until the
    gateway's operator readmits them."""
    fetched = ex.store.disputed(limit=PAGE_SIZE + 1, offset=page_no * PAGE_SIZE)
    listed = Page(fetched[:PAGE_SIZE], page_no, PAGE_SIZE, len(fetched) > PAGE_SIZE)
    rows = listed.rows
    on_page: dict[str, int] = {}
    for r in rows:
        on_page[r.node_id] = on_page.get(r.node_id, 0) + 1
    disputes = ex.store.node_disputes()
    known = ex.q.nodes_by_id(set(on_page))
    ex.learn_names(r.adapter_id for r in rows)

    def routing(node_id: str) -> str:
        d = disputes.get(node_id)
        if d is None or d.open or d.readmitted_at is None:
            return "kept out"
        note = f": {esc(d.note)}" if d.note else ""
        return f"readmitted {d.readmitted_at:%Y-%m-%d %H:%M} UTC{note}"

    nodes = table(
        ["node", "operator", "disputed records", "routing"],
        [
            [
                id_link("nodes", n),
                address_link(known[n].operator) if n in known else "—",
                num(disputes[n].records if n in disputes else k),
                routing(n),
            ]
            for n, k in sorted(on_page.items(), key=lambda kv: -kv[1])
        ],
        numeric=(2,),
        empty="no node has a disputed record",
        table_id="disputed-nodes",
    )

    def count(v) -> str:
        return "—" if v is None else num(v)

    records = table(
        ["request", "node", "adapter", "gateway counted (prompt + completion)", "node's receipt claimed", "why"],
        [
            [
                mono(r.request_id[:18] + "…"),
                id_link("nodes", r.node_id),
                adapter_link_or_id(ex, r.adapter_id),
                f"{num(r.prompt_tokens)} + {num(r.completion_tokens)}",
                f"{count(r.node_prompt_tokens)} + {count(r.node_completion_tokens)}",
                esc(r.error or ""),
            ]
            for r in rows
        ],
        empty="no disputed records",
        table_id="disputed-records",
    )
    intro = (
        '<p class="muted">The gateway bills what it counted itself. A node whose signed receipt claims '
        "more than that, beyond the stated tolerance, is disputed: the record is kept with both counts, never "
        "settled, and the node is dropped from routing until the gateway's operator readmits it "
        "(<code>loramesh gateway disputes readmit</code>).</p>"
    )
    shown = "<h2>Nodes</h2>" + nodes + "<h2>Records</h2>" + records + pager("/disputes", listed)
    return page("Disputes", intro + shown)


def records_page(ex: View, *, adapter: str | None, node: str | None, batch: str | None, page_no: int) -> str:
    listed = ex.q.records(adapter=adapter, node=node, batch=batch, page=page_no, size=PAGE_SIZE)
    total = ex.q.record_count(adapter=adapter, node=node, batch=batch)
    keep = (("adapter", adapter), ("node", node), ("batch", batch))
    what = [
        f"adapter {adapter_link(adapter, ex.adapter_name(adapter))}" if adapter else "",
        f"node {id_link('nodes', node)}" if node else "",
        f"batch {id_link('batches', batch)}" if batch else "",
    ]
    head = f"<p>{num(total)} settled records" + (" of " + ", ".join(w for w in what if w) if any(what) else "")
    body = (
        head
        + "</p>"
        + records_table(ex, listed.rows, table_id="records")
        + (pager("/records", listed, keep=keep, total=total) or '<p class="pager"></p>')
    )
    unsettled = ex.store.unsettled(20) if adapter is None and node is None and batch is None else []
    if unsettled:
        ex.learn_names(r.adapter_id for r in unsettled)
        rows = [
            [record_link(r.request_id), adapter_link_or_id(ex, r.adapter_id), esc(r.status), esc(r.error or "")]
            for r in unsettled
        ]
        body += "<h2>Not settled yet (ledger database)</h2>" + table(["request", "adapter", "status", "error"], rows)
    return page("Inference records", body)


def adapter_link_or_id(ex: View, adapter_id: str) -> str:
    return adapter_link(adapter_id, ex.adapter_name(adapter_id))


def record_page(ex: View, rec: RecordDetail) -> str:
    row, chain = rec.row, rec.chain
    first = chain[0] if chain else None
    src = row if row is not None else first
    warnings = []
    if len(chain) > 1:
        warnings.append(f"this request id was settled {len(chain)} times on chain")
    for c in chain:
        if row is not None and (c.prompt_tokens, c.completion_tokens) != (row.prompt_tokens, row.completion_tokens):
            warnings.append(
                f"the chain settled {c.prompt_tokens} prompt + {c.completion_tokens} completion tokens; "
                f"the database says {row.prompt_tokens} + {row.completion_tokens}"
            )
    info = kv(
        [
            ("request id", mono(rec.request_id)),
            ("adapter", adapter_link_or_id(ex, src.adapter_id)),
            ("node", id_link("nodes", src.node_id, full=True)),
            ("prompt tokens", num(src.prompt_tokens)),
            ("completion tokens", num(src.completion_tokens)),
            ("fee", eth(first.fee) if first else '<span class="muted">not settled</span>'),
            ("batch", id_link("batches", first.batch_id, full=True) if first else esc(row.batch_id or "none")),
            ("block", num(first.block) if first else "—"),
            ("transaction", tx_link(first.tx_hash, full=True) if first else "—"),
            (
                "ledger database",
                f"{esc(row.status)}, recorded {esc(row.created_at.strftime('%Y-%m-%d %H:%M:%S'))} UTC"
                + (f', <span class="bad">{esc(row.error)}</span>' if row.error else "")
                if row is not None
                else '<span class="muted">not in this ledger database</span>',
            ),
        ],
        dl_id="record-info",
    )
    warn = "".join(f'<p class="bad warning">{esc(w)}</p>' for w in warnings)
    return page("Inference record", card(info) + warn + _proof_section(rec) + _signature_section(rec))


def _proof_section(rec: RecordDetail) -> str:
    p = rec.proof
    if p is None:
        badge = status_badge(UNCHECKED, "not checkable", element_id="proof-status")
        note = ' <span class="muted">the record is not in this ledger database, so its batch cannot be rebuilt</span>'
        return "<h2>Merkle proof</h2>" + card(badge + note)
    if p.pending:
        badge = status_badge(UNCHECKED, "not settled yet", element_id="proof-status")
    elif p.verified:
        badge = status_badge(VERIFIED, "verified", element_id="proof-status")
    else:
        badge = status_badge(NOT_VERIFIED, "NOT verified", element_id="proof-status")

    def yes(v):
        return "—" if v is None else ("yes" if v else '<span class="bad">no</span>')

    details = kv(
        [
            ("result", f'<span id="proof-reason">{esc(p.reason)}</span>'),
            ("leaf (computed here)", mono(p.leaf or "—")),
            ("leaf (contract leafOf)", mono(p.contract_leaf or "—")),
            ("leaf index", "—" if p.leaf_index is None else num(p.leaf_index)),
            ("proof", "<br>".join(mono(h) for h in p.proof) or '<span class="muted">none (single-record batch)</span>'),
            ("root on chain", mono(p.chain_root or "—")),
            ("root of the database's batch", mono(p.db_root or "—")),
            ("checked here", yes(p.offchain_ok)),
            ("contract verifyRecord", yes(p.onchain_ok)),
        ]
    )
    return f"<h2>Merkle proof</h2>{card(badge + details)}"


SHOWN_RECEIPT_CHARS = 2000


def _signature_section(rec: RecordDetail) -> str:
    s = rec.signature
    if s is None:
        return ""
    badge = status_badge(s.state, s.label, element_id="signature-status")
    receipt = json.dumps(s.receipt, indent=2, sort_keys=True) if s.receipt is not None else rec.row.receipt_json
    if receipt and len(receipt) > SHOWN_RECEIPT_CHARS:  # a refused receipt may be any size: show its start only
        receipt = f"{receipt[:SHOWN_RECEIPT_CHARS]}… ({len(receipt):,} characters in all)"
    details = kv(
        [
            ("result", f'<span id="signature-reason">{esc(s.reason)}</span>'),
            ("signature (Ed25519)", mono(s.signature)),
            ("node public key", mono(s.public_key or "—")),
            ("receipt", f"<pre class=mono>{esc(receipt)}</pre>"),
        ]
    )
    return f"<h2>Node signature</h2>{card(badge + details)}"
