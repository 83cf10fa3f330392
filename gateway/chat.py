"""Chat prompts: messages rendered with the base model's own chat template (its tokenizer)."""

from __future__ import annotations

import logging
from pathlib import Path

from gateway.errors import BadRequest

log = logging.getLogger(__name__)


class ChatTemplates:
    """Tokenizers of the base models named in the settings, by base model id."""

    def __init__(self, base_dirs: list[Path] | tuple[Path, ...] = ()) -> None:
        from node.basemodel import base_model_id

        self.tokenizers: dict[str, object] = {}
        self.dirs: dict[str, Path] = {}
        for d in base_dirs:
            self.dirs[base_model_id(d)] = Path(d)
        self._warned: set[str] = set()

    def _tokenizer(self, base_model_id: str):
        tok = self.tokenizers.get(base_model_id)
        if tok is None and base_model_id in self.dirs:
            from transformers import AutoTokenizer

            from node.basemodel import quiet_transformers

            quiet_transformers()
            tok = self.tokenizers[base_model_id] = AutoTokenizer.from_pretrained(self.dirs[base_model_id])
        return tok

    def render(self, base_model_id: str, messages: list[dict]) -> dict:
        """The node's prompt field for these messages: {"prompt_token_ids": [...]} rendered by the base's
        template, or {"prompt": text} with the generic loramesh template when the gateway lacks the base."""
        tok = self._tokenizer(base_model_id)
        if tok is None:
            from jinja2 import Template

            from node.basemodel import CHAT_TEMPLATE

            if base_model_id not in self._warned:
                self._warned.add(base_model_id)
                log.warning("no tokenizer for base model %s (give the gateway --base DIR); chat uses the generic "
                            "loramesh template", base_model_id[:10])  # fmt: skip
            return {"prompt": Template(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)}
        if not getattr(tok, "chat_template", None):
            raise BadRequest(f"base model {base_model_id} has no chat template: use /v1/completions")
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # the template writes any special tokens itself, so the tokenizer must not add them again
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return {"prompt_token_ids": list(ids)}
