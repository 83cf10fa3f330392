"""Decode a verified adapter package into per-projection (A, B) tensors ready for a slot."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from node.adapters.weights import module_dims, parse_lora_key
from node.engine.config import ModelConfig
from node.engine.lora.errors import AdapterIncompatibleError


@dataclass(slots=True)
class LoadedAdapter:
    """An adapter decoded in host memory: weights[(layer, target)] = (A [r, in], B [out, r]), in the
    package's dtype, as read (views into `buffer` when it was read whole); a slot holds A and
    B * `scaling` in the node's dtype, and the slot write does that conversion (layers.py)."""

    adapter_id: str
    name: str
    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    scaling: float = 1.0
    buffer: torch.Tensor | None = None  # the one host buffer the weights view, if any
    # the whole slot as laid out on the device (padded ranks, block-diagonal fused B), pinned on
    # CUDA, so a slot load is one asynchronous copy; built on the loader thread when the runner
    # prebuilds images (EngineConfig.slot_images), else at the slot write
    image: torch.Tensor | None = None
    # or, when `buffer` is a host pool buffer (lora/host_pool.py): how the device lays it out into a
    # slot (kernels/slot_layout.py), so a slot load is one raw copy and one layout launch
    plan: object | None = None


def decode_lora(
    adapter_id: str,
    name: str,
    tensors: dict[str, torch.Tensor],
    scaling: float,
    cfg: ModelConfig,
    max_rank: int,
    dtype: torch.dtype,
    *,
    check_values: bool = True,
    buffer: torch.Tensor | None = None,
) -> LoadedAdapter:
    """PEFT tensors -> LoadedAdapter, checked against the model's shapes and the slot rank. The
    weights stay as read: no conversion pass on the host. `check_values`: check that A and B *
    scaling are finite in `dtype`; verification already proved it of any package whose hashes it
    checked (verify.check_values), so a store that verified may skip this pass over the bytes."""
    dims = module_dims(cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size)
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        parsed = parse_lora_key(key)
        if parsed is None:
            raise AdapterIncompatibleError(
                f"adapter {adapter_id}: tensor {key!r} is not a LoRA weight of q/k/v/o/gate/up/down"
            )
        layer, target, ab = parsed
        if layer >= cfg.num_layers:
            raise AdapterIncompatibleError(
                f"adapter {adapter_id}: tensor {key!r} is for layer {layer}; the base has {cfg.num_layers}"
            )
        parts.setdefault((layer, target), {})[ab] = t
    weights = {}
    rank = 0
    for (layer, target), ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise AdapterIncompatibleError(f"adapter {adapter_id}: layer {layer} {target} lacks lora_A or lora_B")
        a, b = ab["A"], ab["B"]
        d_in, d_out = dims[target]
        r = a.shape[0]
        if a.shape != (r, d_in) or b.shape != (d_out, r):
            raise AdapterIncompatibleError(
                f"adapter {adapter_id}: layer {layer} {target} has A{list(a.shape)} B{list(b.shape)}, "
                f"expected A[r, {d_in}] B[{d_out}, r]"
            )
        if r > max_rank:
            raise AdapterIncompatibleError(
                f"adapter {adapter_id} has rank {r}, above this node's max_lora_rank {max_rank}"
            )
        rank = max(rank, r)
        if check_values and not (torch.isfinite(a.to(dtype)).all() and torch.isfinite(scaled(b, scaling, dtype)).all()):
            raise AdapterIncompatibleError(
                f"adapter {adapter_id}: layer {layer} {target} has weights that are not finite in {dtype}"
            )
        weights[(layer, target)] = (a, b)
    if not weights:
        raise AdapterIncompatibleError(f"adapter {adapter_id} holds no LoRA weights")
    return LoadedAdapter(adapter_id=adapter_id, name=name, rank=rank, weights=weights, scaling=scaling, buffer=buffer)


def scaled(b: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """B * scaling in `dtype`, multiplied in float32: one rounding into the slot's dtype."""
    return b.to(dtype) if scaling == 1.0 else (b.float() * scaling).to(dtype)
