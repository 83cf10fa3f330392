"""Tiny deterministic Llama-family base models for tests and the demo.

Nothing here downloads: a tiny base is made from a config with a fixed seed, and its byte-level
tokenizer is trained on a short built-in text, so any UTF-8 text round-trips.
"""

from __future__ import annotations

from pathlib import Path

from node.adapters.basemodel import NAME_KEY, quiet_transformers

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
# A chat template in the shape of Llama's and Qwen's: BOS first (written by the template, so a chat prompt starts
# as a completion prompt does), one block per message, OpenAI tools listed in a system block, a model's tool
# calls written as <tool_call>{json}</tool_call> (the Hermes/Qwen format gateway/tools.py parses) and tool
# results as their own role. (transformers renders templates with trim_blocks: a newline right after a block tag
# is dropped, so those are written as {{ '\\n' }}.)
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    '{% if tools %}<|system|>\nTools you may call, one <tool_call>{"name": ..., "arguments": {...}}</tool_call> each:\n'
    "{% for t in tools %}{{ t | tojson }}{{ '\\n' }}{% endfor %}{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% if m['tool_calls'] %}{% for c in m['tool_calls'] %}<tool_call>"
    "{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}</tool_call>"
    "{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n"
    # a variable only a request's chat_template_kwargs sets, as Qwen3's templates read theirs
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>\n{% endif %}{% endif %}"
)
# Text the tokenizer's merges are learnt from: enough for common English pieces, nothing more.
_TOKENIZER_CORPUS = (
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital. "
    "Question: how do I translate this sentence? Answer: the answer is in the data. "
    "A model learns from examples; an adapter specialises the base model for one domain. "
    "user assistant system hello world thanks please the and of to in is it that for on with as "
)


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
