"""Checks on the adapter's weights: the safetensors header, the PEFT LoRA config, and tensor shapes.

A safetensors file is read by its header only (no tensor data is parsed before the header is
sane), and pickle-based formats are never opened. The same parsed header is what the loader reads
tensors through (read_lora_buffer), so a package that verifies is a package that loads.
"""

from __future__ import annotations

import math
import os
import re
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.wire import UntrustedJSONError, parse_json
from node.adapters.errors import PackageError, shown
from node.adapters.limits import MAX_ADAPTER_CONFIG_BYTES, MAX_LORA_ALPHA, MAX_LORA_RANK, MAX_SAFETENSORS_HEADER_BYTES

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_HEADER_BYTES = MAX_SAFETENSORS_HEADER_BYTES
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# the dtypes a LoRA weight may be stored in: PEFT saves the model's. F64 is refused: 4x bf16's bytes on disk and in
# the host cache, which counts adapters, not bytes, and past the pinned pool's float32 buffers (red team)
_FLOAT_DTYPES = {"F32", "F16", "BF16"}
_WIDEST_FLOAT_BYTES = 4
# A header's bound, from what it holds: one entry per tensor (its PEFT key, dtype, shape and offsets: 512 bytes is
# several times the longest) and `__metadata__` (red team: 4 MiB of metadata in a package that verified made every
# later read of its header, one per peer's request, 80 ms of CPU and 31 MB)
HEADER_BYTES_PER_TENSOR = 512
MAX_METADATA_BYTES = 64 << 10
_MAX_DIMS = 8
_MAX_INT = (1 << 63) - 1  # every size and offset fits the int64 that torch and the format's readers use
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})

# ---- the LoRA facts every part of loramesh reads here: what may be adapted, what PEFT calls its
# tensors, and their shapes. Training (node/train.py) targets these, verification checks a package
# against them, and the engine (node/engine/lora/weights.py) decodes a package through them.

# the projections of a Llama-family decoder that an adapter may target (PEFT module names), each
# with the block it sits in
_MODULE_GROUP = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
LORA_TARGETS = tuple(_MODULE_GROUP)
# PEFT's names: base_model.model.model.layers.<i>.<self_attn|mlp>.<target>.lora_<A|B>.weight
LORA_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(0|[1-9]\d{0,5})\.(self_attn|mlp)\.([a-z_]+)\.lora_([AB])\.weight$"
)


def lora_key(layer: int, target: str, ab: str) -> str:
    """PEFT's name of the lora_A or lora_B ("A", "B") tensor of `target` in decoder layer `layer`."""
    return f"base_model.model.model.layers.{layer}.{_MODULE_GROUP[target]}.{target}.lora_{ab}.weight"


def parse_lora_key(name: str) -> tuple[int, str, str] | None:
    """(layer, target, "A" or "B") of a PEFT LoRA tensor name (lora_key's inverse); None for any other name, a target
    that is not in LORA_TARGETS, or one under the wrong block (an mlp.q_proj)."""
    m = LORA_KEY.match(name)
    if not m or _MODULE_GROUP.get(m[3]) != m[2]:
        return None
    return int(m[1]), m[3], m[4]


def module_dims(hidden: int, q_size: int, kv_size: int, intermediate: int) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every LORA_TARGETS projection of a Llama-family decoder, from its
    hidden size, query and key/value widths (heads * head_dim) and MLP width."""
    return {
        "q_proj": (hidden, q_size),
        "k_proj": (hidden, kv_size),
        "v_proj": (hidden, kv_size),
        "o_proj": (q_size, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }


def config_module_dims(base_config: dict) -> dict[str, tuple[int, int]]:
    """module_dims of the base a Hugging Face config.json dict describes."""
    hidden = base_config["hidden_size"]
    heads = base_config["num_attention_heads"]
    kv = base_config.get("num_key_value_heads") or heads
    head_dim = base_config.get("head_dim") or hidden // heads
    return module_dims(hidden, heads * head_dim, kv * head_dim, base_config["intermediate_size"])


@dataclass(frozen=True, slots=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # of its first byte in the file
    nbytes: int = 0


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


def _is_size(v: object) -> bool:
    return type(v) is int and 0 <= v <= _MAX_INT  # bool is an int subclass: refused by the exact type


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Validate a safetensors file's framing and return its tensors' dtypes, shapes and byte ranges.

    Bounded before anything is parsed: the 8-byte length prefix against MAX_HEADER_BYTES and the
    file's size, the header through the one parser of untrusted JSON. Then every entry exactly
    {dtype, shape, data_offsets}, `__metadata__` a str -> str map (as the format requires), and the
    tensors' bytes contiguous from the body's start to the file's end."""
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
        raw = f.read(n)
    if not raw.startswith(b"{"):
        raise PackageError(f"{path.name}: header does not start with a JSON object")
    try:
        header = parse_json(raw, max_bytes=MAX_HEADER_BYTES, max_depth=4, what=f"{path.name} header")
    except UntrustedJSONError as e:
        raise PackageError(str(e)) from None
    if not isinstance(header, dict):
        raise PackageError(f"{path.name}: header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise PackageError(f"{path.name}: __metadata__ must map strings to strings")
    if (held := sum(len(k) + len(v) for k, v in meta.items())) > MAX_METADATA_BYTES:
        raise PackageError(f"{path.name}: __metadata__ holds {held} characters; at most {MAX_METADATA_BYTES}")
    if n > header_bound(len(header) - ("__metadata__" in header)):
        raise PackageError(
            f"{path.name}: header of {n} bytes for {len(header)} entries; at most {HEADER_BYTES_PER_TENSOR} bytes "
            "an entry beside the metadata"
        )
    data_start = 8 + n
    body = size - data_start
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = info = _tensor_entry(path.name, name, entry, data_start)
        if info.offset - data_start + info.nbytes > body:
            raise PackageError(
                f"{path.name}: body is truncated: tensor {shown(name, 128)} ends at byte "
                f"{info.offset - data_start + info.nbytes} of a {body}-byte body"
            )
        spans.append((info.offset - data_start, info.offset - data_start + info.nbytes))
    spans.sort()
    pos = 0
    for start, end in spans:
        if start != pos:
            raise PackageError(f"{path.name}: tensor data overlaps or leaves a gap at byte {pos}")
        pos = end
    if pos != body:
        raise PackageError(f"{path.name}: {body - pos} bytes of trailing data after the last tensor")
    return tensors


def header_bound(tensors: int) -> int:
    """The largest header a file of `tensors` tensors may have (safetensors pads it to 8 bytes)."""
    return MAX_METADATA_BYTES + HEADER_BYTES_PER_TENSOR * tensors + 8


def max_weights_bytes(rank: int, targets: tuple[str, ...], base_config: dict) -> int:
    """The largest adapter_model.safetensors a LoRA of `rank` on `targets` of this base may be: every layer's A and
    B of each target in the widest dtype taken, and their header. A manifest that lists a larger one is refused
    before its bytes are fetched (red team: 268 MB of junk behind a 40 KB adapter's tensors were downloaded, written
    and hashed before the framing check refused them)."""
    dims = config_module_dims(base_config)
    layers = base_config["num_hidden_layers"]
    known = set(targets) & set(dims)  # each once (the manifest's are: manifest.LoraInfo)
    elements = layers * sum(rank * sum(dims[t]) for t in known)
    return 8 + header_bound(2 * layers * len(known)) + _WIDEST_FLOAT_BYTES * elements


def _tensor_entry(file: str, name: str, entry: Any, data_start: int) -> TensorInfo:
    shown_name = shown(name, 128)
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        raise PackageError(f"{file}: tensor {shown_name} must be an object of exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPE_SIZES:
        raise PackageError(
            f"{file}: tensor {shown_name} has dtype {shown(dtype, 24)}; expected one of {sorted(_DTYPE_SIZES)}"
        )
    if not isinstance(shape, list) or len(shape) > _MAX_DIMS or not all(_is_size(d) for d in shape):
        raise PackageError(f"{file}: tensor {shown_name} has a malformed shape (a list of at most {_MAX_DIMS} sizes)")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_size(o) for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise PackageError(
            f"{file}: tensor {shown_name} has malformed data_offsets (expected [start, end], start <= end)"
        )
    nbytes = math.prod(shape) * _DTYPE_SIZES[dtype]
    start, end = offsets
    if end - start != nbytes:
        raise PackageError(f"{file}: tensor {shown_name} spans {end - start} bytes, its shape needs {nbytes}")
    return TensorInfo(dtype, tuple(shape), data_start + start, nbytes)


TENSOR_ALIGN = 16  # bytes: every tensor read_lora_buffer places starts here, so any dtype can view it
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024  # views one preadv takes
# a package of READ_SPLIT_BYTES or more is read by up to READ_THREADS threads at once: the 8B shape's 168 MB
# took 20.1 ms on one thread and 13.5 on two of this 2-core machine (its page cache to a reused buffer)
READ_THREADS = max(1, min(4, os.cpu_count() or 1))
READ_SPLIT_BYTES = 16 << 20


def read_lora_buffer(path: Path, tensors: dict[str, TensorInfo], alloc=None) -> tuple:
    """The tensors a verified header describes, read straight from the file into one buffer (no
    intermediate copy), each at a TENSOR_ALIGN-aligned offset: (buffer [bytes] uint8, {name: view}).
    `alloc(nbytes)` gives the buffer (a pinned one, for one raw copy to a GPU); default: a new tensor."""
    import torch

    dtypes = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }
    starts, total = [], 0
    for info in tensors.values():
        starts.append(total)
        total += -(-info.nbytes // TENSOR_ALIGN) * TENSOR_ALIGN
    buf = torch.empty(total, dtype=torch.uint8) if alloc is None else alloc(total)
    raw = buf.numpy() if total else None
    out, targets = {}, []
    for (name, info), start in zip(tensors.items(), starts):
        out[name] = buf[start : start + info.nbytes].view(dtypes[info.dtype]).view(info.shape)
        if info.nbytes:
            targets.append((info.offset, memoryview(raw[start : start + info.nbytes]), name))
    targets.sort(key=lambda t: t[0])
    fd = os.open(path, os.O_RDONLY)
    try:
        parts = _split(targets, min(READ_THREADS, -(-total // READ_SPLIT_BYTES)))
        if len(parts) == 1:
            _read_scattered(fd, path, targets)
        else:  # each part's preadv runs without the GIL: the page-cache copy spreads over the cores
            for f in [_reader_pool().submit(_read_scattered, fd, path, part) for part in parts]:
                f.result()
    finally:
        os.close(fd)
    return buf, out


def _split(targets: list, n: int) -> list[list]:
    """`targets` cut at tensor boundaries into at most n runs of about equal bytes."""
    total = sum(len(t[1]) for t in targets)
    parts, part, done = [], [], 0
    for t in targets:
        part.append(t)
        done += len(t[1])
        if done * n >= total * (len(parts) + 1) and len(parts) < n - 1:
            parts.append(part)
            part = []
    return [p for p in parts + [part] if p]


_READER_POOL = None
_READER_LOCK = threading.Lock()


def _reader_pool():
    global _READER_POOL
    with _READER_LOCK:
        if _READER_POOL is None:
            _READER_POOL = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="adapter-read")
        return _READER_POOL


def _forget_reader_pool() -> None:  # a forked child has none of its parent's threads
    global _READER_POOL
    _READER_POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_reader_pool)


def _read_scattered(fd: int, path: Path, targets: list) -> None:
    """Fill each (file offset, view, name) of `targets`, sorted by offset, with one preadv per run of
    adjacent ranges (IOV_MAX views at most): for a package of the 8B shape one system call, not 448
    seeks and reads (22 against 29 ms from the page cache on this machine). Each read also lets go of
    the GIL, which a busy engine thread may hold until its next wait."""
    i = 0
    while i < len(targets):
        offset = end = targets[i][0]
        views: list[memoryview] = []
        while i < len(targets) and targets[i][0] == end and len(views) < IOV_MAX:
            views.append(targets[i][1])
            end += len(targets[i][1])
            i += 1
        while views:  # a short read fills the views in order: drop the full ones, trim the one cut
            got = os.preadv(fd, views, offset)
            if got == 0:
                name = targets[i - len(views)][2]
                raise PackageError(f"{path.name}: tensor {shown(name, 128)} was cut short after it was verified")
            offset += got
            while views and got >= len(views[0]):
                got -= len(views.pop(0))
            if got:
                views[0] = views[0][got:]


HALF_MAX = 65504.0  # the largest finite float16: a slot in any node's dtype holds every value below it


# ---- adapter_config.json: an allow-list of PEFT LoraConfig fields (peft 0.21) ----------------------------
# A field is here only when its value is served exactly: either it does not change the math at
# inference, or only the values listed do. Any other field, or value, is refused naming it, so a PEFT
# feature added later (or a variant like DoRA or aLoRA) is never served silently as plain LoRA.


def _any(v: object) -> bool:
    return True


def _str_or_null(v: object) -> bool:
    return v is None or isinstance(v, str)


def _bool(v: object) -> bool:
    return isinstance(v, bool)


def _false(v: object) -> bool:
    return v is False


def _empty(v: object) -> bool:
    return v is None or v == {} or v == []


def _dropout(v: object) -> bool:  # only used in training
    return type(v) in (int, float) and 0 <= v <= 1


def _init(v: object) -> bool:
    # True/False/"gaussian"/"eva" only initialise A and B, which the saved weights replace; "pissa",
    # "olora", "corda", "loftq", "orthogonal", "mica", "lora_ga" also rewrite the base weights.
    return isinstance(v, bool) or (isinstance(v, str) and v.lower() in ("gaussian", "eva"))


def _dict_or_null(v: object) -> bool:
    return v is None or isinstance(v, dict)


_PEFT_FIELDS: dict[str, tuple[Any, str]] = {
    # field: (check, what is accepted)
    "peft_type": (lambda v: v == "LORA", "'LORA'"),
    "task_type": (lambda v: v in (None, "CAUSAL_LM"), "'CAUSAL_LM' or null"),
    "r": (_any, ""),  # checked on its own below
    "lora_alpha": (_any, ""),
    "target_modules": (_any, ""),
    "use_rslora": (_bool, "true or false"),
    "lora_dropout": (_dropout, "a number in 0..1"),
    "bias": (lambda v: v == "none", "'none'"),
    "fan_in_fan_out": (_false, "false"),
    "use_dora": (_false, "false"),
    "lora_bias": (_false, "false"),
    "use_qalora": (_false, "false"),
    "modules_to_save": (_empty, "null"),
    "layers_to_transform": (_empty, "null"),
    "layers_pattern": (_empty, "null"),
    "exclude_modules": (_empty, "null"),
    "rank_pattern": (_empty, "empty"),
    "alpha_pattern": (_empty, "empty"),
    "alora_invocation_tokens": (_empty, "null (aLoRA is not served)"),
    "trainable_token_indices": (_empty, "null"),
    "layer_replication": (_empty, "null"),
    "target_parameters": (_empty, "null"),
    "megatron_config": (_empty, "null"),
    "loftq_config": (_empty, "empty"),
    "eva_config": (_dict_or_null, "an object or null"),  # EVA only initialises A
    "corda_config": (_empty, "null"),
    "lora_ga_config": (_empty, "null"),
    "velora_config": (_empty, "null"),
    "monteclora_config": (_empty, "null"),
    "use_bdlora": (_empty, "null"),
    "arrow_config": (_empty, "null"),
    "kasa_config": (_empty, "null"),
    "astra_config": (_empty, "null"),  # PEFT 0.22: used only with init_lora_weights "astra", which is refused
    "init_lora_weights": (_init, "true, false, 'gaussian' or 'eva'"),
    "qalora_group_size": (_any, ""),  # used only with use_qalora
    "megatron_core": (_any, ""),  # used only with megatron_config
    "ensure_weight_tying": (_bool, "true or false"),  # only affects modules_to_save, which must be null
    "runtime_config": (_dict_or_null, "an object or null"),
    "inference_mode": (_bool, "true or false"),
    "base_model_name_or_path": (_str_or_null, "a string or null"),
    "revision": (_str_or_null, "a string or null"),
    "peft_version": (_str_or_null, "a string or null"),
    "auto_mapping": (_dict_or_null, "an object or null"),
}


def read_lora_config(pkg_dir: Path) -> LoraConfig:
    """Parse adapter_config.json and refuse anything but a plain PEFT LoRA adapter we serve exactly."""
    return parse_lora_config(read_peft_config(pkg_dir))


def read_peft_config(pkg_dir: Path) -> object:
    """adapter_config.json as decoded JSON, read within limits (its fields unchecked)."""
    path = pkg_dir / CONFIG_FILE
    if path.is_symlink() or not path.is_file():
        raise PackageError(f"{pkg_dir.name} is not a PEFT adapter: {CONFIG_FILE} is missing")
    if path.stat().st_size > MAX_ADAPTER_CONFIG_BYTES:
        raise PackageError(f"{CONFIG_FILE} is larger than {MAX_ADAPTER_CONFIG_BYTES} bytes")
    try:
        return parse_json(path.read_bytes(), max_bytes=MAX_ADAPTER_CONFIG_BYTES, max_depth=8, what=CONFIG_FILE)
    except UntrustedJSONError as e:
        raise PackageError(str(e)) from None


def parse_lora_config(cfg: object) -> LoraConfig:
    """Check a decoded adapter_config.json against the allow-list; the first problem, naming its field."""
    if not isinstance(cfg, dict):
        raise PackageError(f"{CONFIG_FILE} is not a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise PackageError(f"{CONFIG_FILE}: peft_type is {shown(cfg.get('peft_type'), 32)}, expected 'LORA'")
    for key in sorted(cfg):
        if key not in _PEFT_FIELDS:
            raise PackageError(
                f"{CONFIG_FILE}: field {shown(key)} is not one loramesh serves exactly; remove it "
                "or leave it at its default"
            )
        check, accepted = _PEFT_FIELDS[key]
        if not check(cfg[key]):
            raise PackageError(f"{CONFIG_FILE}: {key} = {shown(cfg[key])} is not served; expected {accepted}")
    rank = cfg.get("r", 8)  # PEFT's defaults
    alpha = cfg.get("lora_alpha", 8)
    if type(rank) is not int or not 1 <= rank <= MAX_LORA_RANK:
        raise PackageError(
            f"{CONFIG_FILE}: rank r={shown(rank, 32)} must be an integer in 1..{MAX_LORA_RANK}, the "
            "largest rank nodes serve"
        )
    if type(alpha) not in (int, float) or not math.isfinite(alpha) or not 0 < alpha <= MAX_LORA_ALPHA:
        raise PackageError(
            f"{CONFIG_FILE}: lora_alpha={shown(alpha, 32)} must be a finite number in (0, {MAX_LORA_ALPHA:g}]"
        )
    targets = cfg.get("target_modules")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise PackageError(f"{CONFIG_FILE}: target_modules must be a list of module names from {list(LORA_TARGETS)}")
    bad = sorted(set(targets) - set(LORA_TARGETS))
    if bad:
        raise PackageError(
            f"{CONFIG_FILE}: unsupported target modules {shown(bad[:4])}; supported: {list(LORA_TARGETS)}"
        )
    return LoraConfig(
        rank=rank, alpha=float(alpha), targets=tuple(sorted(set(targets))), use_rslora=cfg.get("use_rslora", False)
    )


def check_lora_tensors(tensors: dict[str, TensorInfo], lora: LoraConfig, base_config: dict | None) -> None:
    """Every tensor is a LoRA A or B of a configured target with the config's rank (and the base's dims);
    with the base known, every configured target of every layer is there, as PEFT saves it."""
    dims = config_module_dims(base_config) if base_config else None
    layers = base_config["num_hidden_layers"] if base_config else None
    seen: dict[tuple[int, str], set[str]] = {}
    for name, info in tensors.items():
        shown_name = shown(name, 128)
        key = parse_lora_key(name)
        if key is None:
            raise PackageError(f"{WEIGHTS_FILE}: tensor {shown_name} is not a LoRA weight of a supported module")
        layer, module, ab = key
        if module not in lora.targets:
            raise PackageError(f"{WEIGHTS_FILE}: tensor {shown_name} targets {module}, not in target_modules")
        if info.dtype not in _FLOAT_DTYPES or len(info.shape) != 2:
            raise PackageError(
                f"{WEIGHTS_FILE}: tensor {shown_name} must be a 2-D float matrix (F32, F16 or BF16), got "
                f"{info.dtype}{list(info.shape)}"
            )
        if layers is not None and layer >= layers:
            raise PackageError(f"{WEIGHTS_FILE}: tensor {shown_name} is for layer {layer}; the base has {layers}")
        if dims is not None:
            d_in, d_out = dims[module]
            want = (lora.rank, d_in) if ab == "A" else (d_out, lora.rank)
        else:
            want = (lora.rank, info.shape[1]) if ab == "A" else (info.shape[0], lora.rank)
        if info.shape != want or 0 in info.shape:
            raise PackageError(
                f"{WEIGHTS_FILE}: tensor {shown_name} has shape {list(info.shape)}, expected "
                f"{list(want)} for rank {lora.rank}" + (" on this base model" if dims else "")
            )
        seen.setdefault((layer, module), set()).add(ab)
    if not seen:
        raise PackageError(f"{WEIGHTS_FILE}: holds no LoRA weights")
    for (layer, module), parts in sorted(seen.items()):
        if parts != {"A", "B"}:
            raise PackageError(f"{WEIGHTS_FILE}: layer {layer} {module} has lora_{''.join(parts)} without its pair")
    if layers is not None:
        for layer in range(layers):
            for module in lora.targets:
                if (layer, module) not in seen:
                    raise PackageError(
                        f"{WEIGHTS_FILE}: layer {layer} {module} has no LoRA weights, though target_modules names it"
                    )
