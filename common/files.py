"""Secrets written to disk whole or not at all: a process killed mid-write, or a disk that fills, leaves the
file as it was (or absent), never empty or cut short; and no temporary copy of the secret stays behind: one a
killed writer left is removed by the next write of that file."""

from __future__ import annotations

import glob
import os
import re
import secrets
import time
from pathlib import Path

# a temporary file whose writer (by the process id in its name) is gone is a leftover once it is this old (a write
# takes milliseconds; the margin keeps a writer in another process namespace, whose id means nothing here, safe)
_DEAD_WRITER_S = 1.0
# and any is, whoever wrote it, once it is this old
_LEFTOVER_S = 600.0


def write_private(path: Path, data: bytes, *, replace: bool) -> bool:
    """Write `data` to `path`, readable by its owner only (0600): to a temporary file beside it, flushed to
    disk, then renamed over `path` (`replace`) or linked to it only where no file is yet. Returns False when
    `replace` is False and `path` existed (it is left as it was: two processes creating one file at once
    both end up reading the first one's)."""
    _remove_leftovers(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links: created only where none is (not atomic there)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            else:
                tmp.unlink()  # at once: a kill while the folder syncs must leave no second name for the secret
        _sync_folder(path.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _remove_leftovers(path: Path) -> None:
    """Remove the temporary copies of `path` that killed writers left (named ".<name>.<pid>.<random>.tmp")."""
    now = time.time()
    ours = re.compile(rf"\.{re.escape(path.name)}\.([0-9]+)\.[0-9a-f]{{8}}\.tmp")  # not another file's copies
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        named = ours.fullmatch(tmp.name)
        if named is None:
            continue
        try:
            age = now - tmp.lstat().st_mtime
            if age > _LEFTOVER_S or (age > _DEAD_WRITER_S and not _alive(int(named[1]))):
                tmp.unlink(missing_ok=True)
        except OSError:  # its writer finished meanwhile, or it is not ours to remove: the write goes on
            continue


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # no /proc: one namespace is all there is to tell
        return 0


# this process's mark on what it leaves in a shared folder: its pid namespace, its id there and a token of its own,
# so that a successor given the same id (a restart) still tells its predecessor's leftovers from its own, and a
# writer in another namespace (another container on the same volume, also pid 1) is never taken for a dead one
WRITER = f"{_pid_namespace()}.{os.getpid()}.{secrets.token_hex(4)}"
WRITER_PATTERN = r"([0-9]+)\.([0-9]+)\.([0-9a-f]{8})"  # a WRITER's three parts, as groups


def writer_gone(namespace: int, pid: int, token: str) -> bool:
    """Whether the writer that marked something `{namespace}.{pid}.{token}` (`WRITER`) is known to have ended:
    in this pid namespace, another process whose id is free, or one of this process's id with another token. One of
    another namespace, or a live process of that id (ids are reused), is not known: False."""
    if namespace != _pid_namespace():
        return False
    if pid == os.getpid():
        return f"{namespace}.{pid}.{token}" != WRITER
    return not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    except OverflowError:  # no process has that id
        return False
    return True


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename or link in it) to disk, where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
