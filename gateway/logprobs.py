"""Log-probabilities in OpenAI's shapes, from the node's token events: the node sends token ids and numbers, the
gateway names the tokens with its own tokenizer (the base's, which ChatTemplates holds).

- completions: `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`; each position's
  top_logprobs dict holds the `logprobs` most likely tokens and the sampled one, as OpenAI's does.
- chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`.
- vLLM's prompt_logprobs: one entry per prompt position, the first null, each else `{token id: {"logprob", "rank",
  "decoded_token"}}` for the prompt's token and the most likely ones.

What a node sends is untrusted: a value that is not what the protocol says is read as missing, never a crash,
and no number the gateway writes is NaN or infinite (JSON has none)."""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass

from common.wire import MAX_LOGPROBS, TOKEN_ID_LIMIT  # MAX_LOGPROBS: the most alternatives a node may send per position

# what OpenAI writes for a log-probability too small to state (the node sent none, or not a finite number)
FLOOR = -9999.0
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # sentencepiece's byte fallback tokens


@dataclass(frozen=True, slots=True)
class Scored:
    """One position: the token, its log-probability (None: not scored, as a prompt's first token), the most
    likely alternatives as (token id, log-probability), descending, and (a prompt's position) the token's rank in
    the vocabulary, where the node said it."""

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None

    def most_likely(self, k: int) -> Scored:
        """The position with its k most likely alternatives at most (a node may send more than it was asked)."""
        return self if len(self.top) <= k else Scored(self.token_id, self.logprob, self.top[:k], self.rank)


def _number(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    if isinstance(v, int) and abs(v) > 2**1023:  # float() raises OverflowError: a node's 10**400 made a 500
        return FLOOR
    v = float(v)
    return v if math.isfinite(v) else FLOOR


def _id(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < TOKEN_ID_LIMIT else None


def read_top(raw: object) -> tuple[tuple[int, float], ...]:
    """A node's `top_logprobs` ([[id, logprob], ...]); what does not read is dropped."""
    if not isinstance(raw, list):
        return ()
    out = []
    for pair in raw[:MAX_LOGPROBS]:
        if isinstance(pair, list) and len(pair) == 2:
            tid, lp = _id(pair[0]), _number(pair[1])
            if tid is not None and lp is not None:
                out.append((tid, lp))
    return tuple(out)


def read_token(ev: dict) -> Scored | None:
    """A token event's position (None: the event carries no token id)."""
    tid = _id(ev.get("token_id"))
    if tid is None:
        return None
    return Scored(tid, _number(ev.get("logprob")), read_top(ev.get("top_logprobs")))


def read_prompt(ids: list[int], entries: object) -> list[Scored] | None:
    """A prompt_logprobs event's entries for a prompt of `ids` (the first entry is null: nothing precedes it);
    None when they do not describe this prompt."""
    if not isinstance(entries, list) or len(entries) != len(ids):
        return None
    out = [Scored(ids[0], None)]
    for tid, e in zip(ids[1:], entries[1:], strict=True):
        if not isinstance(e, dict):
            return None
        rank = _id(e.get("rank"))
        out.append(Scored(tid, _number(e.get("logprob")), read_top(e.get("top_logprobs")), rank or None))
    return out


def prompt_entry(texts: TokenTexts, s: Scored) -> dict | None:
    """One prompt position in vLLM's prompt_logprobs shape: {token id: {"logprob", "rank", "decoded_token"}} for
    the prompt's token, then its most likely alternatives (ranked in the order the node listed them); None for a
    position not scored (the first)."""
    if s.logprob is None:
        return None
    out = {str(s.token_id): {"logprob": s.logprob, "rank": s.rank, "decoded_token": texts.text(s.token_id)}}
    for r, (tid, lp) in enumerate(s.top, 1):
        if tid == s.token_id and s.rank is None:  # the node said no rank; its place among the top says it
            out[str(tid)]["rank"] = r
        out.setdefault(str(tid), {"logprob": lp, "rank": r, "decoded_token": texts.text(tid)})
    return out


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character that stands for each byte -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_UNBYTE = _bytes_to_unicode()


def _decoder_kind(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None) if backend is not None else None
    return type(decoder).__name__ if decoder is not None else ""


class TokenTexts:
    """A tokenizer's tokens as strings and bytes, one token at a time (cached): a byte-level BPE token's bytes
    are its characters mapped back through GPT-2's alphabet, a sentencepiece byte token (<0xNN>) is that byte,
    anything else is what decoding the one token gives. A special token is its own text ("</s>")."""

    def __init__(self, tok) -> None:
        self.tok = tok
        vocab = tok.get_vocab()
        # the ids the tokenizer knows: its vocabulary and added tokens (an added id may lie past len(tok))
        self.size = max(len(tok), max(vocab.values(), default=-1) + 1)
        # the most characters one token can stand for: its longest vocabulary entry
        self.longest = max(map(len, vocab), default=1) or 1
        self.special = frozenset(getattr(tok, "all_special_ids", ()) or ())
        self.byte_level = _decoder_kind(tok) == "ByteLevel"
        self._cache: dict[int, tuple[str, bytes]] = {}
        self._lock = threading.Lock()

    def _make(self, token_id: int) -> tuple[str, bytes]:
        piece = self.tok.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):  # an id outside the vocabulary
            return "", b""
        if token_id in self.special:
            return piece, piece.encode("utf-8")
        if self.byte_level and all(c in _UNBYTE for c in piece):
            raw = bytes(_UNBYTE[c] for c in piece)
            return raw.decode("utf-8", "replace"), raw
        if m := _BYTE_PIECE.fullmatch(piece):
            raw = bytes([int(m.group(1), 16)])
            return raw.decode("utf-8", "replace"), raw
        text = self.tok.decode([token_id])
        return text, text.encode("utf-8")

    def get(self, token_id: int) -> tuple[str, bytes]:
        """A token's (string, bytes); an id outside the vocabulary (a node may send any) is ("", b""), not
        cached: the cache holds at most the vocabulary."""
        got = self._cache.get(token_id)
        if got is None:
            if not 0 <= token_id < self.size:
                return "", b""
            with self._lock:
                got = self._cache[token_id] = self._make(token_id)
        return got

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]


def token_id_name(token_id: int) -> str:
    """A token named by its id, as vLLM's return_tokens_as_token_ids names it: what a text cannot say (the bytes of
    half a character, two tokens of one text) the id does."""
    return f"token_id:{token_id}"


class CompletionLogprobs:
    """One completion choice's logprobs object, built position by position; `offset` is where the next token
    starts in the choice's text (text_offset); `named`: tokens named by their ids (token_id_name)."""

    def __init__(self, texts: TokenTexts, offset: int = 0, *, named: bool = False) -> None:
        self.texts, self.offset, self.named = texts, offset, named
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict | None] = []
        self.text_offset: list[int] = []

    def add(self, s: Scored, width: int | None = None) -> dict:
        """Add a position (`width`: the characters it adds to the text; default its token's); the position alone,
        as a streamed chunk's logprobs object."""
        name = token_id_name if self.named else self.texts.text
        text = self.texts.text(s.token_id)
        token = name(s.token_id)
        if s.logprob is None:
            top = None
        else:  # the sampled token is listed beside the most likely ones, as OpenAI lists it
            top = {name(i): lp for i, lp in s.top}
            top.setdefault(token, s.logprob)
        one = {"tokens": [token], "token_logprobs": [s.logprob], "top_logprobs": [top], "text_offset": [self.offset]}
        self.tokens.append(token)
        self.token_logprobs.append(s.logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(self.offset)
        self.offset += len(text) if width is None else width
        return one

    def obj(self) -> dict:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


def chat_entry(texts: TokenTexts, s: Scored, *, named: bool = False) -> dict:
    """One chat position: the token (`named`: by its id, token_id_name), its log-probability and bytes, and the most
    likely alternatives."""

    def one(tid: int, lp: float | None) -> dict:
        token, raw = texts.get(tid)
        return {
            "token": token_id_name(tid) if named else token,
            "logprob": FLOOR if lp is None else lp,
            "bytes": list(raw),
        }

    return one(s.token_id, s.logprob) | {"top_logprobs": [one(i, lp) for i, lp in s.top]}
