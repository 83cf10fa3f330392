"""Base models: identity (name and config hash) and tiny deterministic Llama-family models for tests and demos.

Nothing here downloads: a tiny base is made from a config with a fixed seed, and its byte-level
tokenizer is trained on a short built-in text, so any UTF-8 text round-trips.
"""

from __future__ import annotations

from pathlib import Path

from common.wire import UntrustedJSONError, canonical_json, parse_json, sha256_hex

# Keys of config.json that describe how a checkpoint was saved, not what the model is.
_VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache"})
NAME_KEY = "loramesh_base_name"
MAX_CONFIG_BYTES = 1 << 20  # a model's config.json is a few KB; a downloaded folder may hold anything
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Text the tokenizer's merges are learnt from: enough for common English pieces, nothing more.
_TOKENIZER_CORPUS = (
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital. "
    "Question: how do I translate this sentence? Answer: the answer is in the data. "
    "A model learns from examples; an adapter specialises the base model for one domain. "
    "user assistant system hello world thanks please the and of to in is it that for on with as "
)


class BaseModelError(ValueError):
    """A base model folder that is missing or not usable."""


def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars and advisory warnings (our commands show their own)."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def read_config(base_dir: str | Path) -> dict:
    """Read a Hugging Face checkpoint folder's config.json."""
    path = Path(base_dir) / "config.json"
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise BaseModelError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
        cfg = parse_json(path.read_bytes(), max_bytes=MAX_CONFIG_BYTES, what="config.json")
    except FileNotFoundError as e:
        raise BaseModelError(f"{base_dir} is not a model folder: config.json is missing") from e
    except UntrustedJSONError as e:
        raise BaseModelError(str(e)) from None
    if not isinstance(cfg, dict):
        raise BaseModelError(f"{path} is not a JSON object")
    return cfg


def base_model_id(base_dir: str | Path) -> str:
    """The base model's id: sha256 of its canonical config, without keys that only describe the save."""
    return base_model_id_from_config(read_config(base_dir))


def base_model_id_from_config(config: dict) -> str:
    """The base model id computed from a config dict."""
    return sha256_hex(canonical_json({k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}))


def base_model_name(base_dir: str | Path) -> str:
    """A human name for the base model: the one recorded at creation, else the folder's name."""
    return str(read_config(base_dir).get(NAME_KEY) or Path(base_dir).resolve().name)


def _make_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TOKENIZER_CORPUS] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def init_tiny(
    out_dir: str | Path,
    seed: int = 0,
    *,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 320,
    max_positions: int = 512,
    model_type: str = "llama",
    qkv_bias: bool = False,
    name: str | None = None,
) -> Path:
    """Write a small deterministic Llama-family causal LM (weights, config, tokenizer) to `out_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    if not 16 <= hidden_size <= 4096 or hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} must be in 16..4096 and divisible by num_heads {num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer (>= 259)")
    if model_type not in ("llama", "mistral", "qwen2", "qwen3"):
        raise ValueError(f"model_type {model_type!r} is not one of llama, mistral, qwen2, qwen3")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if model_type == "llama":
        kwargs["attention_bias"] = qkv_bias
    if model_type in ("qwen3",):
        kwargs["head_dim"] = hidden_size // num_heads
    config = AutoConfig.for_model(model_type, **kwargs)
    setattr(config, NAME_KEY, name or f"tiny-{model_type}-h{hidden_size}-l{num_layers}-s{seed}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out, safe_serialization=True)
    _make_tokenizer(vocab_size).save_pretrained(out)
    return out
