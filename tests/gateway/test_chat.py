"""Prompts as token ids: chat rendered with the base model's own template through its tokenizer, completion
text encoded as the node encodes it; a base the gateway has no folder for cannot be counted."""

from __future__ import annotations

import pytest

from gateway.chat import ChatTemplates
from gateway.errors import BaseNotConfigured
from node.adapters.basemodel import base_model_id

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def test_base_template_gives_token_ids(tiny_base):
    from transformers import AutoTokenizer

    ids = ChatTemplates([tiny_base]).render(base_model_id(tiny_base), MESSAGES)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    # the template writes BOS itself (as Llama's does), and it is not added twice
    assert tok.decode(ids) == "<s><|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    assert ids.count(tok.bos_token_id) == 1


def test_a_rendered_chat_too_long_for_the_context_is_refused_before_it_is_tokenized(tiny_base, monkeypatch):
    """What the template writes around each message is no text of the request: 137,000 empty messages (or an
    assistant's tool call of megabytes, for a template that renders them) passed the check of the texts, and
    tokenizing the rendered megabytes held the gateway's event loop for seconds. The rendered text is held to
    the context before it is tokenized."""
    import node.adapters.prompts as prompts
    from gateway.errors import BadRequest

    t, base = ChatTemplates([tiny_base]), base_model_id(tiny_base)
    t.render(base, MESSAGES)  # the tokenizer loaded
    many = [{"role": "user", "content": ""}] * (t.context_len(base) * t.token_texts[base].longest)
    monkeypatch.setattr(prompts, "text_ids", lambda *a: pytest.fail("the rendered text was tokenized"))
    with pytest.raises(BadRequest) as err:
        t.render(base, many)
    assert (err.value.code, err.value.param) == ("context_length_exceeded", "messages")


def test_completion_text_is_encoded_as_the_node_does(tiny_base):
    from node.engine.llm_engine import load_tokenizer

    t = ChatTemplates([tiny_base])
    text = "The capital of France is Paris. ünïcode ✓"
    assert t.encode(base_model_id(tiny_base), text) == load_tokenizer(tiny_base).encode(text)
    assert t.context_len(base_model_id(tiny_base)) == 512


def test_unknown_base_cannot_be_counted():
    with pytest.raises(BaseNotConfigured, match="--base"):
        ChatTemplates().render("0x" + "00" * 32, MESSAGES)
    with pytest.raises(BaseNotConfigured):
        ChatTemplates().encode("0x" + "00" * 32, "hello")
