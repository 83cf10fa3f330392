"""Our decoder against transformers on base weights: every supported family, sharded and half-precision loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from node.engine import EngineConfig, LLMEngine, ModelConfigError
from node.engine.config import ModelConfig
from node.engine.loader import CheckpointError
from tests.utils.engine import greedy
from tests.utils.factories import make_base

IDS = [1, 17, 99, 23, 250, 8, 77, 31, 140]


def _engine_logits(base_dir, **kw) -> torch.Tensor:
    engine = LLMEngine(EngineConfig(model_dir=base_dir, num_kv_blocks=16, block_size=8, **kw))
    try:
        engine.add_request(greedy("r", None, IDS, 1))
        seqs, _, _ = engine.scheduler.schedule()
        return engine.runner.forward(seqs, True, all_logits=True).float()
    finally:
        engine.close()


def _hf_logits(base_dir) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([IDS])).logits[0]


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_base_logits_match_transformers(tmp_path, model_type):
    base = make_base(tmp_path / model_type, seed=3, model_type=model_type, num_kv_heads=1)
    torch.testing.assert_close(_engine_logits(base), _hf_logits(base), atol=1e-4, rtol=0)


def test_sharded_checkpoint_and_bf16_load(tmp_path, llama_world):
    src = llama_world.base_dir
    dst = tmp_path / "sharded"
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(dst / fname))
        weight_map.update({n: fname for n in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    want = _hf_logits(src)
    torch.testing.assert_close(_engine_logits(dst), want, atol=1e-4, rtol=0)
    bf16 = _engine_logits(dst, dtype="bf16")
    assert (bf16 - want).abs().max() < 0.1 * want.abs().max()


def test_checkpoint_missing_a_tensor_is_refused(tmp_path, llama_world):
    dst = tmp_path / "partial"
    dst.mkdir()
    for f in llama_world.base_dir.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(llama_world.base_dir / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(dst / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks 1 tensors, e.g. layers.1.mlp.gate_up_proj.weight"):
        LLMEngine(EngineConfig(model_dir=dst, num_kv_blocks=4))


def test_unsupported_model_type_is_refused():
    cfg = {
        "model_type": "gpt2",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    with pytest.raises(ModelConfigError, match="model_type 'gpt2' is not supported"):
        ModelConfig.from_dict(cfg)


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    base = make_base(tmp_path / "l3", seed=4)
    cfg = json.loads((base / "config.json").read_text())
    cfg["rope_parameters"] = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    (base / "config.json").write_text(json.dumps(cfg))
    assert ModelConfig.from_dir(base).rope.rope_type == "llama3"
    torch.testing.assert_close(_engine_logits(base), _hf_logits(base), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"device": "tpu"}, "device 'tpu' is not supported"),
        ({"num_slots": 0}, "num_slots must be >= 1"),
        ({"dtype": "int8"}, "dtype 'int8' is not supported"),
        ({"num_kv_blocks": 0}, "num_kv_blocks must be >= 1"),
    ],
)
def test_bad_engine_config_is_refused(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        EngineConfig(model_dir=tmp_path, **kwargs)


@pytest.mark.parametrize(
    "index, match",
    [
        ('{"weight_map": {"lm_head.weight": "../outside.safetensors"}}', "names shard '../outside.safetensors'"),
        ('{"weight_map": {"lm_head.weight": "a.safetensors\\n"}}', "names shard 'a.safetensors\\\\n'"),
        ('{"weight_map": ' + "[" * 20_000, "nested deeper than 8 levels"),
        ('{"weight_map": {}}', "has no weight_map"),
    ],
)
def test_shard_index_is_read_within_limits(tmp_path, llama_world, index, match):
    """A downloaded checkpoint's index may name files outside its folder or be nested JSON: refused."""
    from node.engine.loader import checkpoint_tensors

    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=match):
        next(checkpoint_tensors(tmp_path))
