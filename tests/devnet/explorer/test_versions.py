"""Many versions of one name: a stranger registers thousands under their own name, each naming the one before and
declaring a victim's dataset. /adapters read every version of each name it listed, the newest version's page
walked (and named) every predecessor, and the victim's dataset page listed every adapter declaring it (5,000
versions: 1.8 s and 1.0 MB, 0.95 s and 2 MB, red team). Each is bounded now: a count and one seek for the names,
a capped walk that links on, a paged list. Search hits name whose name each adapter is under.

Real anvil (this module's own), the explorer under real uvicorn; the page sizes are made small, so that a dozen
versions show what thousands would."""

import re

import httpx
import pytest

from devnet.explorer import Explorer, create_app
from devnet.explorer import pages_registry as reg
from devnet.explorer.store import LedgerStore, open_ledger_db
from ledger.db import init_db, make_engine
from tests.utils.chain import rand_id
from tests.utils.servers import ServerThread

pytestmark = pytest.mark.integration

VERSIONS = 12


def _versions(env, owner, name: str, dataset_id: str) -> list[str]:
    """VERSIONS versions of `name` by `owner`, each naming the one before and declaring the dataset at 1 bps."""
    client, base, ids = env.client(owner), rand_id(), []
    for i in range(VERSIONS):
        ids.append(rand_id())
        predecessor = ids[-2] if i else "0x" + "00" * 32
        client.register_adapter(
            ids[-1],
            name=name,
            version=f"{i}.0.0",
            base_model=base,
            price_per_1k_tokens=1,
            datasets=[(dataset_id, 1)],
            predecessor=predecessor,
        )
    return ids


def _adapters_in(html: str, element_id: str) -> list[str]:
    part = html.split(f'id="{element_id}"')[1].split("</table>")[0].split("</dl>")[0]
    return re.findall(r'href="/adapters/(0x[0-9a-f]{64})"', part)


def test_many_versions_of_a_name_are_shown_a_bounded_part_at_a_time(anvil_chain, tmp_path, monkeypatch):
    monkeypatch.setattr(reg, "VERSIONS_SHOWN", 5)
    monkeypatch.setattr(reg, "PAGE_SIZE", 5)
    victim, squatter = anvil_chain.users[4], anvil_chain.new_account(10**18)
    anvil_chain.client(victim).register_dataset("famous-dataset", rand_id())
    dataset_id = anvil_chain.client().dataset_id("famous-dataset", victim.address)
    ids = _versions(anvil_chain, squatter, "alice/capitals-pro", dataset_id)
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    init_db(make_engine(db_url))
    ex = Explorer(anvil_chain.client(), LedgerStore(open_ledger_db(db_url)), data_dir=tmp_path / "index")
    with ServerThread(create_app(explorer=ex)) as server:
        ex.wait_synced()

        def get(path: str) -> str:
            r = httpx.get(server.url + path, timeout=30)
            assert r.status_code == 200, (path, r.text[:300])
            return r.text

        # the names table: how many versions, and the newest (a count and a seek, not every version read)
        names = get("/adapters").split('id="names"')[1].split("</table>")[0]
        assert f'href="/adapters/{ids[-1]}"' in names and f">{VERSIONS}</td>" in names
        # the newest version names the 5 before it and links to the 5th, whose page names the next 5
        newest = get(f"/adapters/{ids[-1]}")
        assert _adapters_in(newest, "adapter-info")[:6] == ids[-2:-7:-1] + [ids[-6]]
        assert 'class="more-versions"' in newest
        assert 'class="more-versions"' not in get(f"/adapters/{ids[4]}")  # 4 before it: all named
        oldest = get(f"/adapters/{ids[0]}")  # its successor, named once
        assert _adapters_in(oldest, "adapter-info") == [ids[1]]
        # the victim's dataset lists the adapters declaring it a page at a time, in registration order
        pages = [get(f"/datasets/{dataset_id}?adapters_page={n}") for n in range(3)]
        shown = [_adapters_in(p, "dataset-adapters") for p in pages]
        assert shown == [ids[:5], ids[5:10], ids[10:]]
        assert f"1–5 of {VERSIONS}" in pages[0] and f'href="/datasets/{dataset_id}?adapters_page=1"' in pages[0]
        assert "older →" not in pages[2]
        # a search hit says whose name it is: the squatter's, not alice's
        found = httpx.get(server.url + "/search", params={"q": "alice/capitals-pro"}, timeout=30).text
        short = f"{squatter.address[:8]}…{squatter.address[-4:]}"
        assert f"alice/capitals-pro 11.0.0 (name owner {short})" in found
