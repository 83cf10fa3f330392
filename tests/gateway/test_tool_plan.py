"""gateway/tools.py: checking tools and tool_choice, the grammar for constrained choices, parsing answers whole
and streamed."""

from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import BadRequest
from gateway.tools import COMPACT, ToolPlan, template_messages, tool_plan

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
TOOLS = [WEATHER, TIME]


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        (None, "auto", "tool_choice"),
        ([], "none", "tool_choice"),
        ([{"type": "code_interpreter"}], None, "tools"),
        ([{"type": "function", "function": {"name": "bad name"}}], None, "tools"),
        ([{"type": "function", "function": {"name": "get_time\n"}}], None, "tools"),
        ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], None, "tools"),
        ([TIME, TIME], None, "tools"),
        ([TIME] * 129, None, "tools"),
        ([TIME], "sometimes", "tool_choice"),
        ([TIME], {"type": "function", "function": {"name": "get_weather"}}, "tool_choice"),
    ],
)
def test_bad_tools_are_refused_by_name(tools, choice, param):
    with pytest.raises(BadRequest) as e:
        tool_plan(tools, choice)
    assert e.value.param == param


def test_a_constrained_choices_schema_past_the_nodes_bound_is_refused_here():
    """Tools within their own bounds whose constrained schema is past MAX_SCHEMA_BYTES (16 tools of 7 kB under
    "required", one of 96 kB named) are refused by the gateway, not after a node was asked (audit)."""

    def tool(name: str, description_chars: int) -> dict:
        props = {f"p{i}": {"type": "string", "description": "x" * description_chars} for i in range(32)}
        return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": props}}}

    many = [tool(f"t{i}", 200) for i in range(16)]
    huge = tool("huge", 3000)
    assert tool_plan(many, "auto") is not None and tool_plan(many[:1], "required") is not None
    for tools, choice in ((many, "required"), ([huge], {"type": "function", "function": {"name": "huge"}})):
        with pytest.raises(BadRequest, match="schema") as e:
            tool_plan(tools, choice)
        assert e.value.param == "tools"


def test_no_tools_no_plan():
    assert tool_plan(None, None) is None
    assert tool_plan([], None) is None


def test_choices_and_what_the_template_sees():
    assert tool_plan([WEATHER], None).choice == "auto"
    assert tool_plan([WEATHER], "none").template_tools is None
    named = tool_plan([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}})
    assert named.choice == "function"
    assert [t["function"]["name"] for t in named.template_tools] == ["get_time"]
    assert len(tool_plan([WEATHER, TIME], "required").template_tools) == 2


def _plan(choice="auto") -> ToolPlan:
    return tool_plan([WEATHER, TIME], choice)


def test_required_grammar_accepts_exactly_valid_calls():
    schema = _plan("required").guided()["schema"]
    jsonschema.validate([{"name": "get_weather", "arguments": {"city": "Paris"}}], schema)
    jsonschema.validate([{"name": "get_time", "arguments": {}}], schema)
    too_many = [{"name": "get_time", "arguments": {}}] * 9
    for bad in ([], [{"name": "nope", "arguments": {}}], [{"name": "get_weather", "arguments": {}}], too_many):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_named_grammar_is_the_functions_parameters():
    plan = _plan({"type": "function", "function": {"name": "get_weather"}})
    assert plan.guided() == {"type": "json_schema", "schema": WEATHER["function"]["parameters"] | COMPACT}
    assert _plan("auto").guided() is None and _plan("none").guided() is None


def test_parse_constrained_answers():
    content, calls = _plan("required").answer('[{"name": "get_weather", "arguments": {"city": "Oslo"}}]')
    assert content is None
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    named = _plan({"type": "function", "function": {"name": "get_weather"}})
    _, calls = named.answer('{"city": "Rome"}')
    assert calls[0]["function"]["name"] == "get_weather"
    # cut short by max_tokens: the call with its arguments as written, as it streamed (and as vLLM answers)
    content, calls = named.answer('{"city": "Ro')
    assert content is None and calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Ro'}
    # a "required" answer cut short: the calls it finished, and the rest (billed) as content
    content, calls = _plan("required").answer('[{"name":"get_time","arguments":{}},{"name":"get_w')
    assert [c["function"] for c in calls] == [{"name": "get_time", "arguments": "{}"}]
    assert content == '{"name":"get_w'


def test_parse_auto_answers():
    plan = _plan("auto")
    assert plan.answer("Just text.") == ("Just text.", [])
    text = 'Let me check.<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    content, calls = plan.answer(text)
    assert content == "Let me check." and [c["function"]["name"] for c in calls] == ["get_time"]
    # arguments as a JSON string, as OpenAI writes them, are read too
    _, calls = plan.answer('<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"X\\"}"}</tool_call>')
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "X"}
    # an unknown tool or broken JSON stays text
    for text in ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', "<tool_call>{not json</tool_call>"):
        assert plan.answer(text) == (text, [])


def _stream(plan: ToolPlan, pieces: list[str]) -> tuple[str, list[dict], bool]:
    s = plan.stream()
    deltas = [d for p in pieces for d in s.push(p)] + s.close()
    text = "".join(d.get("content", "") for d in deltas)
    calls = [c for d in deltas for c in d.get("tool_calls", ())]
    return text, calls, s.called


def test_stream_auto_holds_back_only_what_may_be_a_call():
    text = 'Sure. <tool_call>{"name": "get_time", "arguments": {}}</tool_call> done'
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)]  # split inside the tags
    content, calls, called = _stream(_plan("auto"), pieces)
    assert content == "Sure. done" and called  # one space where the call was taken out (it was two; review)
    assert [c["index"] for c in calls] == [0] and calls[0]["function"]["name"] == "get_time"
    # plain text streams through at once, except a possible tag start at the end
    # (and trailing whitespace, which waits for the text after it: beside a call it is no content)
    s = _plan("auto").stream()
    assert s.push("hello <tool") == [{"content": "hello"}]
    assert s.push("box>") == [{"content": " <toolbox>"}]
    assert s.close() == []


CALL = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
TAGGED = '<tool_call>{"name": "get_weather", "arguments": {"city": "a</tool_call>b \\"</tool_call>"}}</tool_call>'


@pytest.mark.parametrize(
    "text",
    [
        f"{CALL}\n{CALL}",  # the newline a template writes between calls
        f"\n{CALL}\n",
        f"Let me look.\n\n{CALL}\n{CALL}\n",
        f"{CALL} then {CALL}  ",
        "no calls here \n",
        f"{TAGGED}\n{CALL}",
    ],
)
def test_a_streamed_answer_has_the_content_and_calls_of_the_whole_one(text):
    """Whitespace between and beside calls used to stream as content ("\n" between two calls made a content
    delta, a second assistant turn for a Responses client) while the whole answer's content was stripped."""
    plan = _plan("auto")
    whole, whole_calls = plan.answer(text)
    for size in (1, 3, len(text)):
        content, calls, _ = _stream(plan, [text[i : i + size] for i in range(0, len(text), size)])
        assert (content or None) == whole
        assert [c["function"] for c in calls] == [c["function"] for c in whole_calls]


def test_a_call_whose_string_arguments_hold_the_closing_tag_is_a_call():
    """The first `</tool_call>` inside a call's string argument used to end the block: the call was read as
    text. A tag inside a JSON string ends nothing when the block up to it is no call."""
    plan = _plan("auto")
    content, calls = plan.answer(f"Look: {TAGGED}")
    assert content == "Look:" and len(calls) == 1
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": 'a</tool_call>b "</tool_call>'}
    # as before: a block that is no call ends at its first tag, and the text after it is read on
    junk = '<tool_call>"unclosed</tool_call>'
    content, calls = plan.answer(f"{junk} {CALL}")
    assert content == junk and [c["function"]["name"] for c in calls] == ["get_time"]
    streamed, got, _ = _stream(plan, list(f"{junk} {CALL}"))
    assert streamed == junk and [c["function"]["name"] for c in got] == ["get_time"]
    # a tag inside a string with no call around it stays text, whole or streamed
    text = '<tool_call>{"name": "nope", "arguments": {"x": "</tool_call>"}}</tool_call>'
    assert plan.answer(text) == (text, [])
    assert _stream(plan, list(text))[:2] == (text, [])


def test_stream_unterminated_call_is_flushed_as_text():
    content, calls, called = _stream(_plan("auto"), ["a <tool_call>{", '"name"'])
    assert content == 'a <tool_call>{"name"' and calls == [] and not called


def test_stream_required_sends_calls_at_the_end():
    pieces = ['[{"name": "get_time", ', '"arguments": {}}, {"name": "get_weather", "arguments": {"city": "A"}}]']
    content, calls, called = _stream(_plan("required"), pieces)
    assert content == "" and called and [c["index"] for c in calls] == [0, 1]


COMPACT_CALLS = '[{"name":"get_weather","arguments":{"city":"x}\\"{[","unit":"c"}},{"name":"get_time","arguments":{}}]'


def test_a_required_answer_streams_each_call_as_it_comes():
    # compact, keys in the grammar's order: each call's name once it is whole, then its arguments' text as it
    # comes (braces and quotes inside strings are text), the same text the whole answer carries
    s = _plan("required").stream()
    deltas = [d for ch in COMPACT_CALLS for d in s.push(ch)]
    assert s.close() == [] and s.called
    calls = [c for d in deltas for c in d["tool_calls"]]
    heads = [c for c in calls if "id" in c]
    assert [(c["index"], c["function"]["name"], c["function"]["arguments"]) for c in heads] == [
        (0, "get_weather", ""),
        (1, "get_time", ""),
    ]
    streamed = ["".join(c["function"]["arguments"] for c in calls if c["index"] == i) for i in (0, 1)]
    whole = [c["function"]["arguments"] for c in _plan("required").answer(COMPACT_CALLS)[1]]
    assert streamed == whole == ['{"city":"x}\\"{[","unit":"c"}', "{}"]
    assert len(calls) > 10  # the weather call's arguments came in pieces, not whole at the end


def test_a_required_answer_the_reader_cannot_follow_is_sent_at_the_end():
    # keys in another order after a first call: that call streamed, the rest parsed whole at the end
    text = '[{"name":"get_time","arguments":{}},{"arguments":{"city":"A"},"name":"get_weather"}]'
    s = _plan("required").stream()
    early = [c for p in (text[:40], text[40:]) for d in s.push(p) for c in d["tool_calls"]]
    late = [c for d in s.close() for c in d["tool_calls"]]
    assert [c["function"]["name"] for c in early if "id" in c] == ["get_time"]
    assert [(c["index"], c["function"]["name"]) for c in late] == [(1, "get_weather")]
    # cut short inside a call's arguments: what went out stays the answer; nothing is re-sent as text
    cut = _plan("required").stream()
    assert cut.push('[{"name":"get_weather","arguments":{"ci') and cut.close() == [] and cut.release() == []


def test_template_messages():
    msgs = [
        {"role": "developer", "content": "be brief"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}],
        },
        {"role": "tool", "tool_call_id": "c", "content": "2"},
    ]
    out = template_messages(msgs)
    assert out[0]["role"] == "system"
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'  # the request is not changed
    assert out[2] == msgs[2]


def test_one_call_only_when_parallel_calls_are_off():
    plan = tool_plan([WEATHER, TIME], "required", parallel=False)
    assert plan.guided()["schema"]["maxItems"] == 1
    text = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call><tool_call>{"name": "get_time"}</tool_call>'
    auto = tool_plan([WEATHER, TIME], "auto", parallel=False)
    content, calls = auto.answer(text)
    assert len(calls) == 1 and content is None  # the second call left out, not sent as markup (compat audit)
    sent, streamed, _ = _stream(auto, [text])
    assert len(streamed) == 1 and not sent
    cut = text[: len(text) - 12]  # the second call cut short (max_tokens): left out too, whole and streamed
    assert auto.answer(cut)[0] is None and _stream(auto, [cut])[0] == ""
    many = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>' * 10
    assert len(_plan("auto").answer(many)[1]) == 10  # with parallel calls, all a free answer writes


def test_a_deeply_nested_call_is_text_not_a_crash():
    """A model (or a client's own assistant message) can write JSON nested past Python's recursion limit; it is
    refused by the bounded parser and kept as text, never a RecursionError (a 500 for a billed request)."""
    plan = tool_plan(TOOLS, "auto")
    deep = '{"name": "get_weather", "arguments": ' + "[" * 6000 + "]" * 6000 + "}"
    text = f"<tool_call>{deep}</tool_call>"
    assert plan.answer(text) == (text, [])
    assert plan.stream().push(text) == [{"content": text}]
    assert tool_plan(TOOLS, "required").answer("[" * 6000 + "]" * 6000) == ("[" * 6000 + "]" * 6000, [])
    named = tool_plan(TOOLS, {"type": "function", "function": {"name": "get_weather"}})  # its arguments as written
    assert named.answer("[" * 6000 + "]" * 6000)[1][0]["function"]["arguments"] == "[" * 6000 + "]" * 6000
    message = {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": deep}}]}
    assert template_messages([message])[0]["tool_calls"][0]["function"]["arguments"] == deep


def test_many_unclosed_blocks_stay_text_whole_and_streamed():
    """4,096 `<tool_call>` with no close (the shape that made the old lazy regex quadratic): all of it comes back
    as content, whole and streamed token by token."""
    plan = tool_plan(TOOLS, "auto")
    text = "<tool_call>x" * 4096
    assert plan.answer(text) == (text, [])
    stream = plan.stream()
    out = [d for i in range(0, len(text), 5) for d in stream.push(text[i : i + 5])] + stream.close()
    assert "".join(d["content"] for d in out) == text


def test_required_tools_whose_parameters_refer_to_themselves(tiny_base):
    """Parameters as pydantic writes them ($defs and "#/$defs/..." references) nested under the required calls'
    array: each tool's references are moved with it, so the node's grammar compiles them (it refused them:
    "Pointer '/$defs/Unit' does not exist") and holds calls to them; data that merely looks like a reference
    ("const", "enum", "default") is left as written."""
    from transformers import AutoTokenizer

    from node.engine.grammar import Grammars, GuidedSpec

    unit = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "$defs": {"Unit": {"enum": ["c", "f"]}},
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 6},
                    "unit": {"$ref": "#/$defs/Unit"},
                    "again": {"$ref": "#/properties/city"},
                    "note": {"const": {"$ref": "#/not/a/schema"}},
                    # properties named like keywords: names, their schemas rooted all the same (review)
                    "default": {"$ref": "#/$defs/Unit"},
                    "enum": {"$ref": "#/$defs/Unit"},
                },
                "required": ["city", "unit"],
            },
        },
    }
    plan = tool_plan([unit, TIME], "required")
    guided = plan.guided()
    schema = guided["schema"]
    assert schema["$defs"]["tool0"]["properties"]["note"] == {"const": {"$ref": "#/not/a/schema"}}
    for name in ("default", "enum"):
        assert schema["$defs"]["tool0"]["properties"][name] == {"$ref": "#/$defs/tool0/$defs/Unit"}
    assert tool_plan([WEATHER, TIME], "required").guided()["schema"].get("$defs") is None  # no references: as before
    jsonschema.validate([{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c", "again": "Rome"}}], schema)
    for bad in ({"city": "Paris", "unit": "k"}, {"city": "Paris", "unit": "c", "again": "Amsterdam"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate([{"name": "get_weather", "arguments": bad}], schema)

    tok = AutoTokenizer.from_pretrained(tiny_base)
    grammars = Grammars(tok, len(tok))
    m = grammars.matcher(GuidedSpec.from_wire(guided))  # compiles (GrammarError before)
    good = '[{"name":"get_weather","arguments":{"city":"Paris","unit":"f"}}]'
    assert all(m.accept(t) for t in tok.encode(good, add_special_tokens=False)) and m.accepting
    m = grammars.matcher(GuidedSpec.from_wire(guided))
    bad = '[{"name":"get_weather","arguments":{"city":"Paris","unit":"k"'
    assert not all(m.accept(t) for t in tok.encode(bad, add_special_tokens=False))


def test_a_named_calls_arguments_go_on_as_written_even_past_a_doubles_range():
    """The grammar let the model write 2E59048 (valid JSON, past a double's range): the call is the arguments as
    written, as vLLM's is, not the text as content with no call (an instructor client saw "no tool calls")."""
    plan = _plan({"type": "function", "function": {"name": "get_weather"}})
    text = '{"city":"Paris","temp":2E59048}'
    content, calls = plan.answer(text)
    assert content is None and calls[0]["function"] == {"name": "get_weather", "arguments": text}
    assert plan.answer('{"city":"Par')[1][0]["function"]["arguments"] == '{"city":"Par'  # cut short: as streamed


@pytest.mark.parametrize(
    "text, content",
    [
        (f"hi {CALL} there", "hi there"),
        (f"hi\n{CALL}\n\nthere", "hi\nthere"),
        (f"hi{CALL} there", "hi there"),
        (f"hi {CALL}there", "hi there"),
        (f"hi {CALL}\n{CALL}  there", "hi there"),
        (f"hi{CALL}there", "hithere"),
    ],
)
def test_a_call_between_two_texts_leaves_one_run_of_whitespace(text, content):
    """Whitespace on both sides of a call taken out of the text was kept: "hi  there" (review)."""
    plan = _plan("auto")
    assert plan.answer(text)[0] == content
    for size in (1, 2, 5):
        assert _stream(plan, [text[i : i + size] for i in range(0, len(text), size)])[0] == content


_PIECES = [CALL, TAGGED, " ", "\n", "hi", "<tool_call>", "</tool_call>", '"', "\\", "{", "x</tool", "<tool_c"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(_PIECES), max_size=12),
    st.lists(st.integers(1, 40), min_size=1, max_size=8),
    st.booleans(),
)
def test_any_answer_streams_as_it_reads_whole(pieces, sizes, parallel):
    """Whatever the model writes (calls, tags in strings, stray tags, quotes and backslashes, whitespace), cut
    anywhere: the stream's calls are the whole answer's, and so is its content (less whitespace sent before the
    first call, which the stream could not know would come)."""
    plan = tool_plan([WEATHER, TIME], "auto", parallel=parallel)
    text = "".join(pieces)
    whole, whole_calls = plan.answer(text)
    parts, i, k = [], 0, 0
    while i < len(text):
        parts.append(text[i : i + sizes[k % len(sizes)]])
        i, k = i + sizes[k % len(sizes)], k + 1
    content, calls, _ = _stream(plan, parts)
    assert [c["function"] for c in calls] == [c["function"] for c in whole_calls]
    assert (content if not whole_calls else content.lstrip() or None) == (whole if whole_calls else text)


class _CountingScanner:
    """tools._JSON_TOKEN, counting the characters its searches pass over."""

    def __init__(self, pattern) -> None:
        self.pattern, self.read = pattern, 0

    def search(self, text, pos):
        m = self.pattern.search(text, pos)
        self.read += (m.end() if m else len(text)) - pos
        return m


@pytest.mark.parametrize(
    "block", ['<tool_call>"</tool_call>"', '<tool_call>\\"</tool_call>', '<tool_call>{"a":"</tool_call>x" <']
)
def test_reading_blocks_is_linear_in_the_answer(monkeypatch, block):
    """Each block whose first tag is inside a string used to search for a tag outside one to the end of the
    answer: 3,000 such blocks (90 KB, a model's answer a client can prompt for) took 3.8 s of the event loop.
    A block's search stops where the text stops being JSON, so the whole answer is read a bounded number of
    times, whole or streamed."""
    from gateway import tools

    text = block * 3000
    counter = _CountingScanner(tools._JSON_TOKEN)
    monkeypatch.setattr(tools, "_JSON_TOKEN", counter)
    plan = _plan("auto")
    assert plan.answer(text) == (text, [])
    assert counter.read <= 3 * len(text), counter.read / len(text)
    counter.read = 0
    content, calls, _ = _stream(plan, [text[i : i + 7] for i in range(0, len(text), 7)])
    assert (content, calls) == (text, [])
    assert counter.read <= 3 * len(text), counter.read / len(text)


def test_deciding_many_blocks_at_once_copies_the_answer_once_and_sends_its_text_as_one_delta(monkeypatch):
    """A node's answer that opens a string in its first block leaves every block after it undecided until the end,
    where each decided block cut the rest of the answer off again and went out as a chunk of its own: a choice of
    4,096 such tokens held the gateway's event loop 0.4 s, 9 s with n=16 (complexity red team). Whole or streamed,
    the answer is copied a bounded number of times, and its text goes out as one delta."""
    from gateway import tools
    from gateway.tools import MAX_BLOCKS, ToolStream

    parsed = []
    parse = tools._parsed
    monkeypatch.setattr(tools, "_parsed", lambda text: parsed.append(text) or parse(text))
    copied: list[int] = []

    class Counted(ToolStream):
        def __setattr__(self, name, value):
            if name == "held":
                copied.append(len(value))
            super().__setattr__(name, value)

    text = '<tool_call>"' + "</tool_call><tool_call>" * 2000 + "done"
    for pieces in ([text], [text[i : i + 129] for i in range(0, len(text), 129)]):
        stream, copied[:] = Counted(_plan("auto")), []
        pushed = [d for p in pieces for d in stream.push(p)]
        at_end = stream.close()
        assert "".join(d["content"] for d in pushed + at_end) == text
        assert sum(copied) <= 3 * len(text), sum(copied) / len(text)
        assert len(at_end) == 1  # the text decided at the end: one delta (it was one a block)
    # each block is parsed as a call would be, and 17,000 short ones were a third of a second a choice: past
    # MAX_BLOCKS blocks the rest of an answer is text, whole or streamed
    parsed.clear()
    plan = _plan("auto")
    text = CALL * (MAX_BLOCKS + 500)
    content, calls = plan.answer(text)
    assert len(calls) == MAX_BLOCKS and content == CALL * 500 and len(parsed) <= MAX_BLOCKS
    streamed, streamed_calls, _ = _stream(plan, [text[i : i + 50] for i in range(0, len(text), 50)])
    assert (streamed, len(streamed_calls)) == (content, MAX_BLOCKS)


def test_an_answer_cut_short_ends_length_whatever_the_tool_choice():
    """ "length" is kept for every choice (auto said "tool_calls"; compat audit); an answer that ended calls."""
    assert {c: _plan(c).called_reason("length") for c in ("auto", "required")} == {
        "auto": "length",
        "required": "length",
    }
    assert [_plan(c).called_reason("stop") for c in ("auto", "required")] == ["tool_calls", "tool_calls"]
