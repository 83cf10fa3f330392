"""Checks on the adapter's weights: the safetensors header, the PEFT LoRA config, and tensor shapes.

A safetensors file is read by its header only (no tensor data is parsed before the header is
sane), and pickle-based formats are never opened.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from node.adapters.errors import PackageError
from node.adapters.manifest import LORA_TARGETS

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
# PEFT's names: base_model.model.model.layers.<i>.<self_attn|mlp>.<target>.lora_<A|B>.weight
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.([a-z_]+)\.lora_([AB])\.weight$")


@dataclass(frozen=True, slots=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LoraConfig:
    """The parts of a PEFT LoRA adapter_config.json that loramesh serves."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    use_rslora: bool

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)


def is_pickle_file(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Validate a safetensors file's framing and return its tensors' dtypes and shapes."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise PackageError(f"{path.name}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise PackageError(f"{path.name}: header of {n} bytes is larger than the {MAX_HEADER_BYTES}-byte limit")
        if 8 + n > size:
            raise PackageError(f"{path.name}: header length {n} runs past the end of the {size}-byte file")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise PackageError(f"{path.name}: header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise PackageError(f"{path.name}: header is not a JSON object")
    body = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            if dtype not in _DTYPE_SIZES or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError
            if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
                raise ValueError
        except (KeyError, TypeError, ValueError) as e:
            raise PackageError(f"{path.name}: tensor {name!r} has a malformed header entry") from e
        numel = 1
        for d in shape:
            numel *= d
        if end - start != numel * _DTYPE_SIZES[dtype]:
            raise PackageError(f"{path.name}: tensor {name!r} spans {end - start} bytes, its shape needs "
                               f"{numel * _DTYPE_SIZES[dtype]}")
        if end > body:
            raise PackageError(f"{path.name}: body is truncated: tensor {name!r} ends at byte {end} of a "
                               f"{body}-byte body")
        spans.append((start, end))
        tensors[name] = TensorInfo(dtype, shape)
    spans.sort()
    pos = 0
    for start, end in spans:
        if start != pos:
            raise PackageError(f"{path.name}: tensor data overlaps or leaves a gap at byte {pos}")
        pos = end
    if pos != body:
        raise PackageError(f"{path.name}: {body - pos} bytes of trailing data after the last tensor")
    return tensors


def read_lora_config(pkg_dir: Path) -> LoraConfig:
    """Parse adapter_config.json and refuse anything but a plain PEFT LoRA adapter we can serve."""
    path = pkg_dir / CONFIG_FILE
    if not path.is_file():
        raise PackageError(f"{pkg_dir} is not a PEFT adapter: {CONFIG_FILE} is missing")
    try:
        cfg = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise PackageError(f"{CONFIG_FILE} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise PackageError(f"{CONFIG_FILE}: peft_type is {cfg.get('peft_type') if isinstance(cfg, dict) else None!r}, "
                           "expected 'LORA'")
    for flag in ("use_dora",):
        if cfg.get(flag):
            raise PackageError(f"{CONFIG_FILE}: {flag} adapters are not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise PackageError(f"{CONFIG_FILE}: per-module {key} is not supported")
    if cfg.get("modules_to_save"):
        raise PackageError(f"{CONFIG_FILE}: modules_to_save (full copies of base layers) is not supported")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if not isinstance(rank, int) or not 1 <= rank <= 1024:
        raise PackageError(f"{CONFIG_FILE}: rank r={rank!r} must be an integer in 1..1024")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise PackageError(f"{CONFIG_FILE}: lora_alpha={alpha!r} must be a positive number")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets:
        raise PackageError(f"{CONFIG_FILE}: target_modules must be a list of module names")
    bad = sorted(set(targets) - set(LORA_TARGETS))
    if bad:
        raise PackageError(f"{CONFIG_FILE}: unsupported target modules {bad}; supported: {list(LORA_TARGETS)}")
    return LoraConfig(rank=rank, alpha=float(alpha), targets=tuple(sorted(set(targets))),
                      use_rslora=bool(cfg.get("use_rslora", False)))


def module_dims(base_config: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every LoRA-targetable projection of a Llama-family base."""
    hidden = base_config["hidden_size"]
    heads = base_config["num_attention_heads"]
    kv = base_config.get("num_key_value_heads") or heads
    head_dim = base_config.get("head_dim") or hidden // heads
    inter = base_config["intermediate_size"]
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv * head_dim),
        "v_proj": (hidden, kv * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def check_lora_tensors(tensors: dict[str, TensorInfo], lora: LoraConfig, base_config: dict | None) -> None:
    """Every tensor must be a LoRA A or B of a configured target with the config's rank (and the base's dims)."""
    dims = module_dims(base_config) if base_config else None
    layers = base_config["num_hidden_layers"] if base_config else None
    seen: dict[tuple[int, str], set[str]] = {}
    for name, info in tensors.items():
        m = _KEY.match(name)
        if not m:
            raise PackageError(f"{WEIGHTS_FILE}: tensor {name!r} is not a LoRA weight of a supported module")
        layer, _, module, ab = int(m[1]), m[2], m[3], m[4]
        if module not in lora.targets:
            raise PackageError(f"{WEIGHTS_FILE}: tensor {name!r} targets {module}, not in target_modules")
        if info.dtype not in _FLOAT_DTYPES or len(info.shape) != 2:
            raise PackageError(f"{WEIGHTS_FILE}: tensor {name!r} must be a 2-D float matrix, got "
                               f"{info.dtype}{list(info.shape)}")
        if layers is not None and layer >= layers:
            raise PackageError(f"{WEIGHTS_FILE}: tensor {name!r} is for layer {layer}; the base has {layers}")
        if dims is not None:
            d_in, d_out = dims[module]
            want = (lora.rank, d_in) if ab == "A" else (d_out, lora.rank)
        else:
            want = (lora.rank, info.shape[1]) if ab == "A" else (info.shape[0], lora.rank)
        if info.shape != want:
            raise PackageError(f"{WEIGHTS_FILE}: tensor {name!r} has shape {list(info.shape)}, expected "
                               f"{list(want)} for rank {lora.rank}" + (" on this base model" if dims else ""))
        seen.setdefault((layer, module), set()).add(ab)
    if not seen:
        raise PackageError(f"{WEIGHTS_FILE}: holds no LoRA weights")
    for (layer, module), parts in seen.items():
        if parts != {"A", "B"}:
            raise PackageError(f"{WEIGHTS_FILE}: layer {layer} {module} has lora_{''.join(parts)} without its pair")
