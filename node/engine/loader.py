"""Build the decoder on the meta device and fill it from a Hugging Face safetensors folder
(single file or sharded with model.safetensors.index.json); each fused parameter loads its parts."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from common.wire import UntrustedJSONError, parse_json
from node.engine.config import ModelConfig
from node.engine.lora.layers import LinearWithLoRA
from node.engine.lora.mapping import LoRAMapping
from node.engine.model import CausalLM
from node.engine.quant import Int8Weight, probe, vocab_scheme

log = logging.getLogger(__name__)

# checkpoint projection -> (fused parameter, part name)
_FUSED = {
    "q_proj": ("qkv_proj", "q_proj"),
    "k_proj": ("qkv_proj", "k_proj"),
    "v_proj": ("qkv_proj", "v_proj"),
    "gate_proj": ("gate_up_proj", "gate_proj"),
    "up_proj": ("gate_up_proj", "up_proj"),
}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
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
    if bad := [f for f in files if not _SHARD.fullmatch(f)]:
        raise CheckpointError(f"{index.name} names shard {bad[0][:64]!r}; expected a .safetensors file beside it")
    return files


def build_model(
    cfg: ModelConfig,
    mapping: LoRAMapping,
    tensors: Iterable[tuple[str, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype,
    quantization: str = "none",
    shard=None,
) -> CausalLM:
    """Meta-device construction, then allocate on `device` and copy every checkpoint tensor in.

    Quantized (`quantization` int8 | int4 | fp8, quant.py): the base linears, and under int8/int4 the
    embedding and lm_head, are never allocated in full precision on the device. Each one's checkpoint
    tensors (its q/k/v or gate/up parts) gather in a host buffer, which is quantized on the device once
    complete and dropped, so loading needs the quantized model plus one fused layer.

    With a tensor-parallel `shard` (parallel.Shard) the model is that rank's, and each checkpoint tensor is
    cut to the rank's rows (column-parallel, in weight_loader) or columns (row-parallel, here) as it loads."""
    with torch.device("meta"):
        model = CausalLM(cfg, mapping, shard)
    model.to(dtype)  # still on meta: allocating afterwards never holds an fp32 copy (32 GB for an 8B model)
    quantized = _quantized_weights(model, quantization)  # parameter name -> its module
    if not quantized:
        model.to_empty(device=device)
    else:  # as to_empty, but the weights to quantize stay on meta (shape only) until they are
        for prefix, module in model.named_modules():
            for n, p in module._parameters.items():
                if p is not None and f"{prefix}.{n}".lstrip(".") not in quantized:
                    module._parameters[n] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=False)
            for n, b in module._buffers.items():
                if b is not None:
                    module._buffers[n] = torch.empty_like(b, device=device)
    params = dict(model.named_parameters())
    missing = set(params)
    staged: dict[str, torch.Tensor] = {}  # fused quantized weights waiting for their other parts (host)
    vocab: dict[str, torch.Tensor] = {}  # embedding / lm_head, quantized once the loop ends
    for name, t in tensors:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if t.dtype not in _FLOAT_DTYPES:  # int8/fp8 tensors come with scales this engine does not read
            raise CheckpointError(
                f"checkpoint tensor {name} is {str(t.dtype).removeprefix('torch.')}: this engine loads bf16/fp16/fp32 "
                "checkpoints and quantizes them itself (--quantization int8|int4|fp8)"
            )
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        m = _PROJ.match(name)
        if m:
            fused, part = _FUSED[m.group(2)]
            pname = f"{m.group(1)}{fused}.{m.group(3)}"[len("model.") :]
            if pname not in params:
                raise CheckpointError(f"checkpoint tensor {name} has no place in a {cfg.model_type} model")
            module = model.get_submodule(pname.rsplit(".", 1)[0])
            if pname in quantized:
                rows = (sum(module.output_sizes), module.in_features)
                buf = staged.setdefault(pname, torch.empty(rows, dtype=torch.float32))
                module.weight_loader(buf, t.float(), part)
                if _all_parts_loaded(module, pname, part):
                    module.quantize(staged.pop(pname).to(device), quantization, pname)
                    probe(module.qweight, quantization, dtype)
                    missing.discard(pname)
                continue
            module.weight_loader(params[pname], t.to(dtype), part)
            if _all_parts_loaded(module, pname, part):
                missing.discard(pname)
            continue
        pname = name[len("model.") :] if name.startswith("model.") else name
        if pname not in params:
            raise CheckpointError(f"checkpoint tensor {name} has no place in a {cfg.model_type} model")
        row_shard = None  # a row-parallel layer of a tensor-parallel shard: it takes its columns of t
        if shard is not None:
            owner = model.get_submodule(pname.rsplit(".", 1)[0])
            if isinstance(owner, LinearWithLoRA) and owner.in_range is not None and t.dim() == 2:
                row_shard = owner
                t = owner.check_full_input(t, name)
                if pname not in quantized:  # a quantized one is cut after its scales are taken (quant.py)
                    t = owner.shard_input(t)
        if params[pname].shape != t.shape and not (row_shard is not None and pname in quantized):
            raise CheckpointError(f"{name}: checkpoint shape {tuple(t.shape)} != expected {tuple(params[pname].shape)}")
        if pname in quantized:
            if isinstance(quantized[pname], LinearWithLoRA):
                quantized[pname].quantize(t.to(device), quantization, pname)
                probe(quantized[pname].qweight, quantization, dtype)
            else:
                vocab[pname] = t
        else:
            params[pname].data.copy_(t.to(dtype))
        missing.discard(pname)
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
    if vocab:
        embed = Int8Weight(vocab.pop("embed_tokens.weight").to(device), rows=True)
        head = Int8Weight(vocab.pop("lm_head.weight").to(device)) if "lm_head.weight" in vocab else None
        probe(head or embed, "int8", dtype)  # the output layer's matmul (a tied table's too)
        model.quantize_vocab(embed, head)
    model.rotary.build(device, dtype)
    return model.eval()


def _quantized_weights(model: CausalLM, scheme: str) -> dict[str, nn.Module]:
    """{parameter name: owning module} of the weights `scheme` quantizes (empty for "none")."""
    if scheme == "none":
        return {}
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, LinearWithLoRA):
            out[f"{name}.weight"] = module
    if vocab_scheme(scheme) != "none":
        out["embed_tokens.weight"] = model.embed_tokens
        if model.lm_head is not None:
            out["lm_head.weight"] = model.lm_head
    return out


def _all_parts_loaded(module, pname: str, part: str) -> bool:
    # fused parameters count as loaded once every part arrived
    seen = module.__dict__.setdefault("_loaded_parts", {})
    seen.setdefault(pname, set()).add(part)
    return len(seen[pname]) == len(module.names)
