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
