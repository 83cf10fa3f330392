"""Names, versions, prices and dataset counts the registry would refuse are refused when packing, in one
line, before anything is written (H2, H3): names 1..64 bytes of [a-z0-9._/-] starting with [a-z0-9] and
not with "0x"; versions 1..32 bytes of [0-9A-Za-z.+-]."""

import pytest
from eth_account import Account

from node.adapters import PackageError, make_dataset_share, pack_adapter
from node.adapters.manifest import (
    MAX_DATASETS,
    MAX_PRICE_PER_1K_TOKENS,
    check_adapter_name,
    check_adapter_version,
    check_dataset_name,
    dataset_id,
    parse_manifest,
)
from tests.utils.factories import make_peft_adapter

BAD_NAMES = [
    "0x" + "aa" * 32,
    "0xabc",
    "a" * 65,
    "x" * 3000,
    "Alice/capitals",
    "alice capitals",
    "alice:capitals",
    "ålice",
    "/alice",
    "-alice",
    ".alice",
    "",
    "alice\n",
]
GOOD_NAMES = ["alice/capitals", "bob/elements", "x", "adapter-0a1b2c", "a" * 64, "0/x", "x0x/y", "a.b_c-d/e"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused(name):
    with pytest.raises(PackageError, match="adapter name") as err:
        check_adapter_name(name)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names_pass(name):
    assert check_adapter_name(name) == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_dataset_names_are_refused(name):
    """Dataset names follow the rule of adapter names (AdapterRegistry.registerDataset)."""
    with pytest.raises(PackageError, match="dataset name") as err:
        check_dataset_name(name)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_dataset_names_pass(name):
    assert check_dataset_name(name) == name


@pytest.mark.parametrize("version", ["", "v" * 33, "1 0", "1/2", "1_0", "é", "1\n"])
def test_bad_versions_are_refused(version):
    with pytest.raises(PackageError, match="version"):
        check_adapter_version(version)


@pytest.mark.parametrize("version", ["1", "2", "1.0.0", "1.0.0-rc.1+Build.7", "v" * 32])
def test_good_versions_pass(version):
    assert check_adapter_version(version) == version


def _doc(**over):
    doc = {
        "name": "x",
        "version": "1",
        "base_model": {"name": "b", "id": "0x" + "0" * 64},
        "files": [],
        "lora": {"rank": 1, "alpha": 1, "targets": ["q_proj"]},
    }
    return {**doc, **over}


def test_a_manifest_the_registry_would_refuse_is_refused():
    assert parse_manifest(_doc(price_per_1k_tokens=MAX_PRICE_PER_1K_TOKENS)).price_per_1k_tokens == 2**128 - 1
    for over in (
        {"name": "0x" + "aa" * 32},
        {"name": "Tiny"},
        {"version": "1 0"},
        {"price_per_1k_tokens": MAX_PRICE_PER_1K_TOKENS + 1},
    ):
        with pytest.raises(PackageError):
            parse_manifest(_doc(**over))
    contributor = Account.create().address
    many = [make_dataset_share(f"d{i}", contributor, 1).model_dump() for i in range(MAX_DATASETS + 1)]
    with pytest.raises(PackageError, match="datasets"):
        parse_manifest(_doc(datasets=many))
    assert len(parse_manifest(_doc(datasets=many[:MAX_DATASETS])).datasets) == MAX_DATASETS


def test_pack_refuses_a_bad_name_before_writing_anything(tiny_base, tmp_path):
    peft = make_peft_adapter(tiny_base, tmp_path / "peft", rank=2)
    account = Account.create()
    for kw in (
        {"name": "0x" + "aa" * 32},
        {"name": "Alice/Capitals"},
        {"name": "alice/ok", "version": "1 0"},
        {"name": "alice/ok", "price_per_1k_tokens": 2**255},
    ):
        with pytest.raises(PackageError) as err:
            pack_adapter(peft, tmp_path / "out", account=account, base_dir=tiny_base, **kw)
        assert "\n" not in str(err.value)
        assert not (tmp_path / "out").exists()


def test_a_dataset_share_carries_only_a_name_the_registry_takes():
    # a share built from a name the registry refuses fails in one line where it is made, and a manifest built
    # elsewhere that holds one fails verification, not its registration
    contributor = Account.create().address
    with pytest.raises(PackageError, match="dataset name 'Capitals QA'") as err:
        make_dataset_share("Capitals QA", contributor, 100)
    assert "\n" not in str(err.value)
    good = make_dataset_share("capitals-qa", contributor, 100).model_dump()
    for name in ("Capitals QA", "0xabc", "a" * 65):
        bad = {**good, "name": name, "id": dataset_id(name, contributor)}
        with pytest.raises(PackageError, match="dataset name"):
            parse_manifest(_doc(datasets=[bad]))
    assert parse_manifest(_doc(datasets=[good])).datasets[0].name == "capitals-qa"
