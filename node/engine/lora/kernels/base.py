"""The batched multi-adapter LoRA kernel interface, which the torch reference (torch_ref.py) and
the Triton kernels (triton.py) implement.

Layout shared by every implementation:
- `a`: [S + 1, R, in]   stacked lora_A of S slots; row S is all zeros ("no adapter").
- `b`: [S + 1, R, out]  stacked lora_B transposed, the adapter's scaling folded in; row S zeros.
- token slot indices: [T] int64, -1 = base only; `prepare` turns them into kernel metadata once
  per step, and every layer of that step reuses it.
R = n_slices * rank for a fused projection (q/k/v, gate/up): slice i's rows i*rank..(i+1)*rank
feed only its columns of `b` (block-diagonal). The stacks are views into the model runner's slot
buffer, so their slot stride may be larger than R * in; the last dim is always contiguous.
"""

from __future__ import annotations

from typing import Protocol

import torch


class LoRAKernel(Protocol):
    """Semantics, for each token t with slot s_t >= 0:
    shrink: h[t] = A[s_t] @ x[t]                  (x [T, in] -> h [T, R])
    expand: y[t, off:off+out] += B[s_t] @ h[t]    (h [T, R] -> y slice [T, out], in place)
    tokens with s_t = -1 get h[t] = 0 and y unchanged. `host_slots` is the same list on the host,
    so a kernel can plan the step without reading device memory. `slices` (fused outputs) says
    that slice i's columns take only rank rows i*R/n..(i+1)*R/n (B is block-diagonal), so a kernel
    may skip the zero blocks. What shrink returns is only ever handed to the same kernel's expand
    (the Triton kernel returns float32 split-K partials [K, T, R] whose sum is h; the torch
    kernel's grouped mode returns h in its packed row order)."""

    def prepare(self, token_slots: torch.Tensor, num_slots: int, host_slots: list[int]) -> object: ...

    def shrink(self, x: torch.Tensor, a: torch.Tensor, meta: object) -> torch.Tensor: ...

    def expand(
        self,
        y: torch.Tensor,
        h: torch.Tensor,
        b: torch.Tensor,
        meta: object,
        offset: int,
        slices: tuple[int, ...] | None = None,
    ) -> None: ...
