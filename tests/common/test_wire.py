"""common.wire.parse_json: the one parser of untrusted JSON refuses, in one line, what used to crash
a process or pass through as a value no canonical form can hold."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.wire import UntrustedJSONError, is_id, nested_deeper, parse_json


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


def test_containers_are_counted_outside_strings_where_a_caller_bounds_them():
    """Heartbeats anyone may send: 90 kB of `[{},{},...]` or `[[],[],...]` cost a gateway's process 12 ms or a
    garbage collection of its heap (175 ms) to parse; counted first, in one pass of C."""
    ok = json.dumps({"a": [{"b": "[[[{{{"}] * 3})
    assert parse_json(ok, max_bytes=1 << 10, max_containers=5)["a"][0]["b"] == "[[[{{{"
    for body in ("[" + "{}," * 5 + "{}]", "[" + "[]," * 5 + "[]]"):
        with pytest.raises(UntrustedJSONError, match="hb holds 7 objects and arrays, more than 6"):
            parse_json(body, max_bytes=1 << 10, max_containers=6, what="hb")
    assert len(parse_json("[" + "[]," * 5 + "[]]", max_bytes=1 << 10)) == 6  # no bound unless asked
    # and values: one object of many keys, an array of many numbers (re-attack)
    for body in ("{" + ",".join(f'"{i}":0' for i in range(4)) + "}", "[" + ",".join("1.5" for _ in range(8)) + "]"):
        with pytest.raises(UntrustedJSONError, match="hb holds [0-9]+ values, more than 6"):
            parse_json(body, max_bytes=1 << 10, max_separators=6, what="hb")
    assert parse_json('{"a": ",:,:,:,:", "b": [1, 2]}', max_bytes=1 << 10, max_separators=4)["b"] == [1, 2]


def test_brackets_inside_strings_do_not_count_as_nesting():
    deep_text = '{"prompt": "' + "[" * 10_000 + '\\"' + "{" * 10_000 + '"}'
    assert not nested_deeper(deep_text, 1) and nested_deeper(deep_text, 0)
    assert parse_json(deep_text, max_bytes=1 << 20)["prompt"].startswith("[[[")
    assert parse_json("[" * 64 + "]" * 64, max_bytes=1000) is not None


def test_a_string_never_closed_is_blanked_through_to_the_end_in_one_match():
    """The pattern that blanks strings needed a closing quote: on 120 kB of \\" without one it scanned to the end
    from every quote, 52 s of CPU for one body (review). Now one match takes it to the end, where the decoder
    fails."""
    from common.wire import _STRINGS

    text = '[1, "' + '\\"' * 1000
    assert [m.span() for m in _STRINGS.finditer(text)] == [(4, len(text))]
    assert _STRINGS.sub('""', '["a", "b\\') == '["", ""'  # a lone backslash at the very end too
    with pytest.raises(UntrustedJSONError, match="Unterminated string"):
        parse_json(text, max_bytes=1 << 20)


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


# ---- the parser's checks in C against the same checks made value by value --------------------------------------
# `_reference` is the parser as it was before its checks moved into C (a Python call per number, per object and per
# value): slow, and plainly right. The fast one must take and refuse exactly the same texts, with the same values.

_REF_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def _reference(text: str, max_depth: int, max_int_digits: int | None) -> object:
    depth = deepest = 0
    for ch in _REF_STRINGS.sub('""', text):
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    if deepest > max_depth:
        raise UntrustedJSONError("deep")

    def bounded_int(t: str) -> int:
        if max_int_digits is not None and len(t) - t.startswith("-") > max_int_digits:
            raise UntrustedJSONError("long")
        return int(t)

    def finite(t: str) -> float:
        if math.isinf(float(t)):
            raise UntrustedJSONError("inf")
        return float(t)

    def unique(pairs):
        if len(dict(pairs)) != len(pairs):
            raise UntrustedJSONError("dup")
        return dict(pairs)

    def no_constant(name):
        raise UntrustedJSONError("constant")

    try:
        obj = json.loads(
            text, parse_int=bounded_int, parse_float=finite, parse_constant=no_constant, object_pairs_hook=unique
        )
    except ValueError as e:  # JSONDecodeError and Python's own bound on int() are ValueErrors
        raise UntrustedJSONError(str(e)) from None
    stack = [obj]
    while stack:
        o = stack.pop()
        for s in [o] if isinstance(o, str) else list(o) if isinstance(o, dict) else []:
            s.encode("utf-8")  # a lone surrogate: UnicodeEncodeError
        stack.extend(o.values() if isinstance(o, dict) else o if isinstance(o, list) else [])
    return obj


def _outcome(parse, text: str) -> tuple:
    try:
        return ("taken", json.dumps(parse(text), ensure_ascii=False, allow_nan=True))
    except (UntrustedJSONError, UnicodeEncodeError):
        return ("refused",)


_digits = st.text("0123456789", min_size=1, max_size=100)
_number = st.one_of(
    st.integers(-(10**85), 10**85).map(str),
    st.builds(
        lambda sign, whole, frac, exp: sign + whole.lstrip("0").rjust(1, "0") + frac + exp,
        st.sampled_from(["", "-"]),
        _digits,
        st.one_of(st.just(""), _digits.map(lambda d: "." + d)),
        st.one_of(
            st.just(""),
            st.builds(lambda e, s, d: e + s + d, st.sampled_from("eE"), st.sampled_from(["", "+", "-"]), _digits),
        ),
    ),
)
_string_parts = st.sampled_from(
    ["a", " ", "[", "]", "{", "}", ",", ":", "1e400", "9" * 90, "\\\\", '\\"', "\\n", "\\u0041", "\\ud800", "\\udc00"]
    + ["\\ud83d\\ude00", "\\\\ud800", "é", "😀", "\ud800"]  # the last a lone surrogate in a str given as it is
)
_string = st.lists(_string_parts, max_size=6).map(lambda parts: '"' + "".join(parts) + '"')
_scalar = st.one_of(_number, _string, st.sampled_from(["true", "false", "null", "NaN", "-Infinity"]))
_space = st.sampled_from(["", " ", "\n"])


def _containers(children):
    arrays = st.lists(children, max_size=5).map(lambda xs: "[" + ",".join(xs) + "]")
    keys = st.sampled_from(['"a"', '"b"', '"\\u0061"', '"[{"', '"\\ud800"'])  # few: duplicates come up often
    pairs = st.lists(st.tuples(keys, _space, children), max_size=4)
    objects = pairs.map(lambda ps: "{" + ",".join(k + s + ":" + v for k, s, v in ps) + "}")
    return st.one_of(arrays, objects)


_json_text = st.recursive(_scalar, _containers, max_leaves=20)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=_json_text,
    cut=st.one_of(st.none(), st.integers(0, 200)),
    extra=st.sampled_from(["", "]", "}", "[", ",1"]),
    max_depth=st.sampled_from([1, 2, 3, 64]),
    max_int_digits=st.sampled_from([80, 3, None]),
)
def test_the_checks_in_c_take_and_refuse_what_the_value_by_value_checks_do(text, cut, extra, max_depth, max_int_digits):
    text = (text if cut is None else text[:cut]) + extra
    fast = _outcome(
        lambda t: parse_json(t, max_bytes=1 << 20, max_depth=max_depth, max_int_digits=max_int_digits), text
    )
    assert fast == _outcome(lambda t: _reference(t, max_depth, max_int_digits), text), text


@pytest.mark.parametrize(
    "text",
    [
        '{"a": [[1, 2], {"b": "]]]}}}"}], "c": "[[[["}',
        "[" * 64 + "]" * 64,
        "[" * 65 + "]" * 65,
        "[" * 64,
        "]" + "[" * 200,
        "[1e308, 1.7976931348623157e308, 1.8e308, 1e-400, " + "9" * 80 + ".5e99, " + "9" * 81 + ".5]",
        '["\\ud83d\\ude00", "\\\\ud800", "\\ud800"]',
        '{"a": 1, "\\u0061": 2}',
        '["\ud800"]',  # a str holding a lone surrogate as it is, not as an escape
    ],
)
def test_edges_taken_and_refused_alike(text):
    assert _outcome(lambda t: parse_json(t, max_bytes=1 << 20), text) == _outcome(lambda t: _reference(t, 64, 80), text)
