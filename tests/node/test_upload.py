import io
import tarfile

import pytest

from node.adapters import PackageError
from node.upload import tar_package, untar_package


def tar_of(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, kind in entries:
            info = tarfile.TarInfo(name)
            if kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_round_trip(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "loramesh.json").write_text("{}")
    (src / "adapter_config.json").write_text('{"r": 1}')
    dst = tmp_path / "dst"
    dst.mkdir()
    untar_package(tar_package(src), dst)
    assert sorted(p.name for p in dst.iterdir()) == ["adapter_config.json", "loramesh.json"]


@pytest.mark.parametrize("entries,message", [
    ([("../escape.json", b"x", "file")], "escapes the package folder"),
    ([("/abs.json", b"x", "file")], "escapes the package folder"),
    ([("link.json", b"", "sym")], "is not a regular file"),
    ([("a.json", b"1", "file"), ("a.json", b"2", "file")], "names a file twice"),
])
def test_unsafe_archives_are_refused(tmp_path, entries, message):
    with pytest.raises(PackageError, match=message):
        untar_package(tar_of(entries), tmp_path)


def test_garbage_is_refused(tmp_path):
    with pytest.raises(PackageError, match="not a valid tar archive"):
        untar_package(b"\x00garbage" * 100, tmp_path)
