"""The Triton paged decode attention against the SDPA path (float64) on fresh random caches: GQA
groups of 1..4 (and 3, padded), head sizes that are not powers of two, cache blocks of 5, 8 and 16
tokens, sliding windows, contexts from 1 token to several blocks, scattered block tables."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from node.engine.layers.attention import build_metadata, paged_attention  # noqa: E402
from node.engine.layers.triton_attention import paged_decode_attention  # noqa: E402


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def run_case(device, dtype, heads, kv_heads, head_dim, block_size, window, contexts, seed, block_n=None):
    g = torch.Generator().manual_seed(seed)
    blocks = sum(-(-c // block_size) for c in contexts) + 3
    k_cache = torch.randn(blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    order = list(range(blocks))
    random.Random(seed).shuffle(order)
    tables, i = [], 0
    for c in contexts:
        n = -(-c // block_size)
        tables.append(order[i : i + n])
        i += n
    q = torch.randn(len(contexts), heads, head_dim, generator=g).to(dtype)
    meta = build_metadata([[c - 1] for c in contexts], tables, block_size, window, torch.device("cpu"))
    ref = paged_attention(q.double(), k_cache.double(), v_cache.double(), meta)  # [B, H, d]
    out = torch.full_like(q, float("nan"), device=device)  # poisoned: every element must be written
    ctx = torch.tensor(contexts, dtype=torch.int32, device=device)
    got = paged_decode_attention(
        q.to(device),
        k_cache.to(device),
        v_cache.to(device),
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_llama3_8b_decode_shape_on_cuda():
    """Bench shape: 32 heads on 8 KV heads, d 128, blocks of 16, 64 sequences of ~190 tokens."""
    contexts = [129 + (i * 37) % 120 for i in range(64)]
    err = run_case(torch.device("cuda"), torch.bfloat16, 32, 8, 128, 16, None, contexts, seed=5)
    assert err < 1e-2, err
