"""What a signed package may weigh and say, checked from its manifest before its bytes are fetched, written or
hashed (red team of the package path): a weights file larger than its rank and targets make it on the node's
base, a header bloated with metadata, float64 weights, a base model name that is not one printable line."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
from pathlib import Path

import pytest
import trio
from typer.testing import CliRunner

import node.upload as upload_mod
from node.adapters import AdapterStore, PackageError, pack_adapter, verify_package
from node.adapters.basemodel import read_config
from node.adapters.manifest import MANIFEST_FILE, SIGNATURE_FILE, BaseModelRef, read_manifest
from node.adapters.pack import write_signed
from node.adapters.verify import file_sha256
from node.adapters.weights import MAX_METADATA_BYTES, WEIGHTS_FILE, max_weights_bytes
from node.p2p.errors import UnfitAdapter
from node.p2p.protocol import package_frames, plan_transfer, request_package
from node.upload import PackageInstaller, tar_package
from tests.node.adapters.test_untrusted_package import header_of, with_header
from tests.node.p2p.test_transfer import CutStream
from tests.utils.factories import make_peft_adapter, resign, writable_copy

PAD = 4 << 20  # junk behind the tensors: 50x the honest adapter (a real attack pads gigabytes)


@pytest.fixture(scope="module")
def honest(tiny_base, publisher, tmp_path_factory):
    work = tmp_path_factory.mktemp("bounds")
    peft = make_peft_adapter(tiny_base, work / "peft", rank=4, targets=("q_proj", "v_proj"))
    return pack_adapter(peft, work / "pkg", name="alice/bounds", account=publisher, base_dir=tiny_base)


def _signed_as_is(pkg_dir, publisher) -> None:
    """Sign the weights as they now are (size and hash), so only the checks past the signature can refuse them."""
    w = pkg_dir / WEIGHTS_FILE
    m = read_manifest(pkg_dir)
    files = tuple(
        f.model_copy(update={"size": w.stat().st_size, "sha256": file_sha256(w)}) if f.path == WEIGHTS_FILE else f
        for f in m.files
    )
    (pkg_dir / MANIFEST_FILE).unlink()
    (pkg_dir / SIGNATURE_FILE).unlink()
    write_signed(pkg_dir, m.model_copy(update={"files": files}), publisher)


@pytest.fixture(scope="module")
def padded(honest, publisher, tmp_path_factory):
    pkg = writable_copy(honest.path, tmp_path_factory.mktemp("padded") / "pkg")
    with (pkg / WEIGHTS_FILE).open("ab") as f:
        f.write(b"\0" * PAD)
    _signed_as_is(pkg, publisher)
    return pkg


def test_the_bound_holds_an_honest_adapter_and_not_much_more(honest, tiny_base):
    m = honest.manifest
    size = (honest.path / WEIGHTS_FILE).stat().st_size
    bound = max_weights_bytes(m.lora.rank, m.lora.targets, read_config(tiny_base))
    tensors = 2 * len(m.lora.targets) * read_config(tiny_base)["num_hidden_layers"]
    # float32 weights, as PEFT saved these: the slack is the header's allowance alone
    assert size <= bound <= size + MAX_METADATA_BYTES + 512 * tensors + 8


def test_a_padded_weights_file_is_refused_from_its_manifest(padded, tiny_base, publisher, tmp_path, monkeypatch):
    """Before, 268 MB behind a 40 KB adapter were received, written and hashed (1 s) before the framing check."""
    hashed = []
    monkeypatch.setattr("node.adapters.verify.file_sha256", lambda p: hashed.append(p) or "")
    with pytest.raises(PackageError, match=r"adapter_model.safetensors is \d+ bytes; a rank 4 adapter .* at most"):
        verify_package(padded, base_dir=tiny_base)
    assert not hashed
    # an upload: refused before a file is written
    written = []
    monkeypatch.setattr(upload_mod.UploadedPackage, "extract", lambda self, dest: written.append(dest))
    store = AdapterStore(tmp_path / "store", base_dir=tiny_base)
    inst = PackageInstaller(store, base_dir=tiny_base, owner_of=lambda _: publisher.address, on_chain=True)
    with pytest.raises(PackageError, match="at most"):
        inst.install(io.BytesIO(tar_package(padded)))
    assert not written
    # over p2p: refused once the manifest frame is read, as the adapter's own fault (UnfitAdapter: the fetcher
    # tries no other provider and blames none, since every one sends the same manifest)
    manifest_bytes = (padded / MANIFEST_FILE).read_bytes()
    adapter_id = read_manifest(padded).adapter_id
    assert plan_transfer(manifest_bytes, adapter_id, max_bytes=1 << 30).total_bytes > PAD  # no base: as before
    wire = b"".join(bytes(f) for f in package_frames(padded, adapter_id))
    stream = CutStream(wire, itertools.repeat(64 << 10))  # a provider's answer, read in 64 KiB pieces

    async def fetch():
        dest = tmp_path / "dest"
        dest.mkdir()
        await request_package(
            stream, adapter_id, dest, timeout=5, max_bytes=1 << 30, base_config=read_config(tiny_base)
        )

    with pytest.raises(UnfitAdapter, match=f"adapter {adapter_id} cannot be served here: .* at most"):
        trio.run(fetch)
    assert len(stream.data) >= len(wire) - (128 << 10)  # two reads of the wire at most: the junk was never read
    assert not (tmp_path / "dest" / WEIGHTS_FILE).exists()


def test_a_header_bloated_with_metadata_is_refused(honest, tiny_base, publisher, tmp_path):
    """Before, 4 MiB of __metadata__ verified, and every later read of the package's header (one per peer's
    request) took 80 ms and 31 MB."""
    pkg = writable_copy(honest.path, tmp_path / "meta")
    header = header_of(pkg)
    header["__metadata__"] = {"format": "pt", "junk": "x" * (MAX_METADATA_BYTES + 1)}
    with_header(pkg, json.dumps(header).encode())
    resign(pkg, tiny_base, publisher)
    with pytest.raises(PackageError, match=f"__metadata__ holds {MAX_METADATA_BYTES + 13} characters"):
        verify_package(pkg)
    # the same bytes as spaces (a header may be padded): bounded by its entries
    pkg = writable_copy(honest.path, tmp_path / "spaces")
    with_header(pkg, json.dumps(header_of(pkg)).encode() + b" " * (2 * MAX_METADATA_BYTES))
    resign(pkg, tiny_base, publisher)
    with pytest.raises(PackageError, match="at most 512 bytes an entry beside the metadata"):
        verify_package(pkg)


def test_float64_weights_are_refused(honest, tiny_base, publisher, tmp_path):
    from safetensors.torch import load_file, save_file

    pkg = writable_copy(honest.path, tmp_path / "f64")
    tensors = {k: v.double() for k, v in load_file(pkg / WEIGHTS_FILE).items()}
    save_file(tensors, str(pkg / WEIGHTS_FILE), metadata={"format": "pt"})
    resign(pkg, tiny_base, publisher)
    with pytest.raises(PackageError, match=r"must be a 2-D float matrix \(F32, F16 or BF16\), got F64"):
        verify_package(pkg, base_dir=tiny_base)


@pytest.mark.parametrize("name", ["tiny\n  signer      0xab", "tiny\x1b[3A", "x" * 257])
def test_a_base_name_that_is_not_one_printable_line_is_refused(name):
    with pytest.raises(ValueError, match="base_model|name"):
        BaseModelRef(name=name, id="0x" + "11" * 32)


def test_adapter_verify_prints_the_base_name_as_written(honest, tiny_base, publisher, tmp_path):
    """Rich markup in a signed name was read as markup: "[/bold]" made `adapter verify` print ok, then fail."""
    from node.cli import app

    pkg = writable_copy(honest.path, tmp_path / "markup")
    m = read_manifest(pkg)
    base = m.base_model.model_copy(update={"name": "[/bold][link=https://evil.example]x"})
    (pkg / MANIFEST_FILE).unlink()
    (pkg / SIGNATURE_FILE).unlink()
    write_signed(pkg, m.model_copy(update={"base_model": base}), publisher)
    got = CliRunner().invoke(app, ["adapter", "verify", str(pkg)], env={"COLUMNS": "200"})
    assert got.exit_code == 0, got.output
    assert "base model  [/bold][link=https://evil.example]x (0x" in got.output


@pytest.mark.parametrize(
    "targets",
    [("down_proj",) * 3, ("v_proj", "q_proj"), ("q_proj", "made_up"), ()],
    ids=["twice", "order", "unknown", "none"],
)
def test_a_manifests_targets_are_as_pack_writes_them(honest, targets):
    """The bound is counted from the manifest's targets: one listed 20,000 times made it 3,400 times an honest
    adapter's (review). A manifest whose own bytes name the adapter is the adapter's fault over p2p, not its
    provider's: UnfitAdapter, no provider blamed."""
    from common.wire import canonical_json

    doc = json.loads(honest.manifest.canonical_bytes())
    doc["lora"]["targets"] = list(targets)
    raw = canonical_json(doc)
    with pytest.raises(UnfitAdapter, match="targets are one or more of"):
        plan_transfer(raw, "0x" + hashlib.sha256(raw).hexdigest(), max_bytes=1 << 30)


def test_a_base_folders_name_is_made_one_printable_line(tiny_base, tmp_path):
    """A folder named with a no-break space made pack fail with a raw validation error (review)."""
    import shutil

    from node.adapters.basemodel import base_model_name

    folder = tmp_path / "Llama 3\xa08B\n"
    shutil.copytree(tiny_base, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("loramesh_base_name", None)
    (folder / "config.json").write_text(json.dumps(cfg))
    assert base_model_name(folder) == "Llama 3 8B"
    assert BaseModelRef(name=base_model_name(folder), id="0x" + "11" * 32).name == "Llama 3 8B"


def test_an_unfit_package_with_its_owners_signature_blames_no_provider(honest, tiny_base, publisher, tmp_path):
    """Every byte of a fetched package hashed to its manifest, which is the adapter's: where the node's checks then
    refuse it (float64 weights, which an older node took) and the owner signed it, no provider sent anything but
    the adapter, and each one would send it: UnfitAdapter ends the fetch (re-attack: each honest provider was
    downloaded from in turn and marked failed). A signature not the owner's is the provider's own (PackageError)."""
    import shutil
    from types import SimpleNamespace

    from eth_account import Account
    from safetensors.torch import load_file, save_file

    from node.p2p.fetcher import Fetcher

    unfit = writable_copy(honest.path, tmp_path / "f64")
    save_file({k: v.double() for k, v in load_file(unfit / WEIGHTS_FILE).items()}, str(unfit / WEIGHTS_FILE))
    resign(unfit, tiny_base, publisher)
    store = AdapterStore(tmp_path / "store", base_dir=tiny_base)
    fetcher = SimpleNamespace(store=store, base_dir=tiny_base)  # what _install reads of the fetcher
    with pytest.raises(UnfitAdapter, match="cannot be served here: .* got F64"):
        Fetcher._install(fetcher, Path(shutil.copytree(unfit, tmp_path / "tmp1")), publisher.address)
    stranger = Account.create()
    with pytest.raises(PackageError, match="registered owner"):
        Fetcher._install(fetcher, Path(shutil.copytree(unfit, tmp_path / "tmp2")), stranger.address)
