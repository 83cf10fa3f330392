"""Paged attention over a block-table KV cache: the torch path (SDPA over gathered blocks), and
the step's metadata every layer shares. Decode steps on static buffers (the CUDA-graph path) carry
`context_lens` and run the Triton kernel of triton_attention.py instead.

Semantics: for query token i of sequence b at position p_i, out_i = softmax(q_i K_b^T / sqrt(d)
+ mask) V_b, where K_b/V_b are the sequence's cached keys/values at positions 0..ctx_b-1 and the
mask keeps positions j <= p_i (and j > p_i - window with a sliding window).

Prefix caching needs nothing more here: a prefill whose first k blocks were found cached has query
positions k * block_size .. ctx-1 and reads positions below them from the shared blocks through the
same block table (on CUDA too: prefill runs this SDPA path, not the Triton decode kernel)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from node.engine.layers.kv_cache import LayerKV, gather


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
    kk, vv = gather(kv, meta.block_tables, q.dtype)  # [B, Lk, KVH, d] each
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), attn_mask=meta.mask, enable_gqa=True
    ).transpose(1, 2)  # [B, Lq, H, d]
    if meta.query_valid is None:
        return out.reshape(b, q.shape[1], d)
    return out[meta.query_valid]  # [T, H, d], sequence-major like q
