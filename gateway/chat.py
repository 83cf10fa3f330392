"""Prompts as token ids: the gateway tokenizes every prompt itself with the base model's own tokenizer (and
renders chat with its chat template), sends the node `prompt_token_ids`, and so knows the prompt's token
count exactly: the node's count of the same ids is their number, by construction."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gateway.errors import BadRequest, BaseNotConfigured
from gateway.logprobs import TokenTexts

log = logging.getLogger(__name__)

# the most characters a token's text may hold when the base's vocabulary is not known here (no vocabulary of a
# model served today has an entry near it)
MAX_TOKEN_CHARS = 1024
# The most characters of a prompt cut to its last tokens (truncate_prompt_tokens) that is tokenized although a prompt
# of its length could not be served uncut (check_length): a cut is made on the whole text's ids, as vLLM makes it (its
# end alone tokenized gave other last ids wherever BPE merges run across the cut: review, red team), and 1 MB of text
# takes a worker thread about a second to tokenize (4 MB, 3 to 4 s)
MAX_CUT_CHARS = 1 << 20


@contextmanager
def _encoding(param: str) -> Iterator[None]:
    """A client's text the base's tokenizer cannot encode is the request's mistake, a 400 naming its field, not a
    500: the tokenizers library raises a bare Exception for it (a Unigram model without an unknown token, given a
    character it has no piece for: red team)."""
    try:
        yield
    except Exception as e:
        if type(e) is not Exception:  # anything else is ours (a BadRequest made below it, a bug), as it is
            raise
        said = " ".join(str(e).split())[:200]
        raise BadRequest(f"this model's tokenizer cannot encode the {param}: {said}", param=param) from None


class ChatTemplates:
    """Tokenizers (and context lengths) of the base models named in the settings, by base model id."""

    def __init__(self, base_dirs: list[Path] | tuple[Path, ...] = ()) -> None:
        from node.adapters.basemodel import base_model_id_from_config, eos_token_ids, read_config

        self.tokenizers: dict[str, object] = {}
        self.dirs: dict[str, Path] = {}
        self.context: dict[str, int | None] = {}
        self.model_vocab: dict[str, int | None] = {}  # config.json's vocab_size: the model's output rows
        # base id -> its tokens' strings for logprobs, its vocabulary's size and longest entry; known once the
        # tokenizer is loaded
        self.token_texts: dict[str, TokenTexts] = {}
        # base id -> the ids that end its sequences (the tokenizer's own joins them once it is loaded)
        self.eos: dict[str, frozenset[int]] = {}
        for d in base_dirs:
            cfg = read_config(d)  # read once for the id and the sizes
            bid = base_model_id_from_config(cfg)
            self.dirs[bid] = Path(d)
            self.context[bid], self.model_vocab[bid] = _config_sizes(cfg)
            self.eos[bid] = eos_token_ids(d)
        self._lock = threading.Lock()

    def knows(self, base_model_id: str) -> bool:
        return base_model_id in self.dirs

    def loaded(self, base_model_id: str) -> bool:
        """Whether the base's tokenizer is loaded already (using it does not read files)."""
        return self.tokenizers.get(base_model_id) is not None

    def context_len(self, base_model_id: str) -> int | None:
        """The base's context (max_position_embeddings): no request on it can hold more tokens."""
        return self.context.get(base_model_id)

    def _tokenizer(self, base_model_id: str):
        if base_model_id not in self.dirs:
            raise BaseNotConfigured(
                f"this gateway has no tokenizer for base model {base_model_id}, so it cannot "
                "count the prompt's tokens; its operator starts it with --base <folder> for "
                "every base it serves (or send the prompt as token ids)"
            )
        with self._lock:
            tok = self.tokenizers.get(base_model_id)
            if tok is None:
                tok = _load_tokenizer(self.dirs[base_model_id])
                if tok is not False:
                    self.token_texts[base_model_id] = TokenTexts(tok)
                    from node.adapters.basemodel import eos_token_ids

                    self.eos[base_model_id] = eos_token_ids(self.dirs[base_model_id], tok)
                self.tokenizers[base_model_id] = tok
        if tok is False:
            raise BadRequest(
                f"base model {base_model_id} has no tokenizer: send the prompt as token ids", param="prompt"
            )
        return tok

    def warm(self) -> None:
        """Load every base's tokenizer and use its chat template once (blocking; at start-up). Concurrent
        first uses raced in transformers' lazy imports; a base that cannot be loaded is logged, and its
        requests get the error."""
        for bid in self.dirs:
            try:
                tok = self._tokenizer(bid)
                tok.encode("warm up")
                if getattr(tok, "chat_template", None):
                    self.render(bid, [{"role": "user", "content": "warm up"}])
            except Exception as e:  # noqa: BLE001 - the base's requests report it; the gateway still serves others
                log.warning("base model %s: tokenizer not ready: %s", bid, e)

    def end_ids(self, base_model_id: str) -> frozenset[int]:
        """The ids that end a sequence of the base, as its nodes end it (node.adapters.basemodel.eos_token_ids;
        none for a base this gateway has no folder of)."""
        return self.eos.get(base_model_id, frozenset())

    def id_bound(self, base_model_id: str) -> int | None:
        """No token id a node generates can be this or more: the rows of the model's output (config.json's
        vocab_size), or the tokenizer's ids where it knows more (None: neither is known here)."""
        texts = self.token_texts.get(base_model_id)
        bounds = [b for b in (self.model_vocab.get(base_model_id), texts and texts.size) if b]
        return max(bounds) if bounds else None

    def check_length(self, base_model_id: str, chars: int, *, param: str = "prompt") -> None:
        """Refuse a prompt of `chars` characters that holds at least as many tokens as the context, before
        tokenizing it: no token stands for more characters than the longest in the vocabulary, so the prompt
        has at least chars / longest tokens (tokenizing 20 MB of text costs a process tens of seconds)."""
        at_least, context = self._fewest_tokens(base_model_id, chars)
        if at_least >= context:
            raise BadRequest(
                f"the prompt has at least {at_least} tokens ({chars} characters); the model's "
                f"context holds {context} (prompt + at least one generated token)",
                code="context_length_exceeded",
                param=param,
            )

    def _fewest_tokens(self, base_model_id: str, chars: int) -> tuple[int, int]:
        """(the fewest tokens a text of `chars` characters can be, the context); (0, 1) where either is unknown."""
        context, texts = self.context.get(base_model_id), self.token_texts.get(base_model_id)
        if context is None or texts is None:
            return 0, 1
        return -(-chars // texts.longest), context

    def token_chars(self, base_model_id: str) -> int:
        """The most characters of text a node may send per token of the base: its longest vocabulary entry,
        and one more for a decoder that puts a space between words (MAX_TOKEN_CHARS while its tokenizer is
        not loaded: a prompt sent as token ids needs none)."""
        texts = self.token_texts.get(base_model_id)
        return MAX_TOKEN_CHARS if texts is None else texts.longest + 1

    def check_ids(self, base_model_id: str, ids: list[int], *, param: str = "prompt", what: str = "prompt") -> None:
        """Refuse token ids the base's vocabulary does not have (when the gateway knows it)."""
        texts = self.token_texts.get(base_model_id)
        if texts is not None and ids and max(ids) >= texts.size:
            raise BadRequest(
                f"{what} token id {max(ids)} is not in the model's vocabulary of {texts.size}", param=param
            )

    def encode(self, base_model_id: str, text: str, param: str = "prompt") -> list[int]:
        """A completion prompt's token ids, exactly as the node would encode the text (blocking). Its length is
        checked by the caller first (check_length; a prompt to be cut to its last tokens, check_cut: it is tokenized
        whole all the same)."""
        from node.adapters.prompts import completion_ids

        with _encoding(param):
            return completion_ids(self._tokenizer(base_model_id), text)

    def check_cut(self, base_model_id: str, chars: list[int], *, param: str = "prompt") -> None:
        """Refuse prompts of `chars` characters each, to be cut to their last tokens, when those too long to be
        served uncut (check_length's bound) are more than MAX_CUT_CHARS in all: which are a prompt's last tokens
        only the whole text's tokenization says, and the bound is the request's (a request of 4 prompts of 1 MiB
        held a worker thread 5 s: re-attack)."""
        context = self._fewest_tokens(base_model_id, 0)[1]
        beyond = sum(c for c in chars if self._fewest_tokens(base_model_id, c)[0] >= context)
        if beyond > MAX_CUT_CHARS:
            raise BadRequest(
                f"the prompts the context's {context} tokens cannot hold uncut are {beyond} characters: a prompt cut "
                f"to its last tokens is tokenized whole to find them, and such prompts only up to {MAX_CUT_CHARS} "
                "characters a request: send less of them",
                param=param,
            )

    def bad_words(self, base_model_id: str, words: list[str]) -> list[list[int]]:
        """vLLM's bad_words as the token id sequences the node bans (node.adapters.prompts.bad_word_ids;
        blocking)."""
        from node.adapters.prompts import bad_word_ids

        with _encoding("bad_words"):
            return bad_word_ids(self._tokenizer(base_model_id), words)

    def decode(
        self,
        base_model_id: str,
        ids: list[int],
        *,
        skip_special_tokens: bool = True,
        unshown: frozenset[int] = frozenset(),
    ) -> str:
        """Token ids as text, without the special tokens unless `skip_special_tokens` is false, and then without the
        `unshown` ids' (a prompt given as ids, echoed back; a node's sequence, as it shows it; blocking)."""
        from node.adapters.detokenizer import shown_text

        return shown_text(self._tokenizer(base_model_id), ids, skip_special_tokens=skip_special_tokens, unshown=unshown)

    def sent_chars(
        self,
        base_model_id: str,
        ids: list[int],
        stops: list[str],
        stop_ids: set[int],
        ended: bool,
        *,
        skip_special_tokens: bool = True,
        unshown: frozenset[int] = frozenset(),
    ) -> tuple[int, int | None, str | None]:
        """What an honest node sends for a sequence of these token ids (its tokenizer loaded; blocking): the
        characters of its text, and the position of the token that completes a stop string and that string
        (None, None: none does), after which it sends nothing. Its detokenizer run over the ids as the engine runs it
        (node.engine.llm_engine._emit): a stop token id ends the sequence without its text, a stop string ends it
        before the string; the text still held back (half a character, a possible stop string's start) is sent when
        the sequence `ended` there, not when it was cut off. `skip_special_tokens`, `unshown`: as the node's
        TextStream takes them."""
        from node.adapters.detokenizer import TextStream

        stream = TextStream(
            self._tokenizer(base_model_id), tuple(stops), skip_special_tokens=skip_special_tokens, unshown=unshown
        )
        for i, tid in enumerate(ids):
            if tid in stop_ids:
                break
            if stream.push(tid)[1]:
                return len(stream.text), i, stream.stopped
        if ended:
            stream.flush()
        return len(stream.text), None, None

    def pieces(self, base_model_id: str, ids: list[int]) -> list[str]:
        """The tokenizer's own strings of these ids (its vocabulary's entries: "Ġthe", "▁the"; blocking)."""
        return list(self._tokenizer(base_model_id).convert_ids_to_tokens(ids))

    def vocab(self, base_model_id: str) -> int | None:
        """The base's vocabulary size, its tokenizer loaded (None: it has none; blocking)."""
        try:
            self._tokenizer(base_model_id)
        except BadRequest:
            return None
        texts = self.token_texts.get(base_model_id)
        return None if texts is None else texts.size

    def texts(self, base_model_id: str) -> TokenTexts:
        """The base's tokens as strings and bytes, for logprobs (its tokenizer loaded)."""
        self._tokenizer(base_model_id)
        return self.token_texts[base_model_id]

    def render(
        self,
        base_model_id: str,
        messages: list[dict],
        tools: list[dict] | None = None,
        extra: dict | None = None,
        generation_prompt: bool = True,
        continue_final: bool = False,
        param: str = "messages",
        cut: bool = False,
    ) -> list[int]:
        """Chat messages (and the request's tools) rendered by the base's template, as token ids, exactly as
        `adapter train` renders its chat data (node.adapters.prompts; blocking); `extra`: the request's own
        template variables (chat_template_kwargs). A rendered text too long for the context is refused before
        it is tokenized: what the template renders around and from the messages (role markup, tool calls) is
        counted only here. generation_prompt: the assistant's turn opened after the messages; continue_final: the
        final (assistant) message left open, the answer going on with it; cut: the ids are cut to their last ones
        by the caller (truncate_prompt_tokens): a text longer than the context is tokenized whole all the same
        (check_cut)."""
        from jinja2 import TemplateError

        from node.adapters.prompts import NoChatTemplate, chat_text, text_ids

        tok = self._tokenizer(base_model_id)
        try:
            text = chat_text(
                tok,
                messages,
                tools=tools,
                add_generation_prompt=generation_prompt,
                continue_final_message=continue_final,
                extra=extra,
            )
        except NoChatTemplate:
            raise BadRequest(f"base model {base_model_id} has no chat template: use /v1/completions") from None
        except TemplateError as e:  # a template that refuses these messages (e.g. roles that must alternate)
            raise BadRequest(f"the model's chat template refused the messages: {e}", param=param) from None
        except Exception as e:
            # a variable the template, or transformers under it, takes for something else (a name of a newer
            # release's own argument, a number the template's range() refuses), or a final message the template
            # does not write out as given (it cannot be continued): the request's mistake, not a crash
            # (transformers' message may quote the whole rendered chat: cut short)
            said = " ".join(str(e).split())[:300]
            if continue_final and isinstance(e, ValueError):
                raise BadRequest(
                    f"the final message cannot be continued: {said}", param="continue_final_message"
                ) from None
            if extra:
                raise BadRequest(
                    f"the chat template could not be rendered with chat_template_kwargs: {said}",
                    param="chat_template_kwargs",
                ) from None
            raise
        if cut:
            self.check_cut(base_model_id, [len(text)], param=param)
        else:
            self.check_length(base_model_id, len(text), param=param)
        with _encoding(param):
            return text_ids(tok, text)


def _load_tokenizer(base_dir: Path):
    """The base's tokenizer as the node loads it (node.engine.llm_engine.load_tokenizer: AutoTokenizer from
    the folder), or False when the folder has none; not imported from there, which would load the engine."""
    if not any((base_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return False
    # transformers encodes even one text as a batch of one, and the tokenizers library runs a batch on its
    # thread pool: each prompt went to a pool thread and back, a wake-up that costs the request up to a
    # millisecond on a busy machine. The gateway encodes one prompt at a time, on the request's own thread;
    # the ids are the same. An operator's own setting is kept.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    from node.adapters.basemodel import quiet_transformers

    quiet_transformers()
    return AutoTokenizer.from_pretrained(str(base_dir))


def _config_sizes(cfg: dict) -> tuple[int | None, int | None]:
    """The base's context (max_position_embeddings) and output vocabulary (vocab_size), None where unknown."""
    context, vocab = (cfg.get(k) for k in ("max_position_embeddings", "vocab_size"))
    return tuple(n if type(n) is int and n > 0 else None for n in (context, vocab))
