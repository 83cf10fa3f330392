"""Reference generation with transformers (+ PEFT): the yardstick our engine is checked against."""

from __future__ import annotations

from pathlib import Path


def greedy_answers(
    base_dir: str | Path, prompts: list[str], *, adapter_dir: str | Path | None = None, max_new_tokens: int = 24
) -> list[str]:
    """Greedy completions of `prompts`, one at a time, by the base model or the base plus one adapter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from node.adapters.basemodel import quiet_transformers

    quiet_transformers()
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt").input_ids
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            out.append(tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True))
    return out
