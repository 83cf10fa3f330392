"""weights.read_lora_buffer: what it reads equals what safetensors reads, whatever the header's order
against the file's, the dtypes' mix, the sizes (aligned or not) and the count (past one preadv's
IOV_MAX views); a file cut short after its header was checked is refused in one line."""

import os
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from node.adapters import weights
from node.adapters.errors import PackageError
from node.adapters.weights import IOV_MAX, TENSOR_ALIGN, read_lora_buffer, read_safetensors_header


def _tensors(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8]
    out = {}
    for i in range(n):
        dt = dtypes[i % len(dtypes)]
        shape = (1 + i % 3, 1 + (7 * i) % 5)  # odd sizes: the buffer pads each to TENSOR_ALIGN
        t = torch.randn(shape, generator=g) * 100
        out[f"t{i:05d}"] = t.to(dt)
    out["empty"] = torch.zeros(0, 4)
    return out


@pytest.mark.parametrize("n", [10, 40, IOV_MAX + 37])
def test_read_equals_safetensors(tmp_path, monkeypatch, n):
    calls = []
    preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, views, offset: calls.append(len(views)) or preadv(fd, views, offset))
    path = tmp_path / "adapter_model.safetensors"
    save_file(_tensors(n), str(path))
    header = dict(reversed(read_safetensors_header(path).items()))  # not the file's order: the reader sorts
    buf, got = read_lora_buffer(path, header)
    want = load_file(str(path))
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name], t), name
        assert (got[name].data_ptr() - buf.data_ptr()) % TENSOR_ALIGN == 0
    # one read per IOV_MAX tensors: each read lets the engine thread take the GIL until it waits again
    assert calls == [min(IOV_MAX, n - k) for k in range(0, n, IOV_MAX)]


def test_read_into_a_reused_buffer_overwrites_it(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    save_file(_tensors(40), str(path))
    header = read_safetensors_header(path)
    reused = torch.full((1 << 16,), 0xAB, dtype=torch.uint8)
    _, got = read_lora_buffer(path, header, lambda n: reused[:n])
    for name, t in load_file(str(path)).items():
        assert torch.equal(got[name], t), name


@pytest.mark.parametrize("cut", [1, 300])
def test_file_cut_short_after_its_header_was_read(tmp_path, cut):
    path = tmp_path / "adapter_model.safetensors"
    save_file(_tensors(40), str(path))
    header = read_safetensors_header(path)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - cut)
    with pytest.raises(
        PackageError, match=r"^adapter_model\.safetensors: tensor 't\d+' was cut short after it was verified$"
    ):
        read_lora_buffer(path, header)


def test_a_large_package_is_read_in_parts_by_several_threads(tmp_path, monkeypatch):
    path = tmp_path / "adapter_model.safetensors"
    save_file(_tensors(40), str(path))
    monkeypatch.setattr(weights, "READ_SPLIT_BYTES", 256)
    monkeypatch.setattr(weights, "READ_THREADS", 3)
    threads = []
    preadv = os.preadv
    monkeypatch.setattr(
        os, "preadv", lambda fd, v, off: threads.append(threading.current_thread().name) or preadv(fd, v, off)
    )
    header = read_safetensors_header(path)
    _, got = read_lora_buffer(path, header)
    for name, t in load_file(str(path)).items():
        assert torch.equal(got[name], t), name
    assert len(threads) == 3 and all(n.startswith("adapter-read") for n in threads)
    with path.open("r+b") as f:  # a part cut short fails the whole read, in one line
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(PackageError, match=r"^adapter_model\.safetensors: tensor '\w+' was cut short"):
        read_lora_buffer(path, header)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_split_keeps_order_and_balances_bytes(n):
    sizes = [5, 1, 9, 3, 3, 8, 2, 7, 4, 6]
    targets = [(i, memoryview(bytearray(s)), f"t{i}") for i, s in enumerate(sizes)]
    parts = weights._split(targets, n)
    assert [t for p in parts for t in p] == targets and len(parts) == min(n, len(sizes))
    assert max(sum(len(t[1]) for t in p) for p in parts) <= sum(sizes) / len(parts) + max(sizes)
