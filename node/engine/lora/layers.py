"""LoRA overlaid on base linear layers (vLLM's *WithLoRA layers): `LinearWithLoRA` wraps one (possibly
fused) base linear with per-slot stacked A/B tensors, views into the model runner's slot buffer, and
adds the LoRA delta of each token's slot through the step's LoRAMapping. Base weights are never
copied or merged."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from node.engine.lora.mapping import LoRAMapping
from node.engine.lora.weights import scaled
from node.engine.quant import QuantWeight, quantize_columns, quantize_weight


class LinearWithLoRA(nn.Module):
    """A base linear whose output is the concatenation of `names` (e.g. q,k,v fused), plus LoRA.

    Under tensor parallelism (parallel.py) it holds one rank's shard: column-parallel (`out_ranges`, each
    part's rows [start, stop) of its full output) or row-parallel (`in_range`, the full input's columns it
    reads, and `reduce`, the all-reduce of its partial output). Sizes given are the shard's."""

    def __init__(
        self,
        in_features: int,
        output_sizes: tuple[int, ...],
        names: tuple[str, ...],
        bias: bool,
        mapping: LoRAMapping,
        *,
        out_ranges: tuple[tuple[int, int], ...] | None = None,
        out_full: tuple[int, ...] | None = None,
        in_range: tuple[int, int] | None = None,
        in_full: int | None = None,
        reduce=None,
        reduce_max=None,
    ) -> None:
        super().__init__()
        self.out_ranges = out_ranges
        self.out_full = out_full  # a column-parallel shard's parts' whole output sizes
        self.in_range = in_range
        self.in_full = in_full  # a row-parallel shard's whole input width
        self.reduce = reduce
        self.reduce_max = reduce_max  # max over the ranks: a quantized shard's per-token input scale
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
        if self.out_ranges is not None:  # this rank's rows of the part (a weight's or a bias's)
            if loaded.shape[0] != self.out_full[i]:
                raise ValueError(f"{name}: checkpoint has {loaded.shape[0]} output rows, expected {self.out_full[i]}")
            loaded = loaded[self.out_ranges[i][0] : self.out_ranges[i][1]]
        rows = param.data[self.offsets[i] : self.offsets[i] + self.output_sizes[i]]
        if rows.shape != loaded.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(loaded.shape)} != expected {tuple(rows.shape)}")
        rows.copy_(loaded)

    def check_full_input(self, w: torch.Tensor, name: str) -> torch.Tensor:
        """A row-parallel shard's whole checkpoint weight [out, in_full], checked before it is cut."""
        if tuple(w.shape) != (sum(self.output_sizes), self.in_full):
            raise ValueError(
                f"{name}: checkpoint shape {tuple(w.shape)} != expected {(sum(self.output_sizes), self.in_full)}"
            )
        return w

    def shard_input(self, w: torch.Tensor) -> torch.Tensor:
        """A row-parallel layer's columns of its full checkpoint weight [out, in] (the bias stays whole)."""
        if self.in_range is None or w.dim() != 2:
            return w
        return w[:, self.in_range[0] : self.in_range[1]]

    def quantize(self, w: torch.Tensor, scheme: str, name: str) -> None:
        """Serve the base from `w` [sum(out), in] quantized under `scheme`; the full-precision parameter goes.
        A row-parallel shard takes the whole checkpoint weight and keeps its columns after scaling."""
        if self.in_range is not None and tuple(w.shape) == (sum(self.output_sizes), self.in_full):
            self.qweight = quantize_columns(w, *self.in_range, scheme, name, self.reduce_max)
            self.weight = None
            return
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

    def slot_parts(self, layer: int, adapter):
        """The blocks of this module's slot stacks that `adapter` fills: (A or B source, whether it
        is read transposed, first row of the stack, first column, whether it is B). A shard keeps
        B's rows or A's columns. Scaling and dtype are the writer's (slot_image, or the device
        layout of kernels/slot_layout.py)."""
        for i, name in enumerate(self.names):
            w = adapter.weights.get((layer, name))
            if w is None:
                continue
            a, b = w  # the full adapter: A [r, in], B [out, r]
            if self.out_ranges is not None:
                b = b[self.out_ranges[i][0] : self.out_ranges[i][1]]
            if self.in_range is not None:
                a = a[:, self.in_range[0] : self.in_range[1]]
            yield a, False, i * self.rank, 0, False
            yield b, True, i * self.rank, self.offsets[i], True

    def slot_image(self, image_a: torch.Tensor, image_b: torch.Tensor, layer: int, adapter) -> None:
        """Write `adapter`'s weights for this module into one slot's (zeroed) A and B views: a host
        image, or the slot's row of the device buffer itself."""
        for src, _, row, col, is_b in self.slot_parts(layer, adapter):
            if is_b:
                image_b[row : row + src.shape[1], col : col + src.shape[0]].copy_(
                    scaled(src, adapter.scaling, image_b.dtype).t()
                )
            else:
                image_a[row : row + src.shape[0]].copy_(src)

    def slot_jobs(self, layer: int, adapter, a_off: int, b_off: int):
        """slot_parts as device layout jobs into a slot row whose A stack starts at `a_off` and B
        stack at `b_off` (elements): (source, transposed, dst_off, dst_rs, scale)."""
        (_, a_cols), (_, b_cols) = self.lora_shapes(self.rank)
        for src, transposed, row, col, is_b in self.slot_parts(layer, adapter):
            if is_b:
                yield src, transposed, b_off + row * b_cols + col, b_cols, adapter.scaling
            else:
                yield src, transposed, a_off + row * a_cols, a_cols, 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [T, in] -> y [T, sum(out)]
        # row-parallel: the bias is added once, after the ranks' partial sums are reduced
        bias = self.bias if self.reduce is None else None
        if self.qweight is None:
            y = F.linear(x, self.weight, bias)
        else:  # only the base matmul changes: the LoRA delta below adds in x's dtype as ever
            y = self.qweight.linear(x)
            if bias is not None:
                y = y + bias
        if self.mapping.active:
            self.mapping.add_lora(y, x, self.lora_a, self.lora_b, self.output_sizes)
        if self.reduce is not None:  # x_i W_i + (x_i A_i) B summed: B is whole, so this is x W + (x A) B
            self.reduce(y)
            if self.bias is not None:
                y = y + self.bias
        return y
