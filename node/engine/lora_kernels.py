"""The batched multi-adapter LoRA kernel interface and its torch reference implementation.

Layout shared by every implementation (the Triton kernels of the GPU issue slot in here):
- `a`: [S + 1, R, in]   stacked lora_A of S slots; row S is all zeros ("no adapter").
- `b`: [S + 1, R, out]  stacked lora_B transposed, the adapter's scaling folded in; row S zeros.
- token slot indices: [T] int64, -1 = base only; `prepare` turns them into kernel metadata once
  per step, and every layer of that step reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(slots=True)
class LoRAMeta:
    """Per-step metadata of the torch reference kernel."""

    rows: torch.Tensor  # [T] int64: slot per token, S for base-only tokens
    num_tokens: int
    num_slots: int
    mode: str  # "grouped" | "dense" | "gather"
    # grouped mode: tokens with an adapter, packed per active slot into [G, max_per_slot]
    group_slots: torch.Tensor | None = None  # [G] slot of each group
    tok_idx: torch.Tensor | None = None  # [N] token index of each adapter token
    tok_group: torch.Tensor | None = None  # [N] its group
    tok_pos: torch.Tensor | None = None  # [N] its position in the group
    max_per_slot: int = 0
    group_range: tuple[int, int] | None = None  # groups are slots lo..hi-1 in order: slice, don't gather


class LoRAKernel(Protocol):
    """Semantics, for each token t with slot s_t >= 0:
    shrink: h[t] = A[s_t] @ x[t]                  (x [T, in] -> h [T, R])
    expand: y[t, off:off+out] += B[s_t] @ h[t]    (h [T, R] -> y slice [T, out], in place)
    tokens with s_t = -1 get h[t] = 0 and y unchanged. `host_slots` is the same list on the host,
    so a kernel can plan the step without reading device memory. `slices` (fused outputs) says
    that slice i's columns take only rank rows i*R/n..(i+1)*R/n (B is block-diagonal), so a kernel
    may skip the zero blocks. What shrink returns is only ever handed to the same kernel's expand
    (the Triton kernel returns float32 split-K partials [K, T, R] whose sum is h)."""

    def prepare(self, token_slots: torch.Tensor, num_slots: int, host_slots: list[int]) -> object: ...

    def shrink(self, x: torch.Tensor, a: torch.Tensor, meta: object) -> torch.Tensor: ...

    def expand(self, y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, meta: object, offset: int,
               slices: tuple[int, ...] | None = None) -> None: ...


class TorchLoRAKernel:
    """Reference kernel with three strategies, chosen per step from the host slot list:
    - grouped (SGMV-like): adapter tokens packed per active slot, one bmm against each active
      adapter's weights read once; best when tokens spread evenly over the adapters.
    - dense: every token times every slot, keep its own: (S+1)*R*in reads and T*(S+1)*R*in
      multiply-adds in one BLAS call; best when one adapter holds most tokens.
    - gather (BGMV-like): copies each token's adapter weights, 3*T*R*in traffic; for T << S."""

    def __init__(self, mode: str | None = None) -> None:
        if mode not in (None, "grouped", "dense", "gather"):
            raise ValueError(f"mode {mode!r} is not one of grouped, dense, gather (or None = automatic)")
        self.mode = mode

    def prepare(self, token_slots: torch.Tensor, num_slots: int, host_slots: list[int]) -> LoRAMeta:
        """Map -1 to the zero row S and plan this step's strategy."""
        rows = torch.where(token_slots < 0, torch.full_like(token_slots, num_slots), token_slots)
        t = len(host_slots)
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(host_slots):
            if s >= 0:
                groups.setdefault(s, []).append(i)
        g = len(groups)
        max_per = max((len(v) for v in groups.values()), default=0)
        mode = self.mode
        if mode is None:
            costs = {"grouped": g * max_per * 8 + g * 8, "dense": t * (num_slots + 1) + (num_slots + 1) * 8,
                     "gather": t * 24}
            mode = min(costs, key=costs.get)
        meta = LoRAMeta(rows=rows, num_tokens=t, num_slots=num_slots, mode=mode)
        if mode == "grouped":
            dev = token_slots.device
            meta.group_slots = torch.tensor(list(groups), dtype=torch.int64).to(dev)
            meta.tok_idx = torch.tensor([i for v in groups.values() for i in v], dtype=torch.int64).to(dev)
            meta.tok_group = torch.tensor([k for k, v in enumerate(groups.values()) for _ in v], dtype=torch.int64).to(dev)
            meta.tok_pos = torch.tensor([p for v in groups.values() for p in range(len(v))], dtype=torch.int64).to(dev)
            meta.max_per_slot = max_per
            keys = list(groups)
            if keys == list(range(keys[0], keys[0] + g)):
                meta.group_range = (keys[0], keys[0] + g)
        return meta

    @staticmethod
    def _group_weights(w: torch.Tensor, meta: LoRAMeta) -> torch.Tensor:
        # [G, ...] weights of the active slots: a view when they are consecutive
        if meta.group_range is not None:
            return w[meta.group_range[0] : meta.group_range[1]]
        return w[meta.group_slots]

    def shrink(self, x: torch.Tensor, a: torch.Tensor, meta: LoRAMeta) -> torch.Tensor:
        """h[t] = A[s_t] @ x[t]."""
        s1, r, d_in = a.shape
        if meta.mode == "grouped":
            xg = x.new_zeros(meta.group_slots.shape[0], meta.max_per_slot, d_in)  # [G, M, in]
            xg[meta.tok_group, meta.tok_pos] = x[meta.tok_idx]
            hg = torch.bmm(xg, self._group_weights(a, meta).transpose(1, 2))  # [G, M, R]
            h = x.new_zeros(meta.num_tokens, r)
            h[meta.tok_idx] = hg[meta.tok_group, meta.tok_pos]
            return h
        if meta.mode == "dense":
            # [T, in] @ [in, (S+1)*R] -> [T, S+1, R], then keep each token's own slot
            full = (x @ a.reshape(s1 * r, -1).t()).view(-1, s1, r)
            return full[torch.arange(meta.num_tokens, device=x.device), meta.rows]
        # [T, R, in] @ [T, in, 1] -> [T, R]
        return torch.bmm(a[meta.rows], x.unsqueeze(-1)).squeeze(-1)

    def expand(self, y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, meta: LoRAMeta, offset: int,
               slices: tuple[int, ...] | None = None) -> None:
        """y[t, off:off+out] += B[s_t] @ h[t] (the zero blocks of a fused B are simply multiplied)."""
        s1, r, out = b.shape
        if meta.mode == "grouped":
            hg = h.new_zeros(meta.group_slots.shape[0], meta.max_per_slot, r)  # [G, M, R]
            hg[meta.tok_group, meta.tok_pos] = h[meta.tok_idx]
            dg = torch.bmm(hg, self._group_weights(b, meta))  # [G, M, out]
            y[meta.tok_idx, offset : offset + out] += dg[meta.tok_group, meta.tok_pos]
            return
        if meta.mode == "dense":
            # scatter h into its slot's columns: [T, (S+1)*R] @ [(S+1)*R, out] -> [T, out]
            wide = h.new_zeros(meta.num_tokens, s1, r)
            wide[torch.arange(meta.num_tokens, device=h.device), meta.rows] = h
            delta = wide.view(meta.num_tokens, s1 * r) @ b.reshape(s1 * r, out)  # a view unless b is strided
        else:
            # [T, 1, R] @ [T, R, out] -> [T, out]
            delta = torch.bmm(h.unsqueeze(1), b[meta.rows]).squeeze(1)
        y[:, offset : offset + out] += delta
