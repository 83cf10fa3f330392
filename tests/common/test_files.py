"""common.files.write_private: a secret is on disk whole or not at all, 0600, with no temporary copy left."""

from __future__ import annotations

import errno
import os

import pytest

from common import files
from common.files import write_private


def test_written_whole_and_private(tmp_path):
    path = tmp_path / "key"
    assert write_private(path, b"secret", replace=True)
    assert path.read_bytes() == b"secret" and path.stat().st_mode & 0o777 == 0o600
    assert write_private(path, b"newer", replace=True) and path.read_bytes() == b"newer"
    assert not write_private(path, b"other", replace=False) and path.read_bytes() == b"newer"  # kept
    assert write_private(tmp_path / "fresh", b"x", replace=False) and (tmp_path / "fresh").read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "key"]


@pytest.mark.parametrize("replace", [True, False])
def test_a_full_disk_leaves_the_old_file_and_no_copy_of_the_secret(tmp_path, monkeypatch, replace):
    # the gateway's key file was created empty and then written: a kill in between, or a short write, left an
    # empty key; and a full disk left the identity's encrypted key in a temporary file
    path = tmp_path / "key"
    if replace:
        path.write_bytes(b"old")

    def full(_fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        write_private(path, b"secret", replace=replace)
    assert [p.name for p in tmp_path.iterdir()] == (["key"] if replace else [])
    if replace:
        assert path.read_bytes() == b"old"


def test_a_file_system_without_hard_links_still_creates_once(tmp_path, monkeypatch):
    def no_links(*_a):
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(files.os, "link", no_links)
    path = tmp_path / "key"
    assert write_private(path, b"first", replace=False) and path.read_bytes() == b"first"
    assert not write_private(path, b"second", replace=False) and path.read_bytes() == b"first"
    assert path.stat().st_mode & 0o777 == 0o600 and [p.name for p in tmp_path.iterdir()] == ["key"]


# a writer killed (SIGKILL) at its fsync: the secret is in its temporary file, which nothing of its own removes
_KILLED_WRITER = r"""
import os, sys
from pathlib import Path
from common import files
files.os.fsync = lambda fd: os.kill(os.getpid(), 9)
files.write_private(Path(sys.argv[1]), b"secret", replace=sys.argv[2] == "replace")
"""


@pytest.mark.parametrize("replace", [True, False])
def test_a_copy_a_killed_writer_left_is_removed_by_the_next_write(tmp_path, replace):
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    path = tmp_path / "key"
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(path), "replace" if replace else "create"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        timeout=60,
    )
    assert killed.returncode == -9
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".key.") and left.read_bytes() == b"secret"  # the kill left a copy
    # a live writer's file (a slow disk's), in the middle of its write, is not touched
    busy = tmp_path / f".key.{os.getpid()}.00000000.tmp"
    busy.write_bytes(b"being written")
    old = time.time() - 5
    for p in (left, busy):  # the restart comes seconds later
        os.utime(p, (old, old))
    assert write_private(path, b"new", replace=replace) and path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [busy.name, "key"]


def test_only_this_files_own_leftovers_are_removed(tmp_path):
    """Review: the match took a sibling's copies too (`key.41000` is another file), and a "pid" of other digits
    (²) raised inside the write."""
    import time

    old = time.time() - 3600
    others = [tmp_path / ".key.41000.123.abcdef01.tmp", tmp_path / ".key.².abcdef01.tmp"]
    for p in others:
        p.write_bytes(b"not key's")
        os.utime(p, (old, old))
    assert write_private(tmp_path / "key", b"new", replace=True)
    assert all(p.exists() for p in others)
