"""Our Llama-family decoder (Llama 2/3, Mistral, Qwen2 qkv bias, Qwen3 q/k norm) over flat token
batches with a paged KV cache; q/k/v and gate/up are fused, each wrapped with LoRA."""

from __future__ import annotations

import dataclasses
import math
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from node.engine.config import ModelConfig, RopeConfig
from node.engine.layers.attention import AttentionMetadata, LayerKV, paged_attention, write_kv
from node.engine.lora.layers import LinearWithLoRA
from node.engine.lora.mapping import LoRAMapping
from node.engine.quant import Int8Weight

if TYPE_CHECKING:
    from node.engine.parallel import Shard


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in fp32 like transformers, so fp32 logits match to rounding
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], with Llama 3 / linear scaling when configured."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return inv / rope.factor
    if rope.rope_type == "llama3":
        low_wl = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wl = rope.original_max_position_embeddings / rope.high_freq_factor
        wl = 2 * math.pi / inv
        scaled = torch.where(wl > low_wl, inv / rope.factor, inv)
        smooth = (rope.original_max_position_embeddings / wl - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        mid = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_mid = (wl >= high_wl) & (wl <= low_wl)
        return torch.where(is_mid, mid, scaled)
    return inv


class Rotary(nn.Module):
    """cos/sin tables [max_pos, head_dim], applied rotate-half style (the HF layout)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None

    def build(self, device: torch.device, dtype: torch.dtype) -> None:
        inv = rope_inv_freq(self.cfg.rope, self.cfg.head_dim).to(device)
        t = torch.arange(self.cfg.max_position_embeddings, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos, self.sin = emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x [T, heads, d], positions [T]
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _column(shard: Shard | None, names: tuple[str, ...]) -> dict:
    if shard is None:
        return {}
    return {"out_ranges": tuple(shard.out_range(n) for n in names), "out_full": tuple(shard.out_full(n) for n in names)}


def _row(shard: Shard | None, name: str) -> dict:
    if shard is None:
        return {}
    from node.engine.parallel import all_reduce, all_reduce_max

    lo, hi = shard.in_range(name)
    return {
        "in_range": (lo, hi),
        "in_full": (hi - lo) * shard.world,
        "reduce": all_reduce,
        "reduce_max": all_reduce_max,
    }


class Attention(nn.Module):
    """`cfg` is the shard's under tensor parallelism (its heads), and `shard` says which."""

    def __init__(self, cfg: ModelConfig, mapping: LoRAMapping, rotary: Rotary, shard: Shard | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv_proj = LinearWithLoRA(
            cfg.hidden_size,
            (cfg.q_size, cfg.kv_size, cfg.kv_size),
            ("q_proj", "k_proj", "v_proj"),
            cfg.qkv_bias,
            mapping,
            **_column(shard, ("q_proj", "k_proj", "v_proj")),
        )
        self.o_proj = LinearWithLoRA(
            cfg.q_size, (cfg.hidden_size,), ("o_proj",), cfg.o_bias, mapping, **_row(shard, "o_proj")
        )
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rotary = rotary

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv: LayerKV,
        fused: ModuleType | None = None,
    ) -> torch.Tensor:
        c = self.cfg
        qkv = self.qkv_proj(x)  # [T, q + 2 kv]
        # one kernel: rotate q and k, write k and v into the cache (an fp8 cache is written by write_kv, which
        # quantizes)
        if fused is not None and self.q_norm is None and not kv.quantized:
            q = fused.rope_and_cache(
                qkv, self.rotary.cos, self.rotary.sin, positions, meta.slot_mapping, kv.k, kv.v, c.num_heads
            )  # [T, H, d]
            return self.o_proj(paged_attention(q, kv, meta).reshape(-1, c.q_size))
        q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = q.view(-1, c.num_heads, c.head_dim)
        k = k.view(-1, c.num_kv_heads, c.head_dim)
        v = v.view(-1, c.num_kv_heads, c.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(q, positions), self.rotary(k, positions)
        write_kv(kv, k, v.contiguous(), meta.slot_mapping)
        out = paged_attention(q, kv, meta)  # [T, H, d]
        return self.o_proj(out.reshape(-1, c.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, mapping: LoRAMapping, shard: Shard | None = None) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = LinearWithLoRA(
            cfg.hidden_size,
            (self.inter, self.inter),
            ("gate_proj", "up_proj"),
            False,
            mapping,
            **_column(shard, ("gate_proj", "up_proj")),
        )
        self.down_proj = LinearWithLoRA(
            self.inter, (cfg.hidden_size,), ("down_proj",), False, mapping, **_row(shard, "down_proj")
        )

    def forward(self, x: torch.Tensor, fused: ModuleType | None = None) -> torch.Tensor:
        if fused is not None:
            return self.down_proj(fused.silu_mul(self.gate_up_proj(x)))  # [T, 2I] -> [T, I] -> [T, D]
        gate, up = self.gate_up_proj(x).split([self.inter, self.inter], dim=-1)  # [T, I] each
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, mapping: LoRAMapping, rotary: Rotary, shard: Shard | None = None) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, mapping, rotary, shard)
        self.mlp = MLP(cfg, mapping, shard)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, positions, meta, kv):
        x = x + self.self_attn(self.input_layernorm(x), positions, meta, kv)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(self, x, residual, positions, meta, kv, fused: ModuleType):
        """(x, residual) -> (x, residual) with the fused ops: the residual adds happen inside the fused
        norms (vLLM's fused_add_rms_norm); residual None on the first layer, whose input is the residual
        stream."""
        ln, post = self.input_layernorm, self.post_attention_layernorm
        h = fused.rms_norm(x, ln.weight, ln.eps, residual)  # [T, D]
        residual = x if residual is None else residual
        x = self.self_attn(h, positions, meta, kv, fused=fused)
        h = fused.rms_norm(x, post.weight, post.eps, residual)  # residual += attention output
        return self.mlp(h, fused=fused), residual


def full_context(meta: AttentionMetadata) -> AttentionMetadata:
    """The same step's metadata without its sliding window, for the layers that attend to everything.

    Semantics: a windowed mask row keeps keys (p - window, p], so its last kept key is the query's
    position p; the full causal row keeps [0, p]. The decode kernel takes the window as an argument."""
    if meta.mask is None:
        return dataclasses.replace(meta, window=None)
    lk = meta.mask.shape[-1]
    kpos = torch.arange(lk, device=meta.mask.device)  # [Lk]
    last = torch.where(meta.mask, kpos, -1).amax(-1, keepdim=True)  # [B, 1, Lq, 1]: each query's position
    return dataclasses.replace(meta, mask=kpos <= last, window=None)


class CausalLM(nn.Module):
    """Flat-batch decoder: forward(token_ids [T], positions [T], meta, kv caches) -> hidden [T, D].
    With a tensor-parallel `shard` its layers hold that rank's heads and columns (parallel.py); the
    embedding, norms and lm_head stay whole."""

    def __init__(self, cfg: ModelConfig, mapping: LoRAMapping, shard: Shard | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.shard = shard
        layer_cfg = cfg if shard is None else shard.local_config()
        self.mapping = mapping
        self.rotary = Rotary(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(layer_cfg, mapping, self.rotary, shard) for _ in range(cfg.num_layers))
        # Qwen2/Qwen3 slide only some layers (transformers' layer_types): the runner's metadata carries
        # the window, and the layers that attend over the whole context get it without (full_context).
        self.full_layers = frozenset(i for i in range(cfg.num_layers) if cfg.layer_window(i) is None)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if self.lm_head is not None:
            self.lm_head.weight.requires_grad_(False)
        self.fused: ModuleType | None = None  # layers/fused.py when the fused ops run (use_fused_ops)
        # quantized bases (quant.py): the embedding table and the output layer as int8 rows; they replace
        # embed_tokens / lm_head, and a tied model's one table serves both
        self.qembed: Int8Weight | None = None
        self.qhead: Int8Weight | None = None

    def quantize_vocab(self, embed: Int8Weight, head: Int8Weight | None) -> None:
        """Serve the embedding (and the untied lm_head, else the same table) from int8 rows."""
        self.qembed, self.qhead = embed, head if head is not None else embed
        self.embed_tokens = None
        self.lm_head = None

    def use_fused_ops(self, on: bool) -> None:
        """Run the CUDA path's fused Triton norms, rotary + cache writes and SiLU gate, or the torch ops.
        Their module is imported here, once, not with this one: importing it defines Triton kernels,
        which needs Triton installed and TRITON_INTERPRET already set when it is to apply."""
        if on:
            from node.engine.layers import fused

            self.fused = fused
        else:
            self.fused = None

    def lora_layers(self) -> list[tuple[int, LinearWithLoRA]]:
        """(layer index, wrapped linear) for every LoRA-capable module."""
        out = []
        for i, layer in enumerate(self.layers):
            a, m = layer.self_attn, layer.mlp
            out += [(i, a.qkv_proj), (i, a.o_proj), (i, m.gate_up_proj), (i, m.down_proj)]
        return out

    def forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[LayerKV],
    ) -> torch.Tensor:
        if self.qembed is None:
            x = self.embed_tokens(token_ids)  # [T, D]
        else:
            x = self.qembed.embedding(token_ids, self.norm.weight.dtype)
        metas = [meta] * len(self.layers)
        if self.cfg.sliding_window is not None and self.full_layers:
            full = full_context(meta)
            metas = [full if i in self.full_layers else meta for i in range(len(self.layers))]
        if self.fused is not None:
            residual = None
            for layer, m, kv in zip(self.layers, metas, kv_caches):
                x, residual = layer.forward_fused(x, residual, positions, m, kv, self.fused)
            return self.fused.rms_norm(x, self.norm.weight, self.norm.eps, residual)
        for layer, m, kv in zip(self.layers, metas, kv_caches):
            x = layer(x, positions, m, kv)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden [N, D] -> [N, vocab]
        if self.qhead is not None:
            return self.qhead.linear(hidden)
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if hidden.device.type == "cpu" and 1 < hidden.shape[0] < 8:
            # MKL's GEMM over 2-7 rows of a vocabulary-wide weight ran at half the speed of this product
            # (a speculative step's verified positions); the same sums, another loop order
            return (w @ hidden.T).T.contiguous()
        return F.linear(hidden, w)
