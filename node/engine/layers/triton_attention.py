"""Paged decode attention in Triton: one query token per sequence, keys/values read block by block
through the sequence's block table up to its context length, so a step reads only the cache it
needs and its launch shape depends on the batch size alone (what a CUDA graph requires).

Prefill, a prefix-cache hit's included, does not come here: it runs attention.py's SDPA over the
gathered blocks, which reads a cached prefix through the block table like any other context. A decode
step reads shared (prefix-cached) blocks through its table like its own; it never writes them.

Runs compiled on CUDA, and on CPU tensors under TRITON_INTERPRET=1 (set before import)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from node.engine.layers.attention import LayerKV
from node.engine.layers.triton_util import INTERPRET, check_device

NO_WINDOW = 2**31 - 1
BLOCK_N = 64  # positions per inner step (any cache block size: each position looks its block up)
# Measured on an H200 at the 8B shape's decode (bench/h200/run4a-gpu-profile.json, a layer of batch 64
# mid-decode): BLOCK_N 64 at 8 warps 21.5 us (1.96 TB/s); 32 at 8 warps, the setting before, 27.7 us;
# 16 at 4 warps 23.0; 16 at 8 warps 29.2. Two programs an SM (16/8, 112 registers a thread) lost to the
# fewest loop steps. sm_90 registers a thread: 64/8 185, 32/8 157; 64 at 4 warps spills.
NUM_WARPS = 8


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    ks_ptr,
    vs_ptr,
    out_ptr,
    tables_ptr,
    ctx_ptr,
    scale,
    WINDOW,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_sb,
    stride_ss,
    stride_ot,
    stride_oh,
    stride_tb,
    GROUP: tl.constexpr,
    GROUP_P: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_P: tl.constexpr,
    CACHE_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    # program (sequence b, kv head g): the GROUP query heads sharing kv head g (padded to
    # GROUP_P >= 16 rows for the tensor cores), online softmax over positions lo..ctx-1 in chunks
    # of BLOCK_N, each position's cache block looked up in the block table
    b = tl.program_id(0)
    g = tl.program_id(1)
    ctx = tl.load(ctx_ptr + b).to(tl.int32)
    lo = tl.maximum(ctx - WINDOW, 0)  # WINDOW is 2**31 - 1 without a sliding window
    gh = tl.arange(0, GROUP_P)
    h_mask = gh < GROUP
    heads = g * GROUP + gh
    offs_d = tl.arange(0, HEAD_P)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + b * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=h_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [GP, D]
    if DOT_F32:  # the interpreter's bf16 dot is wrong
        q = q.to(tl.float32)
    m_i = tl.full((GROUP_P,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GROUP_P,), dtype=tl.float32)
    acc = tl.zeros((GROUP_P, HEAD_P), dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    table = tables_ptr + b * stride_tb
    for start in range(lo, ctx, BLOCK_N):
        pos = start + offs_n
        valid = pos < ctx
        blk = tl.load(table + pos // CACHE_BLOCK, mask=valid, other=0).to(tl.int64)
        within = (pos % CACHE_BLOCK).to(tl.int64)
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(
            k_ptr + (blk * stride_kb + within * stride_ks + g * stride_kh)[:, None] + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )  # [BN, D]
        v = tl.load(
            v_ptr + (blk * stride_vb + within * stride_vs + g * stride_vh)[:, None] + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )  # [BN, D]
        if KV_FP8:
            # e4m3 codes widened as they are (|code| <= 448 is exact in bf16/fp16); each position's scale is
            # applied to its score and its probability instead of to its d values
            k = k.to(q.dtype)
            v = v.to(q.dtype)
            s_off = blk * stride_sb + within * stride_ss + g
            k_scale = tl.load(ks_ptr + s_off, mask=valid, other=0.0)  # [BN]
            v_scale = tl.load(vs_ptr + s_off, mask=valid, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GP, BN]
        if KV_FP8:
            s = s * k_scale[None, :]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if KV_FP8:  # the softmax's sum (l_i) is over p: the scale is V's alone
            p = p * v_scale[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + b * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=h_mask[:, None] & d_mask[None, :],
    )


def paged_decode_attention(
    q: torch.Tensor,
    kv: LayerKV,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    window: int | None = None,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Semantics: for sequence b with c = context_lens[b] >= 1 and query q[b] (its newest token, at
    position c-1), out[b, h] = softmax(q[b, h] . K_b[j] / sqrt(d), j in [lo, c)) @ V_b[j], where
    K_b[j] / V_b[j] sit at cache[block_tables[b, j // bs], j % bs, h // (H / KVH)] (times their scale in an
    fp8 cache, layers/attention.py), and lo = max(0, c - window) with a sliding window, else 0.
    q [B, H, d]; kv's caches [blocks, bs, KVH, d]; block_tables [B, >= ceil(c / bs)] int; context_lens [B] int.
    block_n / num_warps override BLOCK_N / NUM_WARPS (bench/gpu_profile.py's attention sweep)."""
    k_cache, v_cache = kv.k, kv.v
    bsz, heads, d = q.shape
    _, block_size, kvh, d_k = k_cache.shape
    assert d == d_k and heads % kvh == 0, (q.shape, k_cache.shape)
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    check_device(q.device)
    group = heads // kvh
    o = out if out is not None else torch.empty_like(q)
    if bsz == 0:
        return o
    # without a quantized cache the scale pointers are never read (KV_FP8 is a constexpr): pass the caches
    k_scale = kv.k_scale if kv.quantized else k_cache
    v_scale = kv.v_scale if kv.quantized else v_cache
    if kv.quantized:
        assert k_scale.stride() == v_scale.stride() and k_scale.stride(2) == 1, (k_scale.stride(), v_scale.stride())
    _paged_decode_kernel[(bsz, kvh)](
        q,
        k_cache,
        v_cache,
        k_scale,
        v_scale,
        o,
        block_tables,
        context_lens,
        1.0 / math.sqrt(d),
        window or NO_WINDOW,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        k_scale.stride(0),
        k_scale.stride(1),
        o.stride(0),
        o.stride(1),
        block_tables.stride(0),
        GROUP=group,
        GROUP_P=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=d,
        HEAD_P=max(16, triton.next_power_of_2(d)),
        CACHE_BLOCK=block_size,
        BLOCK_N=block_n or BLOCK_N,
        DOT_F32=INTERPRET,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        KV_FP8=kv.quantized,
        num_warps=num_warps or NUM_WARPS,
    )
    return o
