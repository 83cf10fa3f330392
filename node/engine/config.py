"""Typed configuration of the engine (EngineConfig) and of the base model it serves (ModelConfig)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from node.adapters.limits import MAX_LORA_RANK
from node.engine.layers.attention import check_kv_cache_dtype
from node.engine.quant import check_quantization

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class ModelConfigError(ValueError):
    """The base model folder holds a config this engine cannot serve."""


def parse_dtype(name: str) -> torch.dtype:
    """Map a dtype name ("bf16", "float32", ...) to a torch dtype."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not supported; expected one of {sorted(_DTYPES)}") from None


@dataclass(slots=True, frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"  # "default" | "llama3" | "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(slots=True, frozen=True)
class ModelConfig:
    """The decoder's shape, read from a Hugging Face config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # the window of the layers that slide; None when none does
    sliding_layers: tuple[int, ...] | None = None  # which layers slide; None: all (when there is a window)
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(
                f"model_type {self.model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}"
            )

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of decoder layer `layer`, None for full causal attention."""
        if self.sliding_window is None or (self.sliding_layers is not None and layer not in self.sliding_layers):
            return None
        return self.sliding_window

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dict(cls, cfg: dict) -> ModelConfig:
        """Build from the dict of a Hugging Face config.json (transformers 4.x or 5.x layout)."""
        model_type = cfg.get("model_type", "")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"hidden_act {cfg.get('hidden_act')!r} is not supported; expected 'silu'")
        if (qc := cfg.get("quantization_config")) is not None:
            method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else "unknown"
            raise ModelConfigError(
                f"the base checkpoint is saved quantized (quant_method {str(method)[:32]!r}), which this engine "
                "does not load; give it the bf16/fp16/fp32 checkpoint and --quantization int8|int4|fp8"
            )
        if cfg.get("mlp_bias"):
            raise ModelConfigError("mlp_bias=true is not supported; expected false")
        rp = dict(cfg.get("rope_parameters") or {})
        rs = dict(cfg.get("rope_scaling") or {})
        rp.update({k: v for k, v in rs.items() if k not in rp})
        theta = float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rp.get("rope_type", rp.get("type", "default")) or "default"
        if rope_type not in ("default", "llama3", "linear"):
            raise ModelConfigError(f"rope_type {rope_type!r} is not supported; expected default, linear or llama3")
        rope = RopeConfig(
            theta=theta,
            rope_type=rope_type,
            factor=float(rp.get("factor", 1.0)),
            low_freq_factor=float(rp.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rp.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rp.get("original_max_position_embeddings", 8192)),
        )
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        num_layers = int(cfg["num_hidden_layers"])
        window, sliding_layers = sliding_window_layers(model_type, cfg, num_layers)
        return cls(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope=rope,
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            o_bias=model_type in ("llama", "mistral") and bool(cfg.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=window,
            sliding_layers=sliding_layers,
            torch_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        """Read `model_dir/config.json`."""
        from node.adapters.basemodel import read_config

        path = Path(model_dir) / "config.json"
        try:
            cfg = read_config(model_dir)
        except (OSError, ValueError) as e:
            raise ModelConfigError(
                f"cannot read base model config {path}: {e}; expected a Hugging Face config.json"
            ) from e
        try:
            return cls.from_dict(cfg)
        except KeyError as e:
            raise ModelConfigError(f"base model config {path} lacks {e.args[0]!r}") from e


def sliding_window_layers(model_type: str, cfg: dict, num_layers: int) -> tuple[int | None, tuple[int, ...] | None]:
    """(window, sliding layers) as transformers runs the family: Mistral slides every layer by
    `sliding_window`; Qwen2/Qwen3 slide only with `use_sliding_window`, and then only the layers
    `layer_types` marks "sliding_attention", which by default are those from `max_window_layers` on
    (configuration_qwen2.py); Llama never slides."""
    window = cfg.get("sliding_window")
    if model_type == "mistral":
        return (_window(window), None) if window is not None else (None, None)
    if model_type not in ("qwen2", "qwen3") or not cfg.get("use_sliding_window") or window is None:
        return None, None
    types = cfg.get("layer_types")
    if types is None:
        first = cfg.get("max_window_layers", 28)  # transformers' default for both families
        if type(first) is not int:
            raise ModelConfigError(f"max_window_layers {first!r} is not an integer")
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if (
        not isinstance(types, list)
        or len(types) != num_layers
        or any(t not in ("sliding_attention", "full_attention") for t in types)
    ):
        raise ModelConfigError(
            f"layer_types must list 'sliding_attention' or 'full_attention' for each of the {num_layers} layers"
        )
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return (_window(window), sliding) if sliding else (None, None)


def _window(window: object) -> int:
    if type(window) is not int or window < 1:
        raise ModelConfigError(f"sliding_window {window!r} is not a positive integer")
    return window


MAX_THREADS = 1024  # torch.set_num_threads(100_000) crashes the process (SIGSEGV)


@dataclass(slots=True)
class EngineConfig:
    """What the engine runs and how big its tables are; checked when built."""

    model_dir: Path
    device: str = "cpu"
    dtype: str = "auto"  # "auto": fp32 on CPU, the checkpoint's dtype on CUDA
    num_slots: int = 8  # adapter slots on the device
    max_lora_rank: int = MAX_LORA_RANK  # every slot is padded to this rank; packages above it are refused
    cpu_cache_size: int = 32  # decoded adapters kept in (pinned) host memory
    block_size: int = 16  # tokens per KV cache block
    num_kv_blocks: int | None = None  # None: size from kv_cache_memory
    kv_cache_memory: int | None = None  # bytes; None: 512 MiB on CPU, 90% of free memory on CUDA
    max_num_seqs: int = 64  # running sequences per step
    max_num_batched_tokens: int = 4096  # prompt tokens per prefill step
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    threads: int | None = None  # torch CPU threads; None leaves torch's default
    # decode on static buffers for bucketed batch sizes: "auto" captures CUDA graphs on CUDA when
    # the Triton kernels run; "static" runs the same buffers without capture (tests, debugging)
    cuda_graphs: str = "auto"  # "auto" | "off" | "static"
    # build each adapter's slot image on the loader thread, so a slot load is one copy of it; else the
    # slot is laid out at the write (in place on CPU). None: on CUDA, where the copy is then asynchronous
    slot_images: bool | None = None
    # with slot_images, where the Triton kernels run: adapters are read raw into host buffers allocated at
    # start (pinned on CUDA) and laid out on the device (lora/host_pool.py, kernels/slot_layout.py); this
    # many buffers, each the size of a max-rank float32 package, and the host cache holds 2 fewer adapters
    # at most. None: cpu_cache_size + 2 within 8 GiB (model_runner.HOST_POOL_BUDGET); 0: host-built images
    host_pool_buffers: int | None = None
    # re-hash package files whose size, mtime or inode changed since the store last hashed them
    verify_adapter_hashes: bool = True
    fused_ops: bool | None = None  # fused Triton norm / rotary+cache / SiLU ops; None: with static decode
    # share the KV of full prompt blocks across requests under the same (base, adapter) key (block_manager.py)
    enable_prefix_caching: bool = True
    # base weights quantized on load (quant.py): "none" | "int8" | "int4" | "fp8" (CUDA, compute capability
    # >= 8.9); LoRA and activations stay in `dtype`
    quantization: str = "none"
    # the KV cache's storage (layers/attention.py): "auto" the activation dtype; "fp8" e4m3 with a scale per token
    # and kv head, about half the bytes of bf16 (CPU, or CUDA with compute capability >= 8.9)
    kv_cache_dtype: str = "auto"
    # speculative decoding (speculative.py): "ngram" proposes up to num_speculative_tokens tokens per decoding
    # row from the last earlier occurrence of its newest ngram_max..ngram_min tokens, verified in the step's
    # one forward pass; "off" decodes one token per row per step
    speculative: str = "ngram"
    num_speculative_tokens: int = 4
    ngram_min: int = 2
    ngram_max: int = 4
    # shard the base over this many ranks of one host (parallel.py): processes on CPU (gloo), GPUs cuda:0..N-1
    # (NCCL); decode runs without CUDA graphs and slot images are laid out at the write then
    tensor_parallel: int = 1

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device {self.device!r} is not supported; expected 'cpu' or 'cuda'")
        if self.device != "cpu" and not torch.cuda.is_available():
            raise ValueError(
                f"device {self.device!r}: this torch build has no usable CUDA device (a CPU build, or no driver); "
                "install a CUDA build of torch (LORAMESH_TORCH_SPEC) or serve on cpu"
            )
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise ValueError(f"threads must be in 1..{MAX_THREADS}, got {self.threads}")
        if self.dtype != "auto":
            parse_dtype(self.dtype)
        for name in ("num_slots", "max_lora_rank", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cpu_cache_size < 0:
            raise ValueError(f"cpu_cache_size must be >= 0, got {self.cpu_cache_size}")
        if self.host_pool_buffers is not None and self.host_pool_buffers < 0:
            raise ValueError(f"host_pool_buffers must be >= 0, got {self.host_pool_buffers}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.cuda_graphs not in ("auto", "off", "static"):
            raise ValueError(f"cuda_graphs {self.cuda_graphs!r} is not one of auto, off, static")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        check_quantization(self.quantization, self.device)
        check_kv_cache_dtype(self.kv_cache_dtype, self.device)
        if self.speculative not in ("ngram", "off"):
            raise ValueError(f"speculative {self.speculative!r} is not one of ngram, off")
        if not 1 <= self.num_speculative_tokens <= 32:
            raise ValueError(f"num_speculative_tokens must be in 1..32, got {self.num_speculative_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max <= 64:
            raise ValueError(
                f"ngram_min/ngram_max must satisfy 1 <= min <= max <= 64, got {self.ngram_min}/{self.ngram_max}"
            )
        if self.tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be >= 1, got {self.tensor_parallel}")
        if self.tensor_parallel > 1:
            if self.cuda_graphs == "static":
                raise ValueError("cuda_graphs='static' does not run with tensor_parallel > 1; give 'off' or 'auto'")
            self.cuda_graphs = "off"  # the ranks' all-reduces are not captured in the decode graphs
            if self.slot_images:
                raise ValueError("slot_images does not run with tensor_parallel > 1: each rank lays out its own shard")
            self.slot_images = False

    def torch_dtype(self, model: ModelConfig) -> torch.dtype:
        """The dtype weights and activations run in."""
        if self.dtype != "auto":
            return parse_dtype(self.dtype)
        if self.device == "cpu":
            return torch.float32
        return _DTYPES.get(model.torch_dtype, torch.bfloat16)

    def context_len(self, model: ModelConfig) -> int:
        """Longest sequence (prompt + completion) a request may reach."""
        return min(self.max_model_len or model.max_position_embeddings, model.max_position_embeddings)

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)
