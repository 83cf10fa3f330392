"""Moving a package to a node over HTTP: a flat, uncompressed tar of the package's plain files.

The receiving side trusts nothing in the archive: only regular files with safe flat names are
written, sizes are capped, and the result still has to pass the full package check.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path
from typing import BinaryIO

from node.adapters.errors import PackageError
from node.adapters.manifest import RESERVED_FILES, check_file_name

MAX_UPLOAD_BYTES = 4 << 30
MAX_FILES = 64


def tar_package(pkg_dir: str | Path) -> bytes:
    """The package folder's plain files as a flat tar archive."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for p in sorted(Path(pkg_dir).iterdir()):
            if p.is_file():
                tar.add(p, arcname=p.name, recursive=False)
    return buf.getvalue()


def untar_package(data: bytes | BinaryIO, dest: Path) -> None:
    """Write a flat tar archive's (bytes or a file) regular files into `dest`, refusing anything else."""
    if isinstance(data, bytes):
        if len(data) > MAX_UPLOAD_BYTES:
            raise PackageError(f"upload of {len(data)} bytes is over the {MAX_UPLOAD_BYTES}-byte limit")
        data = io.BytesIO(data)
    try:
        with tarfile.open(fileobj=data, mode="r:") as tar:
            members = tar.getmembers()
            if len(members) > MAX_FILES:
                raise PackageError(f"upload holds {len(members)} entries, more than {MAX_FILES}")
            for m in members:
                if not m.isreg():
                    raise PackageError(f"upload entry {m.name!r} is not a regular file")
                if m.name not in RESERVED_FILES:  # manifest and signature travel with the files
                    check_file_name(m.name)
                src = tar.extractfile(m)
                assert src is not None  # regular files always have a body
                with (dest / m.name).open("xb") as out:
                    shutil.copyfileobj(src, out)
    except tarfile.TarError as e:
        raise PackageError(f"upload is not a valid tar archive: {e}") from e
    except FileExistsError as e:
        raise PackageError(f"upload names a file twice: {e.filename}") from e
