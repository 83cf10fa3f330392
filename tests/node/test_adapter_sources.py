"""Adapters from outside the mesh: `loramesh adapter import` from the Hugging Face Hub (huggingface_hub itself
downloading into its own cache, then reading it offline), from an HTTP folder, and a node fetching from an
operator's HTTP registry (node/sources.py). Every server is a real `http.server` process
(tests/utils/static_server.py); the CLI runs as a process of its own, since huggingface_hub reads HF_ENDPOINT
and HF_HOME when it is imported."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from common.identity import create_identity
from node.adapters import verify_package
from node.adapters.weights import CONFIG_FILE, WEIGHTS_FILE
from node.sources import HttpRegistry, SourceError
from node.upload import PackageInstaller, tar_package
from tests.utils.factories import make_package, make_peft_adapter
from tests.utils.node_auth import Gateway
from tests.utils.stack import start_daemon
from tests.utils.static_server import COMMIT, start

pytestmark = pytest.mark.integration

PASSWORD = "import"
HUGE = "0x" + "ab" * 32  # an adapter id whose archive is 2 MB of noise


@pytest.fixture(scope="module")
def peft(tiny_base, tmp_path_factory) -> Path:
    return make_peft_adapter(tiny_base, tmp_path_factory.mktemp("peft") / "capitals", seed=3)


@pytest.fixture(scope="module")
def signer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "alice.json"
    create_identity(path, PASSWORD)
    return path


@pytest.fixture(scope="module")
def hub(peft, tmp_path_factory):
    """A Hub with acme/capitals (the adapter, plus a pickle checkpoint beside it that must never be fetched),
    acme/pickled (a pickle checkpoint only) and acme/huge (weights past an import's bound)."""
    root = tmp_path_factory.mktemp("hub")
    repo = root / "acme" / "capitals"
    repo.mkdir(parents=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copyfile(peft / name, repo / name)
    (repo / "adapter_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    huge = root / "acme" / "huge"  # weights of 64 MiB (a sparse file)
    huge.mkdir()
    (huge / CONFIG_FILE).write_text('{"peft_type": "LORA"}')
    with open(huge / WEIGHTS_FILE, "wb") as f:
        f.truncate(64 << 20)
    pickled = root / "acme" / "pickled"
    pickled.mkdir()
    shutil.copyfile(peft / CONFIG_FILE, pickled / CONFIG_FILE)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    proc, url = start("hub", root)
    yield proc, url
    proc.kill()
    proc.wait()


def loramesh(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = os.environ | {"LORAMESH_KEY_PASSWORD": PASSWORD, "LORAMESH_DEBUG": ""} | env
    return subprocess.run(
        [sys.executable, "-m", "devnet", *args], capture_output=True, text=True, env=full, timeout=300, cwd=Path.cwd()
    )


def test_import_from_the_hub_fills_its_cache_then_works_offline(hub, peft, signer, tiny_base, tmp_path):
    _, url = hub
    env = {"HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1"}
    common = ["--name", "acme/capitals", "--key", str(signer), "--base", str(tiny_base)]
    r = loramesh("adapter", "import", "hf://acme/capitals", "--out", str(tmp_path / "pkg"), *common, env=env)
    assert r.returncode == 0, r.stderr
    pkg = verify_package(tmp_path / "pkg", base_dir=tiny_base)
    assert pkg.name == "acme/capitals"
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        assert (tmp_path / "pkg" / name).read_bytes() == (peft / name).read_bytes()
    # laid out by huggingface_hub itself: models--ORG--NAME/snapshots/<commit>/..., and no pickle fetched
    snapshot = tmp_path / "hf" / "hub" / "models--acme--capitals" / "snapshots" / COMMIT
    assert sorted(p.name for p in snapshot.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert not list((tmp_path / "hf").rglob("*.bin"))

    offline = env | {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there
    r = loramesh("adapter", "import", "hf://acme/capitals", "--out", str(tmp_path / "again"), *common, env=offline)
    assert r.returncode == 0, r.stderr
    assert verify_package(tmp_path / "again").adapter_id == pkg.adapter_id

    r = loramesh("adapter", "import", "hf://acme/other", "--out", str(tmp_path / "x"), *common, env=offline)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "not in the Hugging Face cache (HF_HUB_OFFLINE is set)" in r.stderr  # not a guess that it may be


def test_a_pickle_only_hub_adapter_is_refused_before_anything_is_loaded(hub, signer, tiny_base, tmp_path):
    _, url = hub
    env = {"HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1"}
    args = ["--name", "acme/pickled", "--key", str(signer), "--base", str(tiny_base), "--out", str(tmp_path / "p")]
    r = loramesh("adapter", "import", "hf://acme/pickled", *args, env=env)
    assert r.returncode == 1 and "has no adapter_model.safetensors" in r.stderr, r.stderr
    assert not (tmp_path / "p").exists()


def test_import_from_an_http_folder(peft, signer, tiny_base, tmp_path):
    proc, url = start("static", peft.parent)
    try:
        args = ["--name", "acme/capitals", "--key", str(signer), "--base", str(tiny_base), "--out", str(tmp_path / "p")]
        r = loramesh("adapter", "import", f"{url}/{peft.name}/", *args, env={})
        assert r.returncode == 0, r.stderr
        assert verify_package(tmp_path / "p").name == "acme/capitals"
        r = loramesh("adapter", "import", f"{url}/missing", *args[:-1], str(tmp_path / "q"), env={})
        assert r.returncode == 1 and "HTTP 404" in r.stderr
    finally:
        proc.kill()
        proc.wait()


# ---- a node's HTTP registry ----


@pytest.fixture(scope="module")
def registry(tiny_base, tmp_path_factory):
    """A registry folder served by a real http.server: one good package (exported by the CLI), one archive named
    for the good id that holds another adapter, and one that is cut short."""
    root = tmp_path_factory.mktemp("registry")
    good = make_package(tiny_base, root.parent / "good", name="acme/good", seed=5)
    other = make_package(tiny_base, root.parent / "other", name="acme/other", seed=6)
    bad = make_package(tiny_base, root.parent / "cut", name="acme/cut", seed=7)
    r = loramesh("adapter", "export", str(good.path), "--out", str(root), env={})
    assert r.returncode == 0, r.stderr
    assert (root / f"{good.adapter_id}.tar").read_bytes() == tar_package(good.path)
    swapped = make_package(tiny_base, root.parent / "swapped", name="acme/swapped", seed=8)
    (root / f"{swapped.adapter_id}.tar").write_bytes(tar_package(other.path))  # served under the wrong id
    (root / f"{bad.adapter_id}.tar").write_bytes(tar_package(bad.path)[:20_000])  # truncated
    (root / f"{HUGE}.tar").write_bytes(os.urandom(2 << 20))  # past any small package limit
    proc, url = start("static", root)
    yield url, good, swapped, bad
    proc.kill()
    proc.wait()


def installer(tmp_path: Path, tiny_base: Path, **kw) -> PackageInstaller:
    from node.adapters import AdapterStore

    store = AdapterStore(tmp_path / "store", base_dir=tiny_base)
    return PackageInstaller(store, base_dir=tiny_base, owner_of=lambda _id: None, on_chain=False, **kw)


def fetch(url: str, adapter_id: str, inst: PackageInstaller):
    import asyncio

    return asyncio.run(HttpRegistry(url).fetch(adapter_id, inst))


def test_a_registry_package_is_installed_after_the_upload_checks(registry, tiny_base, tmp_path):
    url, good, _, _ = registry
    inst = installer(tmp_path, tiny_base)
    pkg = fetch(url, good.adapter_id, inst)
    assert pkg.adapter_id == good.adapter_id and inst.store.has(good.adapter_id)


@pytest.mark.parametrize("which, why", [("swapped", "not .* as asked"), ("bad", "refused"), ("missing", "404")])
def test_what_a_registry_gets_wrong_is_refused_and_installs_nothing(registry, tiny_base, tmp_path, which, why):
    url, _, swapped, bad = registry
    adapter_id = {"swapped": swapped.adapter_id, "bad": bad.adapter_id, "missing": "0x" + "ee" * 32}[which]
    inst = installer(tmp_path, tiny_base)
    with pytest.raises(SourceError, match=why):
        fetch(url, adapter_id, inst)
    assert inst.store.list() == [] and not list(inst.store.tmp_dir().parent.glob("*/manifest.json"))


def test_a_registry_archive_past_the_nodes_package_limit_is_cut_off(registry, tiny_base, tmp_path):
    url = registry[0]
    inst = installer(tmp_path, tiny_base, max_package_bytes=4096)  # an archive of at most ~285 KB
    with pytest.raises(SourceError, match="more than"):
        fetch(url, HUGE, inst)
    assert inst.store.list() == []


def test_a_node_serves_an_adapter_it_fetched_from_its_registry(registry, tiny_base, tmp_path):
    url, good, _, _ = registry
    gw = Gateway()
    node = start_daemon(tmp_path, tiny_base, trusted=(gw.public_hex,), adapter_sources=("http://127.0.0.1:9", url))
    try:
        with gw.client(node.url, node.node_id) as client:
            body = {"adapter_id": good.adapter_id, "prompt_token_ids": [1, 5, 6], "max_tokens": 2, "temperature": 0}
            r = client.post("/v1/generate", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 2
            metrics = client.get("/metrics").text
        assert "loramesh_node_source_fetches_total 1.0" in metrics
    finally:
        node.stop()


def test_tar_of_a_package_is_flat(registry):
    """The registry's archive is what an upload sends: plain files at the top, nothing else."""
    _, good, _, _ = registry
    with tarfile.open(fileobj=io.BytesIO(tar_package(good.path))) as tar:
        assert all(m.isfile() and "/" not in m.name for m in tar.getmembers())


def test_import_from_a_local_folder_takes_the_two_files(peft, signer, tiny_base, tmp_path):
    """As from the Hub or a web folder, only the config and the weights: a folder from elsewhere holding a
    tokenizer of megabytes (over a package's 1 MiB beside them) imports, a link to a file of the importer's is
    not packed, and a snapshot's links to the two files are followed."""
    folder, blobs = tmp_path / "snapshot", tmp_path / "blobs"
    folder.mkdir()
    blobs.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (blobs / name).write_bytes((peft / name).read_bytes())
        (folder / name).symlink_to(blobs / name)
    (folder / "tokenizer.json").write_bytes(b"{}" + b" " * (3 << 20))
    (tmp_path / "secret").write_text("a key of the importer's")
    (folder / "README.md").symlink_to(tmp_path / "secret")
    out = tmp_path / "p"
    args = ["--name", "acme/local", "--key", str(signer), "--base", str(tiny_base), "--out", str(out)]
    r = loramesh("adapter", "import", f"file://{folder}", *args, env={})
    assert r.returncode == 0, r.stderr
    pkg = verify_package(out)
    assert {f.path for f in pkg.manifest.files} == {"adapter_config.json", "adapter_model.safetensors"}
    r = loramesh("adapter", "import", str(tmp_path / "blobs" / "x"), *args[:-1], str(tmp_path / "q"), env={})
    assert r.returncode == 1 and "is not a folder" in r.stderr


@pytest.fixture(scope="module")
def hostile():
    """A server answering every GET as the path's first part says: `bomb/...` a body of 60 kB that inflates,
    undone twice as its `Content-Encoding: gzip, gzip` says, to 64 MiB; `drip/...` one byte of body every 0.1 s,
    for ever; `slowhead/...` a header line a byte every 0.1 s; `chunky/...` a chunk-size line that never ends;
    `redirect/...` a redirect to `bomb/...` whose own body drips for ever."""
    import gzip
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    bomb = gzip.compress(gzip.compress(b"\0" * (64 << 20), 9), 9)

    class Answer(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            try:
                if self.path.startswith("/redirect/"):
                    self.send_response(302)
                    self.send_header("Location", self.path.replace("/redirect/", "/bomb/", 1))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self._drip(b"x")
                self.send_response(200)
                if self.path.startswith("/slowhead/"):
                    self._drip(b"X-Slow: " + b"a" * (1 << 20))
                if self.path.startswith("/chunky/"):
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self._drip(b"1;" + b"a" * (1 << 20))
                if self.path.startswith("/bomb/"):
                    self.send_header("Content-Encoding", "gzip, gzip")
                    self.send_header("Content-Length", str(len(bomb)))
                    self.end_headers()
                    self.wfile.write(bomb)
                    return
                self.send_header("Connection", "close")  # no length: the body runs until the connection closes
                self.end_headers()
                self._drip(b"x" * (1 << 20))
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _drip(self, data: bytes) -> None:
            for i in range(len(data)):
                self.wfile.write(data[i : i + 1])
                self.wfile.flush()
                time.sleep(0.1)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _import(url: str, tmp_path: Path):
    from node.adapters.importer import fetch_peft

    return fetch_peft(url, tmp_path / "work", max_bytes=1 << 20)


def test_an_encoded_answer_is_refused_not_inflated(hostile, tiny_base, tmp_path):
    """Red team: httpx undid every Content-Encoding an answer listed, each network read whole, before the size
    limit was looked at: 2.5 kB of "gzip, gzip" from a registry took a node to 2.2 GB (its package limit 1 MiB),
    and as much from an import's http(s) folder. The bytes are now asked for and taken as sent."""
    from node.adapters.errors import PackageError

    inst = installer(tmp_path, tiny_base, max_package_bytes=1 << 20)
    with pytest.raises(SourceError, match="Content-Encoding 'gzip, gzip'; only plain bytes are taken"):
        fetch(f"{hostile}/bomb", HUGE, inst)
    assert inst.store.list() == []
    with pytest.raises(PackageError, match="Content-Encoding 'gzip, gzip'"):
        _import(f"{hostile}/bomb", tmp_path)


def test_a_source_dripping_its_bytes_is_dropped(hostile, tiny_base, tmp_path, monkeypatch):
    """Red team: a read timeout bounds each wait, not a download: a source sending a byte a second held an import
    as long as it liked, and a node's fetch until the engine's fetch timeout (300 s), the sources after it never
    tried. A download now keeps a pace (here 1,000 bytes/s after 0.5 s; 10 bytes/s are sent)."""
    import time

    from common import http
    from node.adapters.errors import PackageError

    monkeypatch.setattr(http, "MIN_DOWNLOAD_RATE", 1000)
    monkeypatch.setattr(http, "DOWNLOAD_GRACE_S", 0.5)
    # and what sends no byte of body (review): headers a byte at a time, a chunk-size line that never ends
    for how in ("drip", "slowhead", "chunky"):
        started = time.monotonic()
        with pytest.raises(SourceError, match="slower than the 1000 bytes/s"):
            fetch(f"{hostile}/{how}", HUGE, installer(tmp_path, tiny_base))
        with pytest.raises(PackageError, match="slower than the 1000 bytes/s"):
            _import(f"{hostile}/{how}", tmp_path)
        assert time.monotonic() - started < 10, how


def test_an_imports_redirect_is_followed_without_reading_its_body(hostile, tmp_path):
    """Review: httpx, following a redirect itself, read its body whole, undoing its Content-Encoding and at no
    pace: a 302 of 1 kB took an import to 512 MiB more, and one whose body drips held it for ever."""
    from node.adapters.errors import PackageError

    # the redirect's target answered (the 302 itself names no encoding)
    with pytest.raises(PackageError, match="redirect/adapter_config.json answered with Content-Encoding 'gzip"):
        _import(f"{hostile}/redirect", tmp_path)


def test_a_hub_file_past_the_import_bound_is_refused_before_it_is_downloaded(hub, tmp_path):
    """Red team: the import's size bound reached only its http(s) downloads: a Hub repository's 64 MiB weights
    passed a 1 MiB bound, into the Hugging Face cache and again into the work folder. The Hub's size of a file
    is read first."""
    _, url = hub
    script = (
        "import pathlib, sys\n"
        "from node.adapters.importer import fetch_peft\n"
        "fetch_peft('hf://acme/huge', pathlib.Path(sys.argv[1]), max_bytes=1 << 20)\n"
    )
    env = os.environ | {"HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1"}
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "work")], capture_output=True, text=True, env=env)
    assert "adapter_model.safetensors is 67108864 bytes, more than the 1048576 allowed" in r.stderr, r.stderr[-2000:]
    assert not [p for p in (tmp_path / "hf").rglob("*") if p.is_file() and p.stat().st_size > 1 << 20]


@pytest.fixture
def counting():
    """A source that answers every GET 404 after 0.3 s, counting the GETs and the most it served at once."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = {"gets": 0, "now": 0, "most": 0}
    lock = threading.Lock()

    class Answer(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            with lock:
                seen["gets"] += 1
                seen["now"] += 1
                seen["most"] = max(seen["most"], seen["now"])
            time.sleep(0.3)
            with lock:
                seen["now"] -= 1
            self.send_error(404)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()


def test_sources_download_a_few_at_once_and_ask_again_only_after_a_while(counting, tiny_base, tmp_path):
    """Red team: a package refused after it arrived whole was downloaded again, whole, for every request naming it,
    and 16 requests for 16 adapters made 16 downloads at once (+1.1 GB of the node's memory)."""
    import asyncio

    from node import sources

    url, seen = counting
    now = [1000.0]
    srcs = sources.Sources([HttpRegistry(url)], budget_s=60, clock=lambda: now[0])
    inst = installer(tmp_path, tiny_base)
    ids = [f"0x{i:064x}" for i in range(1, 7)]

    async def each() -> list:
        return await asyncio.gather(*(srcs.fetch(aid, inst) for aid in ids))

    assert asyncio.run(each()) == [None] * 6
    assert seen["gets"] == 6 and seen["most"] == sources.MAX_DOWNLOADS
    assert asyncio.run(each()) == [None] * 6 and seen["gets"] == 6  # each failed a moment ago: not asked again
    now[0] += sources.FAILED_BACKOFF_S
    assert asyncio.run(srcs.fetch(ids[0], inst)) is None and seen["gets"] == 7


def test_a_slow_source_leaves_the_next_its_turn(hostile, registry, tiny_base, tmp_path, monkeypatch):
    """Red team: a first source sending its bytes slowly, but at the pace a download must keep, held the node's
    whole fetch budget (300 s) and the source after it, which held the package, was never asked."""
    import asyncio

    from common import http
    from node import sources

    monkeypatch.setattr(http, "MIN_DOWNLOAD_RATE", 5)  # the drip (10 bytes/s) keeps it
    url, good, _, _ = registry
    srcs = sources.Sources([HttpRegistry(f"{hostile}/drip"), HttpRegistry(url)], budget_s=3)
    got = asyncio.run(srcs.fetch(good.adapter_id, installer(tmp_path, tiny_base)))
    assert got is not None and got[0].adapter_id == good.adapter_id and str(got[1]) == url


def test_a_sources_credentials_stay_out_of_what_is_shown(registry, tiny_base, tmp_path):
    url = registry[0].replace("http://", "http://alice:s3cr3t@")
    source = HttpRegistry(url)
    with pytest.raises(SourceError) as e:
        fetch(url, "0x" + "ee" * 32, installer(tmp_path, tiny_base))
    assert "s3cr3t" not in str(e.value) and "s3cr3t" not in str(source) and str(source).startswith("http://127.0.0.1")


def test_a_nodes_fetches_are_held_to_its_cache_bound(tiny_base, tmp_path, monkeypatch):
    """An owner of many adapters had a node fetch each for a request and keep it for good: its disk filled. Past
    `--max-cache-bytes` the node evicts what it used least recently, and answers 503 while all it fetched was used
    too recently to go; the gateway takes that as busy, not faulty. An adapter the node serves is used, however
    long ago it was loaded (review: the hot adapter, loaded once and held, was the first to go)."""
    from node.adapters.store import CACHED_DIR, EVICT_GRACE_S
    from node.engine.lora import manager

    monkeypatch.setattr(manager, "USE_TOLD_S", 0.0)  # each use told to the store (in service, once a minute)

    root = tmp_path / "registry"
    root.mkdir()
    pkgs = [make_package(tiny_base, tmp_path / f"p{i}", name=f"acme/p{i}", seed=20 + i) for i in range(2)]
    for pkg in pkgs:
        (root / f"{pkg.adapter_id}.tar").write_bytes(tar_package(pkg.path))
    size = sum(p.stat().st_size for p in pkgs[0].path.iterdir())
    proc, url = start("static", root)
    gw = Gateway()
    node = start_daemon(tmp_path, tiny_base, trusted=(gw.public_hex,), adapter_sources=(url,), max_cache_bytes=size)
    store = node.daemon.store
    try:
        with gw.client(node.url, node.node_id) as client:

            def ask(pkg):
                body = {"adapter_id": pkg.adapter_id, "prompt_token_ids": [1, 5, 6], "max_tokens": 1, "temperature": 0}
                return client.post("/v1/generate", json=body)

            assert ask(pkgs[0]).status_code == 200
            r = ask(pkgs[1])  # the first was fetched just now: it may not go yet
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_full", r.text
            assert "no room for" in r.json()["error"]["message"]
            assert store.has(pkgs[0].adapter_id) and not store.has(pkgs[1].adapter_id)

            def age_first() -> None:
                old = time.time() - EVICT_GRACE_S - 1
                os.utime(store.root / CACHED_DIR / pkgs[0].adapter_id, (old, old))

            age_first()
            assert ask(pkgs[0]).status_code == 200  # served from memory: used now
            assert ask(pkgs[1]).status_code == 503 and store.has(pkgs[0].adapter_id)
            age_first()
            r = ask(pkgs[1])
            assert r.status_code == 200, r.text
            assert not store.has(pkgs[0].adapter_id) and store.has(pkgs[1].adapter_id)
            assert store.cached_bytes() <= size
            metrics = client.get("/metrics").text
        assert "loramesh_node_store_evictions_total 1.0" in metrics
        assert "loramesh_node_store_full_refusals_total 2.0" in metrics
    finally:
        node.stop()
        proc.kill()
        proc.wait()
