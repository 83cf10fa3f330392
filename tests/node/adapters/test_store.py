import os

import pytest

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
    assert sorted(os.listdir(store.root)) == [".tmp"]
    assert not os.listdir(store.root / ".tmp")


def test_leftovers_of_a_crashed_write_are_invisible_and_cleaned(package, tiny_base, tmp_path):
    store = AdapterStore(tmp_path / "store", base_dir=tiny_base)
    half = store.tmp_dir()
    (half / "adapter_config.json").write_text("{")  # a writer died here
    assert store.list() == [] and store.get(package.adapter_id) is None
    assert store.clean_tmp() == 1 and not os.listdir(store.root / ".tmp")


def test_bad_ids_are_refused(tmp_path):
    store = AdapterStore(tmp_path / "store")
    with pytest.raises(ValueError, match="not 0x followed by 64"):
        store.get("../../etc")
