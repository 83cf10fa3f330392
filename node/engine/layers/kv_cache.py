"""The paged KV cache's tensors, in the model's dtype or in fp8 (`EngineConfig.kv_cache_dtype`).

A layer's cache is K and V of shape [blocks, block_size, kv_heads, head_dim]. With "fp8" they hold
float8_e4m3fn and each (token, kv head) vector has its own fp32 scale in k_scale / v_scale [blocks,
block_size, kv_heads]: x ~= q * scale with scale = max|x| / 448 (e4m3's largest finite value), so any
magnitude keeps e4m3's 3 mantissa bits; a per-tensor scale of 1.0, as vLLM uses without calibration,
would flush the small keys and values of some models to e4m3's subnormals. A token and head costs
head_dim + 4 bytes instead of 2 x head_dim at bf16 (0.52x at head_dim 128).

Writers quantize (`write_kv`); readers dequantize what they gather (`gather`, attention.py's SDPA path)
or scale the scores and probabilities (the Triton decode kernel, which reads the fp8 bytes itself)."""

from __future__ import annotations

from typing import NamedTuple

import torch

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


def bytes_per_token(kv_heads: int, head_dim: int, dtype: torch.dtype, kv_cache_dtype: str) -> int:
    """K and V of one token in one layer."""
    if kv_cache_dtype == "fp8":
        return 2 * kv_heads * (head_dim * FP8.itemsize + 4)
    return 2 * kv_heads * head_dim * dtype.itemsize


def allocate(
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


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        q, s = quantize(x)
        # index_copy_ has no fp8 kernel on CPU; the bytes are copied as uint8, which is the same write
        cache.view(torch.uint8).view(nb * bs, h, d).index_copy_(0, slot_mapping, q.view(torch.uint8))
        scales.view(nb * bs, h).index_copy_(0, slot_mapping, s)


def gather(kv: LayerKV, block_tables: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
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
