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

import math
from dataclasses import dataclass

import torch

from common.wire import canonical_json, is_id, sha256_hex
from node.engine.lora.errors import AdapterIncompatibleError
from node.engine.lora.weights import LoadedAdapter

MAX_ENSEMBLE_ADAPTERS = 4
# a weight scales a component's delta; beyond this it is no longer a blend but an amplifier
MAX_ENSEMBLE_WEIGHT = 8.0
_KEY_DOMAIN = "loramesh/ensemble/1"


def check_components(components) -> tuple[tuple[str, float], ...]:
    """Validate (adapter id, weight) pairs from a request: 2..MAX distinct ids, weights finite in
    (0, MAX_ENSEMBLE_WEIGHT]. Raises ValueError naming the bad value."""
    pairs = tuple(components)
    if not 2 <= len(pairs) <= MAX_ENSEMBLE_ADAPTERS:
        raise ValueError(f"an ensemble has 2 to {MAX_ENSEMBLE_ADAPTERS} adapters, got {len(pairs)}")
    seen = set()
    out = []
    for aid, w in pairs:
        if not isinstance(aid, str) or not is_id(aid):
            raise ValueError(f"ensemble adapter id must be '0x' + 64 lowercase hex characters, got {aid!r}")
        if aid in seen:
            raise ValueError(f"adapter {aid} appears twice in the ensemble; give it one weight")
        seen.add(aid)
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ValueError(f"ensemble weight must be a number, got {w!r}")
        w = float(w)
        if not (math.isfinite(w) and 0.0 < w <= MAX_ENSEMBLE_WEIGHT):
            raise ValueError(f"ensemble weight must be finite and in (0, {MAX_ENSEMBLE_WEIGHT:g}], got {w!r}")
        out.append((aid, w))
    return tuple(out)


def ensemble_key(components) -> str:
    """The ensemble's adapter id: sha256 over its (id, weight) pairs in order, domain-separated so it
    never equals a package's id; repr(float) round-trips, so equal weights give equal keys."""
    pairs = check_components(components)
    doc = [_KEY_DOMAIN, [[aid, repr(w)] for aid, w in pairs]]
    return sha256_hex(canonical_json(doc))


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
    """Decoded components (B already times its own scaling) and weights -> one LoadedAdapter whose
    every projection is the concatenation above. Refuses a concatenated rank above `max_rank`."""
    targets: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for adapter, w in parts:
        if not adapter.weights:
            raise AdapterIncompatibleError(f"ensemble {name}: component {adapter.adapter_id} holds no host weights")
        for lt, (a, b) in adapter.weights.items():
            targets.setdefault(lt, []).append((a, b, w))
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
        weights[lt] = (a_cat, b_cat)
    if not weights:
        raise AdapterIncompatibleError(f"ensemble {name} holds no LoRA weights")
    return LoadedAdapter(adapter_id=key, name=name, rank=rank, weights=weights)
