"""The content-addressed package store: `root/<adapter id>/` holds only packages that passed verification.

Writers fill a temporary folder inside `root/.tmp/`, verify it, and rename it into place, so a
package is either whole and verified or not visible at all, even if the process dies mid-write.

Hashes are checked once: a full verification leaves a stamp in `root/.verified/<adapter id>.json` (each
file's size, modification time and inode), and a later read re-hashes only a package whose files no
longer match their stamp. A 168 MB adapter then loads without reading its bytes twice (hashing cost
~150 ms of a cold load on the H200 host, bench/NOTES.md); a file rewritten since (by a writer that
changes its time, size or inode) is hashed again and refused if it no longer matches its manifest.

Packages the node fetched on its own (from peers or an adapter source, for a request) are a cache: anyone who can
register adapters and send requests decides what it fetches, so its disk would fill. Each such entry has a marker
in `root/.cached/` whose time is its last use (installed, loaded, or serving a request: the engine says so once a
minute); an install that would take the fetched entries past `max_cache_bytes`, or the disk under `min_free_bytes`,
first removes the least recently used of them, and is refused (StoreFull), removing nothing, if that cannot be
enough. Never removed: what the `protected` callbacks name (what the engine loads or may read again, what the p2p
server is sending), an entry used in the last `EVICT_GRACE_S`, and what the operator put there (an upload, `adapter
fetch --store`, a pin: no marker), as entries from before markers existed.
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
from collections.abc import Callable, Iterable
from pathlib import Path

from common.files import WRITER, WRITER_PATTERN, writer_gone
from ledger.types import Domain
from node.adapters.errors import ForeignSignature, PackageError, StoreFull
from node.adapters.manifest import MANIFEST_FILE, check_id
from node.adapters.verify import VerifiedPackage, verify_package

log = logging.getLogger(__name__)

INSTALL_LOCK = ".install.lock"  # in the store's root: installs take it in turn (AdapterStore._installing)
INSTALL_LOCK_WAIT_S = 60.0  # an install holds it for renames only: past this its holder is stuck, not busy
TMP_IDLE_S = 600.0  # a temporary folder unwritten this long at a node's start is a dead writer's (clean_tmp)
CACHED_DIR = ".cached"  # root/.cached/<adapter id>: an entry fetched for a request; its mtime is its last load
EVICT_GRACE_S = 60.0  # an entry used this recently is not evicted: it was just fetched for a load, say
_TMP_NAME = re.compile(rf"(?:pkg|rm)-{WRITER_PATTERN}-")  # a temporary folder's writer (tmp_dir, remove)
_STORE_LOCKS: dict[str, threading.Lock] = {}  # a store's real path -> its installs' lock in this process
_THREADS_LOCK = threading.Lock()


class AdapterStore:
    """Verified adapter packages on disk, addressed by adapter id. With a `domain` (the node's
    deployment) only packages signed for that chain and registry are installed or read back."""

    def __init__(
        self,
        root: str | Path,
        *,
        base_dir: str | Path | None = None,
        domain: Domain | None = None,
        max_cache_bytes: int | None = None,
        min_free_bytes: int = 0,
    ):
        """`max_cache_bytes`: the most the entries installed with `cached=True` may take together (None: no bound);
        `min_free_bytes`: such an install leaves at least this much of the disk free, or evicts, or is refused."""
        self.root = Path(root)
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.domain = domain
        self.max_cache_bytes = max_cache_bytes
        self.min_free_bytes = min_free_bytes
        self.on_evicted: list[Callable[[str], None]] = []  # called with each id evicted, on the installing thread
        # each names adapter ids in use now, never evicted (the engine's held and loading ones, the p2p uploads);
        # called on the installing thread, with the install lock held: quick, and taking no lock of the store's
        self.protected: list[Callable[[], Iterable[str]]] = []
        self._reserved = 0  # bytes of fetches downloading now, room made for them (reserve)
        self._reserved_lock = threading.Lock()
        self.evictions = 0  # fetched packages deleted to make room (GET /metrics)
        self.refusals = 0  # fetches refused for want of room (StoreFull)
        self._tmp_root = self.root / ".tmp"
        self._tmp_root.mkdir(parents=True, exist_ok=True)
        self._stamps = self.root / ".verified"
        self._stamps.mkdir(exist_ok=True)
        self._cached = self.root / CACHED_DIR  # made by the first cached install

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
        cached: bool = False,
    ) -> VerifiedPackage:
        """Verify a filled temporary folder and rename it into place; the folder is gone afterwards either way.

        `base_dir` (else the store's own) makes the check include the base model's identity and shapes.
        `hashes_checked`: the writer hashed every file against this manifest as it wrote it (the p2p
        transfer does), so reading the files back to hash them again would only cost time.
        `cached`: fetched for a request, not put here by the operator: held to the cache's bounds, and evictable
        (StoreFull when no room can be made). An id installed already keeps its standing, but the operator's
        install of a cached one makes it the operator's.
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
                return self._put_in_place(tmp, pkg, final, cached=cached)
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

    def _put_in_place(self, tmp: Path, pkg: VerifiedPackage, final: Path, *, cached: bool) -> VerifiedPackage:
        """The verified temporary folder `tmp` as the store's entry for `pkg` (_installing held; the caller removes
        `tmp` on a failure)."""
        if not cached:
            self.keep(pkg.adapter_id)  # the operator's now, whichever copy ends up in place
        if (final / MANIFEST_FILE).is_file():
            try:
                existing = self.get(pkg.adapter_id, verify_hashes=False)
            except PackageError as e:  # damaged in place (a power cut, a disk error): this copy replaces it
                log.warning("store entry %s is damaged (%s); replacing it with the copy being installed", final.name, e)
                existing = None
            if existing is not None and existing.signer == pkg.signer:
                shutil.rmtree(tmp, ignore_errors=True)
                return existing
            was_cached = self._cached_marker(pkg.adapter_id).exists()
            self.remove(pkg.adapter_id)  # signed for another registry, or by someone else: superseded
            cached = cached and was_cached  # what the operator put here stays theirs
        if final.exists():  # a leftover without a manifest cannot be a finished install
            shutil.rmtree(final)
        if cached:
            self._make_room(_folder_bytes(tmp))
            self._cached.mkdir(exist_ok=True)
            self._cached_marker(pkg.adapter_id).touch()  # loaded soon: a fresh fetch is in its grace
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
        self.keep(adapter_id)  # after: a process killed between the two leaves a marker of nothing, not an entry unseen
        return True

    # ---- the cache of fetched packages ----
    def _cached_marker(self, adapter_id: str) -> Path:
        return self._cached / check_id(adapter_id)

    def touch(self, adapter_id: str) -> None:
        """Say a fetched entry was just used (the engine, before it reads it and as it serves it): evicted last, and
        not within EVICT_GRACE_S. A peer's download of it is no use of this node's: only the engine calls this."""
        with contextlib.suppress(FileNotFoundError, ValueError):  # the operator's, gone, or no entry's id at all
            os.utime(self._cached_marker(adapter_id))

    def keep(self, adapter_id: str) -> None:
        """Make an entry the operator's (a pin): never evicted, outside the cache's bound."""
        self._cached_marker(adapter_id).unlink(missing_ok=True)

    def make_room(self, incoming: int = 0) -> None:
        """Evict what the cache must so that `incoming` more fetched bytes fit; StoreFull when they cannot. With 0,
        a cheap look before a fetch downloads anything: a store over its bounds with nothing evictable says so."""
        with self._installing():
            self._make_room(incoming)

    def reserve(self, nbytes: int) -> None:
        """Make room for a fetch of `nbytes` about to download (its manifest read: nothing of it written yet), and
        hold that room until `release`: fetches downloading at once each count the others' (review: 6 at once, each
        let in by a look that counted none, overshot the bound by 6 packages). StoreFull when it cannot be made."""
        with self._installing():
            self._make_room(nbytes)
            with self._reserved_lock:
                self._reserved += nbytes

    def release(self, nbytes: int) -> None:
        """A reserved fetch ended (installed, where its bytes now count as the cache's, or given up)."""
        with self._reserved_lock:
            self._reserved = max(0, self._reserved - nbytes)

    def cached_bytes(self) -> int:
        """What the fetched entries take on disk."""
        return sum(size for _, size, _ in self._cache_entries())

    def _cache_entries(self) -> list[tuple[str, int, float]]:
        """The fetched entries as (adapter id, bytes, last load), least recently loaded first."""
        out = []
        markers = self._cached.iterdir() if self._cached.is_dir() else ()
        for marker in markers:
            try:
                used = marker.stat().st_mtime
                size = _folder_bytes(self.path_for(marker.name))
            except (OSError, ValueError):  # a stray file, or an entry removed since: no bytes of the cache
                continue
            out.append((marker.name, size, used))
        return sorted(out, key=lambda e: (e[2], e[0]))

    def _make_room(self, incoming: int) -> None:
        # _installing held: two installs must not both count the same room. All or nothing: an eviction that could
        # not make enough room removed every entry it could before it refused (review)
        bound, floor = self.max_cache_bytes, self.min_free_bytes
        if bound is None and floor <= 0:
            return
        entries = self._cache_entries()
        # the room held for fetches still downloading counts as used: what they have written is in .tmp, on this
        # disk (counted once more, at most: the conservative side); `incoming` is in .tmp already, or reserved
        with self._reserved_lock:
            reserved = self._reserved
        used = sum(size for _, size, _ in entries) + reserved
        free = shutil.disk_usage(self.root).free - reserved if floor > 0 else 0
        over = 0 if bound is None else max(0, used + incoming - bound)
        under = max(0, floor - free) if floor > 0 else 0
        if not over and not under:
            return
        now = time.time()
        in_use = self._in_use()
        doomed, freed = [], 0
        for adapter_id, size, last in entries:  # least recently used first
            if freed >= max(over, under):
                break
            if adapter_id in in_use or now - last < EVICT_GRACE_S:
                continue
            doomed.append((adapter_id, size, last))
            freed += size
        if freed < max(over, under):
            self.refusals += 1
            raise StoreFull(self._full(incoming, used, free, over, under))
        for adapter_id, size, last in doomed:
            # looked at again: a load may have begun since the list was made (it would fetch it again, whole)
            if adapter_id in self._in_use() or time.time() - self._last_use(adapter_id) < EVICT_GRACE_S:
                continue
            if self.remove(adapter_id):
                self.evictions += 1
                log.info(
                    "evicted fetched adapter %s (%d bytes, last used %.0f s ago) to make room",
                    adapter_id,
                    size,
                    now - last,
                )
                for callback in self.on_evicted:
                    callback(adapter_id)

    def _in_use(self) -> set[str]:
        return {aid for names in self.protected for aid in names()}

    def _last_use(self, adapter_id: str) -> float:
        try:
            return self._cached_marker(adapter_id).stat().st_mtime
        except OSError:  # gone: the operator's now, or removed
            return float("inf")

    def _full(self, incoming: int, used: int, free: int, over: int, under: int) -> str:
        """StoreFull's one line: which bound, and why no eviction could meet it."""
        if over and incoming > (self.max_cache_bytes or 0):
            return (
                f"this node's store cannot take a fetched package of {incoming:,} bytes: its bound for fetched "
                f"adapters is {self.max_cache_bytes:,} bytes"
            )
        what = (
            f"fetched adapters take {used:,} of {self.max_cache_bytes:,} bytes"
            if over
            else f"{free:,} bytes of its disk are free, under the {self.min_free_bytes:,} it keeps"
        )
        return (
            f"this node's store has no room for {incoming:,} more bytes: {what}, and what it could evict is in use "
            f"(held or loading, being sent to a peer, or used in the last {EVICT_GRACE_S:g} s)"
        )

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


def _folder_bytes(path: Path) -> int:
    """The bytes of a package folder's files."""
    return sum(p.lstat().st_size for p in path.iterdir())
