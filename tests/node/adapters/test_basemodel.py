import random

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from node.adapters.basemodel import BaseModelError, base_model_id, base_model_name
from node.tiny import init_tiny


def test_init_tiny_is_deterministic_and_seed_dependent(tmp_path, tiny_base):
    again = init_tiny(tmp_path / "again", seed=0)
    other = init_tiny(tmp_path / "other", seed=1)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (tiny_base / name).read_bytes()
    assert (other / "model.safetensors").read_bytes() != (tiny_base / "model.safetensors").read_bytes()
    assert base_model_id(again) == base_model_id(tiny_base)
    assert base_model_id(other) != base_model_id(tiny_base)  # the seed is part of the recorded name
    assert base_model_name(tiny_base) == "tiny-llama-h128-l2-s0"


def test_loads_offline_with_transformers(tiny_base):
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert model.config.model_type == "llama"
    assert 64 <= model.config.hidden_size <= 256
    tok = AutoTokenizer.from_pretrained(tiny_base)
    assert len(tok) <= model.config.vocab_size
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)


def test_tokenizer_round_trips_any_utf8(tiny_base):
    tok = AutoTokenizer.from_pretrained(tiny_base)
    rng = random.Random(7)
    samples = ["", "plain ascii", "héllo wörld", "🦙🦙 emoji", "中文 日本語 한국어", "\x00\t\n\r", "  spaced  out  "]
    samples += [
        "".join(
            chr(rng.choice([rng.randrange(32, 0x7F), rng.randrange(0xA0, 0xD7FF), rng.randrange(0x10000, 0x10FFFF)]))
            for _ in range(40)
        )
        for _ in range(20)
    ]
    for text in samples:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_qwen2_variant_has_qkv_bias(tmp_path):
    out = init_tiny(tmp_path / "q", seed=0, model_type="qwen2")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert base_model_id(out) != base_model_id(init_tiny(tmp_path / "l", seed=0))


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        init_tiny(tmp_path / "x", model_type="gpt2")
    with pytest.raises(ValueError, match="divisible"):
        init_tiny(tmp_path / "x", hidden_size=100, num_heads=3)
    with pytest.raises(BaseModelError, match="config.json is missing"):
        base_model_id(tmp_path)


def test_eos_ids_join_the_config_the_generation_config_and_the_tokenizer(tmp_path, tiny_base):
    import json
    import shutil

    from node.adapters.basemodel import eos_token_ids

    base = shutil.copytree(tiny_base, tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(base)
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": [7]}))
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(cfg | {"eos_token_id": 5}))
    assert eos_token_ids(base) == {5, 7}
    assert eos_token_ids(base, tok) == {5, 7, 2}  # the tokenizer's is 2
    (base / "generation_config.json").write_text("{not json")
    with pytest.raises(BaseModelError, match="generation_config.json"):
        eos_token_ids(base)
