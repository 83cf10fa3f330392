"""LoRA overlaid on base linear layers (vLLM's *WithLoRA layers): `LinearWithLoRA` wraps one (possibly
fused) base linear with per-slot stacked A/B tensors, views into the model runner's slot buffer, and
adds the LoRA delta of each token's slot through the step's LoRAMapping. Base weights are never
copied or merged."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from node.engine.lora.mapping import LoRAMapping
from node.engine.quant import QuantWeight, quantize_weight


class LinearWithLoRA(nn.Module):
    """A base linear whose output is the concatenation of `names` (e.g. q,k,v fused), plus LoRA."""

    def __init__(
        self, in_features: int, output_sizes: tuple[int, ...], names: tuple[str, ...], bias: bool, mapping: LoRAMapping
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.output_sizes = output_sizes
        self.names = names
        self.offsets = tuple(sum(output_sizes[:i]) for i in range(len(output_sizes)))
        self.mapping = mapping
        self.weight = nn.Parameter(torch.empty(sum(output_sizes), in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(sum(output_sizes)), requires_grad=False) if bias else None
        self.qweight: QuantWeight | None = None  # the base weight when the node serves it quantized
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

    def quantize(self, w: torch.Tensor, scheme: str, name: str) -> None:
        """Serve the base from `w` [sum(out), in] quantized under `scheme`; the full-precision parameter goes."""
        if tuple(w.shape) != (sum(self.output_sizes), self.in_features):
            raise ValueError(
                f"{name}: weight shape {tuple(w.shape)} != expected {(sum(self.output_sizes), self.in_features)}"
            )
        self.qweight = quantize_weight(w, scheme, name)
        self.weight = None

    def lora_shapes(self, max_rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Per-slot shapes of (A, B): ([n*R, in], [n*R, sum(out)])."""
        n = len(self.names)
        return (n * max_rank, self.in_features), (n * max_rank, sum(self.output_sizes))

    def attach_lora(self, a: torch.Tensor, b: torch.Tensor, max_rank: int) -> None:
        """Use views into the runner's slot buffer as the stacks (one copy then fills a whole slot)."""
        self.rank = max_rank
        self.lora_a, self.lora_b = a, b

    def slot_image(self, image_a: torch.Tensor, image_b: torch.Tensor, layer: int, adapter) -> None:
        """Write `adapter`'s weights for this module into one slot's (zeroed) A and B views: a host
        image, or the slot's row of the device buffer itself."""
        for i, name in enumerate(self.names):
            w = adapter.weights.get((layer, name))
            if w is None:
                continue
            a, b = w
            r = a.shape[0]
            base = i * self.rank
            image_a[base : base + r].copy_(a)
            image_b[base : base + r, self.offsets[i] : self.offsets[i] + self.output_sizes[i]].copy_(b.t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [T, in] -> y [T, sum(out)]
        if self.qweight is None:
            y = F.linear(x, self.weight, self.bias)
        else:  # only the base matmul changes: the LoRA delta below adds in x's dtype as ever
            y = self.qweight.linear(x)
            if self.bias is not None:
                y = y + self.bias
        if self.mapping.active:
            self.mapping.add_lora(y, x, self.lora_a, self.lora_b, self.output_sizes)
        return y
