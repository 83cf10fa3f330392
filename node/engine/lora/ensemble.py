"""Adapter ensembles: several adapters with weights, served as one adapter of concatenated rank.

Semantics (PEFT's `add_weighted_adapter(..., combination_type="cat")`): for components i with
A_i [r_i, in], B_i [out, r_i], own scaling s_i = alpha_i / r_i and weight w_i,

    delta(x) = sum_i w_i * s_i * B_i A_i x = B_cat A_cat x
    A_cat = [A_1; A_2; ...]                    (rows: rank r_1 + r_2 + ...)
    B_cat = [w_1 s_1 B_1, w_2 s_2 B_2, ...]    (columns)

so the slot kernels serve an ensemble exactly like one adapter, with no merge into the base. A
projection some component does not target contributes nothing for that component (PEFT unions
the targets and leaves those rows zero; we simply leave them out). The ensemble has its own id,
a hash of its components and weights, so the slot table and the prefix cache (whose block hashes
start from the adapter id) never mix an ensemble with its parts or with another weighting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from node.adapters.ensemble import check_components, ensemble_key
from node.engine.lora.errors import AdapterIncompatibleError
from node.engine.lora.weights import LoadedAdapter


@dataclass(frozen=True, slots=True)
class EnsembleSpec:
    """An ensemble as the engine knows it: its components in order, its key and display name."""

    components: tuple[tuple[str, float], ...]
    key: str
    name: str

    @classmethod
    def of(cls, components, names: list[str] | None = None) -> EnsembleSpec:
        pairs = check_components(components)
        name = "+".join(names) if names else "+".join(aid[:10] for aid, _ in pairs)
        return cls(components=pairs, key=ensemble_key(pairs), name=name)


def combine_lora(
    key: str, name: str, parts: list[tuple[LoadedAdapter, float]], max_rank: int, dtype: torch.dtype
) -> LoadedAdapter:
    """Decoded components and weights -> one LoadedAdapter whose every projection is the
    concatenation above (B times its component's scaling and weight, so the result's scaling is 1).
    Refuses a concatenated rank above `max_rank`."""
    targets: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for adapter, w in parts:
        if not adapter.weights:
            raise AdapterIncompatibleError(f"ensemble {name}: component {adapter.adapter_id} holds no host weights")
        for lt, (a, b) in adapter.weights.items():
            targets.setdefault(lt, []).append((a, b, w * adapter.scaling))
    weights = {}
    rank = 0
    for lt, abw in sorted(targets.items()):
        r = sum(a.shape[0] for a, _, _ in abw)
        if r > max_rank:
            layer, target = lt
            raise AdapterIncompatibleError(
                f"ensemble {name}: concatenated rank {r} at layer {layer} {target} is above this node's "
                f"max_lora_rank {max_rank}"
            )
        rank = max(rank, r)
        a_cat = torch.cat([a for a, _, _ in abw], dim=0).to(dtype).contiguous()  # [r, in]
        # weight in float32, then the serving dtype: one rounding, as for a single adapter's scaling
        b_cat = torch.cat([b.float() * w for _, b, w in abw], dim=1).to(dtype).contiguous()  # [out, r]
        # each component fits float16 (verify.check_values), times its weight (up to MAX_ENSEMBLE_WEIGHT) it may
        # not: a slot of inf answered an ensemble with nothing, billed (red team)
        if not torch.isfinite(b_cat).all():
            layer, target = lt
            raise AdapterIncompatibleError(
                f"ensemble {name}: its weights make layer {layer} {target}'s LoRA B overflow {str(dtype)[6:]}; "
                "ask for smaller weights"
            )
        weights[lt] = (a_cat, b_cat)
    if not weights:
        raise AdapterIncompatibleError(f"ensemble {name} holds no LoRA weights")
    return LoadedAdapter(adapter_id=key, name=name, rank=rank, weights=weights)
