"""How a base model's tokenizer turns a prompt into token ids: the one place that serving (the gateway) and
training (`adapter train`) agree on, so an adapter is trained on exactly the ids it is later served.

- A completion prompt is encoded with the tokenizer's own special tokens (its BOS, where it has one).
- A chat is rendered by the base's chat template, which writes any special tokens itself (BOS included, as
  Llama's and the tiny bases' templates do), and is then encoded without adding them again: this is what
  transformers' `apply_chat_template(tokenize=True)` and vLLM's chat endpoint do.
- Tools (OpenAI's `tools`, as function schemas) are handed to the template, which lists them where the
  model expects them.
"""

from __future__ import annotations


class NoChatTemplate(ValueError):
    """The base model's tokenizer has no chat template: it cannot render chat messages."""


def completion_ids(tok, text: str) -> list[int]:
    """A completion prompt's token ids, with the tokenizer's special tokens (as the node encodes text)."""
    return list(tok.encode(text))


def chat_text(
    tok,
    messages: list[dict],
    *,
    tools: list[dict] | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    extra: dict | None = None,
) -> str:
    """The chat rendered by the base's template, as text (the assistant's turn opened when asked, or the final
    message left open to be continued); `extra`: variables the template may read beside the messages and tools (a
    request's chat_template_kwargs)."""
    if not getattr(tok, "chat_template", None):
        raise NoChatTemplate("this base model's tokenizer has no chat template")
    return tok.apply_chat_template(
        messages,
        tools=tools or None,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        **(extra or {}),
    )


def chat_ids(tok, messages: list[dict], *, tools: list[dict] | None = None) -> list[int]:
    """A chat prompt's token ids, ending where the assistant's answer begins."""
    return text_ids(tok, chat_text(tok, messages, tools=tools))


def text_ids(tok, text: str) -> list[int]:
    """Ids of text that holds its special tokens already (rendered by a template): none are added."""
    return list(tok(text, add_special_tokens=False)["input_ids"])


def bad_word_ids(tok, words: list[str]) -> list[list[int]]:
    """vLLM's bad_words as the token id sequences to ban: each word as the tokenizer writes it where a text begins
    and, where it writes the word after a space as other tokens of the same number (a word token of its own), that
    way too: the word is banned at an answer's start and inside it. Words are their text without leading spaces;
    ValueError for one with no tokens (blank, or all of it dropped by the tokenizer's normalizer)."""
    out = []
    for word in words:
        bare = word.lstrip()
        alone, spaced = text_ids(tok, bare), text_ids(tok, " " + bare)
        if not alone:
            raise ValueError(f"the bad word {word[:40]!r} is no tokens to this model's tokenizer")
        out.append(alone)
        if spaced and spaced[0] != alone[0] and len(spaced) == len(alone):
            out.append(spaced)
    return out
