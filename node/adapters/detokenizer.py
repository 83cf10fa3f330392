"""Incremental detokenization: emit only complete UTF-8 characters, and hold back any text that
could be the start of a stop string until it is decided. The node makes a sequence's text with it; the
gateway runs it again over the token ids a node streamed, to know the text an honest node sends for them."""

from __future__ import annotations

# a character's bytes end within four byte tokens: text still undecodable after this many tokens is not a
# character being completed (stray bytes, or a client forcing them) and is emitted as it decodes (U+FFFD); a
# run of tokens without text (special tokens) is let go too. So nothing is held back without bound, nor
# decoded again on every token (a held run of n cost n^2 decodes: 1.4 s for 4,096 tokens)
MAX_HELD_TOKENS = 8


class TextStream:
    """Feeds generated token ids, returns the text that became final with each."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] decode to text already consumed
        self._read = 0
        self.pending = ""  # decoded, not yet emitted (a possible stop-string prefix)
        self._emitted: list[str] = []  # a list, joined when read: `text +=` copied the whole text at every token

    @property
    def text(self) -> str:
        """Everything emitted."""
        return "".join(self._emitted)

    def _decode_new(self) -> str:
        if self.tokenizer is None:
            return ""
        dec = self.tokenizer.decode
        before = dec(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = dec(self.ids[self._prefix :], skip_special_tokens=True)
        # an incomplete multi-byte character decodes to U+FFFD: wait for its remaining bytes
        complete = len(after) > len(before) and not after.endswith("\ufffd")
        if complete or len(self.ids) - self._read >= MAX_HELD_TOKENS:
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token; return (text now final, whether a stop string was hit)."""
        self.ids.append(token_id)
        self.pending += self._decode_new()
        for s in self.stop:
            i = self.pending.find(s)
            if i >= 0:
                out, self.pending = self.pending[:i], ""
                self._emitted.append(out)
                return out, True
        hold = self._held_back()
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        self._emitted.append(out)
        return out, False

    def flush(self) -> str:
        """At the end: emit held-back text and any trailing undecodable bytes (as U+FFFD)."""
        tail = ""
        if self.tokenizer is not None and self._read < len(self.ids):
            before = self.tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
            after = self.tokenizer.decode(self.ids[self._prefix :], skip_special_tokens=True)
            tail = after[len(before) :]
            self._prefix = self._read = len(self.ids)
        out, self.pending = self.pending + tail, ""
        self._emitted.append(out)
        return out

    def _held_back(self) -> int:
        # longest suffix of pending that is a proper prefix of some stop string
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:n]):
                    best = n
                    break
        return best
