"""Paged decode attention in Triton: one query token per sequence, keys/values read block by block
through the sequence's block table up to its context length, so a step reads only the cache it
needs and its launch shape depends on the batch size and the table width alone (what a CUDA graph
requires). Contexts longer than one partition are split across programs (flash-decoding: each
partition's softmax-normalised output, maximum and sum are combined by a second kernel), because
one program per (sequence, KV head) left an H200 waiting on memory latency: 512 programs at batch
64 reached 1.7 TB/s (bench/NOTES.md, attempt 3).

Runs compiled on CUDA, and on CPU tensors under TRITON_INTERPRET=1 (set before import)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from node.engine.triton_lora import _check_device
from node.engine.triton_lora_kernels import INTERPRET

NO_WINDOW = 2**31 - 1
BLOCK_N = 32  # positions per inner step (any cache block size: each position looks its block up)
NUM_WARPS = 8  # sm_90 build: ~160 registers a thread, no spills (4 warps: 255)
PARTITION = 64  # positions per program when a context is split; a multiple of BLOCK_N
MAX_PARTITIONS = 32  # longer tables get longer partitions, so the grid stays bounded


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, ctx_ptr, scale, WINDOW,
                         stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                         stride_ot, stride_oh, stride_tb,
                         GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_P: tl.constexpr,
                         CACHE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
                         PRECISION: tl.constexpr, PART: tl.constexpr, ml_ptr=None, stride_mlt=0, stride_mlh=0,
                         stride_op=0):
    # program (sequence b, kv head g, partition p): the GROUP query heads sharing kv head g (padded
    # to GROUP_P >= 16 rows for the tensor cores), online softmax over positions lo..ctx-1 (PART 0)
    # or over partition p of them, in chunks of BLOCK_N, each position's cache block looked up in
    # the block table. A partition writes its normalised output at out[b, h, p] and its running
    # maximum and sum at ml[b, h, p, 0:2]; partitions past the context write nothing
    b = tl.program_id(0)
    g = tl.program_id(1)
    ctx = tl.load(ctx_ptr + b).to(tl.int32)
    lo = tl.maximum(ctx - WINDOW, 0)  # WINDOW is 2**31 - 1 without a sliding window
    hi = ctx
    if PART > 0:
        part = tl.program_id(2)
        lo = lo + part * PART
        hi = tl.minimum(ctx, lo + PART)
        out_ptr += part * stride_op
    gh = tl.arange(0, GROUP_P)
    h_mask = gh < GROUP
    heads = g * GROUP + gh
    offs_d = tl.arange(0, HEAD_P)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)  # [GP, D]
    if DOT_F32:  # the interpreter's bf16 dot is wrong
        q = q.to(tl.float32)
    m_i = tl.full((GROUP_P,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GROUP_P,), dtype=tl.float32)
    acc = tl.zeros((GROUP_P, HEAD_P), dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    table = tables_ptr + b * stride_tb
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n
        valid = pos < hi
        blk = tl.load(table + pos // CACHE_BLOCK, mask=valid, other=0).to(tl.int64)
        within = (pos % CACHE_BLOCK).to(tl.int64)
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + (blk * stride_kb + within * stride_ks + g * stride_kh)[:, None] + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # [BN, D]
        v = tl.load(v_ptr + (blk * stride_vb + within * stride_vs + g * stride_vh)[:, None] + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # [BN, D]
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GP, BN]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    live = h_mask & (gh * 0 + lo < hi)  # a partition past this sequence's context ran no step: no write
    tl.store(out_ptr + b * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=live[:, None] & d_mask[None, :])
    if PART > 0:
        ml = ml_ptr + b * stride_mlt + heads * stride_mlh + part * 2
        tl.store(ml, m_i, mask=live)
        tl.store(ml + 1, l_i, mask=live)


@triton.jit
def _partition_reduce_kernel(part_ptr, ml_ptr, out_ptr, ctx_ptr, WINDOW, stride_pt, stride_ph, stride_pp,
                             stride_mlt, stride_mlh, stride_ot, stride_oh,
                             HEAD_DIM: tl.constexpr, HEAD_P: tl.constexpr, PART: tl.constexpr,
                             PARTS_P: tl.constexpr):
    # program (sequence b, head h): out = sum_p w_p * out_p / sum_p w_p with w_p = l_p * exp(m_p - M)
    # over the partitions this sequence's context reaches
    b = tl.program_id(0)
    h = tl.program_id(1)
    ctx = tl.load(ctx_ptr + b).to(tl.int32)
    lo = tl.maximum(ctx - WINDOW, 0)
    n = tl.cdiv(ctx - lo, PART)
    offs_p = tl.arange(0, PARTS_P)
    p_mask = offs_p < n
    ml = ml_ptr + b * stride_mlt + h * stride_mlh + offs_p * 2
    m = tl.load(ml, mask=p_mask, other=float("-inf"))
    l_p = tl.load(ml + 1, mask=p_mask, other=0.0)
    w = l_p * tl.exp(m - tl.max(m, axis=0))  # [PP]; partitions past the context weigh 0
    offs_d = tl.arange(0, HEAD_P)
    d_mask = offs_d < HEAD_DIM
    parts = tl.load(part_ptr + b * stride_pt + h * stride_ph + offs_p[:, None] * stride_pp + offs_d[None, :],
                    mask=p_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [PP, D]
    out = tl.sum(parts * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * stride_ot + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def partitioning(max_context: int) -> tuple[int, int]:
    """(positions per partition, partitions) for contexts up to max_context; (0, 1) = no split."""
    if max_context <= PARTITION:
        return 0, 1
    part = max(PARTITION, triton.cdiv(triton.cdiv(max_context, MAX_PARTITIONS), BLOCK_N) * BLOCK_N)
    return part, triton.cdiv(max_context, part)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, window: int | None = None,
                           out: torch.Tensor | None = None, partition: int | None = None) -> torch.Tensor:
    """Semantics: for sequence b with c = context_lens[b] >= 1 and query q[b] (its newest token, at
    position c-1), out[b, h] = softmax(q[b, h] . K_b[j] / sqrt(d), j in [lo, c)) @ V_b[j], where
    K_b[j] / V_b[j] sit at cache[block_tables[b, j // bs], j % bs, h // (H / KVH)], and
    lo = max(0, c - window) with a sliding window, else 0.
    q [B, H, d]; caches [blocks, bs, KVH, d]; block_tables [B, >= ceil(c / bs)] int; context_lens [B] int.
    partition: positions per program (a multiple of BLOCK_N; 0 = never split; None = partitioning())."""
    bsz, heads, d = q.shape
    _, block_size, kvh, d_k = k_cache.shape
    assert d == d_k and heads % kvh == 0, (q.shape, k_cache.shape)
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    _check_device(q.device)
    group = heads // kvh
    o = out if out is not None else torch.empty_like(q)
    if bsz == 0:
        return o
    # the table's width bounds every context, and keeps the grid fixed for a CUDA graph
    max_context = block_tables.shape[1] * block_size
    if window is not None:
        max_context = min(max_context, window)
    if partition is None:
        part, n_parts = partitioning(max_context)
    else:
        part, n_parts = (partition, triton.cdiv(max_context, partition)) if partition > 0 else (0, 1)
    split = part > 0 and n_parts > 1
    dst = torch.empty(bsz, heads, n_parts, d, dtype=q.dtype, device=q.device) if split else o  # [B, H, P, d]
    ml = torch.empty(bsz, heads, n_parts, 2, dtype=torch.float32, device=q.device) if split else None
    consts = dict(HEAD_DIM=d, HEAD_P=max(16, triton.next_power_of_2(d)))
    _paged_decode_kernel[(bsz, kvh, n_parts if split else 1)](
        q, k_cache, v_cache, dst, block_tables, context_lens, 1.0 / math.sqrt(d), window or NO_WINDOW,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), dst.stride(0), dst.stride(1), block_tables.stride(0),
        GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)), CACHE_BLOCK=block_size, BLOCK_N=BLOCK_N,
        DOT_F32=INTERPRET, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", PART=part if split else 0,
        ml_ptr=ml, stride_mlt=ml.stride(0) if split else 0, stride_mlh=ml.stride(1) if split else 0,
        stride_op=dst.stride(2) if split else 0, num_warps=NUM_WARPS, **consts)
    if split:
        _partition_reduce_kernel[(bsz, heads)](
            dst, ml, o, context_lens, window or NO_WINDOW, dst.stride(0), dst.stride(1), dst.stride(2),
            ml.stride(0), ml.stride(1), o.stride(0), o.stride(1), PART=part,
            PARTS_P=triton.next_power_of_2(n_parts), num_warps=4, **consts)
    return o
