"""What a fetcher may write: the file list of a manifest that hashes to the requested adapter id.

The file list decides which bytes land on disk before the full package check runs, so the
manifest is checked first: it must parse within limits (the package format refuses unsafe file
names), be in canonical form and hash to the adapter id asked for.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from node.adapters import MANIFEST_FILE, SIGNATURE_FILE
from node.adapters.manifest import MAX_MANIFEST_BYTES, parse_manifest
from common.wire import parse_json
from node.p2p.errors import BadBytes

__all__ = ["MANIFEST_FILE", "SIGNATURE_FILE", "FileHasher", "PlannedFile", "TransferPlan", "plan_transfer"]

MAX_FILES = 64


@dataclass(frozen=True, slots=True)
class PlannedFile:
    path: str  # a flat file name inside the package folder
    size: int
    sha256: str  # 64 lowercase hex digits


@dataclass(frozen=True, slots=True)
class TransferPlan:
    adapter_id: str
    files: tuple[PlannedFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def plan_transfer(manifest_bytes: bytes, adapter_id: str, *, max_bytes: int) -> TransferPlan:
    """Check the manifest against `adapter_id` and return its file list; BadBytes otherwise."""
    try:
        manifest = parse_manifest(parse_json(manifest_bytes, max_bytes=MAX_MANIFEST_BYTES, max_depth=8, what="manifest"))
    except ValueError as e:  # PackageError and UntrustedJSONError are ValueErrors
        raise BadBytes(f"provider sent an invalid manifest: {e}") from e
    if manifest.canonical_bytes() != bytes(manifest_bytes):
        # the id is the hash of the canonical form: other bytes (duplicate keys, spaces, key order)
        # would verify here and mean something else to another parser
        raise BadBytes("provider sent a manifest that is not in canonical form")
    if manifest.adapter_id != adapter_id:
        raise BadBytes(f"manifest hashes to {manifest.adapter_id}, not the requested adapter id {adapter_id}")
    if len(manifest.files) > MAX_FILES:
        raise BadBytes(f"manifest lists {len(manifest.files)} files; at most {MAX_FILES} are accepted")
    plan = TransferPlan(adapter_id, tuple(PlannedFile(f.path, f.size, f.sha256) for f in manifest.files))
    if plan.total_bytes > max_bytes:
        raise BadBytes(f"package is {plan.total_bytes} bytes; this node accepts at most {max_bytes}")
    return plan


class FileHasher:
    """Checks one planned file while it arrives: never more bytes than its size, hash at the end.

    `reserve(n)` counts bytes as they arrive (refusing any beyond the size at once); `update`
    hashes them, possibly later on a worker thread.
    """

    __slots__ = ("file", "remaining", "_hashed", "_h")

    def __init__(self, file: PlannedFile) -> None:
        self.file = file
        self.remaining = file.size
        self._hashed = 0
        self._h = hashlib.sha256()

    def reserve(self, n: int) -> None:
        if n > self.remaining:
            raise BadBytes(f"{self.file.path}: peer sent more than the manifest's {self.file.size} bytes")
        self.remaining -= n

    def update(self, chunk: bytes) -> None:
        if self._hashed + len(chunk) > self.file.size:
            raise BadBytes(f"{self.file.path}: peer sent more than the manifest's {self.file.size} bytes")
        self._h.update(chunk)
        self._hashed += len(chunk)

    def finish(self) -> None:
        if self.remaining or self._hashed != self.file.size:
            raise BadBytes(f"{self.file.path}: {self.file.size - self._hashed} bytes missing before the next section")
        if self._h.hexdigest() != self.file.sha256:
            raise BadBytes(f"{self.file.path}: sha256 differs from the manifest (tampered or corrupt bytes)")
