"""Moving a package to a node over HTTP: a flat, uncompressed tar of the package's plain files.

The receiving side trusts nothing in the archive and writes nothing before it has read the manifest
and its signature: `open_upload` walks the member headers (refusing anything but regular files with
safe flat names: no links, devices, folders or sparse members, whose real size is not the bytes
sent) and parses the manifest and signature with the bounded JSON parser; the caller then checks the
signature and the on-chain owner; only then does `UploadedPackage.extract` write each weight file,
at most the manifest's declared size of it, hashing as it goes. The store still runs the full
package check before the package becomes visible. `PackageInstaller` is that receiving side for a
node's store, which the node API's upload route (POST /v1/adapters) hands each upload to.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from common.wire import UntrustedJSONError, parse_json
from node.adapters.errors import PackageError
from node.adapters.limits import MAX_FILES, MAX_SIGNATURE_BYTES
from node.adapters.manifest import (
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    SIGNATURE_FILE,
    Manifest,
    check_file_name,
    parse_manifest_bytes,
)

if TYPE_CHECKING:
    from node.adapters import AdapterStore, VerifiedPackage

# an archive (an upload, a download) past this many bytes is spooled to disk while it arrives: never whole in memory
SPOOL_IN_MEMORY_BYTES = 64 << 20
MAX_PACKAGE_BYTES = 4 << 30  # default cap on a package's files together (a node's --max-package-bytes)
# headers (512 bytes, plus PAX records), padding to 512 and the archive's closing blocks and record padding
TAR_OVERHEAD = (MAX_FILES + 2) * 4096 + 10240
_CHUNK = 1 << 20
_PLAIN_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE)
# PAX records and GNU long names: tar_package writes a PAX header of some tens of bytes per file (its mtime)
_EXTENDED_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)
MAX_EXTENDED_HEADER_BYTES = 4096
MAX_EXTENDED_IN_A_ROW = 3  # a member's own header after at most this many extended ones (tarfile recurses on each)


class _BoundedTarInfo(tarfile.TarInfo):
    """A member header, refused before tarfile processes it when it is an extended header (PAX record, GNU
    long name) over MAX_EXTENDED_HEADER_BYTES or a GNU sparse member. tarfile reads such headers whole before
    any member reaches our checks, and Python before 3.11.10 parses a crafted PAX record in time and memory
    growing with the square of its size (CVE-2024-6232: 48 KB took 318 MB); a sparse member's extension
    blocks are read on to the archive's end."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        obj = super().frombuf(buf, encoding, errors)
        if obj.size < 0:  # tar's base-256 numbers can say so; tarfile would read all that follows as this member
            raise PackageError(f"upload entry {obj.name[:128]!r} has a negative size ({obj.size})")
        if obj.type in _EXTENDED_TYPES and obj.size > MAX_EXTENDED_HEADER_BYTES:
            raise PackageError(
                f"upload holds an extended tar header of {obj.size} bytes, more than {MAX_EXTENDED_HEADER_BYTES}"
            )
        if obj.type == tarfile.GNUTYPE_SPARSE:
            raise PackageError(f"upload entry {obj.name[:128]!r} is a sparse file; packages hold plain files only")
        return obj

    @classmethod
    def fromtarfile(cls, tar):
        # tarfile reads the header after an extended one by calling this again, one level deeper each time:
        # thousands in a row ended in RecursionError
        tar.extended_run += 1
        try:
            if tar.extended_run > MAX_EXTENDED_IN_A_ROW + 1:
                raise PackageError(f"upload holds more than {MAX_EXTENDED_IN_A_ROW} extended tar headers in a row")
            return super().fromtarfile(tar)
        finally:
            tar.extended_run -= 1


class _UploadTar(tarfile.TarFile):
    tarinfo = _BoundedTarInfo
    extended_run = 0  # how deep _BoundedTarInfo.fromtarfile is now


def max_upload_bytes(max_package_bytes: int = MAX_PACKAGE_BYTES) -> int:
    """The largest tar body that can carry a package of `max_package_bytes`."""
    return max_package_bytes + TAR_OVERHEAD


def tar_package(pkg_dir: str | Path) -> bytes:
    """The package folder's plain files as a flat tar archive."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for p in sorted(Path(pkg_dir).iterdir()):
            if p.is_file():
                tar.add(p, arcname=p.name, recursive=False)
    return buf.getvalue()


@dataclass(slots=True)
class UploadedPackage:
    """An upload whose member headers, manifest and signature were read and checked; nothing written yet."""

    tar: tarfile.TarFile
    manifest: Manifest
    signature: dict
    manifest_bytes: bytes
    signature_bytes: bytes
    members: dict[str, tarfile.TarInfo] = field(default_factory=dict)  # weight files by name

    def extract(self, dest: Path) -> None:
        """Write the manifest's files into the empty folder `dest`, each no longer than declared and with
        its declared sha256, then the manifest and signature as they were read."""
        try:
            self._extract(dest)
        except tarfile.TarError as e:
            raise PackageError(f"upload is not a valid tar archive: {e}") from None

    def _extract(self, dest: Path) -> None:
        for entry in self.manifest.files:
            m = self.members[entry.path]
            src = self.tar.extractfile(m)
            if src is None:  # cannot happen for a regular member: refuse rather than assume
                raise PackageError(f"upload entry {entry.path!r} has no contents")
            h, left = hashlib.sha256(), entry.size
            with (dest / entry.path).open("xb") as out:
                while left:
                    chunk = src.read(min(_CHUNK, left))
                    if not chunk:
                        raise PackageError(f"upload ends inside {entry.path!r}")
                    h.update(chunk)
                    out.write(chunk)
                    left -= len(chunk)
            if h.hexdigest() != entry.sha256:
                raise PackageError(
                    f"file {entry.path!r} does not match its sha256 in the manifest (modified after signing)"
                )
        (dest / MANIFEST_FILE).write_bytes(self.manifest_bytes)
        (dest / SIGNATURE_FILE).write_bytes(self.signature_bytes)

    def close(self) -> None:
        self.tar.close()

    def __enter__(self) -> UploadedPackage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_member(m: tarfile.TarInfo, max_package_bytes: int) -> None:
    """Refuse every member that is not a plain file with a safe flat name and a size within the cap."""
    if m.type not in _PLAIN_FILE_TYPES or m.issparse() or any(k.startswith("GNU.sparse") for k in m.pax_headers):
        what = (
            "a sparse file"
            if m.issparse() or m.type == tarfile.GNUTYPE_SPARSE
            else "a symlink"
            if m.issym()
            else "a hard link"
            if m.islnk()
            else "a folder"
            if m.isdir()
            else "a device or fifo"
            if m.isdev()
            else "not a regular file"
        )
        raise PackageError(f"upload entry {m.name[:128]!r} is {what}; packages hold plain files only")
    if m.name not in (MANIFEST_FILE, SIGNATURE_FILE):
        check_file_name(m.name)
    if m.size > max_package_bytes:
        raise PackageError(f"upload entry {m.name!r} is {m.size} bytes, over the {max_package_bytes}-byte limit")


def _read_json_member(tar: tarfile.TarFile, m: tarfile.TarInfo, limit: int) -> tuple[bytes, object]:
    if m.size > limit:
        raise PackageError(f"{m.name} is {m.size} bytes, more than {limit}")
    src = tar.extractfile(m)
    raw = src.read(m.size) if src is not None else b""
    if len(raw) != m.size:
        raise PackageError(f"upload ends inside {m.name!r}")
    try:
        return raw, parse_json(raw, max_bytes=limit, what=m.name)
    except UntrustedJSONError as e:
        raise PackageError(str(e)) from None


def open_upload(data: bytes | BinaryIO, *, max_package_bytes: int = MAX_PACKAGE_BYTES) -> UploadedPackage:
    """Read an upload's member headers, manifest and signature (bytes, or a seekable file); PackageError
    for anything but a flat archive of plain files that are exactly the manifest's, within the size caps."""
    if isinstance(data, bytes):
        if len(data) > (limit := max_upload_bytes(max_package_bytes)):
            raise PackageError(f"upload of {len(data)} bytes is over the {limit}-byte limit")
        data = io.BytesIO(data)
    try:
        tar = _UploadTar.open(fileobj=data, mode="r:")
    except tarfile.TarError as e:
        raise PackageError(f"upload is not a valid tar archive: {e}") from None
    try:
        members: dict[str, tarfile.TarInfo] = {}
        while (m := tar.next()) is not None:
            if len(members) >= MAX_FILES + 2:
                raise PackageError(f"upload holds more than {MAX_FILES} files")
            _check_member(m, max_package_bytes)
            if m.name in members:
                raise PackageError(f"upload names the file {m.name!r} twice")
            members[m.name] = m
        for required in (MANIFEST_FILE, SIGNATURE_FILE):
            if required not in members:
                raise PackageError(f"upload holds no {required}: not a signed adapter package")
        manifest_bytes, raw_manifest = _read_json_member(tar, members.pop(MANIFEST_FILE), MAX_MANIFEST_BYTES)
        signature_bytes, signature = _read_json_member(tar, members.pop(SIGNATURE_FILE), MAX_SIGNATURE_BYTES)
        manifest = parse_manifest_bytes(manifest_bytes)  # canonical bytes only: what the adapter id hashes
        if not isinstance(signature, dict):
            raise PackageError(f"{SIGNATURE_FILE} must be a JSON object")
        _check_against_manifest(members, manifest, max_package_bytes)
        return UploadedPackage(tar, manifest, signature, manifest_bytes, signature_bytes, members)
    except tarfile.TarError as e:
        tar.close()
        raise PackageError(f"upload is not a valid tar archive: {e}") from None
    except BaseException:
        tar.close()
        raise


def _check_against_manifest(members: dict[str, tarfile.TarInfo], manifest: Manifest, max_package_bytes: int) -> None:
    declared = {f.path: f.size for f in manifest.files}
    if extra := sorted(set(members) - set(declared)):
        raise PackageError(f"file {extra[0]!r} is not listed in the manifest")
    if missing := sorted(set(declared) - set(members)):
        raise PackageError(f"file {missing[0]!r} listed in the manifest is missing")
    for name, size in declared.items():
        if members[name].size != size:
            raise PackageError(f"file {name!r} is {members[name].size} bytes, the manifest says {size}")
    if (total := sum(declared.values())) > max_package_bytes:
        raise PackageError(f"package files total {total} bytes, over the {max_package_bytes}-byte limit")


# ---- the node's side: an upload into its store ------------------------------------------------------


class UploadRefused(RuntimeError):
    """An uploaded package that the chain does not vouch for."""


class PackageInstaller:
    """Installs uploaded packages into a node's store (the daemon builds it; the API's upload route uses it).

    `owner_of(adapter_id)`: the adapter's registered owner, None when unregistered; `on_chain`: whether this
    node checks owners on a chain at all. `announce(adapter_id)`: offers an installed package to the p2p mesh
    (None: the node has no p2p host)."""

    def __init__(
        self,
        store: AdapterStore,
        *,
        base_dir: Path,
        owner_of: Callable[[str], str | None],
        on_chain: bool,
        max_package_bytes: int = MAX_PACKAGE_BYTES,
        announce: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.store, self.base_dir, self.owner_of, self.on_chain = store, base_dir, owner_of, on_chain
        self.max_package_bytes, self.announce = max_package_bytes, announce

    @property
    def max_bytes(self) -> int:
        """The largest upload body accepted."""
        return max_upload_bytes(self.max_package_bytes)

    @property
    def spool_dir(self) -> Path:
        """Where an upload too big for memory is spooled while it arrives (on the store's file system)."""
        return self.store.root / ".tmp"

    def install(
        self, data: BinaryIO, *, expected_adapter_id: str | None = None, cached: bool = False
    ) -> VerifiedPackage:
        """Check the upload's manifest, signature and on-chain owner before writing any weight byte, then
        write each file capped at its declared size, and let the store verify and install the whole.
        `expected_adapter_id`: the package must be that adapter (a source asked for it by id); `cached`: fetched
        for a request, not uploaded by the operator (AdapterStore.install_from_tmp)."""
        from eth_utils import to_checksum_address

        from node.adapters import verify_manifest_and_signature
        from node.adapters.basemodel import read_config
        from node.adapters.verify import check_for_base

        with open_upload(data, max_package_bytes=self.max_package_bytes) as up:
            adapter_id = up.manifest.adapter_id
            if expected_adapter_id is not None and adapter_id != expected_adapter_id:
                raise UploadRefused(f"package is adapter {adapter_id}, not {expected_adapter_id} as asked")
            check_for_base(up.manifest, read_config(self.base_dir))  # before a weight byte is written or hashed
            owner = self.owner_of(adapter_id)
            if self.on_chain and owner is None:
                raise UploadRefused(f"adapter {adapter_id} is not registered on chain: publish it first")
            _, signer = verify_manifest_and_signature(up.manifest_bytes, up.signature_bytes, domain=self.store.domain)
            if self.on_chain and to_checksum_address(owner) != signer:
                raise UploadRefused(f"package is signed by {signer}, but the adapter's registered owner is {owner}")
            tmp = self.store.tmp_dir()
            try:
                up.extract(tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        # every file was hashed against the signed manifest as it was written
        return self.store.install_from_tmp(
            tmp, expected_owner=owner, base_dir=self.base_dir, hashes_checked=True, cached=cached
        )

    def without_paths(self, message: str) -> str:
        """An error for a remote caller, with this machine's folders taken out."""
        for root in {
            str(self.store.root.resolve()),
            str(self.store.root),
            str(self.base_dir.resolve()),
            str(self.base_dir),
        }:
            if root and root != ".":
                message = message.replace(root, "<node>")
        return message
