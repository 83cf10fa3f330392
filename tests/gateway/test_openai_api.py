"""OpenAI wire models: what is accepted, what is refused with which param, and the chunk shapes."""

from __future__ import annotations

import json

import pytest

from gateway.errors import BadRequest, RateLimited
from gateway.openai_api import ChatRequest, ChunkBuilder, CompletionRequest, parse_body

RID = "0x" + "ab" * 32


def body(**kw) -> bytes:
    return json.dumps({"model": "m", "prompt": "hi", **kw}).encode()


def test_prompt_lists_and_sampling_extras():
    r = parse_body(
        CompletionRequest,
        body(
            prompt=[[1, 2], [3]],
            n=2,
            top_k=-1,
            min_p=0.1,
            repetition_penalty=1.2,
            min_tokens=2,
            ignore_eos=True,
            stop_token_ids=[7],
            logit_bias={"5": -100},
            seed=-1,
            logprobs=0,
            echo=True,
            response_format={"type": "json_object"},
        ),
    )
    assert r.prompt_list() == [[1, 2], [3]] and r.prompt_count() == 2 and r.bias_ids() == [5]
    assert parse_body(CompletionRequest, body(prompt=["a", "b"])).prompt_list() == ["a", "b"]
    # one prompt of many characters is one prompt (found: counted as one prompt per character)
    assert parse_body(CompletionRequest, body(prompt="word " * 100, n=16)).prompt_count() == 1


def test_minimal_completion():
    r = parse_body(
        CompletionRequest, body(stop="\n", stream=True, stream_options={"include_usage": True}, user="u1", seed=3, n=1)
    )
    assert r.stop_list() == ["\n"] and r.include_usage and r.seed == 3 and r.user == "u1"


def test_prompt_forms():
    assert parse_body(CompletionRequest, body(prompt=["one"])).prompt == ["one"]
    assert parse_body(CompletionRequest, body(prompt=[1, 2, 3])).prompt == [1, 2, 3]


@pytest.mark.parametrize(
    "raw,param,match",
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1]", None, "JSON object"),
        (json.dumps({"prompt": "x"}).encode(), "model", "model: is required"),
        (body(n=17), "n", "less than or equal to 16"),
        (body(max_tokens=0), "max_tokens", "only for echo"),
        (body(temperature=3), "temperature", "less than or equal to 2"),
        (body(top_p=0), "top_p", "greater than 0"),
        (body(stop=["a", "b", "c", "d", "e"]), "stop", "at most 4"),
        (body(prompt=["a"] * 17), "prompt", None),
        (body(prompt=[]), "prompt", None),
        (body(logprobs=6), "logprobs", "less than or equal to 5"),
        (body(best_of=3, n=4), "best_of", "at least n"),
        (body(best_of=2, stream=True), "best_of", "greater than n cannot be used with stream"),
        (body(stop=""), "stop", None),
        (body(stop=["a", ""]), "stop", None),
        (body(prompt=["a"] * 5, n=13), "n", "64 sequences"),
        (body(presence_penalty=2.5), "presence_penalty", "less than or equal to 2"),
        (body(suffix="x"), "suffix", "not supported"),
        (body(stream_options={"include_usage": True}), "stream_options", "only allowed when stream"),
        (body(logit_bias={"a": 1}), "logit_bias", "token ids"),
        (body(logit_bias={"5": 101}), "logit_bias", None),
        (body(logit_bias={str(i): 1 for i in range(301)}), "logit_bias", "at most 300"),
        (body(logit_bias={"2": 5, "02": -5}), "logit_bias", "'2' and '02' name the same token, 2"),  # combo fuzz
        (body(stop_token_ids=list(range(17))), "stop_token_ids", None),
        (body(repetition_penalty=0), "repetition_penalty", None),
        (body(min_p=1.5), "min_p", None),
        (body(top_k=2**63), "top_k", "less than or equal to 2147483647"),
        (body(response_format={"type": "json_schema"}), "response_format", "json_schema is required"),
        (body(response_format={"type": "yaml"}), "response_format", None),
        (body(frobnicate=1), "frobnicate", "not a field this API supports"),
        (body(use_beam_search=True), "use_beam_search", "not a field"),
        (body(max_completion_tokens=3), "max_completion_tokens", "not a field"),
    ],
)
def test_completion_refusals(raw, param, match):
    with pytest.raises(BadRequest, match=match) as ei:
        parse_body(CompletionRequest, raw)
    assert ei.value.status == 400 and ei.value.param == param
    assert ei.value.body()["error"]["type"] == "invalid_request_error"


def test_chat_request():
    raw = json.dumps(
        {
            "model": "m",
            "max_completion_tokens": 7,
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]},
            ],
        }
    ).encode()
    r = parse_body(ChatRequest, raw)
    assert r.wanted_tokens() == 7
    assert r.chat_messages() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]


def test_chat_tool_history_and_harmless_fields():
    """An assistant's tool calls (arguments as OpenAI's JSON string) and the tool's answer reach the template as
    it expects them; fields that change nothing here are taken."""
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    raw = json.dumps(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None, "function_call": None},
                {"role": "tool", "tool_call_id": "call_1", "content": "42"},
            ],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "parallel_tool_calls": True,
            "user": "u",
            "metadata": {"a": "b"},
            "store": False,
            "service_tier": "auto",
            "modalities": ["text"],
            "logprobs": True,
            "top_logprobs": 3,
        }
    ).encode()
    r = parse_body(ChatRequest, raw)
    msgs = r.chat_messages()
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert msgs[2] == {"role": "tool", "content": "42", "tool_call_id": "call_1"}
    assert r.plan.choice == "auto" and r.node_logprobs() == 3


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"store": True}, "store"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"echo": True}, "echo"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}, "messages"),
        # OpenAI's 400: an app that lost its user's text was answered and billed (only an assistant's may be null)
        ({"messages": [{"role": "user", "content": None}]}, "messages"),
        ({"messages": [{"role": "system", "content": None}, {"role": "user", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "response_format",
        ),
    ],
)
def test_chat_refusals(extra, param):
    raw = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], **extra}).encode()
    with pytest.raises(BadRequest) as ei:
        parse_body(ChatRequest, raw)
    assert ei.value.param == param


def test_error_shape_and_retry_after():
    e = RateLimited("slow down", retry_after=2.2)
    r = e.response()
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    assert json.loads(r.body) == {
        "error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}
    }


def _data(chunk: bytes) -> dict:
    assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n")
    return json.loads(chunk[6:])


def test_chat_chunks():
    b = ChunkBuilder(chat=True, rid=RID, created=5, model="m", include_usage=True)
    role, tok, fin, use = map(_data, (b.role(), b.token("hi"), b.finish("stop"), b.usage({"total_tokens": 3})))
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""} and role["usage"] is None
    assert tok["object"] == "chat.completion.chunk" and tok["choices"][0]["delta"] == {"content": "hi"}
    assert fin["choices"][0]["finish_reason"] == "stop" and use["choices"] == [] and use["usage"]["total_tokens"] == 3
    assert tok["id"] == "chatcmpl-" + RID[2:]


def test_completion_chunks_without_usage():
    b = ChunkBuilder(chat=False, rid=RID, created=5, model="m", include_usage=False)
    tok = _data(b.token("x"))
    assert tok["object"] == "text_completion" and tok["choices"][0]["text"] == "x" and "usage" not in tok


def test_strict_types_still_take_what_openai_takes():
    # a whole number is a number (temperature 1), null is "not given"
    r = parse_body(CompletionRequest, body(temperature=1, top_p=1, seed=2**64 - 1, stream=None, stop=None, n=None))
    assert (r.temperature, r.top_p, r.seed, r.stream) == (1.0, 1.0, 2**64 - 1, None)
    # OpenAI's seeds are signed 64-bit numbers: a negative one is taken modulo 2^64
    assert parse_body(CompletionRequest, body(seed=-(2**63))).seed == -(2**63)
    for wrong in (
        {"max_tokens": "16"},
        {"seed": 2**64},
        {"seed": -(2**63) - 1},
        {"stream": "true"},
        {"prompt": [2**31]},
    ):
        with pytest.raises(BadRequest) as ei:
            parse_body(CompletionRequest, body(**wrong))
        assert ei.value.param == next(iter(wrong))


def test_what_a_template_is_given_counts_the_tool_calls():
    """The size that decides whether a chat is rendered on the event loop: a tool call's 100,000 characters of
    arguments are in it, and each message's markup (gateway/prompts.py: TEMPLATE_MARKUP_CHARS)."""
    args = json.dumps({"a": "x" * 100_000})
    req = ChatRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": args}}],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "ok"},
            ],
        }
    )
    assert [m.template_chars() for m in req.messages] == [2, len("c1") + 1 + len(args), len("c1") + 2]


def test_what_the_sdk_parsed_of_a_tool_call_is_not_shown_to_the_template():
    """A tool call sent back with the openai SDK's parsed_arguments: the template sees what the model wrote."""
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "f", "arguments": '{"a": 1}', "parsed_arguments": {"a": 1}},
    }
    req = ChatRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]}]}
    )
    req.check()
    (shown,) = req.chat_messages()[1]["tool_calls"]
    assert shown["function"] == {"name": "f", "arguments": {"a": 1}}  # parsed by the gateway, as templates take it
