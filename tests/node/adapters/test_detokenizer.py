"""Incremental text: whole UTF-8 characters only, stop strings held back and cut."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from node.adapters.detokenizer import TextStream


@pytest.fixture(scope="module")
def tok(tiny_base):
    return AutoTokenizer.from_pretrained(str(tiny_base))


def _feed(stream, ids):
    pieces, stopped = [], False
    for t in ids:
        text, stopped = stream.push(t)
        pieces.append(text)
        if stopped:
            break
    return pieces, stopped


def test_multibyte_characters_are_emitted_whole(tok):
    text = "héllo 世界 🙂 ok"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # byte-level: several tokens per character
    stream = TextStream(tok)
    pieces, _ = _feed(stream, ids)
    pieces.append(stream.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert any(p == "" for p in pieces)  # some tokens completed no character


def test_stop_string_is_held_back_then_cut(tok):
    ids = tok.encode("the answer is 42. END more", add_special_tokens=False)
    stream = TextStream(tok, stop=("END",))
    pieces, stopped = _feed(stream, ids)
    assert stopped and "".join(pieces) == "the answer is 42. " and stream.text == "the answer is 42. "
    assert not any("E" in p for p in pieces)


def test_held_back_prefix_is_released_when_it_is_not_a_stop(tok):
    ids = tok.encode("a EN b", add_special_tokens=False)
    stream = TextStream(tok, stop=("END",))
    pieces, stopped = _feed(stream, ids)
    pieces.append(stream.flush())
    assert not stopped and "".join(pieces) == "a EN b"


def test_a_run_of_stray_bytes_is_held_back_a_few_tokens_at_most(tok):
    # byte 0xFF begins no character: a run of it never completes. It is sent as U+FFFD once MAX_HELD_TOKENS
    # are held, not held for good (nor decoded again on every token: a run of n cost n^2)
    from node.adapters.detokenizer import MAX_HELD_TOKENS

    stray = next(i for i in range(len(tok)) if tok.decode([i]) == "\ufffd")
    stream = TextStream(tok)
    pieces = [stream.push(stray)[0] for _ in range(3 * MAX_HELD_TOKENS)]
    assert pieces[: MAX_HELD_TOKENS - 1] == [""] * (MAX_HELD_TOKENS - 1)
    assert "".join(pieces) == "\ufffd" * len("".join(pieces)) and len("".join(pieces)) >= 2 * MAX_HELD_TOKENS
    # a run of special tokens (no text) is let go the same way: the next text arrives as before
    stream = TextStream(tok)
    ids = [tok.pad_token_id] * (3 * MAX_HELD_TOKENS) + tok.encode("ok", add_special_tokens=False)
    assert "".join(stream.push(i)[0] for i in ids) == "ok" and stream._read >= 3 * MAX_HELD_TOKENS
    # a character split over bytes is still held until it completes, and arrives whole
    stream = TextStream(tok)
    ids = tok.encode("中", add_special_tokens=False)
    assert [stream.push(i)[0] for i in ids] == [""] * (len(ids) - 1) + ["中"]


def _naive_stops(chunks: list[str], stops: tuple[str, ...]) -> tuple[list[str], bool]:
    """The specification, the slow way: after each chunk, the first stop string in the order given that the
    held text holds ends it there; else all but the longest end that begins a stop string is let go."""
    pending, out = "", []
    for chunk in chunks:
        pending += chunk
        for s in stops:
            if (i := pending.find(s)) >= 0:
                out.append(pending[:i])
                return out, True
        hold = max((n for s in stops for n in range(len(s)) if n <= len(pending) and s[:n] == pending[-n:]), default=0)
        out.append(pending[: len(pending) - hold])
        pending = pending[len(pending) - hold :]
    return out, False


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.text(alphabet="aab \n", max_size=40),
    stops=st.lists(st.text(alphabet="aab", max_size=7) | st.sampled_from(["", " ", "\n"]), max_size=4).map(tuple),
)
def test_stop_strings_are_found_as_the_slow_way_finds_them(tok, text, stops):
    """Each token's text, with stop strings of repeated and overlapping characters: what the stream lets go
    and where it stops, against the slow way over the same decoded pieces."""
    ids = tok.encode(text, add_special_tokens=False)
    plain = TextStream(tok)  # no stop strings: each token's new text
    chunks = [plain.push(t)[0] for t in ids]
    assert _feed(TextStream(tok, stop=stops), ids) == _naive_stops(chunks, stops)
