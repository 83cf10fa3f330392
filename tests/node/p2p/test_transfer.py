"""A whole package exchange in one process, over a stream that cuts the bytes where a test says: the
receiver writes exactly the provider's files whatever the read sizes (one byte at a time, pieces
across frame boundaries, whole frames), and refuses a flipped byte."""

from __future__ import annotations

import itertools
import random

import pytest
import trio

from node.p2p.errors import BadBytes, FrameError
from node.p2p.protocol import (
    MAX_PAYLOAD,
    encode,
    package_frames,
    package_sections,
    request_package,
)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A package whose weights take two DATA frames (1.1 MB)."""
    from eth_account import Account

    from tests.utils.factories import make_base, make_package

    work = tmp_path_factory.mktemp("big")
    base = make_base(work / "base", hidden_size=512, intermediate_size=1024, num_layers=2, num_heads=8, num_kv_heads=8)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    pkg = make_package(base, work / "pkg", account=Account.create(), rank=16, targets=targets)
    assert (pkg.path / "adapter_model.safetensors").stat().st_size > MAX_PAYLOAD
    return pkg


class CutStream:
    """Serves `data` to reads in pieces of the sizes `cuts` yields (never more than asked for)."""

    def __init__(self, data: bytes, cuts) -> None:
        self.data = memoryview(data)
        self.cuts = cuts
        self.written = bytearray()

    async def read(self, n: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        if not self.data:
            raise EOFError
        take = min(n or len(self.data), next(self.cuts), len(self.data))
        piece, self.data = self.data[:take].tobytes(), self.data[take:]
        return piece

    async def write(self, data: bytes) -> None:
        self.written += data


def _wire(pkg) -> bytes:
    return b"".join(bytes(f) for f in package_frames(pkg.path, pkg.adapter_id))


def _receive(pkg, data: bytes, cuts, dest):
    async def main():
        return await request_package(CutStream(data, cuts), pkg.adapter_id, dest, timeout=5, max_bytes=1 << 30)

    return trio.run(main)


def test_served_frames_are_the_sections_encoded(packages, big):
    for pkg in (packages.main, big):
        assert _wire(pkg) == b"".join(encode(k, p) for k, p in package_sections(pkg.path, pkg.adapter_id))


@pytest.mark.parametrize(
    ("which", "cuts"),
    [
        ("small", lambda: itertools.repeat(1)),  # a byte per read: every small piece is joined, none lost
        ("big", lambda: itertools.repeat(97)),  # headers split across reads
        ("big", lambda: itertools.repeat(MAX_PAYLOAD + 5)),  # greedy reads spanning frames
        ("big", lambda: (random.Random(0).choice([1, 3, 5000, 20000, 70000]) for _ in itertools.count())),
    ],
    ids=["1", "97", "frame", "mixed"],
)
def test_files_arrive_whole_whatever_the_read_sizes(packages, big, tmp_path, which, cuts):
    pkg = packages.main if which == "small" else big
    plan = _receive(pkg, _wire(pkg), cuts(), tmp_path)
    for f in plan.files:
        assert (tmp_path / f.path).read_bytes() == (pkg.path / f.path).read_bytes()


@pytest.mark.parametrize("at", [-100, -(MAX_PAYLOAD + 200)], ids=["last-frame", "first-frame"])
def test_a_flipped_byte_is_refused(big, tmp_path, at):
    pkg = big
    wire = bytearray(_wire(pkg))
    wire[at] ^= 0xFF  # in the weights' bytes (the last file), in its second frame or its first
    with pytest.raises(BadBytes, match="sha256 differs from the manifest"):
        _receive(pkg, bytes(wire), itertools.repeat(20000), tmp_path)


def test_a_package_cut_short_is_refused(big, tmp_path):
    pkg = big
    wire = _wire(pkg)
    with pytest.raises(FrameError, match="stream ended after"):
        _receive(pkg, wire[: len(wire) - 200], itertools.repeat(20000), tmp_path)
