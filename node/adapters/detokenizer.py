"""Incremental detokenization: emit only complete UTF-8 characters, and hold back any text that
could be the start of a stop string until it is decided. The node makes a sequence's text with it; the
gateway runs it again over the token ids a node streamed, to know the text an honest node sends for them."""

from __future__ import annotations

from functools import lru_cache

# a character's bytes end within four byte tokens: text still undecodable after this many tokens is not a
# character being completed (stray bytes, or a client forcing them) and is emitted as it decodes (U+FFFD); a
# run of tokens without text (special tokens) is let go too. So nothing is held back without bound, nor
# decoded again on every token (a held run of n cost n^2 decodes: 1.4 s for 4,096 tokens)
MAX_HELD_TOKENS = 8


class TextStream:
    """Feeds generated token ids, returns the text that became final with each."""

    def __init__(
        self,
        tokenizer,
        stop: tuple[str, ...] = (),
        *,
        skip_special_tokens: bool = True,
        unshown: frozenset[int] = frozenset(),
    ) -> None:
        """`skip_special_tokens` (vLLM's): special tokens' text left out (the default), or written as any token's but
        for the `unshown` ids' (the end tokens that end a sequence: vLLM shows no text of theirs). The ids are held all
        the same (MAX_HELD_TOKENS counts them): only their text is left out, so the text with skipping is as before."""
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip = skip_special_tokens
        self.unshown = frozenset() if skip_special_tokens else unshown
        # per stop string, the longest end of the text that begins it (Knuth-Morris-Pratt): each character is
        # looked at once per stop string. Trying every prefix against the end at every token cost 18x the
        # decoding itself with four stop strings of 255 repeated characters, on the node and again on the gateway
        self._matched = [0] * len(stop)
        self._fail = [_failure(s) for s in stop]
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] decode to text already consumed
        self._read = 0
        self.pending = ""  # decoded, not yet emitted (a possible stop-string prefix)
        self.stopped: str | None = None  # the stop string that ended the text (vLLM's stop_reason)
        self._emitted: list[str] = []  # a list, joined when read: `text +=` copied the whole text at every token

    @property
    def text(self) -> str:
        """Everything emitted."""
        return "".join(self._emitted)

    def _decode(self, ids: list[int]) -> str:
        return shown_text(self.tokenizer, ids, skip_special_tokens=self.skip, unshown=self.unshown)

    def _decode_new(self) -> str:
        if self.tokenizer is None:
            return ""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        # an incomplete multi-byte character decodes to U+FFFD: wait for its remaining bytes
        complete = len(after) > len(before) and not after.endswith("\ufffd")
        if complete or len(self.ids) - self._read >= MAX_HELD_TOKENS:
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token; return (text now final, whether a stop string was hit)."""
        self.ids.append(token_id)
        new = self._decode_new()
        start = len(self.pending)
        self.pending += new
        # the first stop string, in the order given, that the text now holds (its first place): what the text
        # before it is; the text held before this token holds none, else the sequence would have ended there
        for k, s in enumerate(self.stop):
            end = self._advance(k, s, new)
            if end is not None:
                out, self.pending, self.stopped = self.pending[: start + end - len(s)], "", s
                self._emitted.append(out)
                return out, True
        hold = max(self._matched, default=0)  # the longest end of the text that could begin a stop string
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        self._emitted.append(out)
        return out, False

    def flush(self) -> str:
        """At the end: emit held-back text and any trailing undecodable bytes (as U+FFFD)."""
        tail = ""
        if self.tokenizer is not None and self._read < len(self.ids):
            before = self._decode(self.ids[self._prefix : self._read])
            after = self._decode(self.ids[self._prefix :])
            tail = after[len(before) :]
            self._prefix = self._read = len(self.ids)
        out, self.pending = self.pending + tail, ""
        self._emitted.append(out)
        return out

    def _advance(self, k: int, s: str, new: str) -> int | None:
        """Feed the new text to stop string k's match: where in `new` the string first ends (None: nowhere)."""
        if not s:
            return 0
        fail, m = self._fail[k], self._matched[k]
        for i, c in enumerate(new):
            while m and s[m] != c:
                m = fail[m - 1]
            if s[m] == c:
                m += 1
                if m == len(s):
                    return i + 1
        self._matched[k] = m
        return None


def shown_text(
    tokenizer, ids: list[int], *, skip_special_tokens: bool = True, unshown: frozenset[int] = frozenset()
) -> str:
    """The text of `ids` as a node shows it: special tokens' left out, or (`skip_special_tokens` false) written but
    for the `unshown` ids' (TextStream's decoding, and the gateway's of a node's whole sequence)."""
    if unshown and not skip_special_tokens:
        ids = [i for i in ids if i not in unshown]
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@lru_cache(maxsize=1024)
def _failure(s: str) -> tuple[int, ...]:
    """Knuth-Morris-Pratt's table: for each prefix of s, the length of its longest proper end that begins s."""
    fail, m = [0] * len(s), 0
    for i in range(1, len(s)):
        while m and s[i] != s[m]:
            m = fail[m - 1]
        if s[i] == s[m]:
            m += 1
        fail[i] = m
    return tuple(fail)
