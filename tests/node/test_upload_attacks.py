"""Uploads meant to fill a node's disk, escape its store or crash it, sent with the operator's token to a real
`loramesh node run` process (a publisher hands packages to an operator, who may not look inside).

Before the fix a 10 KiB sparse tar made the node write 512 MiB into its store before refusing, a member's size
was unbounded, files were written before the signature was checked, and errors named the store's path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile

import httpx
import pytest
from eth_account import Account

from tests.utils.factories import make_package
from tests.utils.node_auth import Gateway, NodeProcess, package_files, tar_of

pytestmark = pytest.mark.integration
MAX_PACKAGE = 1 << 20  # the node under test takes packages up to 1 MiB


@pytest.fixture(scope="module")
def world(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("upload-attacks")
    pkg = make_package(tiny_base, root / "pkg", account=Account.create(), name="up/honest", rank=2)
    gw = Gateway()
    n = NodeProcess(
        root / "node", tiny_base, trusted=[gw], extra_args=["--max-package-bytes", str(MAX_PACKAGE)]
    ).start()
    try:
        yield {"node": n, "pkg": pkg, "root": root, "gw": gw}
    finally:
        n.stop()


def disk_use(path) -> int:
    """Bytes the folder really holds on disk (allocated blocks: a sparse file counts what it holds)."""
    return sum(os.lstat(os.path.join(d, f)).st_blocks * 512 for d, _, fs in os.walk(path) for f in fs)


def upload(world, body: bytes) -> httpx.Response:
    return world["node"].operator().post("/v1/adapters", content=body, headers={"content-type": "application/x-tar"})


def refused(world, body: bytes, status: int, code: str, fragment: str) -> str:
    """Upload `body`; check the refusal, that nothing stayed in the store, that no path leaked; return the message."""
    node = world["node"]
    r = upload(world, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and fragment in err["message"], err
    # the node's folders (its store is under root) never reach the caller; names the caller sent may
    assert str(world["root"]) not in r.text and str(world["root"].resolve()) not in r.text, err
    assert list((node.store / ".tmp").iterdir()) == []
    assert not [p for p in node.store.iterdir() if p.name.startswith("0x")]
    assert node.alive()
    return err["message"]


def with_file(world, name: str, data: bytes) -> list:
    """The honest package's tar entries with `name`'s contents replaced."""
    return [(n, data if n == name else d, k) for n, d, k in package_files(world["pkg"].path)]


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_a_10kib_sparse_tar_of_512mib_writes_nothing(world, tmp_path, fmt):
    src = tmp_path / "src"
    shutil.copytree(world["pkg"].path, src)
    weights = src / "adapter_model.safetensors"
    os.chmod(weights, 0o644)
    weights.unlink()
    with weights.open("wb") as f:
        f.truncate(512 << 20)  # all hole: GNU tar stores only its map
    subprocess.run(
        [
            "tar",
            "--sparse",
            f"--format={fmt}",
            "-cf",
            tmp_path / "sparse.tar",
            "-C",
            src,
            *sorted(p.name for p in src.iterdir()),
        ],
        check=True,
    )
    body = (tmp_path / "sparse.tar").read_bytes()
    assert len(body) <= 32 << 10  # its map, the small files and the tar's 10 KiB record padding
    before = disk_use(world["node"].store)
    refused(world, body, 400, "package_refused", "is a sparse file")
    assert disk_use(world["node"].store) - before < 1 << 20


def test_a_member_larger_than_its_declared_size_is_refused_before_writing(world):
    weights = (world["pkg"].path / "adapter_model.safetensors").read_bytes()
    body = tar_of(with_file(world, "adapter_model.safetensors", weights + b"\0" * (256 << 10)))
    refused(world, body, 400, "package_refused", "the manifest says")


@pytest.mark.parametrize(
    "entry, fragment",
    [
        (("evil", b"", "sym"), "is a symlink"),
        (("evil", b"", "link"), "is a hard link"),
        (("evil", b"", "chr"), "is a device or fifo"),
        (("evil", b"", "fifo"), "is a device or fifo"),
        (("evil", b"", "dir"), "is a folder"),
        (("../evil.json", b"x", "file"), "escapes the package folder"),
        (("/etc/evil.json", b"x", "file"), "escapes the package folder"),
    ],
)
def test_special_members_and_escaping_names_are_refused(world, entry, fragment):
    refused(world, tar_of([entry] + package_files(world["pkg"].path)), 400, "package_refused", fragment)


def _extended(kind: bytes, data: bytes) -> bytes:
    """One extended tar header (a PAX record set, a GNU long name) holding `data`, padded to its block."""
    info = tarfile.TarInfo("././@LongLink" if kind == tarfile.GNUTYPE_LONGNAME else "././@PaxHeader")
    info.type, info.size = kind, len(data)
    return info.tobuf(format=tarfile.USTAR_FORMAT) + data + bytes(-len(data) % 512)


@pytest.mark.parametrize(
    "head, fragment",
    [
        # records of length 2 whose keyword runs on to the one "=": Python 3.11.7's tarfile took 318 MB on these
        # 48 KB (CVE-2024-6232), growing with the square of the size
        (_extended(tarfile.XHDTYPE, b"2 " * 24_000 + b"="), "extended tar header of 48001 bytes"),
        (_extended(tarfile.XGLTYPE, b"2 " * 24_000 + b"="), "extended tar header of 48001 bytes"),
        (_extended(tarfile.GNUTYPE_LONGNAME, b"a" * 200_000), "extended tar header of 200000 bytes"),
        # tarfile reads each header after an extended one a level deeper: RecursionError, a 500
        (_extended(tarfile.XHDTYPE, b"17 comment=hello\n") * 1100, "extended tar headers in a row"),
    ],
    ids=["pax", "global-pax", "gnu-long-name", "pax-chain"],
)
def test_extended_headers_are_bounded_before_tarfile_reads_them(world, head, fragment):
    refused(world, head + tar_of(package_files(world["pkg"].path)), 400, "package_refused", fragment)


def _negative(kind: bytes) -> bytes:
    """A member header whose size is negative: tar's base-256 numbers can say so (GNU format)."""
    info = tarfile.TarInfo("././@LongLink" if kind == tarfile.GNUTYPE_LONGNAME else "././@PaxHeader")
    info.type, info.size = kind, -512
    return info.tobuf(format=tarfile.GNU_FORMAT)


@pytest.mark.parametrize(
    "kind", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.REGTYPE], ids=["pax", "gnu", "file"]
)
def test_a_member_of_negative_size_is_refused_before_tarfile_reads_it(world, kind):
    """A negative size passed the bound above: tarfile then read the whole rest of the archive as the header, and a
    PAX record of 250 KB of digits held the GIL (every thread of the node, /health included) for 58 s, growing with
    the square of its size (red team, through an adapter source; this route runs the same code)."""
    refused(world, _negative(kind) + b"1" * 40_000, 400, "package_refused", "negative size")


def test_a_nested_manifest_is_a_400_not_a_segfault(world):
    refused(world, tar_of(with_file(world, "loramesh.json", b"[" * 200_000)), 400, "package_refused", "nested deeper")


def test_a_manifest_changed_after_signing_writes_nothing(world):
    manifest = (world["pkg"].path / "loramesh.json").read_bytes()
    changed = manifest.replace(b"up/honest", b"up/hijack")
    assert changed != manifest
    refused(
        world,
        tar_of(with_file(world, "loramesh.json", changed)),
        400,
        "package_refused",
        "does not match its signature",
    )


def test_errors_never_name_the_nodes_folders(world):
    no_manifest = [e for e in package_files(world["pkg"].path) if e[0] != "loramesh.json"]
    refused(world, tar_of(no_manifest), 400, "package_refused", "no loramesh.json")
    refused(world, b"\x00garbage" * 100, 400, "package_refused", "not a valid tar archive")


def test_a_package_over_the_configured_size_is_a_413(world):
    body = b"\0" * (2 * MAX_PACKAGE)
    refused(world, body, 413, "request_too_large", "over the limit")


def test_the_honest_package_is_installed_and_served(world):
    node, pkg = world["node"], world["pkg"]
    r = upload(world, tar_of(package_files(pkg.path)))
    assert r.status_code == 200 and r.json()["adapter_id"] == pkg.adapter_id, r.text
    assert (node.store / pkg.adapter_id / "adapter_model.safetensors").is_file()
    g = node.signed(world["gw"]).post(
        "/v1/generate", json={"adapter_id": pkg.adapter_id, "prompt": "hi", "max_tokens": 2, "temperature": 0}
    )
    assert g.status_code == 200, g.text
