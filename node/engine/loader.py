"""Build the decoder on the meta device and fill it from a Hugging Face safetensors folder
(single file or sharded with model.safetensors.index.json); each fused parameter loads its parts."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from common.wire import UntrustedJSONError, parse_json
from node.engine.config import ModelConfig
from node.engine.lora.mapping import LoRAMapping
from node.engine.model import CausalLM

log = logging.getLogger(__name__)

# checkpoint projection -> (fused parameter, part name)
_FUSED = {
    "q_proj": ("qkv_proj", "q_proj"),
    "k_proj": ("qkv_proj", "k_proj"),
    "v_proj": ("qkv_proj", "v_proj"),
    "gate_proj": ("gate_up_proj", "gate_proj"),
    "up_proj": ("gate_up_proj", "up_proj"),
}
MAX_INDEX_BYTES = 16 << 20  # a 400B model's shard index is well under 1 MiB
_SHARD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.safetensors$")  # a file beside the index, nothing else
_PROJ = re.compile(
    r"^(model\.layers\.\d+\.(?:self_attn|mlp)\.)(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$"
)


class CheckpointError(ValueError):
    """The checkpoint folder does not hold the weights the config describes."""


def checkpoint_tensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from model.safetensors or the shards named in its index (no pickle)."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.exists():
        files = _shard_files(index)
    elif (d / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(
            f"{d} has no model.safetensors or model.safetensors.index.json; expected a safetensors checkpoint"
        )
    for f in files:
        with safe_open(str(d / f), framework="pt", device="cpu") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


def _shard_files(index: Path) -> list[str]:
    """The shard files an index names, each a plain .safetensors name in the same folder."""
    try:
        doc = parse_json(index.read_bytes(), max_bytes=MAX_INDEX_BYTES, max_depth=8, what=index.name)
    except UntrustedJSONError as e:
        raise CheckpointError(str(e)) from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index.name} has no weight_map of tensor names to shard files")
    files = sorted(set(map(str, weight_map.values())))
    if bad := [f for f in files if not _SHARD.match(f)]:
        raise CheckpointError(f"{index.name} names shard {bad[0][:64]!r}; expected a .safetensors file beside it")
    return files


def build_model(
    cfg: ModelConfig,
    mapping: LoRAMapping,
    tensors: Iterable[tuple[str, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype,
) -> CausalLM:
    """Meta-device construction, then allocate on `device` and copy every checkpoint tensor in."""
    with torch.device("meta"):
        model = CausalLM(cfg, mapping)
    model.to(dtype)  # still on meta: allocating afterwards never holds an fp32 copy (32 GB for an 8B model)
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    missing = set(params)
    for name, t in tensors:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        m = _PROJ.match(name)
        if m:
            fused, part = _FUSED[m.group(2)]
            pname = f"{m.group(1)}{fused}.{m.group(3)}"[len("model.") :]
            if pname not in params:
                raise CheckpointError(f"checkpoint tensor {name} has no place in a {cfg.model_type} model")
            module = model.get_submodule(pname.rsplit(".", 1)[0])
            module.weight_loader(params[pname], t.to(dtype), part)
            if _all_parts_loaded(module, pname, part):
                missing.discard(pname)
            continue
        pname = name[len("model.") :] if name.startswith("model.") else name
        if pname not in params:
            raise CheckpointError(f"checkpoint tensor {name} has no place in a {cfg.model_type} model")
        if params[pname].shape != t.shape:
            raise CheckpointError(f"{name}: checkpoint shape {tuple(t.shape)} != expected {tuple(params[pname].shape)}")
        params[pname].data.copy_(t.to(dtype))
        missing.discard(pname)
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
    model.rotary.build(device, dtype)
    return model.eval()


def _all_parts_loaded(module, pname: str, part: str) -> bool:
    # fused parameters count as loaded once every part arrived
    seen = module.__dict__.setdefault("_loaded_parts", {})
    seen.setdefault(pname, set()).add(part)
    return len(seen[pname]) == len(module.names)
