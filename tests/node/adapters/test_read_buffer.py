"""weights.read_lora_buffer: what it reads equals what safetensors reads, whatever the header's order
against the file's, the dtypes' mix, the sizes (aligned or not) and the count (past one preadv's
IOV_MAX views); a file cut short after its header was checked is refused in one line."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

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
