"""The explorer answers bad input and a broken database with one clear error page, and keeps serving.

Real anvil, a real SQLite ledger (a copy of the module's world, so the corruption stays here) and the
explorer under real uvicorn."""

import sqlite3
from types import SimpleNamespace

import httpx
import pytest

from devnet.explorer import ExplorerConfig, create_app
from tests.devnet.explorer.htmlq import text_of
from tests.utils.chain import rand_id
from tests.utils.servers import ServerThread

pytestmark = pytest.mark.integration

# pages that read the ledger database (the others read only the chain index)
DB_PAGES = ("/", "/records", "/disputes")


def _copy_db(src: str, dst) -> str:
    """A consistent copy of the world's ledger (sqlite backup: the WAL is folded in)."""
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    return f"sqlite:///{dst}"


@pytest.fixture
def own_explorer(anvil_chain, world, tmp_path):
    """An explorer over a copy of the world's ledger database: its url, the copy's path, its Explorer."""
    path = tmp_path / "ledger.db"
    url = _copy_db(str(world.db_path), path)
    app = create_app(ExplorerConfig(deployment=anvil_chain.deployment_path, db_url=url))
    with ServerThread(app) as server:
        yield SimpleNamespace(url=server.url, path=path, explorer=app.state.explorer)


def _html_error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.request.url, r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("text/html"), r.headers["content-type"]
    return text_of(r.text, "error-message")


def test_corrupt_database_gives_an_error_page_and_the_explorer_keeps_running(own_explorer, world):
    url, path = own_explorer.url, own_explorer.path
    assert httpx.get(url + "/", timeout=30).status_code == 200
    # the attack: the database file is overwritten while the explorer has it open
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.write(b"\xde\xad\xbe\xef" * (size // 4))
    for wal in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if wal.exists():
            wal.write_bytes(b"\xde\xad" * 4096)
    for page in DB_PAGES + (f"/records/{world.settled[0]}", f"/search?q={world.settled[0]}"):
        message = _html_error(httpx.get(url + page, timeout=30), 503)
        assert "ledger database" in message and str(path) not in message, (page, message)
    r = httpx.get(url + "/health", timeout=30)
    assert r.status_code == 503 and r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "ledger database" in err["message"]
    # still serving: pages that need only the chain answer as before
    assert httpx.get(url + "/adapters", timeout=30).status_code == 200


def test_missing_table_gives_an_error_page(own_explorer):
    url, path = own_explorer.url, own_explorer.path
    with sqlite3.connect(path) as c:
        c.execute("DROP TABLE usage_records")
    message = _html_error(httpx.get(url + "/records", timeout=30), 503)
    assert message.startswith("the ledger database cannot be read")
    assert httpx.get(url + "/adapters", timeout=30).status_code == 200


def test_hostile_receipt_in_the_database_is_refused_not_parsed(own_explorer, world):
    """A receipt is what a node sent: a stranger's bytes. 200 KB of '[' must not end the explorer."""
    url, path = own_explorer.url, own_explorer.path
    rid = rand_id()
    with sqlite3.connect(path) as c:
        c.execute(
            "UPDATE usage_records SET request_id = ?, receipt_json = ? WHERE request_id = ?",
            (rid, "[" * 200_000, world.pending),
        )
    r = httpx.get(f"{url}/records/{rid}", timeout=30)
    assert r.status_code == 200 and "NOT verified" in r.text and "more than the limit of" in r.text
    assert (
        len(r.content) < 50_000 and "200,000 characters in all" in r.text
    )  # the stranger's bytes are not echoed whole
    dup = '{"request_id": "a", "request_id": "b"}'
    with sqlite3.connect(path) as c:
        c.execute("UPDATE usage_records SET receipt_json = ? WHERE request_id = ?", (dup, rid))
    assert "duplicate key" in httpx.get(f"{url}/records/{rid}", timeout=30).text
    assert httpx.get(url + "/health", timeout=30).json()["ok"] is True


def test_request_body_over_the_limit_is_413_before_it_is_read(explorer_url):
    r = httpx.request("GET", explorer_url + "/", content=b"x" * (2 << 20), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.get(explorer_url + "/health", timeout=30).status_code == 200


def test_unknown_query_ignored_bad_query_a_400_page(explorer_url):
    r = httpx.get(explorer_url + "/health", params={"x": "y"}, timeout=30)
    assert r.status_code == 200  # unknown query parameters are ignored
    r = httpx.get(explorer_url + "/records?page=abc", timeout=30)
    assert "page" in _html_error(r, 400)


def test_an_unexpected_failure_is_a_500_page_and_the_explorer_keeps_serving(own_explorer):
    """A bug in a page (here: the ledger store's reads replaced by one that raises) is our error page, not
    Starlette's plain-text 500, and the next request is served."""
    url, app_explorer = own_explorer.url, own_explorer.explorer

    def broken(*_a, **_k):
        raise RuntimeError("a bug with /secret/path in its message")

    real, app_explorer.store.counts = app_explorer.store.counts, broken
    try:
        r = httpx.get(url + "/", timeout=30)
        message = _html_error(r, 500)
        assert "failed on this page" in message and "/secret/path" not in r.text
        # sent from outside the added middlewares: the security headers were missing (red team)
        assert "default-src 'none'" in r.headers["content-security-policy"]
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "no-referrer"
        r = httpx.get(url + "/health", timeout=30)
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    finally:
        app_explorer.store.counts = real
    assert httpx.get(url + "/", timeout=30).status_code == 200


def test_the_overview_shows_the_rpc_url_without_its_secrets(anvil_chain, world):
    """The overview printed the RPC URL whole: a hosted provider's key (in its path or query) or a password before
    the host, public to anyone who opened the page (red team)."""
    from urllib.parse import urlsplit

    port = urlsplit(anvil_chain.rpc_url).port
    secret = f"http://apiuser:S3CRET-PASS@127.0.0.1:{port}/?apikey=S3CRET-KEY"
    app = create_app(ExplorerConfig(deployment=anvil_chain.deployment_path, db_url=world.db_url, rpc_url=secret))
    with ServerThread(app) as server:
        r = httpx.get(server.url + "/", timeout=30)
    assert r.status_code == 200 and "S3CRET" not in r.text
    assert f"http://127.0.0.1:{port}/…" in text_of(r.text, "contracts")
