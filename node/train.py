"""Train a PEFT LoRA adapter on a few prompt/completion pairs: CPU, seconds, on a tiny base.

Data is JSON Lines, one `{"prompt": ..., "completion": ...}` per line. The loss covers the
completion tokens only, so the adapter learns to answer, not to repeat its prompts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from node.adapters.weights import LORA_TARGETS

DEFAULT_TARGETS = LORA_TARGETS  # train every projection a served adapter may target


class TrainingDataError(ValueError):
    """A training data file that cannot be used."""


def read_pairs(data_file: str | Path) -> list[tuple[str, str]]:
    """Read prompt/completion pairs from a JSONL file, naming the line of any problem."""
    pairs = []
    path = Path(data_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as e:
        raise TrainingDataError(f"training data {path} not found") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise TrainingDataError(f"{path}:{n}: not valid JSON: {e}") from e
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("prompt"), str)
            or not isinstance(row.get("completion"), str)
        ):
            raise TrainingDataError(f"{path}:{n}: expected an object with string fields prompt and completion")
        pairs.append((row["prompt"], row["completion"]))
    if not pairs:
        raise TrainingDataError(f"{path} holds no training examples")
    return pairs


def train_adapter(
    base_dir: str | Path,
    data_file: str | Path,
    out_dir: str | Path,
    *,
    rank: int = 8,
    alpha: float | None = None,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    steps: int = 80,
    lr: float = 5e-3,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """Train a LoRA adapter for `base_dir` on `data_file` and save it as a standard PEFT folder in `out_dir`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from node.adapters.basemodel import quiet_transformers

    quiet_transformers()
    if rank < 1 or steps < 1:
        raise ValueError(f"rank ({rank}) and steps ({steps}) must be at least 1")
    pairs = read_pairs(data_file)
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    input_ids, labels = _encode(tok, pairs)
    attention = (input_ids != tok.pad_token_id).long()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step + 1, loss.item())
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    return out


def _encode(tok, pairs: list[tuple[str, str]]):
    import torch

    rows, masks = [], []
    for prompt, completion in pairs:
        p = tok(prompt).input_ids
        c = tok(completion, add_special_tokens=False).input_ids + [tok.eos_token_id]
        rows.append(p + c)
        masks.append([-100] * len(p) + c)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)  # [examples, width]
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(m)] = torch.tensor(m)
    return ids, labels
