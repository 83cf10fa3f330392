"""The explorer's index over a real anvil and real SQLite: it resumes after a restart reading only the new
blocks, shows nothing younger than its confirmations, bounds its log queries, paginates /batches and an
address's accruals, and rebuilds itself when the chain it indexed is gone (a reorg below its cursor).

This module has its own anvil (module-scoped fixtures): it settles more on it and reverts it."""

import re

import httpx
import pytest

from common.wire import hex0x
from devnet.explorer import Explorer, create_app
from devnet.explorer.store import LedgerStore, open_ledger_db
from ledger.log_reader import LogReader, raw_query
from ledger.types import SettleRecord
from tests.devnet.explorer.htmlq import links
from tests.utils.chain import forge_dataset_logs, rand_id, register_sample
from tests.utils.servers import ServerThread

pytestmark = pytest.mark.integration


def settle(env, world, n: int) -> list[str]:
    """n batches of one record each (the opaque node serving alice/capitals 1.0.0), straight on chain;
    returns their request ids."""
    client = env.client(env.settler)
    out = []
    for _ in range(n):
        rec = SettleRecord(rand_id(), world.adapters["alice/capitals 1.0.0"], world.node_opaque, 10, 5)
        client.settle_batch(None, None, [rec])
        out.append(rec.request_id)
    return out


def explorer(env, world, data_dir, **kw) -> Explorer:
    return Explorer(env.client(), LedgerStore(open_ledger_db(world.db_url)), data_dir=data_dir, **kw)


def mine(env, blocks: int) -> None:
    for _ in range(blocks):
        env.client().w3.provider.make_request("evm_mine", [])


def test_index_resumes_after_a_restart_reading_only_the_new_blocks(anvil_chain, world, tmp_path):
    data = tmp_path / "index"
    first = explorer(anvil_chain, world, data)
    with ServerThread(create_app(explorer=first)) as server:
        first.wait_synced()
        before = httpx.get(server.url + "/health", timeout=30).json()
    # the service stopped (its lifespan closed the explorer); the chain moves on
    head = anvil_chain.client().block_number()
    assert before["indexed_block"] == head and before["records"] == len(world.settled) + 1
    assert first.index.reader.blocks == head - anvil_chain.deployment.deploy_block + 1
    new = settle(anvil_chain, world, 3)
    head2 = anvil_chain.client().block_number()
    assert head2 == head + 3

    second = explorer(anvil_chain, world, data)
    cursor = second.index.cursor()
    assert (cursor.block, cursor.records, cursor.batches) == (head, len(world.settled) + 1, 4)
    assert cursor.block_hash == anvil_chain.client().w3.eth.get_block(head)["hash"].to_0x_hex()
    with ServerThread(create_app(explorer=second)) as server:
        second.wait_synced()
        after = httpx.get(server.url + "/health", timeout=30).json()
        listing = httpx.get(server.url + "/records", timeout=30).text
    # only blocks head+1..head2 were asked for, in one query
    assert (second.index.reader.blocks, second.index.reader.queries) == (3, 1)
    assert after["indexed_block"] == head2 and after["records"] == before["records"] + 3
    shown = {h.rsplit("/", 1)[1] for h, _ in links(listing.split('id="records"')[1], "record-link")}
    assert set(new) <= shown
    # and a third start with nothing new reads no logs at all
    third = explorer(anvil_chain, world, data)
    assert third.refresh() == head2
    assert (third.index.reader.blocks, third.index.reader.queries) == (0, 0)
    third.close()


def test_records_younger_than_the_confirmations_are_not_shown(anvil_chain, world, tmp_path):
    ex = explorer(anvil_chain, world, tmp_path / "index", confirmations=2)
    try:
        (rid,) = settle(anvil_chain, world, 1)
        head = anvil_chain.client().block_number()
        assert ex.refresh() == head - 2
        with ex.view() as v:
            assert v.q.records_of_request(rid) == [] and not v.q.has_record(rid)
            assert v.head == head and v.indexed_block == head - 2
        mine(anvil_chain, 1)
        ex.refresh()
        with ex.view() as v:
            assert not v.q.has_record(rid)  # one confirmation: not yet
        mine(anvil_chain, 1)
        assert ex.refresh() == head
        with ex.view() as v:
            (shown,) = v.q.records_of_request(rid)
            assert shown.block == head and shown.prompt_tokens == 10
    finally:
        ex.close()


def test_log_queries_are_bounded_in_logs_and_read_every_log_once(anvil_chain):
    client = anvil_chain.client()
    head = client.block_number()
    addresses = [client.registry.address, client.ledger.address]
    whole = client.w3.provider.make_request(
        "eth_getLogs", [{"address": addresses, "fromBlock": hex(0), "toBlock": hex(head)}]
    )["result"]
    reader = LogReader(client.rpc_url, max_logs=4, span=64)
    query = raw_query(client.w3, client.rpc_url, {"address": addresses})
    chunks = list(reader.chunks(anvil_chain.deployment.deploy_block, head, query))
    for c in chunks:  # a range of several blocks never holds more than max_logs; one block is taken whole
        assert len(c.logs) <= 4 or c.first == c.last, (c.first, c.last, len(c.logs))
    assert [c.first for c in chunks[1:]] == [c.last + 1 for c in chunks[:-1]] and chunks[-1].last == head
    assert [lg for c in chunks for lg in c.logs] == whole
    assert reader.queries > len(chunks)  # the first, 64 blocks wide, held too many and was asked again smaller


def test_batches_and_an_address_paginate(anvil_chain, world, tmp_path):
    settle(anvil_chain, world, 110)  # the opaque node's operator accrues once in each
    operator = anvil_chain.users[3].address
    ex = explorer(anvil_chain, world, tmp_path / "index")
    with ServerThread(create_app(explorer=ex)) as server:
        ex.wait_synced()
        with ex.view() as v:
            batches = v.q.batch_totals()[0]
        seen: list[str] = []
        page = 0
        while True:
            html = httpx.get(f"{server.url}/batches?page={page}", timeout=30).text
            ids = re.findall(r'href="/batches/(0x[0-9a-f]{64})"', html.split('id="batches"')[1].split("</table>")[0])
            seen += ids
            if "older →" not in html:
                break
            assert len(ids) == 50 and f'href="/batches?page={page + 1}"' in html
            page += 1
        assert len(seen) == len(set(seen)) == batches > 100 and page == batches // 50
        newest = httpx.get(server.url + "/batches", timeout=30).text
        assert "← newer" not in newest and f"1–50 of {batches:,}" in newest

        def accruals(page: int) -> list[str]:
            html = httpx.get(f"{server.url}/address/{operator}?page={page}", timeout=30).text
            if 'id="address-accruals"' not in html:
                assert "nothing accrued" in html
                return []
            table = html.split('id="address-accruals"')[1].split("</table>")[0]
            return re.findall(r'href="/batches/(0x[0-9a-f]{64})"', table)

        first, second = accruals(0), accruals(1)
        events = anvil_chain.client().events("ledger", "RewardAccrued", filters={"account": operator})
        assert len(first) == 100 and len(first) + len(second) == len(events) > 110
        assert {hex0x(e["args"]["batchId"]) for e in events} == set(first) | set(second)
        assert accruals(2) == []
        page_two = httpx.get(f"{server.url}/address/{operator}?page=1", timeout=30).text
        assert f'href="/address/{operator}?page=0"' in page_two


def test_what_an_address_registered_is_paginated(anvil_chain, world, tmp_path):
    # anyone registers datasets and names any address their payee: the list was read and shown whole
    stranger, victim = anvil_chain.client(anvil_chain.new_account()), anvil_chain.new_account().address
    for i in range(101):
        stranger.register_dataset(f"gift-{i}", rand_id())
        stranger.set_dataset_payee(stranger.dataset_id(f"gift-{i}"), victim)
    ex = explorer(anvil_chain, world, tmp_path / "index")
    with ServerThread(create_app(explorer=ex)) as server:
        ex.wait_synced()

        def registered(page: int) -> tuple[list[str], str]:
            html = httpx.get(f"{server.url}/address/{victim}?owned_page={page}", timeout=30).text
            table = html.split('id="address-registered"')[1].split("</table>")[0]
            return re.findall(r'href="/datasets/(0x[0-9a-f]{64})"', table), html

        (first, html), (second, html2) = registered(0), registered(1)
        assert len(first) == 100 and len(second) == 1 and not set(first) & set(second)
        assert f'href="/address/{victim}?owned_page=1"' in html and "older →" not in html2


def test_a_reorg_below_the_cursor_rebuilds_the_index(anvil_chain, world, tmp_path):
    w3 = anvil_chain.client().w3
    ex = explorer(anvil_chain, world, tmp_path / "index")
    try:
        snapshot = w3.provider.make_request("evm_snapshot", [])["result"]
        (gone,) = settle(anvil_chain, world, 1)
        ex.refresh()
        with ex.view() as v:
            assert v.q.has_record(gone)
            records = v.q.usage("all").records
        w3.provider.make_request("evm_revert", [snapshot])
        mine(anvil_chain, 2)  # another chain, now higher than the indexed block
        ex.refresh()
        with ex.view() as v:
            assert not v.q.has_record(gone) and v.q.usage("all").records == records - 1
            assert v.indexed_block == anvil_chain.client().block_number()
    finally:
        ex.close()


def test_a_reorg_at_the_same_height_drops_the_batch_from_the_pages(anvil_chain, world, tmp_path):
    """anvil_reorg replaces the block holding a batch with an empty one at the same height (the head does not
    go down): the indexed block's hash changed, so the pages stop showing the dropped batch and its record."""
    w3 = anvil_chain.client().w3
    ex = explorer(anvil_chain, world, tmp_path / "index")
    with ServerThread(create_app(explorer=ex)) as server:
        (gone,) = settle(anvil_chain, world, 1)
        ex.wait_synced()
        with ex.view() as v:
            (rec,) = v.q.records_of_request(gone)
        batch_id = rec.batch_id
        assert httpx.get(f"{server.url}/records/{gone}", timeout=30).status_code == 200
        assert batch_id in httpx.get(f"{server.url}/batches", timeout=30).text
        head = anvil_chain.client().block_number()
        assert "error" not in w3.provider.make_request("anvil_reorg", [1, []])
        assert anvil_chain.client().block_number() == head
        ex.wait_synced()
        assert httpx.get(f"{server.url}/records/{gone}", timeout=30).status_code == 404
        listing = httpx.get(f"{server.url}/batches", timeout=30).text
        assert batch_id not in listing


def test_an_event_whose_string_is_not_utf8_is_left_out_not_a_wedge(anvil_chain, world, tmp_path):
    # anyone could register a dataset whose name is not UTF-8 (the registry refuses them now): decoding it
    # raised, and the index stopped there; left out, a change of its payee named a row never written, which
    # failed the chunk for good. The logs of a registry that takes such names are left out.
    attacker = anvil_chain.new_account()
    tx, _ = forge_dataset_logs(anvil_chain, attacker, b"\xff\xfe not utf-8", anvil_chain.users[0].address)
    after = register_sample(anvil_chain, price=7)
    ex = explorer(anvil_chain, world, tmp_path / "index")
    with ServerThread(create_app(explorer=ex)) as server:
        ex.wait_synced()
        assert ex.index.cursor().block == anvil_chain.client().block_number()
        assert httpx.get(f"{server.url}/adapters/{after.adapter_id}", timeout=30).status_code == 200
        assert httpx.get(f"{server.url}/tx/{tx}", timeout=30).status_code == 200
