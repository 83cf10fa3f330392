"""LoRA overlaid on base linear layers: `LoRAMapping` owns the per-token slot indices of a step
(vLLM's punica wrapper; -1 = base only) and `LinearWithLoRA` wraps one (possibly fused) base linear
with per-slot stacked A/B tensors (vLLM's *WithLoRA layers). Base weights are never copied or merged."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from node.engine.lora_kernels import LoRAKernel, TorchLoRAKernel

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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

    def add_lora(self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 slices: tuple[int, ...] | None = None) -> None:
        """y += B[s] @ (A[s] @ x), in place; fused slices sit block-diagonally in A and B."""
        if not self.active:
            return
        h = self.kernel.shrink(x, a, self.meta)  # [T, n_slices * R], or the kernel's own layout of it
        self.kernel.expand(y, h, b, self.meta, 0, slices)


class LinearWithLoRA(nn.Module):
    """A base linear whose output is the concatenation of `names` (e.g. q,k,v fused), plus LoRA."""

    def __init__(self, in_features: int, output_sizes: tuple[int, ...], names: tuple[str, ...],
                 bias: bool, mapping: LoRAMapping) -> None:
        super().__init__()
        self.in_features = in_features
        self.output_sizes = output_sizes
        self.names = names
        self.offsets = tuple(sum(output_sizes[:i]) for i in range(len(output_sizes)))
        self.mapping = mapping
        self.weight = nn.Parameter(torch.empty(sum(output_sizes), in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(sum(output_sizes)), requires_grad=False) if bias else None
        self.lora_a: torch.Tensor | None = None  # [S+1, n*R, in]
        # [S+1, n*R, sum(out)], block-diagonal: slice i's rank rows feed only its output columns,
        # so a fused projection takes one shrink and one expand
        self.lora_b: torch.Tensor | None = None
        self.rank = 0

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, name: str) -> None:
        """Copy the checkpoint tensor of projection `name` into its rows of the fused parameter."""
        i = self.names.index(name)
        rows = param.data[self.offsets[i] : self.offsets[i] + self.output_sizes[i]]
        if rows.shape != loaded.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(loaded.shape)} != expected {tuple(rows.shape)}")
        rows.copy_(loaded)

    def allocate_lora(self, num_slots: int, max_rank: int) -> None:
        """Allocate zeroed slot stacks (plus the all-zero row S for base-only tokens)."""
        dev, dt = self.weight.device, self.weight.dtype
        n = len(self.names)
        self.rank = max_rank
        self.lora_a = torch.zeros(num_slots + 1, n * max_rank, self.in_features, device=dev, dtype=dt)
        self.lora_b = torch.zeros(num_slots + 1, n * max_rank, sum(self.output_sizes), device=dev, dtype=dt)

    def lora_shapes(self, max_rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Per-slot shapes of (A, B): ([n*R, in], [n*R, sum(out)])."""
        n = len(self.names)
        return (n * max_rank, self.in_features), (n * max_rank, sum(self.output_sizes))

    def attach_lora(self, a: torch.Tensor, b: torch.Tensor, max_rank: int) -> None:
        """Use views into a shared slot buffer as the stacks (one copy then fills a whole slot)."""
        self.rank = max_rank
        self.lora_a, self.lora_b = a, b

    def slot_image(self, image_a: torch.Tensor, image_b: torch.Tensor, layer: int, adapter) -> None:
        """Write `adapter`'s weights for this module into one slot's (zeroed) A and B views."""
        for i, name in enumerate(self.names):
            w = adapter.weights.get((layer, name))
            if w is None:
                continue
            a, b = w
            r = a.shape[0]
            base = i * self.rank
            image_a[base: base + r].copy_(a)
            image_b[base: base + r, self.offsets[i]: self.offsets[i] + self.output_sizes[i]].copy_(b.t())

    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()

    def set_slot(self, slot: int, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Write one projection's adapter into a slot: a [r, in], b [out, r] (scaling folded in)."""
        i = self.names.index(name)
        r = a.shape[0]
        base = i * self.rank
        self.lora_a[slot, base : base + r].copy_(a, non_blocking=True)
        self.lora_a[slot, base + r : base + self.rank].zero_()
        cols = slice(self.offsets[i], self.offsets[i] + self.output_sizes[i])
        self.lora_b[slot, base : base + r, cols].copy_(b.t(), non_blocking=True)
        self.lora_b[slot, base + r : base + self.rank, cols].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [T, in] -> y [T, sum(out)]
        y = F.linear(x, self.weight, self.bias)
        if self.mapping.active:
            self.mapping.add_lora(y, x, self.lora_a, self.lora_b, self.output_sizes)
        return y
