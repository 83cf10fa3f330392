"""The fused elementwise Triton ops of the CUDA path against the torch ops they replace, on fresh
random inputs: add + RMSNorm, rotary + KV-cache write, SiLU gate. fp32 must agree to rounding,
bf16 within METHOD.md's bound; untouched memory stays untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from node.engine.config import ModelConfig  # noqa: E402
from node.engine.layers.attention import LayerKV, write_kv  # noqa: E402
from node.engine.layers.fused import rms_norm, rope_and_cache, silu_mul  # noqa: E402
from node.engine.model import RMSNorm, Rotary  # noqa: E402

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def rel(out, ref) -> float:
    return ((out.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm()).item()


def bound(dtype) -> float:
    return 1e-2 if dtype == torch.bfloat16 else 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [96, 256])
def test_add_rms_norm_matches_torch(triton_device, dtype, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(7, n, generator=g).to(dtype)
    r = torch.randn(7, n, generator=g).to(dtype)
    norm = RMSNorm(n, 1e-5)
    norm.weight.data = (1 + 0.1 * torch.randn(n, generator=g)).to(dtype)
    dev = triton_device
    out = rms_norm(x.to(dev), norm.weight.data.to(dev), 1e-5)
    assert rel(out, norm(x)) < bound(dtype)
    want_res = x + r
    res = r.clone().to(dev)
    out = rms_norm(x.to(dev), norm.weight.data.to(dev), 1e-5, residual=res)
    # the residual stream, updated in place (bf16: the interpreter truncates where the GPU rounds)
    assert torch.equal(res.cpu(), want_res) if dtype == torch.float32 else rel(res, want_res) < bound(dtype)
    assert rel(out, norm(want_res)) < bound(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 32), (6, 2, 24)])
def test_rope_and_cache_matches_rotary_and_write_kv(triton_device, dtype, heads, kv_heads, head_dim):
    cfg = ModelConfig.from_dict(
        {
            "model_type": "llama",
            "vocab_size": 16,
            "hidden_size": heads * head_dim,
            "intermediate_size": 8,
            "num_hidden_layers": 1,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "max_position_embeddings": 64,
        }
    )
    rot = Rotary(cfg)
    rot.build(torch.device("cpu"), dtype)
    g = torch.Generator().manual_seed(heads + head_dim)
    t, bs, blocks = 9, 8, 6
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    positions = torch.tensor([0, 5, 17, 63, 1, 2, 30, 31, 40])
    slots = torch.randperm(blocks * bs, generator=g)[:t]
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    want_q = rot(q.reshape(t, heads, head_dim), positions)
    k_ref = torch.full((blocks, bs, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_ref = k_ref.clone()
    write_kv(
        LayerKV(k_ref, v_ref),
        rot(k.reshape(t, kv_heads, head_dim), positions),
        v.reshape(t, kv_heads, head_dim).contiguous(),
        slots,
    )
    dev = triton_device
    k_cache = torch.full_like(k_ref, float("nan"), device=dev)  # poisoned: only the written slots change
    v_cache = torch.full_like(v_ref, float("nan"), device=dev)
    got_q = rope_and_cache(
        qkv.to(dev), rot.cos.to(dev), rot.sin.to(dev), positions.to(dev), slots.to(dev), k_cache, v_cache, heads
    )
    assert rel(got_q, want_q) < bound(dtype)
    flat_k, flat_v = k_cache.view(-1, kv_heads, head_dim).cpu(), v_cache.view(-1, kv_heads, head_dim).cpu()
    ref_k, ref_v = k_ref.view(-1, kv_heads, head_dim), v_ref.view(-1, kv_heads, head_dim)
    assert rel(flat_k[slots], ref_k[slots]) < bound(dtype)
    assert torch.equal(flat_v[slots], ref_v[slots])  # v is copied, not computed
    others = torch.ones(blocks * bs, dtype=torch.bool)
    others[slots] = False
    assert torch.isnan(flat_k[others]).all() and torch.isnan(flat_v[others]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch(triton_device, dtype):
    g = torch.Generator().manual_seed(4)
    gu = (torch.randn(5, 2 * 1100, generator=g) * 3).to(dtype)  # 1100: two column blocks, the second partial
    gate, up = gu.split([1100, 1100], dim=-1)
    got = silu_mul(gu.to(triton_device))
    assert got.shape == (5, 1100)
    assert rel(got, F.silu(gate) * up) < bound(dtype)
