"""The explorer over a real anvil and a real SQLite ledger, served by real uvicorn: every page, the
checks on records (verified, tampered, unsigned-key, pending), search, and errors."""

import re
import sqlite3

import httpx
import pytest

from ledger.types import Role
from tests.devnet.explorer.htmlq import class_of, links, text_of
from tests.devnet.explorer.scenario import PRICE
from tests.utils.chain import rand_id

pytestmark = pytest.mark.integration


def get(base: str, path: str, status: int = 200) -> str:
    r = httpx.get(base + path, timeout=30, follow_redirects=True)
    assert r.status_code == status, (path, r.status_code, r.text[:500])
    return r.text


def ids_in(html: str, kind: str) -> set[str]:
    return set(re.findall(rf'href="/{kind}/(0x[0-9a-fA-F]+)"', html))


def test_overview_shows_chain_contracts_totals_and_plots(explorer_url, anvil_chain, world):
    client = anvil_chain.client()
    html = get(explorer_url, "/")
    d = anvil_chain.deployment
    assert text_of(html, "stat-chain-id") == str(d.chain_id)
    assert abs(int(text_of(html, "stat-head-block").replace(",", "")) - client.block_number()) <= 1
    assert d.registry in html and d.ledger in html
    records = client.settled_records()
    assert text_of(html, "stat-records") == str(len(records)) == str(len(world.settled) + 1)
    tokens = sum(e.prompt_tokens + e.completion_tokens for e in records)
    assert text_of(html, "stat-tokens") == f"{tokens:,}"
    assert text_of(html, "stat-batches") == "4"
    fees = client.totals()["accrued"]
    assert f'title="{fees} wei"' in html.split('id="stat-fees"')[1][:200]
    assert text_of(html, "attribution-check").startswith("rewards add up")
    assert "pending 1, set_aside 1, settled 8" in text_of(html, "contracts")  # unregistered: set aside
    # both plots, one line per adapter (and the base model) / contributor
    assert html.count('data-series="') == 4 + 4  # alice owns two adapters: one line for her
    for name in ("bob/elements 1.0.0", "alice/capitals 1.1.0", "alice/capitals 1.0.0", "base model"):
        assert f'data-series="{name}"' in html


@pytest.mark.parametrize("path", ["/", "/nodes", "/adapters/0x" + "00" * 32, "/health", "/plots/tokens.svg"])
def test_every_answer_forbids_scripts_and_framing(explorer_url, path):
    """The pages show strings anyone writes on chain, each escaped; the policy is the second line."""
    r = httpx.get(explorer_url + path, timeout=30)
    policy = r.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy and "script-src" not in policy
    assert r.headers["x-content-type-options"] == "nosniff"


def test_plot_endpoints_are_svg(explorer_url):
    for path, series in (("/plots/tokens.svg", 4), ("/plots/rewards.svg", 4)):
        r = httpx.get(explorer_url + path, timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml")
        assert r.text.startswith("<svg") and r.text.count('class="series"') == series


def test_adapters_list_and_pages(explorer_url, anvil_chain, world):
    html = get(explorer_url, "/adapters")
    assert ids_in(html, "adapters") == set(world.adapters.values())
    names = html.split('id="names"')[1]
    assert f'href="/adapters/{world.adapters["alice/capitals 1.1.0"]}"' in names  # the owner's newest version
    assert anvil_chain.users[0].address in names
    bob = world.adapters["bob/elements 1.0.0"]
    page = get(explorer_url, f"/adapters/{bob}")
    info = text_of(page, "adapter-info")
    assert "bob/elements" in info and "1.0.0" in info and "none (first version)" in info
    assert f"{2 * PRICE / 10**18:.6f} ETH" in info  # bob registered twice the base price
    assert ids_in(page, "datasets") == {world.datasets["element-symbols"], world.datasets["capitals-qa"]}
    assert "40.00%" in page and "10.00%" in page
    assert "node operator gets 20.00%" in text_of(page, "fee-split")
    bob_records = {h.rsplit("/", 1)[1] for h, _ in links(page, "record-link")}
    assert bob_records <= set(world.settled) and len(bob_records) == 4
    assert text_of(page, "stat-records") == "4"
    # versions: 1.1.0 names 1.0.0 as its predecessor, and 1.0.0 lists 1.1.0 as successor
    v1, v11 = world.adapters["alice/capitals 1.0.0"], world.adapters["alice/capitals 1.1.0"]
    newer = get(explorer_url, f"/adapters/{v11}")
    assert f'href="/adapters/{v1}"' in newer.split('id="adapter-info"')[1]
    assert f'href="/adapters/{v11}"' in get(explorer_url, f"/adapters/{v1}").split('id="adapter-info"')[1]


def test_datasets_and_contributors(explorer_url, anvil_chain, world):
    html = get(explorer_url, "/datasets")
    assert ids_in(html, "datasets") == set(world.datasets.values())
    payee = anvil_chain.users[4].address  # capitals-qa's contributor
    assert payee in html
    cap = get(explorer_url, f"/datasets/{world.datasets['capitals-qa']}")
    assert payee in text_of(cap, "dataset-info")
    assert set(world.adapters.values()) <= ids_in(cap, "adapters")  # all three adapters use it
    cap_id = world.datasets["capitals-qa"]
    earned = sum(
        e["args"]["amount"]
        for e in anvil_chain.client().events("ledger", "RewardAccrued")
        if e["args"]["role"] == Role.DATASET and "0x" + e["args"]["subjectId"].hex() == cap_id
    )
    assert earned > 0 and f'title="{earned} wei"' in cap.split('id="dataset-info"')[1]


def test_nodes_show_operator_peer_and_served_tokens(explorer_url, anvil_chain, world):
    html = get(explorer_url, "/nodes")
    assert ids_in(html, "nodes") >= {world.node_keyed, world.node_opaque}
    assert "http://127.0.0.1:9101" in html and "12D3KooWtest" in html
    page = get(explorer_url, f"/nodes/{world.node_keyed}")
    assert anvil_chain.users[2].address in text_of(page, "node-info")
    served = sum(
        e.prompt_tokens + e.completion_tokens
        for e in anvil_chain.client().settled_records()
        if e.node_id == world.node_keyed
    )
    assert text_of(page, "stat-tokens-served") == f"{served:,}"


def test_batches_and_batch_page(explorer_url, anvil_chain, world):
    client = anvil_chain.client()
    events = client.events("ledger", "BatchSettled")
    html = get(explorer_url, "/batches")
    assert ids_in(html, "batches") == {"0x" + e["args"]["batchId"].hex() for e in events}
    ev = events[0]
    batch_id, tx = "0x" + ev["args"]["batchId"].hex(), "0x" + ev["transactionHash"].hex()
    page = get(explorer_url, f"/batches/{batch_id}")
    info = text_of(page, "batch-info")
    assert client.get_batch(batch_id).merkle_root in info and tx in info and str(ev["blockNumber"]) in info
    assert f'href="/tx/{tx}"' in page
    assert len(links(page.split('id="batch-records"')[1], "record-link")) == 3


def test_record_with_keyed_node_is_verified(explorer_url, world):
    rid = world.by_node[world.node_keyed][0]
    page = get(explorer_url, f"/records/{rid}")
    assert text_of(page, "proof-status") == "verified" and "verified" in class_of(page, "proof-status")
    assert "contract's verifyRecord" in text_of(page, "proof-reason")
    assert text_of(page, "signature-status") == "verified"
    assert rid in text_of(page, "record-info")


def test_record_of_node_without_key_shows_signature_uncheckable(explorer_url, world):
    page = get(explorer_url, f"/records/{world.by_node[world.node_opaque][0]}")
    assert text_of(page, "proof-status") == "verified"
    assert text_of(page, "signature-status") == "not checkable"
    assert text_of(page, "signature-reason").startswith("not checkable without the node key")


def test_tampered_record_is_not_verified(explorer_url, world):
    rid = world.by_node[world.node_keyed][1]
    assert text_of(get(explorer_url, f"/records/{rid}"), "proof-status") == "verified"
    db = sqlite3.connect(world.db_path)
    try:
        db.execute("UPDATE usage_records SET completion_tokens = completion_tokens + 100 WHERE request_id = ?", (rid,))
        db.commit()
        page = get(explorer_url, f"/records/{rid}")
        assert text_of(page, "proof-status") == "NOT verified"
        assert "not-verified" in class_of(page, "proof-status")
        assert "does not reach the batch's Merkle root" in text_of(page, "proof-reason")
        assert text_of(page, "signature-status") == "NOT verified"  # the signed receipt disagrees with the row
        assert "completion_tokens" in text_of(page, "signature-reason")
        assert "the chain settled" in page
        # a batch mate's proof, built from the database's copy of the batch, fails too, and says why
        i = world.settled.index(rid)
        mate = get(explorer_url, f"/records/{world.settled[i ^ 1]}")
        assert text_of(mate, "proof-status") == "NOT verified"
        reason = text_of(mate, "proof-reason")
        assert f"this record matches what was settled, but the database's leaves [{i % 3}]" in reason
        # records of other batches are untouched
        assert text_of(get(explorer_url, f"/records/{world.settled[3]}"), "proof-status") == "verified"
    finally:
        db.execute("UPDATE usage_records SET completion_tokens = completion_tokens - 100 WHERE request_id = ?", (rid,))
        db.commit()
        db.close()
    assert text_of(get(explorer_url, f"/records/{rid}"), "proof-status") == "verified"


def test_forged_signature_is_not_verified(explorer_url, world):
    rid = world.by_node[world.node_keyed][2]
    db = sqlite3.connect(world.db_path)
    (sig,) = db.execute("SELECT node_signature FROM usage_records WHERE request_id = ?", (rid,)).fetchone()
    forged = ("0" if sig[0] != "0" else "1") + sig[1:]
    try:
        db.execute("UPDATE usage_records SET node_signature = ? WHERE request_id = ?", (forged, rid))
        db.commit()
        page = get(explorer_url, f"/records/{rid}")
        assert text_of(page, "signature-status") == "NOT verified"
        assert "does not verify" in text_of(page, "signature-reason")
        assert text_of(page, "proof-status") == "verified"  # the settled numbers are untouched
    finally:
        db.execute("UPDATE usage_records SET node_signature = ? WHERE request_id = ?", (sig, rid))
        db.commit()
        db.close()


def test_base_model_record_reads_base_model_and_verifies(explorer_url, anvil_chain, world):
    zero = "0x" + "00" * 32
    page = get(explorer_url, f"/records/{world.base}")
    info = text_of(page, "record-info")
    assert "base model" in info and f'href="/adapters/{zero}"' not in page  # no broken adapter link
    assert text_of(page, "proof-status") == "verified" and "contract's verifyRecord" in text_of(page, "proof-reason")
    assert text_of(page, "signature-status") == "verified"  # the receipt says adapter_id null
    price = anvil_chain.client().base_price()
    assert f'title="{price * (12 + 6) // 1000} wei"' in page.split('id="record-info"')[1]
    for path in ("/records", f"/nodes/{world.node_keyed}", f"/address/{anvil_chain.users[2].address}", "/"):
        html = get(explorer_url, path)
        assert f'href="/adapters/{zero}"' not in html, path
    node = get(explorer_url, f"/nodes/{world.node_keyed}")
    assert "base model" in node
    operator = get(explorer_url, f"/address/{anvil_chain.users[2].address}")  # runs the keyed node
    assert "base model" in text_of(operator, "rewards-by-adapter")
    only = get(explorer_url, f"/records?adapter={zero}")
    assert {
        h.rsplit("/", 1)[1] for h, _ in links(only.split('id="records"')[1].split("</table>")[0], "record-link")
    } == {world.base}


def test_record_known_only_on_chain(explorer_url, world):
    page = get(explorer_url, f"/records/{world.chain_only}")
    assert text_of(page, "proof-status") == "not checkable" and "unchecked" in class_of(page, "proof-status")
    assert "not in this ledger database" in text_of(page, "record-info")
    assert "signature-status" not in page


def test_pending_and_rejected_records(explorer_url, world):
    page = get(explorer_url, f"/records/{world.pending}")
    assert text_of(page, "proof-status") == "not settled yet" and "unchecked" in class_of(page, "proof-status")
    assert "not in a batch yet" in text_of(page, "proof-reason")
    rejected = get(explorer_url, f"/records/{world.rejected}")
    assert "is not registered on chain" in text_of(rejected, "record-info")
    listing = get(explorer_url, "/records")
    assert world.pending in listing and world.rejected in listing


def test_records_list_filters_and_links(explorer_url, world):
    html = get(explorer_url, "/records")
    assert {
        h.rsplit("/", 1)[1] for h, _ in links(html.split('id="records"')[1].split("</table>")[0], "record-link")
    } == {*world.settled, world.chain_only}
    bob = world.adapters["bob/elements 1.0.0"]
    only = get(explorer_url, f"/records?adapter={bob}")
    assert len(links(only.split('id="records"')[1].split("</table>")[0], "record-link")) == 4


def test_accounts_and_address_rewards(explorer_url, anvil_chain, world):
    client = anvil_chain.client()
    html = get(explorer_url, "/accounts")
    earners = {e["args"]["account"] for e in client.events("ledger", "RewardAccrued")}
    assert ids_in(html, "address") == earners
    page = get(explorer_url, f"/address/{world.withdrawer}")
    bal = client.rewards_of(world.withdrawer)
    assert bal.withdrawn == world.withdrawn > 0 and bal.available == 0
    for stat, wei in (("stat-accrued", bal.accrued), ("stat-withdrawn", bal.withdrawn), ("stat-available", 0)):
        assert f'title="{wei} wei"' in page.split(f'id="{stat}"')[1][:120]
    assert "withdrawal" in page and "accrued events and rewardsOf do not add up" not in page
    owner = anvil_chain.users[1].address  # bob owns bob/elements
    page = get(explorer_url, f"/address/{owner.lower()}")  # any case is accepted
    assert world.adapters["bob/elements 1.0.0"] in ids_in(page.split('id="rewards-by-adapter"')[1], "adapters")
    assert "adapter owner" in page


def test_tx_page_decodes_our_events(explorer_url, anvil_chain):
    ev = anvil_chain.client().events("ledger", "BatchSettled")[-1]
    tx = "0x" + ev["transactionHash"].hex()
    page = get(explorer_url, f"/tx/{tx}")
    assert "success" in text_of(page, "tx-info")
    events = text_of(page, "tx-events")
    assert "BatchSettled" in events and "RecordsSettled" in events and "RewardAccrued" in events
    assert links(page, "record-link")


def test_search_finds_each_kind(explorer_url, anvil_chain, world):
    def final(q):
        r = httpx.get(explorer_url + "/search", params={"q": q}, timeout=30, follow_redirects=True)
        return r.status_code, str(r.url.path), r.text

    rid = world.settled[0]
    assert final(rid)[1] == f"/records/{rid}"
    assert final(rid.upper().replace("0X", "0x"))[1] == f"/records/{rid}"
    bob = world.adapters["bob/elements 1.0.0"]
    assert final(bob)[1] == f"/adapters/{bob}"
    assert final("bob/elem")[1] == f"/adapters/{bob}"  # a unique name match goes straight there
    status, path, html = final("alice/capitals")  # two versions: a list of both
    assert status == 200 and path == "/search"
    assert {world.adapters["alice/capitals 1.0.0"], world.adapters["alice/capitals 1.1.0"]} == ids_in(html, "adapters")
    addr = anvil_chain.users[4].address
    assert final(addr.lower())[1] == f"/address/{addr}"
    tx = "0x" + anvil_chain.client().events("ledger", "BatchSettled")[0]["transactionHash"].hex()
    assert final(tx)[1] == f"/tx/{tx}"
    assert final(world.node_keyed)[1] == f"/nodes/{world.node_keyed}"
    status, _, html = final("no-such-thing")
    assert status == 404 and "Nothing matches" in text_of(html, "search-empty")
    # SQLite's LIKE ends its pattern at a NUL: "\0" matched every adapter (red team); control characters go
    assert final("\0")[0] == 404 and final("bob/elem\0\x07")[1] == f"/adapters/{bob}"
    assert final(rand_id())[0] == 404


def test_bad_and_unknown_ids(explorer_url):
    assert "64 hex digits" in text_of(get(explorer_url, "/adapters/0x1234", 400), "error-message")
    assert "no adapter" in text_of(get(explorer_url, f"/adapters/{rand_id()}", 404), "error-message")
    assert "no record" in text_of(get(explorer_url, f"/records/{rand_id()}", 404), "error-message")
    assert "no transaction" in text_of(get(explorer_url, f"/tx/{rand_id()}", 404), "error-message")
    assert "40 hex digits" in text_of(get(explorer_url, "/address/0xnothex", 400), "error-message")
    assert "64 hex digits" in text_of(get(explorer_url, "/records?adapter=bob", 400), "error-message")
    assert "page" in text_of(get(explorer_url, "/records?page=-1", 400), "error-message")
    past_end = get(explorer_url, "/records?page=1")
    assert "no settled records yet" in past_end and 'href="/records?page=0"' in past_end
    get(explorer_url, "/no/such/page", 404)


def test_disputes_page_lists_records_billed_below_their_receipts(explorer_url, world):
    from sqlmodel import Session, delete

    from gateway.disputes import readmit
    from gateway.tables import NodeReadmission
    from ledger.db import make_engine
    from ledger.models import RecordStatus, UsageRecord

    assert "no disputed records" in get(explorer_url, "/disputes")
    rid, engine = rand_id(), make_engine(world.db_url)
    with Session(engine) as s:
        s.add(
            UsageRecord(
                request_id=rid,
                adapter_id=world.adapters["bob/elements 1.0.0"],
                node_id=world.node_opaque,
                prompt_tokens=7,
                completion_tokens=2,
                node_prompt_tokens=5_000_000,
                node_completion_tokens=5_000_000,
                status=RecordStatus.DISPUTED,
                error="receipt claims 5000000 + 5000000 tokens, the gateway counted 7 + 2",
            )
        )
        s.commit()
    try:
        html = get(explorer_url, "/disputes")
        nodes = text_of(html, "disputed-nodes")
        assert world.node_opaque[:10] in nodes and "kept out" in nodes
        row = text_of(html, "disputed-records")
        assert "7 + 2" in row and "5,000,000 + 5,000,000" in row and "the gateway counted 7 + 2" in row
        assert "disputed 1" in text_of(get(explorer_url, "/"), "contracts")
        # its operator readmits it: the record stays disputed, the page says the node serves again, and why
        readmit(engine, world.node_opaque, note="receipt <checked> by hand")
        html = get(explorer_url, "/disputes")
        nodes = text_of(html, "disputed-nodes")
        assert "readmitted" in nodes and "kept out" not in nodes and "receipt &lt;checked&gt; by hand" in html
        assert "5,000,000 + 5,000,000" in text_of(html, "disputed-records")
    finally:
        with Session(engine) as s:
            s.exec(delete(UsageRecord).where(UsageRecord.request_id == rid))
            s.exec(delete(NodeReadmission).where(NodeReadmission.node_id == world.node_opaque))
            s.commit()
        engine.dispose()
