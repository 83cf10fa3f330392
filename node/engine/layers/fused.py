"""Fused elementwise Triton ops of the CUDA path: at decode a layer's norms, rotary embedding, KV
cache writes and SiLU gate are ~30 tiny torch kernels, each costing more in launch than in memory;
these do each group in one kernel. They round where the torch ops round (every bf16 product and
sum), so the fused model computes what the torch model computes. The CPU path keeps the torch ops.

Runs compiled on CUDA, and on CPU tensors under TRITON_INTERPRET=1 (set before import)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from node.engine.layers.triton_util import check_device


@triton.jit
def _rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, N, eps, stride_x, stride_r, stride_o, HAS_RES: tl.constexpr, BLOCK: tl.constexpr
):
    # one row: (residual += x), then out = w * (r * rsqrt(mean(r^2) + eps)) with r the residual
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + offs, mask=m, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)  # the residual stream, rounded as torch's add
        tl.store(res_ptr + row * stride_r + offs, x, mask=m)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
    y = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * y).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rotate(x1, x2, c1, c2, s1, s2):
    # torch's x * cos + cat(-x2, x1) * sin, each product and the sum rounded to x's dtype; the
    # arithmetic runs on fp32 copies (what bf16 math does on the GPU, and all the interpreter can do)
    dt = x1.dtype
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    c1, c2, s1, s2 = c1.to(tl.float32), c2.to(tl.float32), s1.to(tl.float32), s2.to(tl.float32)
    o1 = ((a1 * c1).to(dt).to(tl.float32) + (-a2 * s1).to(dt).to(tl.float32)).to(dt)
    o2 = ((a2 * c2).to(dt).to(tl.float32) + (a1 * s2).to(dt).to(tl.float32)).to(dt)
    return o1, o2


@triton.jit
def _rope_cache_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    slot_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    stride_qkv,
    stride_cs,
    stride_qt,
    stride_qh,
    stride_kslot,
    stride_kh,
    stride_vslot,
    stride_vh,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HEADS_P: tl.constexpr,
    KV_P: tl.constexpr,
    HALF: tl.constexpr,
    HALF_P: tl.constexpr,
):
    # one token: rotate its q heads into q, rotate its k heads and copy its v heads into the cache
    # slot slot_mapping[t]
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF_P)
    dm = d < HALF
    cs = pos * stride_cs
    c1 = tl.load(cos_ptr + cs + d, mask=dm, other=0.0)
    c2 = tl.load(cos_ptr + cs + HALF + d, mask=dm, other=0.0)
    s1 = tl.load(sin_ptr + cs + d, mask=dm, other=0.0)
    s2 = tl.load(sin_ptr + cs + HALF + d, mask=dm, other=0.0)
    row = qkv_ptr + t * stride_qkv
    hq = tl.arange(0, HEADS_P)
    mq = (hq < HEADS)[:, None] & dm[None, :]
    src = row + hq[:, None] * (2 * HALF) + d[None, :]
    o1, o2 = _rotate(
        tl.load(src, mask=mq, other=0.0),
        tl.load(src + HALF, mask=mq, other=0.0),
        c1[None, :],
        c2[None, :],
        s1[None, :],
        s2[None, :],
    )
    dst = q_ptr + t * stride_qt + hq[:, None] * stride_qh + d[None, :]
    tl.store(dst, o1, mask=mq)
    tl.store(dst + HALF, o2, mask=mq)
    hk = tl.arange(0, KV_P)
    mk = (hk < KV_HEADS)[:, None] & dm[None, :]
    src = row + (HEADS + hk[:, None]) * (2 * HALF) + d[None, :]
    o1, o2 = _rotate(
        tl.load(src, mask=mk, other=0.0),
        tl.load(src + HALF, mask=mk, other=0.0),
        c1[None, :],
        c2[None, :],
        s1[None, :],
        s2[None, :],
    )
    dst = k_ptr + slot * stride_kslot + hk[:, None] * stride_kh + d[None, :]
    tl.store(dst, o1, mask=mk)
    tl.store(dst + HALF, o2, mask=mk)
    src = row + (HEADS + KV_HEADS + hk[:, None]) * (2 * HALF) + d[None, :]
    dst = v_ptr + slot * stride_vslot + hk[:, None] * stride_vh + d[None, :]
    tl.store(dst, tl.load(src, mask=mk, other=0.0), mask=mk)
    tl.store(dst + HALF, tl.load(src + HALF, mask=mk, other=0.0), mask=mk)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, N, stride_gu, stride_o, BLOCK: tl.constexpr):
    # out[t] = silu(gate[t]) * up[t], gate and up the two halves of gu[t]
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    g = tl.load(gu_ptr + t * stride_gu + offs, mask=m, other=0.0)
    u = tl.load(gu_ptr + t * stride_gu + N + offs, mask=m, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(out_ptr + t * stride_o + offs, (s * u.to(tl.float32)).to(g.dtype), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Semantics: with residual, first residual <- residual + x (in place); then, with r the
    residual (or x), out[t] = weight * (r[t] * rsqrt(mean(r[t]^2) + eps)), the normalised row
    rounded to x's dtype before the weight multiplies it. x, residual [T, N]; weight [N]."""
    t, n = x.shape
    check_device(x.device)
    assert x.stride(1) == 1 and (residual is None or residual.stride(1) == 1)
    out = torch.empty_like(x)
    if t:
        res = residual if residual is not None else x
        block = triton.next_power_of_2(n)
        _rmsnorm_kernel[(t,)](
            x,
            res,
            weight,
            out,
            n,
            eps,
            x.stride(0),
            res.stride(0),
            out.stride(0),
            HAS_RES=residual is not None,
            BLOCK=block,
            num_warps=max(1, min(16, block // 256)),
        )
    return out


def rope_and_cache(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    heads: int,
) -> torch.Tensor:
    """Semantics: qkv[t] = [q heads | k heads | v heads] of head size d; returns q rotated by the
    rotary embedding at positions[t] ([T, heads, d]); writes k rotated and v as is into the
    cache slot slot_mapping[t] (flat index block * block_size + offset). Rotation is torch's
    x * cos + cat(-x2, x1) * sin with cos/sin tables [max_pos, d]."""
    t = qkv.shape[0]
    _, _, kvh, d = k_cache.shape
    assert qkv.shape[1] == (heads + 2 * kvh) * d and qkv.stride(1) == 1 and d % 2 == 0, (qkv.shape, heads, kvh, d)
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()
    check_device(qkv.device)
    q = torch.empty(t, heads, d, dtype=qkv.dtype, device=qkv.device)
    if t:
        half = d // 2
        _rope_cache_kernel[(t,)](
            qkv,
            cos,
            sin,
            positions,
            slot_mapping,
            q,
            k_cache,
            v_cache,
            qkv.stride(0),
            cos.stride(0),
            q.stride(0),
            q.stride(1),
            k_cache.stride(1),
            k_cache.stride(2),
            v_cache.stride(1),
            v_cache.stride(2),
            HEADS=heads,
            KV_HEADS=kvh,
            HEADS_P=triton.next_power_of_2(heads),
            KV_P=triton.next_power_of_2(kvh),
            HALF=half,
            HALF_P=triton.next_power_of_2(half),
            num_warps=4,
        )
    return q


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Semantics: gate_up [T, 2I] -> out [T, I] = silu(gate) * up (silu rounded to the dtype first)."""
    t, n2 = gate_up.shape
    n = n2 // 2
    check_device(gate_up.device)
    assert gate_up.stride(1) == 1
    out = torch.empty(t, n, dtype=gate_up.dtype, device=gate_up.device)
    if t:
        block = 1024
        _silu_mul_kernel[(t, triton.cdiv(n, block))](
            gate_up, out, n, gate_up.stride(0), out.stride(0), BLOCK=block, num_warps=4
        )
    return out
