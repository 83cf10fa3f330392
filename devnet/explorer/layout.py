"""HTML building blocks: the page shell with its inline CSS, escaping, links, numbers and tables.

Everything is server-rendered from Python strings; nothing is fetched from a CDN, so the explorer
works offline. Every value that came from the chain or the database goes through `esc`.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from common.wire import ZERO_ID
from devnet.explorer import queries
from ledger.types import ETHER

PAGE_SIZE = 100  # rows of a list page

CSS = """
:root { --fg:#1d2430; --muted:#5d6778; --line:#dde2ea; --bg:#f6f8fb; --accent:#2457c5; --ok:#17803d;
        --bad:#b42318; --warn:#9a6700; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color:var(--fg);
       background:var(--bg); }
header { background:#14213d; color:#fff; padding:10px 24px; display:flex; gap:24px; align-items:center;
         flex-wrap:wrap; }
header .brand { font-weight:700; font-size:18px; color:#fff; text-decoration:none; }
header nav a { color:#d7e0f5; text-decoration:none; margin-right:16px; }
header nav a:hover { color:#fff; }
header form { margin-left:auto; display:flex; gap:6px; }
header input { width:300px; max-width:60vw; padding:5px 8px; border-radius:4px; border:0; font:inherit; }
header button { padding:5px 12px; border:0; border-radius:4px; background:#fca311; font:inherit; cursor:pointer; }
main { max-width:1180px; margin:0 auto; padding:20px 24px 48px; }
h1 { font-size:22px; margin:4px 0 16px; word-break:break-all; }
h2 { font-size:17px; margin:28px 0 10px; }
a { color:var(--accent); text-decoration:none; }
a:hover { text-decoration:underline; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size:13px; }
.card { background:#fff; border:1px solid var(--line); border-radius:8px; padding:14px 18px; margin-bottom:14px; }
.cards { display:grid; grid-template-columns:repeat(auto-fit, minmax(150px, 1fr)); gap:12px; margin-bottom:14px; }
.stat { background:#fff; border:1px solid var(--line); border-radius:8px; padding:10px 14px; }
.stat .k { color:var(--muted); font-size:13px; }
.stat .v { font-size:19px; font-weight:600; white-space:nowrap; }
table { width:100%; border-collapse:collapse; background:#fff; border:1px solid var(--line); border-radius:8px; }
th, td { text-align:left; padding:6px 10px; border-bottom:1px solid var(--line); vertical-align:top; }
th { background:#eef2f8; font-weight:600; font-size:13px; color:#394253; }
td.num, th.num { text-align:right; font-variant-numeric: tabular-nums; }
dl.kv { display:grid; grid-template-columns:200px 1fr; gap:6px 16px; margin:0; }
dl.kv dt { color:var(--muted); }
dl.kv dd { margin:0; overflow-wrap:anywhere; }
.card > .status { margin-bottom:10px; }
.status { display:inline-block; padding:4px 12px; border-radius:14px; font-weight:700; font-size:15px; }
.status.verified { background:#dcfce7; color:var(--ok); border:1px solid #86efac; }
.status.not-verified { background:#fee4e2; color:var(--bad); border:1px solid #fda29b; }
.status.unchecked { background:#fef3c7; color:var(--warn); border:1px solid #fcd34d; }
.status.no-receipt { background:#e0e7ff; color:#3730a3; border:1px solid #a5b4fc; }
.muted { color:var(--muted); }
.bad { color:var(--bad); font-weight:600; }
.pill { display:inline-block; padding:0 8px; border-radius:10px; background:#eef2f8; font-size:12px; }
.plots { display:grid; grid-template-columns:repeat(auto-fit, minmax(520px, 1fr)); gap:14px; }
.plots svg { width:100%; height:auto; background:#fff; border:1px solid var(--line); border-radius:8px; }
.pager { margin:10px 0; }
"""

NAV = (
    ("Overview", "/"),
    ("Adapters", "/adapters"),
    ("Datasets", "/datasets"),
    ("Nodes", "/nodes"),
    ("Batches", "/batches"),
    ("Records", "/records"),
    ("Disputes", "/disputes"),
    ("Accounts", "/accounts"),
)


ROLE_LABELS = {"node": "node operator", "adapter_owner": "adapter owner", "dataset": "dataset contributor"}


def role(name: str) -> str:
    """A reward role as people say it."""
    return esc(ROLE_LABELS.get(name, name))


def esc(value: object) -> str:
    """HTML-escape any value's text."""
    return html.escape(str(value), quote=True)


def page(title: str, body: str, *, query: str = "") -> str:
    """A whole HTML document: header with navigation and search, then `body` (already HTML)."""
    nav = "".join(f'<a href="{href}">{esc(name)}</a>' for name, href in NAV)
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} · loramesh explorer</title><style>{CSS}</style></head><body>"
        f'<header><a class=brand href="/">loramesh explorer</a><nav>{nav}</nav>'
        '<form action="/search" method=get role=search>'
        f'<input id=search-q name=q value="{esc(query)}" '
        'placeholder="request id, adapter id or name, address, tx hash">'
        "<button type=submit>Search</button></form></header>"
        f"<main><h1>{esc(title)}</h1>{body}</main></body></html>"
    )


def short(value: str, keep: int = 8) -> str:
    """0x12345678…9abc for long hex strings; other strings unchanged."""
    if isinstance(value, str) and value.startswith("0x") and len(value) > keep + 8:
        return f"{value[: keep + 2]}…{value[-4:]}"
    return str(value)


def link(href: str, text: str, *, cls: str = "", title: str = "") -> str:
    cls_attr = f' class="{esc(cls)}"' if cls else ""
    title_attr = f' title="{esc(title)}"' if title else ""
    return f'<a href="{esc(href)}"{cls_attr}{title_attr}>{esc(text)}</a>'


def id_link(kind: str, ident: str, text: str | None = None, *, cls: str = "", full: bool = False) -> str:
    """A link to /<kind>/<ident>, shortened unless full (the full id in the tooltip)."""
    shown = text if text is not None else (ident if full else short(ident))
    return link(f"/{kind}/{ident}", shown, cls=cls or f"{kind}-link", title=ident)


def adapter_link(adapter_id: str, name: str | None = None) -> str:
    """A link to the adapter's page; the zero id (a bare base-model inference, no adapter) reads
    "base model" and links to its records instead."""
    if adapter_id == ZERO_ID:
        return link(
            f"/records?adapter={ZERO_ID}",
            "base model",
            cls="base-model",
            title="no adapter: the bare base model (all of the fee goes to the node operator)",
        )
    return id_link("adapters", adapter_id, name or None)


def address_link(address: str | None, *, full: bool = False) -> str:
    if not address:
        return '<span class="muted">none</span>'
    return id_link("address", address, address if full else short(address, 6), cls="address-link")


def tx_link(tx_hash: str | None, *, full: bool = False) -> str:
    """The hash as text (copyable into any explorer), linked to our transaction page."""
    if not tx_hash:
        return '<span class="muted">none</span>'
    return id_link("tx", tx_hash, tx_hash if full else short(tx_hash), cls="tx-link")


def record_link(request_id: str, *, full: bool = False) -> str:
    return id_link("records", request_id, request_id if full else short(request_id), cls="record-link")


def mono(value: object) -> str:
    return f'<code class="mono">{esc(value)}</code>'


def eth(wei: int) -> str:
    """Wei as ETH with 6 decimals, the exact wei count in the tooltip."""
    return f'<span title="{int(wei)} wei">{int(wei) / ETHER:,.6f} ETH</span>'


def num(n: int) -> str:
    return f"{int(n):,}"


def when(ts: int | None) -> str:
    if ts is None:
        return '<span class="muted">?</span>'
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def status_badge(state: str, text: str, *, element_id: str) -> str:
    """A badge tests and people can read: class verified | not-verified | unchecked | no-receipt."""
    return f'<span id="{esc(element_id)}" class="status {esc(state)}">{esc(text)}</span>'


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    numeric: Sequence[int] = (),
    empty: str = "nothing yet",
    table_id: str = "",
) -> str:
    """A table of already-rendered cells; `numeric` = indexes of right-aligned columns."""
    rows = list(rows)
    if not rows:
        return f'<p class="muted">{esc(empty)}</p>'
    head = "".join(
        f'<th class="num">{esc(h)}</th>' if i in numeric else f"<th>{esc(h)}</th>" for i, h in enumerate(headers)
    )
    body = "".join(
        "<tr>"
        + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    id_attr = f' id="{esc(table_id)}"' if table_id else ""
    return f"<table{id_attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def kv(pairs: Iterable[tuple[str, str]], *, dl_id: str = "") -> str:
    """A definition list of (label, rendered value) pairs."""
    id_attr = f' id="{esc(dl_id)}"' if dl_id else ""
    return f'<dl class="kv"{id_attr}>' + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in pairs) + "</dl>"


def stats(pairs: Iterable[tuple[str, str]]) -> str:
    """A row of stat cards; each value carries a stable id derived from its label."""
    cards = []
    for k, v in pairs:
        slug = "stat-" + "-".join(k.lower().split())
        cards.append(f'<div class=stat><div class=k>{esc(k)}</div><div class=v id="{esc(slug)}">{v}</div></div>')
    return '<div class="cards">' + "".join(cards) + "</div>"


def card(body: str) -> str:
    return f'<div class="card">{body}</div>'


def pager(path: str, page, *, param: str = "page", keep: Iterable[tuple[str, str | None]] = (), total: int = -1) -> str:
    """Links to the newer and older pages of a list (`page` a devnet.explorer.queries.Page): `param` is the
    page number's query name, `keep` the other query values the links carry; `total`, when known, is shown."""
    rest = "".join(f"&{k}={v}" for k, v in keep if v)
    links = []
    if page.number > 0:
        links.append(link(f"{path}?{param}={page.number - 1}{rest}", "← newer"))
    if page.more:
        links.append(link(f"{path}?{param}={page.number + 1}{rest}", "older →"))
    if page.cut:
        links.append(f"pages reach its first {num(queries.MAX_LIST_DEPTH)} rows: search finds the rest")
    first = page.number * page.size
    shown = f"{num(first + 1)}–{num(first + len(page.rows))}" if page.rows else "none"
    of = f" of {num(total)}" if total >= 0 else ""
    if not links and page.number == 0:
        return ""
    return f'<p class="pager" data-param="{esc(param)}">{shown}{of} · {" · ".join(links)}</p>'
