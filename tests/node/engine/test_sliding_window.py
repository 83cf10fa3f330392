"""Qwen2/Qwen3 slide only the layers transformers slides (from max_window_layers on, or as layer_types
says), so greedy text past the window equals transformers', token for token."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from node.engine import EngineConfig, LLMEngine
from node.engine.config import ModelConfig, ModelConfigError
from tests.utils.engine import greedy
from tests.utils.factories import make_base

WINDOW = 4
PROMPT = [1, 17, 99, 23, 250, 8, 77, 31, 140, 5, 66, 201, 12, 9]  # 14 tokens, past the window of 4
NEW = 8


def _windowed_base(tmp_path, model_type: str, *, max_window_layers: int | None, layer_types=None):
    base = make_base(tmp_path / model_type, seed=5, model_type=model_type, num_layers=3, num_kv_heads=1)
    path = base / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(use_sliding_window=True, sliding_window=WINDOW)
    cfg.pop("layer_types", None)  # saved at creation (all full): transformers would read it back as given
    if max_window_layers is not None:
        cfg["max_window_layers"] = max_window_layers
    if layer_types is not None:
        cfg["layer_types"] = layer_types
    path.write_text(json.dumps(cfg))
    return base


def _engine_greedy(base) -> list[int]:
    engine = LLMEngine(EngineConfig(model_dir=base, num_kv_blocks=16, block_size=4, cuda_graphs="off"))
    try:
        return list(engine.generate([greedy("r", None, PROMPT, NEW)])["r"].token_ids)
    finally:
        engine.close()


@torch.no_grad()
def _hf(base) -> tuple[list[int], list[str]]:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    x = torch.tensor([PROMPT])
    out = model.generate(
        input_ids=x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(PROMPT) :].tolist(), list(model.config.layer_types)


@pytest.mark.parametrize(
    "model_type, max_window_layers, layer_types, sliding",
    [
        ("qwen2", 1, None, (1, 2)),
        ("qwen2", 2, None, (2,)),
        ("qwen3", 0, None, (0, 1, 2)),
        ("qwen3", None, ["sliding_attention", "full_attention", "sliding_attention"], (0, 2)),
    ],
)
def test_greedy_equals_transformers_past_the_window(tmp_path, model_type, max_window_layers, layer_types, sliding):
    base = _windowed_base(tmp_path, model_type, max_window_layers=max_window_layers, layer_types=layer_types)
    cfg = ModelConfig.from_dir(base)
    want, hf_types = _hf(base)
    assert tuple(i for i, t in enumerate(hf_types) if t == "sliding_attention") == sliding
    assert tuple(i for i in range(3) if cfg.layer_window(i) == WINDOW) == sliding
    assert _engine_greedy(base) == want


def test_default_max_window_layers_leaves_a_small_model_unwindowed(tmp_path):
    # transformers' default max_window_layers is 28: a 3-layer model with use_sliding_window slides nowhere
    base = _windowed_base(tmp_path, "qwen2", max_window_layers=None)
    cfg = ModelConfig.from_dir(base)
    assert cfg.sliding_window is None and all(cfg.layer_window(i) is None for i in range(3))
    assert _engine_greedy(base) == _hf(base)[0]


def test_window_changes_the_text(tmp_path):
    """The test can fail: with every layer windowed the text differs from the max_window_layers=1 run."""
    mixed = _engine_greedy(_windowed_base(tmp_path / "a", "qwen2", max_window_layers=1))
    every = _engine_greedy(_windowed_base(tmp_path / "b", "qwen2", max_window_layers=0))
    assert mixed != every


def test_malformed_layer_types_are_refused():
    cfg = {
        "model_type": "qwen2",
        "vocab_size": 320,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "use_sliding_window": True,
        "sliding_window": 4,
        "layer_types": ["sliding_attention"],
    }
    with pytest.raises(ModelConfigError, match="layer_types must list"):
        ModelConfig.from_dict(cfg)
