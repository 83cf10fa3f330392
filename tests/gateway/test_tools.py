"""OpenAI tools and structured output through the official openai client against a real gateway and a real
tiny-model node (random weights): every json_schema answer parses and validates, tool_choice required and a named
function always give valid calls (whole and streamed), auto takes a tool's result back."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tests.gateway.conftest import MESSAGES, chat, complete, refused

pytestmark = pytest.mark.integration


SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "sunny": {"type": "boolean"},
        "unit": {"enum": ["c", "f"]},
    },
    "required": ["city", "sunny", "unit"],
    "additionalProperties": False,
}
# the tools are written into the prompt (the tiny tokenizer spends a token on nearly every character): a small one
ARGS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 6}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": ARGS}}


def test_json_schema_answers_all_parse_and_validate(oai):
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
    got = chat(oai, response_format=fmt, n=8, seed=1, temperature=1.0, max_tokens=200)
    for c in got.choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
    obj = complete(
        oai, extra_body={"response_format": {"type": "json_object"}}, n=4, seed=2, temperature=1.0, max_tokens=200
    )
    done = [c for c in obj.choices if c.finish_reason == "stop"]
    assert done and all(isinstance(json.loads(c.text), dict) for c in done)


def valid_calls(choice, reason: str = "tool_calls") -> list:
    assert choice.finish_reason == reason and choice.message.tool_calls, choice.message
    for call in choice.message.tool_calls:
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), ARGS)
    return choice.message.tool_calls


def test_a_named_function_is_called_validly_every_time(oai):
    named = {"type": "function", "function": {"name": "get_weather"}}
    got = chat(oai, tools=[WEATHER], tool_choice=named, n=6, seed=9, temperature=1.0, max_tokens=None)
    assert all(len(valid_calls(c, "stop")) == 1 for c in got.choices)  # a named call ends "stop", as OpenAI's


def test_a_named_functions_arguments_stream_as_they_come(oai):
    # the grammar makes the whole answer the arguments: a first delta names the call, later ones carry the
    # text as the tokens come (they were held to the end, the role with them), and they add up to the answer's
    named = {"type": "function", "function": {"name": "get_weather"}}
    kw = dict(tools=[WEATHER], tool_choice=named, seed=9, temperature=1.0, max_tokens=None)
    whole = chat(oai, **kw).choices[0]
    chunks = [c.choices[0] for c in chat(oai, stream=True, **kw) if c.choices]
    assert chunks[0].delta.role == "assistant"
    calls = [t for c in chunks if c.delta.tool_calls for t in c.delta.tool_calls]
    assert len(calls) > 2 and {t.index for t in calls} == {0}
    assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    assert all(t.id is None and t.function.name is None for t in calls[1:])
    arguments = "".join(t.function.arguments for t in calls)
    assert arguments == valid_calls(whole, "stop")[0].function.arguments
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]


def test_tool_choice_required_calls_validly_every_time(oai):
    """With parallel_tool_calls false the grammar is one compact call, so even random weights finish it: every
    answer, whole and streamed, is a valid call."""
    one = {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": None}
    got = chat(oai, n=6, seed=9, temperature=1.0, **one)
    assert all(len(valid_calls(c)) == 1 for c in got.choices)
    streamed = list(chat(oai, seed=9, stream=True, **one))
    reasons = [c.choices[0].finish_reason for c in streamed if c.choices and c.choices[0].finish_reason]
    calls = [t for c in streamed if c.choices and c.choices[0].delta.tool_calls for t in c.choices[0].delta.tool_calls]
    # one call, named in its first delta, its arguments streamed in pieces as the model wrote them
    assert reasons == ["tool_calls"] and {t.index for t in calls} == {0} and len(calls) > 2
    assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads("".join(t.function.arguments for t in calls)), ARGS)


def test_tool_choice_required_with_parallel_calls(oai):
    """Several calls allowed: every answer that ends is a list of valid calls, at most 8 (random weights list
    calls on a coin flip per item, so an answer may still reach the tiny context first)."""
    got = chat(oai, tools=[WEATHER], tool_choice="required", n=6, seed=9, temperature=1.0, max_tokens=None)
    done = [c for c in got.choices if c.finish_reason != "length"]
    assert done and all(1 <= len(valid_calls(c)) <= 8 for c in done)


def test_auto_round_trips_a_tool_result(oai):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sunny": true}'},
    ]
    got = chat(oai, messages=messages, tools=[WEATHER], tool_choice="auto", max_tokens=8)
    assert got.choices[0].finish_reason in ("stop", "length", "tool_calls") and got.usage.prompt_tokens > 0
    # the tool result reached the prompt: it is longer than the same chat without it
    assert got.usage.prompt_tokens > chat(oai, messages=messages[:2], tools=[WEATHER]).usage.prompt_tokens


def test_auto_tools_beside_a_json_schema_answer_with_the_schema_or_with_calls(oai):
    """Tools the model may call and a response format (an agent with tools and an output type): every answer is
    the format's JSON or valid calls, and both happen (the format alone constrained every answer to it, so no tool
    was ever called)."""
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
    got = chat(oai, tools=[WEATHER], response_format=fmt, n=8, seed=3, temperature=1.0, max_tokens=None)
    kinds = set()
    for c in got.choices:
        if c.message.tool_calls:
            valid_calls(c)
            kinds.add("calls")
        else:
            assert c.finish_reason == "stop", c.message.content
            jsonschema.validate(json.loads(c.message.content), SCHEMA)
            kinds.add("answer")
    assert kinds == {"answer", "calls"}


def test_a_tool_the_grammar_cannot_enforce_beside_a_format_is_refused_naming_tools(oai):
    """Auto tools beside a response format are compiled with it: a tool's parameters the grammar cannot enforce
    are refused naming tools, not the format (red team: param response_format)."""
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA}}
    tags = {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}
    odd = {"type": "function", "function": {"name": "tags", "parameters": tags}}
    assert "uniqueItems" in refused(lambda: chat(oai, tools=[WEATHER, odd], response_format=fmt), "tools")


def _whole_and_streamed(oai, **kw) -> tuple[tuple, tuple]:
    """(content, calls as (name, arguments), finish reason) of the same greedy answer, whole and streamed."""
    whole = chat(oai, temperature=0, **kw).choices[0]
    w = (
        whole.message.content or "",
        [(t.function.name, t.function.arguments) for t in whole.message.tool_calls or ()],
        whole.finish_reason,
    )
    content, calls, reasons = "", {}, []
    for c in chat(oai, temperature=0, stream=True, **kw):
        if not c.choices:
            continue
        d = c.choices[0].delta
        content += d.content or ""
        for t in d.tool_calls or ():
            name, arguments = calls.get(t.index, ("", ""))
            calls[t.index] = (name + (t.function.name or ""), arguments + (t.function.arguments or ""))
        reasons += [c.choices[0].finish_reason] if c.choices[0].finish_reason else []
    return w, (content, [calls[i] for i in sorted(calls)], reasons[0])


@pytest.mark.parametrize(
    "kw",
    [
        {"max_tokens": 2},  # cut short inside the arguments
        {"max_tokens": 24, "stop": ['"']},  # cut short by a stop string
    ],
    ids=["max_tokens", "stop"],
)
def test_a_named_call_cut_short_is_the_same_call_whole_and_streamed(oai, kw):
    """Red team: the whole answer read the text back apart from the stream, so a named function's arguments cut
    short were content whole and a call streamed. Now the whole answer is what its stream sends: the call, its
    arguments as written (as vLLM's named calls are)."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    whole, streamed = _whole_and_streamed(oai, tools=[WEATHER], tool_choice=named, **kw)
    assert whole == streamed
    assert whole[0] == "" and [name for name, _ in whole[1]] == ["get_weather"]


def test_a_required_answer_is_the_same_whole_and_streamed_and_delivers_all_it_bills(oai):
    """A "required" answer cut short after whole calls: they are calls whole and streamed alike (whole, it was
    all content), and what follows them reaches the client as content, its tokens billed."""
    noargs = {"type": "function", "function": {"name": "noargs"}}
    kw = {"tools": [WEATHER, noargs], "tool_choice": "required"}
    for max_tokens in (20, 30, 40):  # the tools take 468 of the tiny context's 512 tokens
        whole, streamed = _whole_and_streamed(oai, max_tokens=max_tokens, **kw)
        assert whole == streamed, max_tokens
        content, calls, _ = whole
        scored = chat(oai, temperature=0, max_tokens=max_tokens, logprobs=True, **kw).choices[0].logprobs.content
        left = "".join(t.token for t in scored)  # the text of every token billed
        # each call as written, then the content, leave nothing of it but the array's own punctuation
        for part in [f'{{"name":"{n}","arguments":{a}' for n, a in calls] + [content]:
            at = left.find(part)
            assert at >= 0 and not set(left[:at]) - set("[,}"), (max_tokens, left, part)
            left = left[at + len(part) :]
        assert not set(left) - set("},]"), (max_tokens, left)


def test_parameters_that_are_not_an_object_are_refused_as_openai_refuses_them(oai):
    """Red team: a tool whose parameters were a string schema made the grammar write arguments no call carries,
    and every call after it was dropped from the stream, billed. OpenAI refuses such parameters; so does this."""
    string = {"type": "function", "function": {"name": "b", "parameters": {"type": "string", "maxLength": 2}}}
    for choice in ("required", "auto", {"type": "function", "function": {"name": "b"}}):
        message = refused(lambda choice=choice: chat(oai, tools=[WEATHER, string], tool_choice=choice), "tools")
        assert 'tools[1].function.parameters must be a JSON schema of type "object"' in message
    # one with no type at all takes an object: its calls' arguments are objects
    untyped = {"type": "function", "function": {"name": "f", "parameters": {"properties": {"x": {"type": "integer"}}}}}
    got = chat(oai, tools=[untyped], tool_choice="required", max_tokens=None, n=3, seed=5, temperature=1.0)
    done = [c for c in got.choices if c.finish_reason != "length"]  # random weights may list calls to the end
    assert done and all(isinstance(json.loads(t.function.arguments), dict) for c in done for t in c.message.tool_calls)


# an `auto` answer in the Hermes tags, written by the node as a trained model would (guided_regex forces the text)
TAGGED = '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome", "unit": "c"}}</tool_call>'
TWO_CALLS = TAGGED + TAGGED.replace("Rome", "Oslo")


def _tagged_answer(oai, **kw) -> list[tuple[str, str | None, list[str]]]:
    """(finish_reason, content, each call's arguments) of the answer whole, then streamed."""
    got = chat(oai, **kw).choices[0]
    answers = [(got.finish_reason, got.message.content, [c.function.arguments for c in got.message.tool_calls or ()])]
    content, calls, finish = "", {}, None
    for chunk in chat(oai, stream=True, **kw):
        for d in chunk.choices:
            content += d.delta.content or ""
            for c in d.delta.tool_calls or ():
                calls[c.index] = calls.get(c.index, "") + (c.function.arguments or "")
            finish = d.finish_reason or finish
    return answers + [(finish, content or None, list(calls.values()))]


def test_auto_calls_in_tags_parallel_or_one_and_cut_short(oai):
    """Two calls written: both taken; with parallel_tool_calls false the first only, the second not sent as its
    markup in the content; cut by max_tokens inside the second, the answer ends "length" (it said "tool_calls",
    so code looking for a cut answer never saw one; compat audit). Whole and streamed alike."""
    kw = {
        "tools": [WEATHER],
        "tool_choice": "auto",
        "temperature": 0,
        "extra_body": {"guided_regex": re.escape(TWO_CALLS)},
    }
    rome, oslo = '{"city": "Rome", "unit": "c"}', '{"city": "Oslo", "unit": "c"}'
    # max_tokens None: what the tiny context leaves after the tools (the answer ends with the regex, before it)
    assert _tagged_answer(oai, max_tokens=None, **kw) == [("tool_calls", None, [rome, oslo])] * 2
    one = _tagged_answer(oai, max_tokens=None, parallel_tool_calls=False, **kw)
    assert one == [("tool_calls", None, [rome])] * 2
    full = chat(oai, max_tokens=None, **kw).usage.completion_tokens
    cut = _tagged_answer(oai, max_tokens=full - 10, **kw)
    assert cut[0] == cut[1] and cut[0][0] == "length" and cut[0][2] == [rome], cut
