"""The content-addressed package store: `root/<adapter id>/` holds only packages that passed verification.

Writers fill a temporary folder inside `root/.tmp/`, verify it, and rename it into place, so a
package is either whole and verified or not visible at all, even if the process dies mid-write.

Hashes are checked once: a full verification leaves a stamp in `root/.verified/<adapter id>.json` (each
file's size, modification time and inode), and a later read re-hashes only a package whose files no
longer match their stamp. A 168 MB adapter then loads without reading its bytes twice (hashing cost
~150 ms of a cold load on the H200 host, bench/NOTES.md); a file rewritten since (by a writer that
changes its time, size or inode) is hashed again and refused if it no longer matches its manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

from common.files import WRITER, WRITER_PATTERN, writer_gone
from ledger.types import Domain
from node.adapters.errors import ForeignSignature, PackageError
from node.adapters.manifest import MANIFEST_FILE, check_id
from node.adapters.verify import VerifiedPackage, verify_package

log = logging.getLogger(__name__)

INSTALL_LOCK = ".install.lock"  # in the store's root: installs take it in turn (AdapterStore._installing)
INSTALL_LOCK_WAIT_S = 60.0  # an install holds it for renames only: past this its holder is stuck, not busy
TMP_IDLE_S = 600.0  # a temporary folder unwritten this long at a node's start is a dead writer's (clean_tmp)
_TMP_NAME = re.compile(rf"(?:pkg|rm)-{WRITER_PATTERN}-")  # a temporary folder's writer (tmp_dir, remove)
_STORE_LOCKS: dict[str, threading.Lock] = {}  # a store's real path -> its installs' lock in this process
_THREADS_LOCK = threading.Lock()


class AdapterStore:
    """Verified adapter packages on disk, addressed by adapter id. With a `domain` (the node's
    deployment) only packages signed for that chain and registry are installed or read back."""

    def __init__(self, root: str | Path, *, base_dir: str | Path | None = None, domain: Domain | None = None):
        self.root = Path(root)
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.domain = domain
        self._tmp_root = self.root / ".tmp"
        self._tmp_root.mkdir(parents=True, exist_ok=True)
        self._stamps = self.root / ".verified"
        self._stamps.mkdir(exist_ok=True)

    def path_for(self, adapter_id: str) -> Path:
        return self.root / check_id(adapter_id)

    def has(self, adapter_id: str) -> bool:
        return (self.path_for(adapter_id) / MANIFEST_FILE).is_file()

    def get(self, adapter_id: str, *, verify_hashes: bool = True) -> VerifiedPackage | None:
        """The installed package with this id, re-verified, or None if the store lacks it (or holds it
        signed for another registry than the store's: it must be fetched or handed over again).
        `verify_hashes`: hash (and value-check) the files unless they still match the stamp of their
        last full verification; False checks sizes and the signature only."""
        path = self.path_for(adapter_id)
        if not (path / MANIFEST_FILE).is_file():
            return None
        # taken before any hashing: a file changed while or after it is read no longer matches next time
        stamp = self._stamp_of(path) if verify_hashes else None
        rehash = verify_hashes and stamp != self._read_stamp(adapter_id)
        try:
            pkg = verify_package(path, base_dir=self.base_dir, hashes=rehash, domain=self.domain)
        except ForeignSignature as e:
            log.warning("store entry %s is not usable here: %s", adapter_id, e)
            return None
        if pkg.adapter_id != adapter_id:
            raise PackageError(f"store entry {adapter_id} holds adapter {pkg.adapter_id}")
        if rehash:
            self._write_stamp(adapter_id, stamp)
        return pkg

    @staticmethod
    def _stamp_of(path: Path) -> dict[str, list[int]]:
        """What identifies each file's current contents without reading them."""
        out = {}
        for p in path.iterdir():
            st = p.lstat()
            out[p.name] = [st.st_size, st.st_mtime_ns, st.st_ino]
        return out

    def _read_stamp(self, adapter_id: str) -> dict | None:
        try:  # our own small file; anything unreadable just means "hash again"
            doc = json.loads((self._stamps / f"{adapter_id}.json").read_text())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def _write_stamp(self, adapter_id: str, stamp: dict[str, list[int]]) -> None:
        tmp = self._stamps / f".{adapter_id}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_text(json.dumps(stamp))
        os.replace(tmp, self._stamps / f"{adapter_id}.json")

    def _drop_stamp(self, adapter_id: str) -> None:
        (self._stamps / f"{adapter_id}.json").unlink(missing_ok=True)

    def list(self) -> list[VerifiedPackage]:
        """Every installed package (size-checked; hashes were checked at install)."""
        out = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith("0x") and (entry / MANIFEST_FILE).is_file():
                try:
                    if (pkg := self.get(entry.name, verify_hashes=False)) is not None:
                        out.append(pkg)
                except PackageError as e:
                    log.warning("skipping damaged store entry %s: %s", entry.name, e)
        return out

    def by_name(self, name: str) -> list[VerifiedPackage]:
        """Installed packages with this name, newest registration order unknown here: sorted by version."""
        return sorted((p for p in self.list() if p.name == name), key=lambda p: p.manifest.version)

    def tmp_dir(self) -> Path:
        """A fresh, empty temporary folder inside the store (same filesystem, so the final rename is atomic)."""
        return Path(tempfile.mkdtemp(prefix=f"pkg-{WRITER}-", dir=self._tmp_root))

    def install(
        self, src_dir: str | Path, *, expected_owner: str | None = None, base_dir: str | Path | None = None
    ) -> VerifiedPackage:
        """Copy a package folder into the store, verifying the copy; installing an id twice is a no-op."""
        src_dir = Path(src_dir)
        if not src_dir.is_dir():
            raise PackageError(f"{src_dir} is not a folder")
        tmp = self.tmp_dir()
        try:
            for p in src_dir.iterdir():
                if p.is_symlink() or not p.is_file():  # a link would be copied as whatever it points at
                    raise PackageError(f"{p.name[:128]!r} is not a plain file; packages hold plain files only")
                shutil.copyfile(p, tmp / p.name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.install_from_tmp(tmp, expected_owner=expected_owner, base_dir=base_dir)

    def install_from_tmp(
        self,
        tmp: Path,
        *,
        expected_owner: str | None = None,
        base_dir: str | Path | None = None,
        hashes_checked: bool = False,
    ) -> VerifiedPackage:
        """Verify a filled temporary folder and rename it into place; the folder is gone afterwards either way.

        `base_dir` (else the store's own) makes the check include the base model's identity and shapes.
        `hashes_checked`: the writer hashed every file against this manifest as it wrote it (the p2p
        transfer does), so reading the files back to hash them again would only cost time.
        """
        try:
            pkg = verify_package(
                tmp,
                base_dir=base_dir or self.base_dir,
                expected_owner=expected_owner,
                hashes=not hashes_checked,
                domain=self.domain,
                values=True,
            )
            final = self.path_for(pkg.adapter_id)
            with self._installing():
                return self._put_in_place(tmp, pkg, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @contextlib.contextmanager
    def _installing(self):
        """One install at a time in this store, from any thread or process, from the look at what is in place to
        the rename: two installs of one id (an operator's upload racing the engine's fetch, `adapter fetch
        --store` beside a running node) had the second rename fail on the first's folder (a raw OSError naming
        the node's paths), or remove the folder the first had just put in place (red team). The checks before
        (hashing) run outside it."""
        with _THREADS_LOCK:
            threads = _STORE_LOCKS.setdefault(os.path.realpath(self.root), threading.Lock())
        # a process's threads by a lock of its own (on NFS, flock is a POSIX lock: the process's, not a thread's);
        # processes by flock, on a descriptor opened read-only (another user of the store's group may take it)
        if not threads.acquire(timeout=INSTALL_LOCK_WAIT_S):
            raise PackageError(f"another install in this process held the store's lock for {INSTALL_LOCK_WAIT_S:g} s")
        try:
            fd = os.open(self.root / INSTALL_LOCK, os.O_RDONLY | os.O_CREAT, 0o664)
            try:
                # polled, not waited for: a holder stopped (a suspended `adapter fetch --store`) must not hold the
                # node's installs, and their worker threads, for ever
                give_up = time.monotonic() + INSTALL_LOCK_WAIT_S
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= give_up:
                            raise PackageError(
                                f"another process held the store's install lock ({INSTALL_LOCK}) for "
                                f"{INSTALL_LOCK_WAIT_S:g} s"
                            ) from None
                        time.sleep(0.05)
                yield
            finally:
                os.close(fd)  # and the flock with it
        finally:
            threads.release()

    def _put_in_place(self, tmp: Path, pkg: VerifiedPackage, final: Path) -> VerifiedPackage:
        """The verified temporary folder `tmp` as the store's entry for `pkg` (_installing held; the caller removes
        `tmp` on a failure)."""
        if (final / MANIFEST_FILE).is_file():
            try:
                existing = self.get(pkg.adapter_id, verify_hashes=False)
            except PackageError as e:  # damaged in place (a power cut, a disk error): this copy replaces it
                log.warning("store entry %s is damaged (%s); replacing it with the copy being installed", final.name, e)
                existing = None
            if existing is not None and existing.signer == pkg.signer:
                shutil.rmtree(tmp, ignore_errors=True)
                return existing
            self.remove(pkg.adapter_id)  # signed for another registry, or by someone else: superseded
        if final.exists():  # a leftover without a manifest cannot be a finished install
            shutil.rmtree(final)
        for p in tmp.iterdir():
            os.chmod(p, 0o444)
        self._drop_stamp(pkg.adapter_id)
        os.replace(tmp, final)
        # hashed and value-checked just now (or as written); the rename keeps sizes, mtimes and inodes
        self._write_stamp(pkg.adapter_id, self._stamp_of(final))
        log.info("installed adapter %s (%s) signed by %s", pkg.adapter_id, pkg.name, pkg.signer)
        return dataclasses.replace(pkg, path=final)  # what was verified is what now sits at `final`

    def remove(self, adapter_id: str) -> bool:
        """Delete an installed package; True if there was one."""
        path = self.path_for(adapter_id)
        if not path.exists():
            return False
        doomed = Path(tempfile.mkdtemp(prefix=f"rm-{WRITER}-", dir=self._tmp_root))  # one a removal
        self._drop_stamp(adapter_id)
        try:
            os.replace(path, doomed)  # disappear atomically (over the empty folder), then delete at leisure
        except FileNotFoundError:  # another removal took it first
            return False
        finally:
            shutil.rmtree(doomed, ignore_errors=True)
        return True

    def clean_tmp(self, *, idle_s: float = TMP_IDLE_S) -> int:
        """Remove temporary folders left by a process that died mid-write; returns how many. A folder's name says
        its writer (`common.files.WRITER`): one whose writer has ended goes at once (a node killed mid-fetch and
        restarted kept 2 MB a crash). Any other written in the last `idle_s` is another process's write going on
        (`adapter fetch --store` beside a node that starts: the node removed it, and the install failed on a raw
        FileNotFoundError; review), and is left."""
        n, now = 0, time.time()
        for p in self._tmp_root.iterdir():
            named = _TMP_NAME.match(p.name)
            try:
                inside = [c.lstat().st_mtime for c in p.iterdir()] if p.is_dir() else []
                written = max([p.lstat().st_mtime, *inside])
            except OSError:  # gone meanwhile: its writer finished or removed it
                continue
            if now - written < idle_s and not (named and writer_gone(int(named[1]), int(named[2]), named[3])):
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            n += 1
        return n
