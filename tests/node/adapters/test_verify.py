"""Every way a package can be bad gets its own refusal message; a good package passes."""

import dataclasses
import hashlib
import json
import os
import shutil
import struct

import pytest
from eth_account import Account

from common.wire import canonical_json
from ledger.types import Domain, dataset_id_for
from node.adapters import AdapterStore, ForeignSignature, PackageError, make_dataset_share, pack_adapter, verify_package
from node.adapters.manifest import MANIFEST_FILE, FileEntry, read_manifest
from node.adapters.pack import build_manifest, write_signed
from node.adapters.signing import sign_manifest, write_signature
from node.tiny import init_tiny
from tests.utils.factories import make_peft_adapter, resign, writable_copy

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def peft_dir(tiny_base, tmp_path_factory):
    return make_peft_adapter(tiny_base, tmp_path_factory.mktemp("peft") / "a", rank=4, targets=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def good_pkg(tiny_base, peft_dir, publisher, tmp_path_factory):
    share = make_dataset_share("capitals-qa", publisher.address, 2500)
    return pack_adapter(
        peft_dir,
        tmp_path_factory.mktemp("pkg") / "good",
        name="alice/capitals",
        account=publisher,
        base_dir=tiny_base,
        datasets=[share],
        price_per_1k_tokens=10**15,
    )


@pytest.fixture
def pkg(good_pkg, tmp_path):
    return writable_copy(good_pkg.path, tmp_path / "pkg")


def refused(pkg_dir, match, **kw):
    with pytest.raises(PackageError, match=match):
        verify_package(pkg_dir, **kw)


def test_a_pack_that_fails_midway_leaves_nothing_behind(tiny_base, peft_dir, publisher, tmp_path, monkeypatch):
    # a pack killed after copying the files and before signing left them at the output folder, and every
    # later pack to it was refused as "not empty": the package is made beside it and renamed in when whole
    import node.adapters.pack as pack_mod

    def killed(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pack_mod, "write_signed", killed)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        pack_adapter(peft_dir, out, name="alice/capitals", account=publisher, base_dir=tiny_base)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    out.mkdir()  # an empty folder given as the output is taken, as before
    pkg = pack_adapter(peft_dir, out, name="alice/capitals", account=publisher, base_dir=tiny_base)
    assert pkg.path == out and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    umask = os.umask(0)
    os.umask(umask)
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~umask)


def test_good_package_verifies(good_pkg, tiny_base, publisher):
    pkg = verify_package(good_pkg.path, base_dir=tiny_base, expected_owner=publisher.address)
    assert pkg.adapter_id == good_pkg.adapter_id
    assert pkg.signer == publisher.address
    assert pkg.manifest.datasets[0].share_bps == 2500
    assert {f.path for f in pkg.manifest.files} == {"README.md", "adapter_config.json", WEIGHTS}
    assert pkg.manifest.lora.targets == ("q_proj", "v_proj")


@pytest.mark.parametrize("name", ["adapter_config.json", WEIGHTS, "README.md"])
def test_flipped_byte_in_any_file(pkg, name):
    data = bytearray((pkg / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (pkg / name).write_bytes(bytes(data))
    refused(pkg, f"file '{name}' does not match its sha256")


def test_missing_file(pkg):
    (pkg / "README.md").unlink()
    refused(pkg, "file 'README.md' listed in the manifest is missing")


def test_extra_file(pkg):
    (pkg / "notes.txt").write_text("hi")
    refused(pkg, "file 'notes.txt' is not listed in the manifest")


def test_manifest_edited_after_signing(pkg):
    doc = json.loads((pkg / MANIFEST_FILE).read_text())
    doc["price_per_1k_tokens"] = 1
    (pkg / MANIFEST_FILE).write_bytes(canonical_json(doc))
    refused(pkg, "manifest does not match its signature")


def test_signature_by_another_key(pkg):
    sig = json.loads((pkg / "signature.json").read_text())
    from node.adapters.signing import sign_manifest

    forged = sign_manifest(read_manifest(pkg), Account.create())
    sig["signature"] = forged["signature"]  # claims the publisher but was signed by someone else
    (pkg / "signature.json").write_text(json.dumps(sig))
    refused(pkg, "signature was made by 0x[0-9a-fA-F]{40}, not by the claimed signer")


def test_signer_is_not_the_registered_owner(good_pkg):
    refused(good_pkg.path, "registered owner is", expected_owner=Account.create().address)


def test_truncated_safetensors_body(pkg, tiny_base, publisher):
    data = (pkg / WEIGHTS).read_bytes()
    (pkg / WEIGHTS).write_bytes(data[:-100])
    resign(pkg, tiny_base, publisher)
    refused(pkg, "body is truncated")


def test_header_length_past_end_of_file(pkg, tiny_base, publisher):
    data = (pkg / WEIGHTS).read_bytes()
    (pkg / WEIGHTS).write_bytes(struct.pack("<Q", len(data) + 10) + data[8:])
    resign(pkg, tiny_base, publisher)
    refused(pkg, "runs past the end")


def test_oversized_header(pkg, tiny_base, publisher):
    (pkg / WEIGHTS).write_bytes(struct.pack("<Q", 200 << 20) + b"{}")
    resign(pkg, tiny_base, publisher)
    refused(pkg, "larger than the")


def test_shapes_that_do_not_match_base_or_rank(tiny_base, tmp_path, publisher):
    wide = init_tiny(tmp_path / "wide", seed=0, hidden_size=64, intermediate_size=128)
    peft = make_peft_adapter(wide, tmp_path / "wide-peft", rank=4)
    pkg_dir = tmp_path / "pkg"
    shutil.copytree(peft, pkg_dir)
    write_signed(pkg_dir, build_manifest(pkg_dir, name="x", base_dir=tiny_base), publisher)
    refused(pkg_dir, r"has shape \[4, 64\], expected \[4, 128\] for rank 4 on this base", base_dir=tiny_base)
    cfg = json.loads((pkg_dir / "adapter_config.json").read_text())
    cfg["r"] = 8  # the config now claims rank 8 while the tensors have rank 4
    (pkg_dir / "adapter_config.json").write_text(json.dumps(cfg))
    (pkg_dir / MANIFEST_FILE).unlink()
    write_signed(pkg_dir, build_manifest(pkg_dir, name="x", base_dir=wide), publisher)
    refused(pkg_dir, r"expected \[8, 64\] for rank 8")


@pytest.mark.parametrize("bad", ["../evil.json", "/etc/passwd", "sub/../../x", "..", "a\\b"])
def test_file_names_that_escape_the_package(pkg, bad):
    doc = json.loads((pkg / MANIFEST_FILE).read_text())
    doc["files"][0]["path"] = bad
    (pkg / MANIFEST_FILE).write_text(json.dumps(doc))
    refused(pkg, "escapes the package folder")


def test_pickle_weight_file(pkg, tiny_base, publisher):
    (pkg / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    refused(pkg, "pickle weight file 'adapter_model.bin' refused")
    resign(pkg, tiny_base, publisher)  # even when signed and listed
    refused(pkg, "pickle weight file 'adapter_model.bin' refused")


@pytest.mark.parametrize("name", ["adapter_model.bin\n", "README.md\n", "loramesh.json\n"])
def test_a_name_ending_in_a_newline_is_refused_even_when_signed(pkg, tiny_base, publisher, name):
    # under re.match a pattern's `$` also matches before a final newline: a pickle rode in as "adapter_model.bin\n".
    # The manifest is written by hand (build_manifest itself refuses the name), listing the file, and signed.
    data = b"\x80\x04K\x01."
    (pkg / name).write_bytes(data)
    old = read_manifest(pkg)
    entry = FileEntry.model_construct(path=name, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    write_signed(pkg, old.model_copy(update={"files": (*old.files, entry)}), publisher)
    refused(pkg, "is not allowed in a package")


def test_adapter_for_another_base_model(good_pkg, tmp_path):
    other = init_tiny(tmp_path / "other", seed=1)
    refused(good_pkg.path, "adapter is for base model tiny-llama-h128-l2-s0", base_dir=other)


def test_missing_manifest_and_signature(pkg):
    (pkg / "signature.json").unlink()
    refused(pkg, "is not signed")
    (pkg / MANIFEST_FILE).unlink()
    refused(pkg, "loramesh.json is missing")


def test_malformed_manifest(pkg):
    (pkg / MANIFEST_FILE).write_text("[1,2")
    refused(pkg, "loramesh.json is not valid JSON")
    (pkg / MANIFEST_FILE).write_text('{"format": "loramesh-adapter/1", "name": "x"}')
    refused(pkg, "loramesh.json is invalid at version")


def test_dataset_shares_over_10000_bps_are_refused(publisher):
    from node.adapters.manifest import parse_manifest

    with pytest.raises(ValueError, match="more than 10000"):
        parse_manifest(
            {
                "name": "x",
                "version": "1",
                "base_model": {"name": "b", "id": "0x" + "0" * 64},
                "files": [],
                "lora": {"rank": 1, "alpha": 1, "targets": ["q_proj"]},
                "datasets": [
                    make_dataset_share("a", publisher.address, 6000).model_dump(),
                    make_dataset_share("b", publisher.address, 6000).model_dump(),
                ],
            }
        )


def test_pack_refuses_a_folder_that_is_not_a_peft_lora_adapter(tmp_path, tiny_base, publisher):
    with pytest.raises(PackageError, match="adapter_config.json is missing"):
        pack_adapter(tiny_base, tmp_path / "out", name="x", account=publisher, base_dir=tiny_base)
    folder = tmp_path / "ia3"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["q_proj"]}))
    with pytest.raises(PackageError, match="peft_type is 'IA3', expected 'LORA'"):
        pack_adapter(folder, tmp_path / "out", name="x", account=publisher, base_dir=tiny_base)


def test_pack_is_deterministic(peft_dir, tiny_base, publisher, good_pkg, tmp_path):
    share = make_dataset_share("capitals-qa", publisher.address, 2500)
    again = pack_adapter(
        peft_dir,
        tmp_path / "again",
        name="alice/capitals",
        account=publisher,
        base_dir=tiny_base,
        datasets=[share],
        price_per_1k_tokens=10**15,
    )
    assert again.adapter_id == good_pkg.adapter_id


# ------------------------------------------------------------------ signatures bound to a chain and registry

CHAIN_A = Domain(31337, "0x" + "aa" * 20)


def test_signature_is_bound_to_its_chain_and_registry(pkg, tiny_base, publisher):
    write_signature(pkg, sign_manifest(read_manifest(pkg), publisher, CHAIN_A))
    assert verify_package(pkg, domain=CHAIN_A).signer == publisher.address
    assert verify_package(pkg).domain == CHAIN_A  # no domain asked: the signature's own is reported
    for other in (Domain(31337, "0x" + "bb" * 20), Domain(1, CHAIN_A.registry)):
        with pytest.raises(
            ForeignSignature,
            match=f"package is signed for chain 31337, registry {CHAIN_A.registry}, "
            f"not for this registry \\(chain {other.chain_id}",
        ):
            verify_package(pkg, domain=other)
    offline = sign_manifest(read_manifest(pkg), publisher)  # no domain: valid on no registry
    write_signature(pkg, offline)
    with pytest.raises(ForeignSignature, match="signed for no deployment"):
        verify_package(pkg, domain=CHAIN_A)


def test_a_signature_moved_to_another_domain_does_not_verify(pkg, publisher):
    doc = sign_manifest(read_manifest(pkg), publisher, CHAIN_A)
    doc["registry"] = "0x" + "bb" * 20  # claims another registry than it was made for
    write_signature(pkg, doc)
    refused(pkg, "signature was made by 0x[0-9a-fA-F]{40}, not by the claimed signer")


def test_the_signature_covers_what_the_registry_registers(pkg, publisher):
    """The signed message is the manifest's registration (name, version, price, ...): a signature over
    another registration of the same adapter id does not verify."""
    m = read_manifest(pkg)
    reg = dataclasses.replace(m.registration(), price_per_1k_tokens=m.price_per_1k_tokens * 1000)
    write_signature(
        pkg,
        {
            "adapter_id": m.adapter_id,
            "signer": publisher.address,
            "chain_id": CHAIN_A.chain_id,
            "registry": CHAIN_A.registry,
            "signature": reg.sign(publisher, CHAIN_A),
        },
    )
    refused(pkg, "signature was made by 0x[0-9a-fA-F]{40}, not by the claimed signer")


def test_old_format_signature_is_refused_with_a_way_out(pkg):
    doc = json.loads((pkg / "signature.json").read_text())
    del doc["chain_id"], doc["registry"]
    (pkg / "signature.json").write_text(json.dumps(doc))
    refused(pkg, "old format .* sign it again with `loramesh adapter publish`")
    assert verify_package(pkg, require_signature=False).signer is None


def test_dataset_ids_are_bound_to_their_contributor(publisher):
    from node.adapters.manifest import parse_manifest

    share = make_dataset_share("capitals-qa", publisher.address, 100)
    assert (
        share.id
        == dataset_id_for(publisher.address, "capitals-qa")
        != dataset_id_for(Account.create().address, "capitals-qa")
    )
    squatted = {**share.model_dump(), "contributor": Account.create().address}  # the id of another contributor
    with pytest.raises(PackageError, match="expected the id of 'capitals-qa' contributed by"):
        parse_manifest(
            {
                "name": "x",
                "version": "1",
                "base_model": {"name": "b", "id": "0x" + "0" * 64},
                "files": [],
                "lora": {"rank": 1, "alpha": 1, "targets": ["q_proj"]},
                "datasets": [squatted],
            }
        )


def test_a_store_bound_to_a_registry(good_pkg, pkg, tiny_base, publisher, tmp_path):
    store = AdapterStore(tmp_path / "store", base_dir=tiny_base, domain=CHAIN_A)
    with pytest.raises(ForeignSignature):  # signed offline
        store.install(good_pkg.path)
    assert sorted(os.listdir(store.root)) == [".tmp", ".verified"] and not os.listdir(store.root / ".verified")
    write_signature(pkg, sign_manifest(read_manifest(pkg), publisher, CHAIN_A))
    installed = store.install(pkg, expected_owner=publisher.address)
    assert installed.domain == CHAIN_A and store.get(installed.adapter_id).signer == publisher.address
    # an entry signed for another registry (a store reused across deployments) is not served here...
    moved = AdapterStore(tmp_path / "store", base_dir=tiny_base, domain=Domain(31337, "0x" + "bb" * 20))
    assert moved.get(installed.adapter_id) is None and moved.list() == []
    # ...and a package signed for this one replaces it
    again = tmp_path / "again"
    shutil.copytree(pkg, again)
    write_signature(again, sign_manifest(read_manifest(again), publisher, moved.domain))
    assert moved.install(again).domain == moved.domain
    assert moved.get(installed.adapter_id).domain == moved.domain
