"""The Triton paged decode attention against the SDPA path (float64) on fresh random caches: GQA
groups of 1..4 (and 3, padded), head sizes that are not powers of two, cache blocks of 5, 8 and 16
tokens, sliding windows, contexts from 1 token to several blocks, scattered block tables; and the fp8
cache (attention.py) read by both paths against the float64 attention over the values it dequantizes to."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from node.engine.layers.attention import LayerKV, allocate_kv, build_metadata, gather_kv, paged_attention, write_kv  # noqa: E402
from node.engine.layers.triton_attention import paged_decode_attention  # noqa: E402


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def fp8_cache(k: torch.Tensor, v: torch.Tensor) -> tuple[LayerKV, LayerKV]:
    """k, v as an fp8 cache (written through write_kv) and, in float64, the values it holds."""
    nb, bs, h, d = k.shape
    kv = allocate_kv(nb, bs, h, d, k.dtype, "fp8", "cpu")
    write_kv(kv, k.view(-1, h, d), v.view(-1, h, d), torch.arange(nb * bs))
    exact = [(c.double() * s.double().unsqueeze(-1)) for c, s in ((kv.k, kv.k_scale), (kv.v, kv.v_scale))]
    return kv, LayerKV(*exact)


def run_case(
    device, dtype, heads, kv_heads, head_dim, block_size, window, contexts, seed, block_n=None, fp8=False, scale=1.0
):
    g = torch.Generator().manual_seed(seed)
    blocks = sum(-(-c // block_size) for c in contexts) + 3
    k_cache = (scale * torch.randn(blocks, block_size, kv_heads, head_dim, generator=g)).to(dtype)
    v_cache = (scale * torch.randn(blocks, block_size, kv_heads, head_dim, generator=g)).to(dtype)
    if fp8:
        kv, exact = fp8_cache(k_cache, v_cache)
    else:
        kv, exact = LayerKV(k_cache, v_cache), LayerKV(k_cache.double(), v_cache.double())
    order = list(range(blocks))
    random.Random(seed).shuffle(order)
    tables, i = [], 0
    for c in contexts:
        n = -(-c // block_size)
        tables.append(order[i : i + n])
        i += n
    q = torch.randn(len(contexts), heads, head_dim, generator=g).to(dtype)
    meta = build_metadata([[c - 1] for c in contexts], tables, block_size, window, torch.device("cpu"))
    ref = paged_attention(q.double(), exact, meta)  # [B, H, d]
    if fp8:  # the SDPA path reads the fp8 cache too
        assert rel(paged_attention(q, kv, meta), ref) < (1e-2 if dtype == torch.bfloat16 else 1e-5)
    out = torch.full_like(q, float("nan"), device=device)  # poisoned: every element must be written
    ctx = torch.tensor(contexts, dtype=torch.int32, device=device)
    got = paged_decode_attention(
        q.to(device),
        LayerKV(*(None if t is None else t.to(device) for t in kv)),
        meta.block_tables.to(device),
        ctx,
        window,
        out=out,
        block_n=block_n,
    )
    assert got.data_ptr() == out.data_ptr() and torch.isfinite(out).all()
    return rel(out, ref)


@pytest.mark.parametrize("block_n", [None, 16], ids=["default", "block16"])
@pytest.mark.parametrize("window", [None, 7], ids=["full", "window7"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, block_size",
    [
        (4, 2, 32, 8),  # the tiny test models
        (6, 2, 24, 5),  # group of 3 and d = 24 (both padded), blocks of 5
        (4, 4, 16, 16),  # plain multi-head
    ],
)
def test_paged_decode_matches_sdpa(triton_device, heads, kv_heads, head_dim, block_size, dtype, window, block_n):
    contexts = [1, block_size, block_size + 1, 3 * block_size + 2, 45]
    err = run_case(
        triton_device,
        dtype,
        heads,
        kv_heads,
        head_dim,
        block_size,
        window,
        contexts,
        seed=heads * 100 + head_dim + block_size + (window or 0),
        block_n=block_n,
    )
    assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5), err


@pytest.mark.parametrize("scale", [1.0, 1e-3, 300.0], ids=["unit", "tiny", "large"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", [(4, 2, 32, 8), (6, 2, 24, 5)])
def test_fp8_cache_decode_matches_sdpa(triton_device, heads, kv_heads, head_dim, block_size, dtype, scale):
    """Both paths read an fp8 cache as the values it dequantizes to, whatever the keys' and values' magnitude
    (a per-vector scale: values of 1e-3 or 300 keep e4m3's precision)."""
    contexts = [1, block_size + 1, 3 * block_size + 2, 45]
    err = run_case(
        triton_device, dtype, heads, kv_heads, head_dim, block_size, None, contexts, seed=7, fp8=True, scale=scale
    )
    assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5), err


def test_fp8_cache_error_against_the_unquantized_cache():
    """What fp8 costs: attention over an fp8 cache against the same attention over the fp32 values written,
    within the bound e4m3's 3 mantissa bits allow (half an ulp: 2**-4 relative per element), at every scale."""
    g = torch.Generator().manual_seed(3)
    for scale in (1e-3, 1.0, 300.0):
        k = scale * torch.randn(8, 8, 2, 32, generator=g)
        v = scale * torch.randn(8, 8, 2, 32, generator=g)
        kv, exact = fp8_cache(k, v)
        assert (exact.k - k.double()).abs().max() <= 2**-4 * k.abs().amax(-1, keepdim=True).double().max()
        q = torch.randn(3, 4, 32, generator=g) / scale
        meta = build_metadata([[c - 1] for c in (5, 12, 30)], [[0], [1, 2], [3, 4, 5, 6]], 8, None, torch.device("cpu"))
        full = paged_attention(q.double(), LayerKV(k.double(), v.double()), meta)
        err = rel(paged_attention(q, kv, meta), full)
        assert 1e-4 < err < 0.05, err  # not exact (it is fp8), and no worse than a few percent


def test_fp8_cache_never_written_slots_read_as_zero():
    kv = allocate_kv(2, 4, 1, 8, torch.float32, "fp8", "cpu")
    k, v = gather_kv(kv, torch.tensor([[0, 1]]), torch.float32)
    assert torch.equal(k, torch.zeros_like(k)) and torch.equal(v, torch.zeros_like(v))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_llama3_8b_decode_shape_on_cuda():
    """Bench shape: 32 heads on 8 KV heads, d 128, blocks of 16, 64 sequences of ~190 tokens."""
    contexts = [129 + (i * 37) % 120 for i in range(64)]
    err = run_case(torch.device("cuda"), torch.bfloat16, 32, 8, 128, 16, None, contexts, seed=5)
    assert err < 1e-2, err
