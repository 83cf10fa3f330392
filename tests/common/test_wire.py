"""common.wire.parse_json: the one parser of untrusted JSON refuses, in one line, what used to crash
a process or pass through as a value no canonical form can hold."""

from __future__ import annotations

import subprocess
import sys

import pytest

from common.wire import UntrustedJSONError, is_id, json_depth, parse_json


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[" * 200_000, "nested deeper than 64"),
        ('{"a": 1, "a": 2}', "duplicate key 'a'"),
        ("[NaN]", "NaN is not a JSON value"),
        ("[-Infinity]", "-Infinity is not a JSON value"),
        ("[1e400]", "out of range"),
        ("[" + "9" * 5000 + "]", "an integer of 5000 digits is out of range (at most 80)"),
        ("[-" + "9" * 81 + "]", "81 digits"),
        ('["\\ud800"]', "lone UTF-16 surrogate"),
        ('{"\\udfff": 1}', "lone UTF-16 surrogate"),
        ("[1,", "not valid JSON"),
    ],
)
def test_refused_in_one_line(text, needle):
    with pytest.raises(UntrustedJSONError) as e:
        parse_json(text, max_bytes=1 << 20)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_integers_up_to_a_uint256_pass_and_a_caller_may_take_pythons_own_bound():
    assert parse_json(f"[{2**256 - 1}, -{10**79}]", max_bytes=1000) == [2**256 - 1, -(10**79)]
    assert parse_json("[" + "9" * 1000 + "]", max_bytes=2000, max_int_digits=None) == [int("9" * 1000)]
    with pytest.raises(UntrustedJSONError, match="Exceeds the limit"):
        parse_json("[" + "9" * 5000 + "]", max_bytes=1 << 20, max_int_digits=None)


def test_size_is_checked_before_anything_is_decoded():
    with pytest.raises(UntrustedJSONError, match="more than the limit of 10"):
        parse_json(b"\xff" * 11, max_bytes=10)
    with pytest.raises(UntrustedJSONError, match="not valid UTF-8"):
        parse_json(b"\xff" * 10, max_bytes=10)


def test_brackets_inside_strings_do_not_count_as_nesting():
    deep_text = '{"prompt": "' + "[" * 10_000 + '\\"' + "{" * 10_000 + '"}'
    assert json_depth(deep_text) == 1
    assert parse_json(deep_text, max_bytes=1 << 20)["prompt"].startswith("[[[")
    assert parse_json("[" * 64 + "]" * 64, max_bytes=1000) is not None


def test_nested_brackets_after_the_ethereum_libraries_raised_the_recursion_limit_do_not_kill_the_process():
    # py_ecc sets sys.setrecursionlimit(100000) at import; the C decoder then overflows the C stack (SIGSEGV)
    # on deep nesting. The parser must refuse first, in a process that has imported them.
    code = (
        "import sys, web3\n"
        "assert sys.getrecursionlimit() >= 100000, sys.getrecursionlimit()\n"
        "from common.wire import parse_json, UntrustedJSONError, restore_recursion_limit\n"
        "try:\n    parse_json('[' * 300000, max_bytes=1 << 20)\n"
        "except UntrustedJSONError as e:\n    print('refused', e)\n"
        "restore_recursion_limit()\nprint('limit', sys.getrecursionlimit())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refused JSON is nested deeper than 64 levels" in out.stdout
    assert "limit 4000" in out.stdout


@pytest.mark.parametrize(
    "value",
    [
        "0x" + "0_" * 31 + "00",
        "0x +" + "0" * 62,
        "0x\n" + "0" * 63,
        "0x" + "\u0661" * 64,
        "0x" + "A" * 64,
        "0x" + "0" * 64 + "\n",
        "0x" + "0" * 63,
        12,
        None,
    ],
)
def test_an_id_has_one_spelling(value):
    assert not is_id(value)
    assert is_id("0x" + "0a" * 32)
