"""gateway/responses_api.py without a server: a Responses answer's items, streamed (ResponseEvents fed as the chat
path feeds a ChunkBuilder) and whole (Choices.replay), from a model's text in each tool mode, and a conversation's
items turned into chat messages."""

from __future__ import annotations

import json

from gateway.choices import Choices
from gateway.openai_api import parse_body, usage_dict
from gateway.responses_api import ResponseEvents, ResponsesRequest

RID = "0x" + "ab" * 32
TOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def request(**body) -> ResponsesRequest:
    return parse_body(ResponsesRequest, json.dumps({"model": "m", "input": "hi"} | body).encode())


def answer(req: ResponsesRequest, pieces: list[str], overall: str) -> tuple[list[dict], dict, dict]:
    """(the stream's events, its final Response, the whole answer's Response) of a model that wrote `pieces`."""
    chat = req.as_chat()

    def choices() -> Choices:
        c = Choices(chat=True, prompts=[[1]], per_prompt=1, n=1, max_tokens=100, plan=chat.plan)
        for i, text in enumerate(pieces):
            c.take_token(0, {"type": "token", "index": 0, "token_id": 10 + i, "text": text})
        return c

    usage = usage_dict(1, len(pieces))
    streamed, b = choices(), ResponseEvents(req, RID, 1)
    raw = streamed.open_all(b)
    for text in pieces:
        raw += streamed.chunk(b, 0, text, None)
    raw += streamed.close_all(b, overall, False) + b.end(usage)
    events = [json.loads(line[6:]) for line in raw.decode().split("\n") if line.startswith("data: ")]
    whole = ResponseEvents(req, RID, 1)
    choices().replay(whole, overall, False)
    return events, events[-1]["response"], whole.response(usage)


def items(response: dict) -> list[tuple]:
    return [
        (o["type"], o["status"], o["content"][0]["text"] if o["type"] == "message" else o["name"])
        for o in response["output"]
    ]


def test_whitespace_between_and_after_calls_is_no_item_of_its_own():
    """A Qwen-style answer (text, a call, "\\n", a call, "\\n") is one message and two calls, whole and streamed;
    the "\\n"s made messages of their own (review), which went back as assistant turns of their own."""
    req = request(tools=[TOOL])
    events, final, whole = answer(req, ["Sure", CALL, "\n", CALL, "\n"], "stop")
    want = [("message", "completed", "Sure"), ("function_call", "completed", "get_weather")] + [
        ("function_call", "completed", "get_weather")
    ]
    assert items(final) == items(whole) == want
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert final["status"] == whole["status"] == "completed"


def test_an_answer_cut_after_a_call_is_incomplete():
    """Auto's finish_reason for an answer that called is "tool_calls", even cut at max_tokens: the Response says
    incomplete all the same (it said completed: review)."""
    events, final, whole = answer(request(tools=[TOOL]), [CALL, "\n", "<tool_c"], "length")
    assert final["status"] == whole["status"] == "incomplete" and events[-1]["type"] == "response.incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}


def test_an_answer_of_whitespace_alone_is_one_message_of_it():
    _, final, whole = answer(request(), ["\n", " "], "stop")
    assert items(final) == items(whole) == [("message", "completed", "\n ")]
    _, final, _ = answer(request(), [], "stop")
    assert items(final) == [("message", "completed", "")]


def test_an_answers_items_sent_back_are_one_assistant_turn():
    """input += response.output: an answer's texts around its calls join one assistant message with the calls,
    as a chat answer holds them (two assistant turns in a row broke templates that alternate roles)."""
    call = {"type": "function_call", "name": "get_weather", "arguments": "{}"}
    req = request(
        tools=[TOOL],
        input=[
            {"role": "user", "content": "hi"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sure"}]},
            call | {"call_id": "call_1"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": " and"}]},
            call | {"call_id": "call_2"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "call_2", "output": "rain"},
        ],
    )
    messages = [m.as_dict() for m in req.as_chat().messages]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    assert messages[1]["content"] == "Sure and"
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["call_1", "call_2"]


def test_two_assistant_messages_with_no_call_between_stay_two():
    req = request(
        input=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "A"},
            {"role": "assistant", "content": "B"},
        ]
    )
    assert [m.as_dict()["content"] for m in req.as_chat().messages] == ["hi", "A", "B"]


def test_a_failed_answer_of_whitespace_alone_shows_it():
    """Billed whitespace no message held yet reaches the client in response.failed's message (it was left out)."""
    b = ResponseEvents(request(), RID, 1)
    b.role()
    b.token("\n")
    failed = json.loads(b.failed("node broke off", usage_dict(1, 1)).decode().split("data: ")[-1])
    assert [o["content"][0]["text"] for o in failed["response"]["output"]] == ["\n"]
    assert (
        failed["response"]["output"][0]["status"] == "incomplete" and failed["response"]["usage"]["output_tokens"] == 1
    )
