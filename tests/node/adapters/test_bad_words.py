"""vLLM's bad_words as token id sequences (node/adapters/prompts.py:bad_word_ids), with the tiny base's byte-level
tokenizer and a tokenizer that writes a word after a space as a token of its own."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from node.adapters.prompts import bad_word_ids


class SpacedWords:
    """A tokenizer that writes "cat" as [10, 11] and " cat" as [20, 11] (a word token of its own, as GPT-2's
    "Ġcat" is), and " dog" as one token more than "dog"."""

    table = {"cat": [10, 11], " cat": [20, 11], "dog": [12], " dog": [30, 12]}

    def __call__(self, text, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": self.table[text]}


def test_a_word_is_banned_where_an_answer_begins_and_after_a_space_where_that_is_other_tokens():
    tok = SpacedWords()
    # leading spaces are not part of the word; " dog" is "dog" after a space token: one sequence covers it
    assert bad_word_ids(tok, ["cat", "  dog"]) == [[10, 11], [20, 11], [12]]


def test_the_tiny_bases_tokenizer(tiny_base):
    tok = AutoTokenizer.from_pretrained(tiny_base)
    got = bad_word_ids(tok, ["xyz"])
    assert got[0] == tok("xyz", add_special_tokens=False)["input_ids"]
    assert all(tok.decode(w).strip() == "xyz" for w in got) and 1 <= len(got) <= 2


def test_a_word_of_no_tokens_is_refused():
    class Dropping(SpacedWords):  # a normalizer that drops the whole word
        table = {"\u200b": [], " \u200b": [5]}

    with pytest.raises(ValueError, match="is no tokens"):
        bad_word_ids(Dropping(), ["\u200b"])
