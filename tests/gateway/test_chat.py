"""Chat prompts rendered with the base model's own template through its tokenizer."""

from __future__ import annotations

from gateway.chat import ChatTemplates
from node.basemodel import base_model_id

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def test_base_template_gives_token_ids(tiny_base):
    from transformers import AutoTokenizer

    out = ChatTemplates([tiny_base]).render(base_model_id(tiny_base), MESSAGES)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    assert tok.decode(out["prompt_token_ids"]) == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"


def test_unknown_base_falls_back_to_generic_template_text():
    out = ChatTemplates().render("0x" + "00" * 32, MESSAGES)
    assert out == {"prompt": "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"}
