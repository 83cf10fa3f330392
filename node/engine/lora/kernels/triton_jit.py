"""The Triton LoRA kernels and their launch configurations: BGMV (one token per program, per-token
slot index) and SGMV (tokens sorted into per-slot tiles) shrink and expand. TritonLoRAKernel
(triton.py) plans each step's tables and launches them.

Runs compiled on CUDA, and on CPU tensors under TRITON_INTERPRET=1 (set before this module is
imported), which is how the tests check it without a GPU.

Layouts (as in base.py): a [S+1, R, in], b [S+1, R, out] with R = n_slices * rank and
slice i's rows i*rank..(i+1)*rank feeding only its columns; x [T, in]; y [T, >= offset + out]."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from node.engine.layers.triton_util import INTERPRET


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(1, n)))


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr,
    a_ptr,
    h_ptr,
    slot_ptr,
    K_IN,
    R,
    K_PER_SPLIT,
    stride_xt,
    stride_as,
    stride_ar,
    stride_hk,
    stride_ht,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # program (t, r-tile, k-split): h_k[t, r] = sum_{k in split} A[s_t, r, k] * x[t, k]; 0 when s_t < 0
    t = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    slot = tl.load(slot_ptr + t)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if slot >= 0:
        k_lo = pid_k * K_PER_SPLIT
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, K_IN)
        a_row = a_ptr + slot.to(tl.int64) * stride_as + offs_r[:, None] * stride_ar
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_hi
            xv = tl.load(x_ptr + t * stride_xt + offs_k, mask=k_mask, other=0.0).to(tl.float32)  # [BK]
            av = tl.load(a_row + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)  # [BR, BK]
            acc += tl.sum(av.to(tl.float32) * xv[None, :], axis=1)
    tl.store(h_ptr + pid_k * stride_hk + t * stride_ht + offs_r, acc, mask=r_mask)


@triton.jit
def _bgmv_expand_kernel(
    h_ptr,
    b_ptr,
    y_ptr,
    slot_ptr,
    cols_ptr,
    RANK,
    SPLIT,
    stride_hk,
    stride_ht,
    stride_bs,
    stride_br,
    stride_yt,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # program (t, slice i, n-tile): y[t, cols_i] += h[t, i*rank:(i+1)*rank] @ B[s_t, same rows, cols_i]
    t = tl.program_id(0)
    sl = tl.program_id(1)
    pid_n = tl.program_id(2)
    slot = tl.load(slot_ptr + t)
    c_lo = tl.load(cols_ptr + sl)
    c_hi = tl.load(cols_ptr + sl + 1)
    n0 = c_lo + pid_n * BLOCK_N
    if (slot >= 0) & (n0 < c_hi):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < c_hi
        rr = tl.arange(0, BLOCK_R)
        r_mask = rr < RANK
        offs_r = sl * RANK + rr
        hv = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k in range(0, SPLIT):  # sum the shrink's split-K partials
            hv += tl.load(h_ptr + k * stride_hk + t * stride_ht + offs_r, mask=r_mask, other=0.0)
        bv = tl.load(
            b_ptr + slot.to(tl.int64) * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :],
            mask=r_mask[:, None] & n_mask[None, :],
            other=0.0,
        )  # [BR, BN]
        delta = tl.sum(bv.to(tl.float32) * hv[:, None], axis=0)  # [BN]
        y_row = y_ptr + t * stride_yt + offs_n
        yv = tl.load(y_row, mask=n_mask, other=0.0)
        tl.store(y_row, (yv.to(tl.float32) + delta).to(yv.dtype), mask=n_mask)


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr,
    a_ptr,
    h_ptr,
    tok_ptr,
    tiles_ptr,
    MAX_TILES,
    K_IN,
    R,
    K_PER_SPLIT,
    stride_xt,
    stride_as,
    stride_ar,
    stride_hk,
    stride_ht,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # program (tile, r-tile, k-split): for the <= BLOCK_M tokens of one slot in this tile,
    # h_k[tok, r] = sum_{k in split} x[tok, k] * A[slot, r, k]; the null slot (-1) writes zeros
    tile = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    slot = tl.load(tiles_ptr + tile)
    start = tl.load(tiles_ptr + MAX_TILES + tile)
    n = tl.load(tiles_ptr + 2 * MAX_TILES + tile)
    if n > 0:
        offs_m = tl.arange(0, BLOCK_M)
        m_mask = offs_m < n
        toks = tl.load(tok_ptr + start + offs_m, mask=m_mask, other=0)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        if slot >= 0:
            k_lo = pid_k * K_PER_SPLIT
            k_hi = tl.minimum(k_lo + K_PER_SPLIT, K_IN)
            a_row = a_ptr + slot.to(tl.int64) * stride_as + offs_r[:, None] * stride_ar
            x_row = x_ptr + toks[:, None].to(tl.int64) * stride_xt
            for k0 in range(k_lo, k_hi, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < k_hi
                xv = tl.load(x_row + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                av = tl.load(a_row + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
                if DOT_F32:  # the interpreter's bf16 dot is wrong; fp32 operands are exact there
                    xv = xv.to(tl.float32)
                    av = av.to(tl.float32)
                acc += tl.dot(xv, tl.trans(av), input_precision=PRECISION)
        tl.store(
            h_ptr + pid_k * stride_hk + toks[:, None] * stride_ht + offs_r[None, :],
            acc,
            mask=m_mask[:, None] & r_mask[None, :],
        )


@triton.jit
def _sgmv_expand_kernel(
    h_ptr,
    b_ptr,
    y_ptr,
    tok_ptr,
    tiles_ptr,
    cols_ptr,
    MAX_TILES,
    RANK,
    SPLIT,
    stride_hk,
    stride_ht,
    stride_bs,
    stride_br,
    stride_yt,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # program (tile, slice i, n-tile): y[tok, cols_i] += h[tok, slice rows] @ B[slot, slice rows, cols_i]
    tile = tl.program_id(0)
    sl = tl.program_id(1)
    pid_n = tl.program_id(2)
    slot = tl.load(tiles_ptr + tile)
    start = tl.load(tiles_ptr + MAX_TILES + tile)
    n = tl.load(tiles_ptr + 2 * MAX_TILES + tile)
    c_lo = tl.load(cols_ptr + sl)
    c_hi = tl.load(cols_ptr + sl + 1)
    n0 = c_lo + pid_n * BLOCK_N
    if (n > 0) & (slot >= 0) & (n0 < c_hi):
        offs_m = tl.arange(0, BLOCK_M)
        m_mask = offs_m < n
        toks = tl.load(tok_ptr + start + offs_m, mask=m_mask, other=0)
        rr = tl.arange(0, BLOCK_R)
        r_mask = rr < RANK
        offs_r = sl * RANK + rr
        hm = m_mask[:, None] & r_mask[None, :]
        hv = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k in range(0, SPLIT):
            hv += tl.load(h_ptr + k * stride_hk + toks[:, None] * stride_ht + offs_r[None, :], mask=hm, other=0.0)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < c_hi
        bv = tl.load(
            b_ptr + slot.to(tl.int64) * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :],
            mask=r_mask[:, None] & n_mask[None, :],
            other=0.0,
        )  # [BR, BN]
        delta = tl.dot(hv, bv.to(tl.float32), input_precision=PRECISION)  # [BM, BN]
        ym = m_mask[:, None] & n_mask[None, :]
        y_tile = y_ptr + toks[:, None].to(tl.int64) * stride_yt + offs_n[None, :]
        yv = tl.load(y_tile, mask=ym, other=0.0)
        tl.store(y_tile, (yv.to(tl.float32) + delta).to(yv.dtype), mask=ym)


def _precision(dtype: torch.dtype) -> str:
    # fp32 engines get exact fp32 dots (CUDA-core FMAs); bf16/fp16 operands ignore it (tensor cores)
    return "ieee" if dtype == torch.float32 else "tf32"


# Launch settings below were chosen by bench/gpu_profile.py's sweep (Llama-3-8B shapes, batch 64,
# rank 16): what each change bought is in bench/NOTES.md, "The LoRA launch-setting sweep".


def shrink_config(mode: str, r: int, dtype: torch.dtype) -> dict:
    """Constexprs and warps of a shrink launch (registers per thread read off the sm_90 build:
    about 100 for these tiles, no spills; tests/node/engine/test_triton_compile.py builds them)."""
    if mode == "bgmv":  # a [32, 128] weight tile a step, reduced on the CUDA cores
        return {"BLOCK_R": min(_pow2(r), 32), "BLOCK_K": 128, "num_warps": 8}
    # [16, 128] x [128, 32] tensor-core tiles; R and K beyond them loop or take more programs
    return {
        "BLOCK_R": min(_pow2(r, 16), 32),
        "BLOCK_K": 128,
        "DOT_F32": INTERPRET,
        "PRECISION": _precision(dtype),
        "num_warps": 4,
    }


def expand_config(mode: str, rank: int, dtype: torch.dtype) -> dict:
    """Constexprs and warps of an expand launch (one slice's rank rows x BLOCK_N columns)."""
    cfg = {
        "BLOCK_R": _pow2(rank, 1 if mode == "bgmv" else 16),
        "BLOCK_N": 512 if mode == "bgmv" else 128,
        "num_warps": 4,
    }
    if mode == "sgmv":
        cfg["PRECISION"] = _precision(dtype)
    return cfg
