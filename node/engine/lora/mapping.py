"""The token -> adapter slot mapping of one step (vLLM's punica wrapper): planned once on the host,
shared by every LoRA layer of the model, and the one place a layer's LoRA delta is computed."""

from __future__ import annotations

import torch

from node.engine.lora.kernels.base import LoRAKernel
from node.engine.lora.kernels.torch_ref import TorchLoRAKernel


class LoRAMapping:
    """Token -> slot mapping for one step, shared by every LoRA layer of the model."""

    def __init__(self, num_slots: int, kernel: LoRAKernel | None = None) -> None:
        self.num_slots = num_slots
        self.kernel: LoRAKernel = kernel or TorchLoRAKernel()
        self.active = False  # any token of this step has an adapter
        self.meta: object | None = None

    def set_token_slots(self, host_slots: list[int], device: torch.device | str = "cpu") -> None:
        """Install this step's slots (one per token, -1 = base only), planned on the host, so
        base-only steps skip LoRA and no kernel reads device memory to plan."""
        self.active = any(s >= 0 for s in host_slots)
        if not self.active:
            self.meta = None
            return
        device = torch.device(device)
        # pinned on CUDA: a pageable host-to-device copy would sync the stream
        token_slots = torch.tensor(host_slots, dtype=torch.int64, pin_memory=device.type == "cuda")
        token_slots = token_slots.to(device, non_blocking=True)
        self.meta = self.kernel.prepare(token_slots, self.num_slots, host_slots)

    def set_meta(self, meta: object | None) -> None:
        """Install metadata prepared elsewhere (static buffers a CUDA graph replays); None = base only."""
        self.active = meta is not None
        self.meta = meta

    def add_lora(
        self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slices: tuple[int, ...] | None = None
    ) -> None:
        """y += B[s] @ (A[s] @ x), in place; fused slices sit block-diagonally in A and B."""
        if not self.active:
            return
        h = self.kernel.shrink(x, a, self.meta)  # [T, n_slices * R], or the kernel's own layout of it
        self.kernel.expand(y, h, b, self.meta, 0, slices)
