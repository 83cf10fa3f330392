"""Paged attention over a block-table KV cache: the cache's tensors (in the model's dtype or fp8), the torch
path (SDPA over gathered blocks), and the step's metadata every layer shares. Decode steps on static buffers
(the CUDA-graph path) carry `context_lens` and run the Triton kernel of triton_attention.py instead.

Semantics: for query token i of sequence b at position p_i, out_i = softmax(q_i K_b^T / sqrt(d)
+ mask) V_b, where K_b/V_b are the sequence's cached keys/values at positions 0..ctx_b-1 and the
mask keeps positions j <= p_i (and j > p_i - window with a sliding window).

Prefix caching needs nothing more here: a prefill whose first k blocks were found cached has query
positions k * block_size .. ctx-1 and reads positions below them from the shared blocks through the
same block table (on CUDA too: prefill runs this SDPA path, not the Triton decode kernel)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

# ---- the KV cache (`EngineConfig.kv_cache_dtype`) ----
# A layer's cache is K and V of shape [blocks, block_size, kv_heads, head_dim]. With "fp8" they hold
# float8_e4m3fn and each (token, kv head) vector has its own fp32 scale in k_scale / v_scale [blocks,
# block_size, kv_heads]: x ~= q * scale with scale = max|x| / 448 (e4m3's largest finite value), so any
# magnitude keeps e4m3's 3 mantissa bits; a per-tensor scale of 1.0, as vLLM uses without calibration,
# would flush the small keys and values of some models to e4m3's subnormals. A token and head costs
# head_dim + 4 bytes instead of 2 x head_dim at bf16 (0.52x at head_dim 128). Writers quantize (`write_kv`);
# readers widen what they gather (`gather_kv`, the SDPA path below) or scale the scores and probabilities (the
# Triton decode kernel, which reads the fp8 codes itself).

KV_CACHE_DTYPES = ("auto", "fp8")
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448.0


class LayerKV(NamedTuple):
    k: torch.Tensor  # [blocks, block_size, kv_heads, head_dim]
    v: torch.Tensor
    k_scale: torch.Tensor | None = None  # [blocks, block_size, kv_heads] fp32; None: k and v are not quantized
    v_scale: torch.Tensor | None = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None


def check_kv_cache_dtype(kv_cache_dtype: str, device: str) -> None:
    """Refuse, in one line, a cache dtype this device cannot run. fp8 runs on CPU (the torch path stores and
    widens it) and on CUDA GPUs of compute capability >= 8.9, whose Triton kernels read e4m3."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"--kv-cache-dtype {kv_cache_dtype!r} is not supported; expected one of auto, fp8")
    if kv_cache_dtype != "fp8" or not device.startswith("cuda") or not torch.cuda.is_available():
        return
    from node.engine.quant import FP8_MIN_CAPABILITY

    cap = torch.cuda.get_device_capability(torch.device(device))
    if cap < FP8_MIN_CAPABILITY:
        raise ValueError(
            f"--kv-cache-dtype fp8 needs compute capability >= 8.9 (Hopper H100/H200, Ada); "
            f"{torch.cuda.get_device_name(torch.device(device))} is {cap[0]}.{cap[1]}: leave it at auto"
        )


def kv_bytes_per_token(kv_heads: int, head_dim: int, dtype: torch.dtype, kv_cache_dtype: str) -> int:
    """K and V of one token in one layer."""
    if kv_cache_dtype == "fp8":
        return 2 * kv_heads * (head_dim * FP8.itemsize + 4)
    return 2 * kv_heads * head_dim * dtype.itemsize


def allocate_kv(
    blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype, kv_cache_dtype: str, device
) -> LayerKV:
    shape = (blocks, block_size, kv_heads, head_dim)
    if kv_cache_dtype != "fp8":
        return LayerKV(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
    # scales of 0 make a never-written slot read as zeros, like the unquantized cache's
    return LayerKV(
        torch.zeros(shape, dtype=FP8, device=device),
        torch.zeros(shape, dtype=FP8, device=device),
        torch.zeros(shape[:3], dtype=torch.float32, device=device),
        torch.zeros(shape[:3], dtype=torch.float32, device=device),
    )


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H, d] -> (fp8 [T, H, d], fp32 scale [T, H]) with x ~= q * scale per (token, head)."""
    scale = x.abs().amax(dim=-1).float() / FP8_MAX  # [T, H]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero vector stays zero
    q = (x.float() / safe.unsqueeze(-1)).to(FP8)  # torch saturates at +-448 (never reached: |x| / scale <= 448)
    return q, scale


def write_kv(kv: LayerKV, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store this step's keys/values k, v [T, kv_heads, d] at the flat cache slots slot_mapping [T]."""
    nb, bs, h, d = kv.k.shape
    if not kv.quantized:
        kv.k.view(nb * bs, h, d).index_copy_(0, slot_mapping, k)
        kv.v.view(nb * bs, h, d).index_copy_(0, slot_mapping, v)
        return
    for cache, scales, x in ((kv.k, kv.k_scale, k), (kv.v, kv.v_scale, v)):
        q, s = quantize_fp8(x)
        # index_copy_ has no fp8 kernel on CPU; the bytes are copied as uint8, which is the same write
        cache.view(torch.uint8).view(nb * bs, h, d).index_copy_(0, slot_mapping, q.view(torch.uint8))
        scales.view(nb * bs, h).index_copy_(0, slot_mapping, s)


def gather_kv(kv: LayerKV, block_tables: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's keys and values in `dtype`: [B, max_blocks * block_size, kv_heads, d] each."""
    b = block_tables.shape[0]
    _, bs, kvh, d = kv.k.shape
    if not kv.quantized:
        return kv.k[block_tables].view(b, -1, kvh, d), kv.v[block_tables].view(b, -1, kvh, d)
    out = []
    for cache, scales in ((kv.k, kv.k_scale), (kv.v, kv.v_scale)):
        x = cache[block_tables].to(torch.float32) * scales[block_tables].unsqueeze(-1)
        out.append(x.to(dtype).view(b, -1, kvh, d))
    return out[0], out[1]


@dataclass(slots=True)
class AttentionMetadata:
    """Built once per step by the model runner and shared by every layer."""

    slot_mapping: torch.Tensor  # [T] int64: flat cache index (block * block_size + offset) per token
    block_tables: torch.Tensor  # [B, max_blocks] int64 (padding points at block 0, masked out)
    query_index: torch.Tensor | None  # [B, Lq] int64 into the flat tokens; None when every Lq == 1
    query_valid: torch.Tensor | None  # [B, Lq] bool
    mask: torch.Tensor | None  # [B, 1, Lq, Lk] bool, True = attend (None on the decode-kernel path)
    num_seqs: int
    # decode-kernel path (static buffers, CUDA graphs): one query per sequence, keys read through
    # block_tables up to context_lens (Triton paged decode attention instead of SDPA)
    context_lens: torch.Tensor | None = None  # [B] int
    window: int | None = None


def build_metadata(
    positions: list[list[int]], block_tables: list[list[int]], block_size: int, window: int | None, device: torch.device
) -> AttentionMetadata:
    """positions[b] are the positions of sequence b's query tokens this step (contiguous, ending
    at its context length - 1; starting past its cached prefix on a prefix-cache hit); block_tables[b]
    covers its whole context, cached prefix included."""
    b = len(positions)
    lq = max(len(p) for p in positions)
    max_blocks = max(len(t) for t in block_tables)
    lk = max_blocks * block_size
    slots, qidx, qpos = [], [], []
    flat = 0
    for pos, table in zip(positions, block_tables):
        slots.extend(table[p // block_size] * block_size + p % block_size for p in pos)
        qidx.append(list(range(flat, flat + len(pos))) + [0] * (lq - len(pos)))
        # padded query rows look at position 0 only, so no row is fully masked (no NaN)
        qpos.append(list(pos) + [-1] * (lq - len(pos)))
        flat += len(pos)
    tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in block_tables], dtype=torch.int64)
    qpos_t = torch.tensor(qpos, dtype=torch.int64)  # [B, Lq]
    kpos = torch.arange(lk, dtype=torch.int64)  # [Lk]
    mask = kpos[None, None, :] <= qpos_t[:, :, None].clamp(min=0)  # [B, Lq, Lk]
    if window is not None:
        mask &= kpos[None, None, :] > qpos_t[:, :, None] - window
    valid = qpos_t >= 0
    single = lq == 1
    return AttentionMetadata(
        slot_mapping=to_device(torch.tensor(slots, dtype=torch.int64), device),
        block_tables=to_device(tables, device),
        query_index=None if single else to_device(torch.tensor(qidx, dtype=torch.int64), device),
        query_valid=None if single else to_device(valid, device),
        mask=to_device(mask.unsqueeze(1), device),
        num_seqs=b,
    )


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host tensor -> device; through pinned memory on CUDA, so the copy does not sync the stream."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def paged_attention(q: torch.Tensor, kv: LayerKV, meta: AttentionMetadata) -> torch.Tensor:
    """q [T, heads, d] -> out [T, heads, d], keys/values read from the layer's cache via block tables."""
    if meta.context_lens is not None:
        from node.engine.layers.triton_attention import paged_decode_attention

        return paged_decode_attention(q, kv, meta.block_tables, meta.context_lens, meta.window)
    b = meta.num_seqs
    d = q.shape[-1]
    if meta.query_index is None:
        qp = q.view(b, 1, q.shape[1], d)  # [B, 1, H, d]
    else:
        qp = q[meta.query_index]  # [B, Lq, H, d]
    kk, vv = gather_kv(kv, meta.block_tables, q.dtype)  # [B, Lk, KVH, d] each
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), attn_mask=meta.mask, enable_gqa=True
    ).transpose(1, 2)  # [B, Lq, H, d]
    if meta.query_valid is None:
        return out.reshape(b, q.shape[1], d)
    return out[meta.query_valid]  # [T, H, d], sequence-major like q
