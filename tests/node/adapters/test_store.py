import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.files import WRITER
from node.adapters import AdapterStore, PackageError
from tests.utils.factories import make_package


@pytest.fixture(scope="module")
def package(tiny_base, tmp_path_factory, publisher):
    return make_package(tiny_base, tmp_path_factory.mktemp("src") / "pkg", account=publisher)


def test_install_get_list_remove(package, tiny_base, tmp_path, publisher):
    store = AdapterStore(tmp_path / "store", base_dir=tiny_base)
    installed = store.install(package.path, expected_owner=publisher.address)
    assert installed.adapter_id == package.adapter_id
    assert installed.path == tmp_path / "store" / package.adapter_id
    assert store.get(package.adapter_id).signer == publisher.address
    assert [p.adapter_id for p in store.list()] == [package.adapter_id]
    assert store.install(package.path).adapter_id == package.adapter_id  # a second install is a no-op
    assert not os.listdir(tmp_path / "store" / ".tmp")
    assert store.remove(package.adapter_id) and store.get(package.adapter_id) is None


def test_a_refused_package_leaves_nothing_behind(package, tiny_base, tmp_path):
    store = AdapterStore(tmp_path / "store", base_dir=tiny_base)
    with pytest.raises(PackageError, match="registered owner"):
        store.install(package.path, expected_owner="0x" + "ab" * 20)
    assert sorted(os.listdir(store.root)) == [".tmp", ".verified"]
    assert not os.listdir(store.root / ".verified")
    assert not os.listdir(store.root / ".tmp")


def test_leftovers_of_a_crashed_write_are_invisible_and_cleaned(package, tiny_base, tmp_path):
    store = AdapterStore(tmp_path / "store", base_dir=tiny_base)
    half = store.tmp_dir()
    (half / "adapter_config.json").write_text("{")  # a writer died here
    assert store.list() == [] and store.get(package.adapter_id) is None
    # written just now: another process's write going on, left to it (review: a node starting removed the folder of
    # an `adapter fetch --store` beside it, whose install then failed on a raw FileNotFoundError)
    assert store.clean_tmp() == 0 and os.listdir(store.root / ".tmp")
    for p in (half / "adapter_config.json", half):  # an hour later, nobody has written it since
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    assert store.clean_tmp() == 1 and not os.listdir(store.root / ".tmp")


def test_a_killed_writers_folder_goes_at_the_next_start_however_recent(tmp_path):
    """A node killed mid-fetch and restarted at once kept its partial download (2 MB a crash) until a start more
    than TMP_IDLE_S after it; now a folder whose writer has ended goes, also one of a predecessor given the same
    process id (a container's restart), and a live writer's stays."""
    root = tmp_path / "store"
    script = "import sys; from node.adapters.store import AdapterStore; print(AdapterStore(sys.argv[1]).tmp_dir())"
    dead = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True, text=True, check=True)
    killed = Path(dead.stdout.strip())
    (killed / "adapter.safetensors").write_bytes(b"\0" * 1000)
    store = AdapterStore(root)
    namespace = WRITER.split(".")[0]
    same_pid = root / ".tmp" / f"pkg-{namespace}.{os.getpid()}.{'0' * 8}-x"  # this id, another token: a predecessor's
    same_pid.mkdir()
    # pid 1 of another pid namespace (another container on the same volume): not known to be gone, left to the idle rule
    elsewhere = root / ".tmp" / f"pkg-{int(namespace) + 1}.1.{'0' * 8}-x"
    elsewhere.mkdir()
    live = store.tmp_dir()
    assert store.clean_tmp() == 2
    assert sorted(os.listdir(root / ".tmp")) == sorted([live.name, elsewhere.name])


def test_bad_ids_are_refused(tmp_path):
    store = AdapterStore(tmp_path / "store")
    with pytest.raises(ValueError, match="not 0x followed by 64"):
        store.get("../../etc")


def _count_hashing(monkeypatch) -> list[bool]:
    """Record the `hashes` flag of every verification the store runs."""
    import node.adapters.store as store_mod

    calls: list[bool] = []
    real = store_mod.verify_package

    def spy(*args, **kwargs):
        calls.append(kwargs.get("hashes", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(store_mod, "verify_package", spy)
    return calls


def test_hashes_are_checked_once_at_install(package, tiny_base, tmp_path, monkeypatch):
    store = AdapterStore(tmp_path / "store", base_dir=tiny_base)
    calls = _count_hashing(monkeypatch)
    store.install(package.path)
    assert calls == [True]  # the install hashes and value-checks the copy
    assert store.get(package.adapter_id).adapter_id == package.adapter_id
    assert AdapterStore(tmp_path / "store", base_dir=tiny_base).get(package.adapter_id) is not None  # a restart
    assert calls == [True, False, False]  # its files still match the install's stamp: not read again


def test_a_file_changed_after_install_is_hashed_again_and_refused(package, tiny_base, tmp_path, monkeypatch):
    store = AdapterStore(tmp_path / "store", base_dir=tiny_base)
    store.install(package.path)
    weights = store.path_for(package.adapter_id) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # same size: only the contents differ
    os.chmod(weights, 0o644)
    weights.write_bytes(bytes(data))
    calls = _count_hashing(monkeypatch)
    with pytest.raises(PackageError, match="sha256|hash"):
        store.get(package.adapter_id)
    assert calls == [True]
    assert store.get(package.adapter_id, verify_hashes=False) is not None  # sizes only: what "False" asks for


def test_a_lost_or_garbled_stamp_means_hashing_again(package, tiny_base, tmp_path, monkeypatch):
    store = AdapterStore(tmp_path / "store", base_dir=tiny_base)
    store.install(package.path)
    stamp = store.root / ".verified" / f"{package.adapter_id}.json"
    calls = _count_hashing(monkeypatch)
    stamp.write_text("[not a stamp")
    assert store.get(package.adapter_id) is not None
    stamp.unlink()
    assert store.get(package.adapter_id) is not None
    assert store.get(package.adapter_id) is not None  # the full checks above wrote it back
    assert calls == [True, True, False]
    store.remove(package.adapter_id)
    assert not stamp.exists()


def test_a_copy_damaged_in_the_store_is_replaced_by_installing_it_again(package, tiny_base, tmp_path):
    # a power cut or a disk error left the weights cut short: the same package installed again (an upload,
    # a fetch from peers) replaced nothing and was refused with the damaged copy's size error
    store = AdapterStore(tmp_path / "store", base_dir=tiny_base)
    store.install(package.path)
    weights = store.path_for(package.adapter_id) / "adapter_model.safetensors"
    os.chmod(weights, 0o644)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(PackageError, match="bytes, the manifest says"):
        store.get(package.adapter_id)
    assert store.install(package.path).adapter_id == package.adapter_id
    assert store.get(package.adapter_id).adapter_id == package.adapter_id
    assert [p.adapter_id for p in store.list()] == [package.adapter_id]


def test_two_installs_of_one_package_at_once_both_answer_it(tiny_base, tmp_path):
    """Red team: an operator's upload racing the engine's fetch of the same adapter (or `adapter fetch --store`
    beside a running node): the second rename failed on the folder the first had just put in place, a raw
    OSError naming the node's paths (7 of 80 installs), or removed it. Installs now take a lock in turn from the
    look at what is in place to the rename."""
    import threading

    from eth_account import Account

    pkg = make_package(tiny_base, tmp_path / "pkg", account=Account.create())
    errors: list[str] = []
    for i in range(30):
        store = AdapterStore(tmp_path / f"store{i}")
        barrier = threading.Barrier(2)
        got = []

        def install(store=store, barrier=barrier, got=got):
            barrier.wait()
            try:
                got.append(store.install(pkg.path).adapter_id)
            except Exception as e:  # what must not happen: either install answers the package
                errors.append(f"{type(e).__name__}: {e}")

        threads = [threading.Thread(target=install) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == [pkg.adapter_id] * 2 or errors, got
        assert store.get(pkg.adapter_id) is not None and not list((store.root / ".tmp").iterdir())
    assert errors == []


def test_an_install_waits_for_the_lock_a_bounded_time(package, tiny_base, tmp_path, monkeypatch):
    """Review: a stopped holder of the store's install lock (a suspended `adapter fetch --store`) held every install
    of the node, and their worker threads, for ever. An install waits INSTALL_LOCK_WAIT_S, then fails in one line."""
    import fcntl

    from node.adapters import store as store_module

    monkeypatch.setattr(store_module, "INSTALL_LOCK_WAIT_S", 0.3)
    store = AdapterStore(tmp_path / "store", base_dir=tiny_base)
    with open(store.root / store_module.INSTALL_LOCK, "a+b") as held:  # another process's, as flock sees it
        fcntl.flock(held, fcntl.LOCK_EX)
        started = time.monotonic()
        with pytest.raises(PackageError, match="another process held the store's install lock"):
            store.install(package.path)
        assert time.monotonic() - started < 5
    assert store.install(package.path).adapter_id == package.adapter_id  # once it is let go
    assert not os.listdir(store.root / ".tmp")
