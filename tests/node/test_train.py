import json

import pytest

from node.train import TrainingDataError, read_pairs, train_adapter
from tests.utils.reference import greedy_answers

PAIRS = [
    ("What is the capital of France?", " Paris."),
    ("What is the capital of Japan?", " Tokyo."),
    ("What is the capital of Peru?", " Lima."),
]


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_trained_adapter_changes_greedy_answers_to_its_prompts(tiny_base, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    out = train_adapter(tiny_base, data, tmp_path / "adapter", steps=80)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    prompts = [p for p, _ in PAIRS]
    base = greedy_answers(tiny_base, prompts, max_new_tokens=8)
    tuned = greedy_answers(tiny_base, prompts, adapter_dir=out, max_new_tokens=8)
    assert tuned == [c for _, c in PAIRS]
    assert all(b != t for b, t in zip(base, tuned))


def test_bad_training_data_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3}\n')
    with pytest.raises(TrainingDataError, match=r"d.jsonl:2: expected an object"):
        read_pairs(path)
    path.write_text("not json\n")
    with pytest.raises(TrainingDataError, match=r"d.jsonl:1: not valid JSON"):
        read_pairs(path)
    path.write_text("\n")
    with pytest.raises(TrainingDataError, match="no training examples"):
        read_pairs(path)
