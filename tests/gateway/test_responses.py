"""OpenAI's Responses API (`POST /v1/responses`) through the official openai client against a real gateway and a
real tiny-model node (random weights): a response is the chat answer of the same conversation (text, counts and
bill), whole and streamed; structured output and function tools come back as Responses items (parsed by the SDK's
own helpers), a conversation with calls goes round again, logprobs when asked; what it cannot serve is refused by
name."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pydantic
import pytest

from tests.gateway import TINY
from tests.gateway.conftest import agree, chat, refused

pytestmark = pytest.mark.integration

QUESTION = "What is the capital of France?"
INSTRUCTIONS = "Answer in one word."
GREEDY = {"temperature": 0, "max_output_tokens": 8}
ARGS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 6}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "name": "get_weather", "parameters": ARGS, "strict": True}
NAMED = {"type": "function", "name": "get_weather"}


class City(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    city: str = pydantic.Field(max_length=8)
    sunny: bool


def respond(oai, **kw):
    return oai.responses.create(model=TINY, **({"input": QUESTION} | kw))


def test_a_response_is_the_chat_answer_of_its_conversation_and_billed_alike(served, oai):
    raw = oai.responses.with_raw_response.create(model=TINY, input=QUESTION, instructions=INSTRUCTIONS, **GREEDY)
    r = agree(served, raw)  # its usage, the node's receipt and the usage row agree
    c = chat(
        oai,
        messages=[{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=8,
    )
    assert r.object == "response" and r.id.startswith("resp_") and r.model == TINY
    assert r.output_text == c.choices[0].message.content
    assert (r.usage.input_tokens, r.usage.output_tokens) == (c.usage.prompt_tokens, c.usage.completion_tokens)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    # cut at max_output_tokens (random weights rarely end sooner), as the chat answer was cut at max_tokens
    assert c.choices[0].finish_reason == "length"
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    assert r.instructions == INSTRUCTIONS and r.max_output_tokens == 8 and r.store is False


def test_input_items_are_the_chat_messages_they_say(oai):
    items = [
        {"role": "developer", "content": INSTRUCTIONS},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Paris", "annotations": []}]},
        {"role": "user", "content": "And of Italy?"},
    ]
    messages = [
        {"role": "developer", "content": INSTRUCTIONS},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And of Italy?"},
    ]
    r, c = respond(oai, input=items, **GREEDY), chat(oai, messages=messages, temperature=0, max_tokens=8)
    assert r.output_text == c.choices[0].message.content
    assert r.usage.input_tokens == c.usage.prompt_tokens


def test_a_streamed_response_is_the_whole_one_event_by_event(oai):
    whole = respond(oai, **GREEDY)
    events = list(respond(oai, stream=True, **GREEDY))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas == final.output_text == whole.output_text
    assert final.id == events[0].response.id and final.usage.output_tokens == whole.usage.output_tokens
    assert final.output[0].status == "incomplete"


def test_structured_output_parses_with_the_sdks_helpers_whole_and_streamed(oai):
    parsed = oai.responses.parse(model=TINY, input=QUESTION, text_format=City, max_output_tokens=200, temperature=1)
    assert parsed.status == "completed", parsed.output_text
    assert isinstance(parsed.output_parsed, City)
    with oai.responses.stream(
        model=TINY, input=QUESTION, text_format=City, max_output_tokens=200, temperature=1
    ) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds[-1] == "response.completed" and "response.output_text.delta" in kinds
    assert isinstance(final.output_parsed, City)
    assert final.text.format.type == "json_schema"
    obj = respond(oai, text={"format": {"type": "json_object"}}, max_output_tokens=200)
    assert obj.status != "completed" or isinstance(json.loads(obj.output_text), dict)


def test_a_named_function_comes_back_as_a_function_call_item_and_goes_round_again(served, oai):
    r = respond(oai, tools=[WEATHER], tool_choice=NAMED, max_output_tokens=60, temperature=1)
    assert r.status == "completed", r.output
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), ARGS)
    # the conversation goes round again as the SDK builds it: the answer's items, then the call's output
    history = [{"role": "user", "content": QUESTION}, *r.output]
    history.append({"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21"})
    raw = oai.responses.with_raw_response.create(model=TINY, input=history, tools=[WEATHER], **GREEDY)
    again = agree(served, raw)
    as_chat = chat(
        oai,
        messages=[
            {"role": "user", "content": QUESTION},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call.call_id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.call_id, "content": "sunny, 21"},
        ],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": ARGS}}],
        temperature=0,
        max_tokens=8,
    )
    assert again.usage.input_tokens == as_chat.usage.prompt_tokens
    assert again.output_text == (as_chat.choices[0].message.content or "")


def test_required_calls_stream_as_function_call_items(oai):
    """One call (parallel_tool_calls false), through the SDK's stream helper, which checks every event against the
    items it holds; then several (greedy, the tiny base lists calls until its context is full): each its own item,
    its arguments streamed as its own deltas, the one cut short "incomplete"."""
    one = {"tools": [WEATHER], "tool_choice": "required", "temperature": 0}
    with oai.responses.stream(model=TINY, input=QUESTION, parallel_tool_calls=False, **one) as stream:
        events = list(stream)
        final = stream.get_final_response()
    [call] = final.output
    assert final.status == "completed" and call.type == "function_call" and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), ARGS)
    assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == call.arguments

    events = list(respond(oai, stream=True, **one))
    final = events[-1].response
    assert events[-1].type == "response.incomplete" and len(final.output) > 1
    for item in final.output:
        assert item.type == "function_call" and item.name == "get_weather"
        deltas = [
            e.delta for e in events if e.type == "response.function_call_arguments.delta" and e.item_id == item.id
        ]
        assert "".join(deltas) == item.arguments
    *whole, cut = final.output
    assert all(c.status == "completed" for c in whole) and cut.status == "incomplete"
    for c in whole:
        jsonschema.validate(json.loads(c.arguments), ARGS)
    assert len({c.id for c in final.output}) == len({c.call_id for c in final.output}) == len(final.output)
    done = [e.item.call_id for e in events if e.type == "response.output_item.done"]
    assert done == [c.call_id for c in final.output]
    # whole, the same items: the calls it finished are calls, the one cut short is "incomplete" (the whole answer
    # was the raw text of the calls, the finished ones lost: client-library run)
    whole = respond(oai, **one)
    assert whole.status == "incomplete"
    assert [(c.type, c.name, c.arguments, c.status) for c in whole.output] == [
        (c.type, c.name, c.arguments, c.status) for c in final.output
    ]


def test_a_text_format_beside_a_forced_call_is_taken_the_answer_being_calls(oai):
    """The Agents SDK sends an agent's output type with its forced tool choice: OpenAI takes both (the answer is the
    call; the format shapes a later, free answer), and so does the gateway (it refused naming response_format)."""
    fmt = {"format": {"type": "json_schema", "name": "city", "schema": City.model_json_schema(), "strict": True}}
    r = respond(oai, tools=[WEATHER], tool_choice=NAMED, text=fmt, max_output_tokens=60, temperature=1)
    assert r.status == "completed" and [o.type for o in r.output] == ["function_call"]
    jsonschema.validate(json.loads(r.output[0].arguments), ARGS)
    assert r.text.format.type == "json_schema"


def test_logprobs_when_asked_whole_and_streamed(oai):
    ask = {"include": ["message.output_text.logprobs"], "top_logprobs": 2, **GREEDY}
    r = respond(oai, **ask)
    entries = r.output[0].content[0].logprobs
    assert len(entries) == r.usage.output_tokens
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
    assert "".join(e.token for e in entries) == r.output_text
    streamed = [
        lp for e in respond(oai, stream=True, **ask) if e.type == "response.output_text.delta" for lp in e.logprobs
    ]
    assert [e.token for e in streamed] == [e.token for e in entries]
    assert respond(oai, **GREEDY).output[0].content[0].logprobs is None  # only when asked


def test_what_it_cannot_serve_is_refused_by_name(oai):
    def refuses(param: str, **kw) -> str:
        return refused(lambda: respond(oai, **kw), param)

    assert "whole conversation" in refuses("store", store=True)
    refuses("previous_response_id", previous_response_id="resp_123")
    refuses("reasoning", reasoning={"effort": "low"})
    refuses("background", background=True)
    refuses("top_logprobs", top_logprobs=2)
    refuses("include", include=["file_search_call.results"])
    refuses("include", include=["message.output_text.logprobs"], tools=[WEATHER])
    assert "only function tools" in refuses("tools", tools=[{"type": "web_search"}])
    refuses("tool_choice", tools=[WEATHER], tool_choice={"type": "function", "name": "nope"})
    refuses("input", input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}])
    refuses("input", input=[{"type": "reasoning", "summary": []}])
    refuses("input", input=[])
    refuses("temperature", temperature=3)
    refuses("max_output_tokens", max_output_tokens=0)
    refuses("frequency_penalty", extra_body={"frequency_penalty": 1})  # not a Responses field
    refuses("max_tool_calls", tools=[WEATHER], max_tool_calls=0)  # no call at all is something asked (red team)
    # each error names the Responses field, not the chat field it becomes (red team: param null, "messages",
    # "response_format", "tools[0].function.name")
    assert "2049 messages" in refuses("input", instructions="x", input=[{"role": "user", "content": "hi"}] * 2048)
    assert "needs schema" in refuses("text", text={"format": {"type": "json_schema", "name": "x"}})
    assert "only go with" in refuses("text", text={"format": {"type": "text", "schema": {"type": "object"}}})
    assert "cannot be compiled" in refuses(
        "text", text={"format": {"type": "json_schema", "name": "x", "schema": {"type": 5}}}
    )
    assert "tools[0].name" in refuses("tools", tools=[WEATHER | {"name": "bad name"}])
    long_call = {"type": "function_call", "call_id": "c", "name": "f", "arguments": "x" * 200_000}
    for too_long in ("word " * 600, "x" * 200_000, [long_call]):  # past the context counted, by length, rendered
        with pytest.raises(openai.BadRequestError) as ei:
            respond(oai, input=too_long)
        assert ei.value.body["param"] == "input" and ei.value.body["code"] == "context_length_exceeded"


def test_an_agents_output_type_beside_its_tools_allows_either(oai):
    """An Agents SDK agent with tools and an output type sends both: served as the chat endpoint serves them (the
    answer is the format's JSON or calls: tests/gateway/test_tools.py draws seeded answers of both kinds), whole
    and streamed alike. Greedy, the tiny base spends its context on the whitespace JSON allows: incomplete, the
    same either way."""
    fmt = {"format": {"type": "json_schema", "name": "city", "schema": City.model_json_schema(), "strict": True}}
    greedy = respond(oai, tools=[WEATHER], text=fmt, temperature=0)
    events = list(respond(oai, tools=[WEATHER], text=fmt, temperature=0, stream=True))
    final = events[-1].response
    assert (final.status, final.output_text) == (greedy.status, greedy.output_text)
    assert [(o.type, o.status) for o in final.output] == [(o.type, o.status) for o in greedy.output]
    if greedy.status == "completed":
        calls = [o for o in greedy.output if o.type == "function_call"]
        for c in calls:
            jsonschema.validate(json.loads(c.arguments), ARGS)
        if not calls:
            City.model_validate_json(greedy.output_text)
    else:
        assert greedy.output_text.startswith(("{", "<tool_call>")), greedy.output_text


def test_a_stored_response_is_none_said_in_one_line(served, oai):
    """responses.retrieve / delete / input_items / cancel: nothing is stored, and the 404 says so (it was a bare
    "Not Found"); without a key it is a 401 like every route."""
    for call in (
        lambda: oai.responses.retrieve("resp_123"),
        lambda: oai.responses.delete("resp_123"),
        lambda: oai.responses.input_items.list("resp_123"),
        lambda: oai.responses.cancel("resp_123"),
    ):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.body["code"] == "response_not_found" and "stores no responses" in e.value.body["message"]
    assert httpx.get(served.url + "/v1/responses/resp_123", timeout=10).status_code == 401


def test_input_tokens_count_what_a_response_is_billed(served, oai):
    """`responses.input_tokens.count` (the SDK's strict types) is the `input_tokens` of the response to the same
    input, instructions and tools; what a response refuses it refuses (it was a 404 saying no response is stored;
    compat audit)."""
    asks = [
        {"input": QUESTION},
        {"input": QUESTION, "instructions": INSTRUCTIONS},
        {"input": [{"role": "user", "content": QUESTION}], "tools": [WEATHER], "tool_choice": "auto"},
    ]
    strict = openai.OpenAI(base_url=served.url + "/v1", api_key=served.api_key, _strict_response_validation=True)
    counts = []
    for ask in asks:
        counted = strict.responses.input_tokens.count(model=TINY, **ask)
        assert counted.object == "response.input_tokens"
        assert counted.input_tokens == respond(oai, **GREEDY | ask).usage.input_tokens
        counts.append(counted.input_tokens)
    assert counts[0] < counts[1] < counts[2]
    alone = strict.responses.input_tokens.count(model=TINY, instructions=INSTRUCTIONS)  # input may be left out
    assert 0 < alone.input_tokens < counts[1]
    refused(lambda: oai.responses.input_tokens.count(model=TINY), "input")
    refused(
        lambda: oai.responses.input_tokens.count(model=TINY, input=QUESTION, previous_response_id="resp_1"),
        "previous_response_id",
    )
    with pytest.raises(openai.NotFoundError):
        oai.responses.input_tokens.count(model="acme/nothing", input=QUESTION)
    # its path with another method is no stored response named "input_tokens" (review), nor is any POST-only route
    auth = {"Authorization": f"Bearer {served.api_key}"}
    for method, path in [("GET", "/v1/responses/input_tokens"), ("DELETE", "/v1/responses/input_tokens")] + [
        ("GET", "/v1/chat/completions")
    ]:
        answer = httpx.request(method, served.url + path, headers=auth, timeout=10)
        assert (answer.status_code, answer.headers.get("allow")) == (405, "POST"), (method, path, answer.text)
        assert answer.json()["error"]["type"] == "invalid_request_error"
    for path in ("/v1/responses/input_tokens/", "/v1/responses/resp_1/responses/input_tokens"):  # no 405 (review)
        assert httpx.post(served.url + path, headers=auth, json={}, timeout=10).status_code == 404, path
