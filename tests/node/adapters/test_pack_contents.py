"""What a package takes from a folder, and what it may carry beside its LoRA.

A folder cloned from someone else can link README.md to a file of the packer's (a key): pack leaves such a link
out, where it copied the target's bytes into the signed package that publish sends to every node. A publisher
could pad a few-KB LoRA with junk up to a node's package cap (4 GiB), stored by every node that serves it: the
files beside the config and weights hold at most MAX_EXTRA_BYTES, refused in the manifest itself, so a peer's
transfer plan is refused before any byte is fetched."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
from eth_account import Account

from common.wire import canonical_json, sha256_hex
from node.adapters import PackageError, pack_adapter, verify_package
from node.adapters.limits import MAX_EXTRA_BYTES, MAX_FILES
from node.adapters.manifest import MANIFEST_FILE, parse_manifest_bytes
from node.adapters.weights import CONFIG_FILE, WEIGHTS_FILE
from node.p2p.errors import UnfitAdapter
from node.p2p.protocol import plan_transfer
from tests.utils.factories import make_peft_adapter


@pytest.fixture(scope="module")
def peft(tiny_base, tmp_path_factory):
    return make_peft_adapter(tiny_base, tmp_path_factory.mktemp("peft") / "a")


def folder_of(peft, tmp_path, *, link=()):
    """A copy of the PEFT folder in tmp_path/folder; the names in `link` as symbolic links to copies kept
    elsewhere."""
    folder, blobs = tmp_path / "folder", tmp_path / "blobs"
    folder.mkdir()
    blobs.mkdir()
    for p in peft.iterdir():
        if p.name in link:
            (blobs / p.name).write_bytes(p.read_bytes())
            os.symlink(blobs / p.name, folder / p.name)
        elif p.is_file():
            (folder / p.name).write_bytes(p.read_bytes())
    return folder


def test_a_linked_file_is_left_out_with_a_warning(tiny_base, peft, tmp_path, caplog):
    folder = folder_of(peft, tmp_path)
    secret = tmp_path / "home" / "id_ed25519"
    secret.parent.mkdir()
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY----- not for publishing\n")
    (folder / "README.md").unlink(missing_ok=True)
    os.symlink(secret, folder / "README.md")
    (folder / "checkpoint-10").mkdir()  # a training run's subfolder: not packed
    (folder / "checkpoint-10" / "notes.txt").write_text("x")
    with caplog.at_level(logging.WARNING, logger="node.adapters.pack"):
        pkg = pack_adapter(folder, tmp_path / "pkg", name="alice/x", account=Account.create(), base_dir=tiny_base)
    assert {f.path for f in pkg.manifest.files} == {CONFIG_FILE, WEIGHTS_FILE}
    assert not (pkg.path / "README.md").exists()
    assert all(secret.read_bytes() not in p.read_bytes() for p in pkg.path.iterdir())
    assert "left out README.md: a symbolic link" in caplog.text


@pytest.mark.parametrize("name", [CONFIG_FILE, WEIGHTS_FILE])
def test_a_linked_config_or_weights_file_is_refused_in_one_line(tiny_base, peft, tmp_path, name):
    folder = folder_of(peft, tmp_path, link=(name,))
    out = tmp_path / "pkg"
    with pytest.raises(PackageError, match=f"{name} is a symbolic link: pack a folder that holds the file itself"):
        pack_adapter(folder, out, name="alice/x", account=Account.create(), base_dir=tiny_base)
    assert not out.exists()


def test_padding_beyond_the_extra_bytes_is_refused_by_pack(tiny_base, peft, tmp_path):
    folder = folder_of(peft, tmp_path)
    readme = (folder / "README.md").stat().st_size
    with open(folder / "notes.txt", "wb") as f:
        f.truncate(MAX_EXTRA_BYTES - readme)  # up to the limit: packed
    pkg = pack_adapter(folder, tmp_path / "ok", name="alice/x", account=Account.create(), base_dir=tiny_base)
    assert verify_package(pkg.path, base_dir=tiny_base).adapter_id == pkg.adapter_id
    with open(folder / "notes.txt", "ab") as f:
        f.write(b"x")  # one byte more
    out = tmp_path / "padded"
    with pytest.raises(PackageError, match=f"hold {MAX_EXTRA_BYTES + 1} bytes; a package holds at most") as ei:
        pack_adapter(folder, out, name="alice/x", account=Account.create(), base_dir=tiny_base)
    assert "\n" not in str(ei.value) and not out.exists()


def test_a_padded_manifest_is_refused_before_a_byte_is_fetched(tiny_base, peft, tmp_path):
    """A stranger's manifest, whatever signs it: the peer's transfer plan and every reader refuse it."""
    pkg = pack_adapter(peft, tmp_path / "pkg", name="alice/x", account=Account.create(), base_dir=tiny_base)
    doc = json.loads((pkg.path / MANIFEST_FILE).read_bytes())
    doc["files"].append({"path": "notes.txt", "sha256": "0" * 64, "size": 48 << 20})
    doc["files"].sort(key=lambda f: f["path"])
    raw = canonical_json(doc)
    # the bytes are the adapter's own (they hash to its id): its fault, not the provider's
    with pytest.raises(UnfitAdapter, match="a package holds at most"):
        plan_transfer(raw, sha256_hex(raw), max_bytes=4 << 30)
    with pytest.raises(PackageError, match="a package holds at most"):
        parse_manifest_bytes(raw)


NOTES = {"path": "notes.txt", "sha256": "0" * 64}


def test_a_folder_of_more_files_than_a_package_holds_is_refused_in_one_line_before_anything_is_copied(
    tiny_base, peft, tmp_path
):
    """The manifest's bound on its files (64) came through packing as pydantic's many-line error, after the files
    were copied (review)."""
    folder = shutil.copytree(peft, tmp_path / "peft")  # the fixture's folder is shared
    for i in range(MAX_FILES):
        (folder / f"extra{i}.txt").write_text("x")
    with pytest.raises(PackageError, match=rf"holds \d+ files; a package holds at most {MAX_FILES}$"):
        pack_adapter(folder, tmp_path / "pkg", name="alice/x", account=Account.create(), base_dir=tiny_base)
    assert not (tmp_path / "pkg").exists() and not list(tmp_path.glob(".pkg.partial-*"))


def test_a_manifests_entries_are_bounded_before_they_are_read_one_by_one(tiny_base, peft, tmp_path):
    """10,000 entries with one name twice at the end cost a node's p2p loop 1.1 s: the duplicate was looked for
    entry by entry, before the fetch's own bound on the number of files (complexity red team)."""
    pkg = pack_adapter(peft, tmp_path / "pkg", name="alice/x", account=Account.create(), base_dir=tiny_base)
    doc = json.loads((pkg.path / MANIFEST_FILE).read_bytes())
    many = [NOTES | {"path": f"n{i:05}", "size": 0} for i in range(2_000)]
    doc["files"] = sorted(doc["files"] + many + many[-1:], key=lambda f: (f["path"], f["size"]))
    with pytest.raises(PackageError, match=f"files.*at most {MAX_FILES}"):
        parse_manifest_bytes(canonical_json(doc))


@pytest.mark.parametrize(
    "extra, match",
    [
        # a name twice: the bound saw the last size, a fetch wrote the first (4 GiB) before the second failed
        ([NOTES | {"size": 4 << 30}, NOTES | {"size": 0}], "'notes.txt' is listed twice"),
        # the config is read whole and parsed: bounded as such before a byte of it is fetched
        ([], f"{CONFIG_FILE} is {4 << 30} bytes"),
    ],
)
def test_no_way_around_the_bounds_in_the_manifest(tiny_base, peft, tmp_path, extra, match):
    pkg = pack_adapter(peft, tmp_path / "pkg", name="alice/x", account=Account.create(), base_dir=tiny_base)
    doc = json.loads((pkg.path / MANIFEST_FILE).read_bytes())
    if not extra:
        doc["files"] = [f | {"size": 4 << 30} if f["path"] == CONFIG_FILE else f for f in doc["files"]]
    doc["files"] = sorted(doc["files"] + extra, key=lambda f: (f["path"], f["size"]))
    raw = canonical_json(doc)
    with pytest.raises(UnfitAdapter, match=match):
        plan_transfer(raw, sha256_hex(raw), max_bytes=8 << 30)
