"""OpenAI wire models: what is accepted, what is refused with which param, and the chunk shapes."""

from __future__ import annotations

import json

import pytest

from gateway.errors import BadRequest, RateLimited
from gateway.openai_api import ChatRequest, ChunkBuilder, CompletionRequest, parse_body

RID = "0x" + "ab" * 32


def body(**kw) -> bytes:
    return json.dumps({"model": "m", "prompt": "hi", **kw}).encode()


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
        (body(n=2), "n", "only n=1"),
        (body(max_tokens=0), "max_tokens", "greater than or equal to 1"),
        (body(temperature=3), "temperature", "less than or equal to 2"),
        (body(top_p=0), "top_p", "greater than 0"),
        (body(stop=["a", "b", "c", "d", "e"]), "stop", "at most 4"),
        (body(prompt=["a", "b"]), "prompt", None),
        (body(echo=True), "echo", "not supported"),
        (body(logprobs=2), "logprobs", "not supported"),
        (body(best_of=3), "best_of", "best_of=1"),
        (body(presence_penalty=0.5), "presence_penalty", "not supported"),
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


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
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
    # a whole number is a number (temperature 1), null is "not given"; the bounds are the node's (seed < 2^64)
    r = parse_body(CompletionRequest, body(temperature=1, top_p=1, seed=2**64 - 1, stream=None, stop=None, n=None))
    assert (r.temperature, r.top_p, r.seed, r.stream) == (1.0, 1.0, 2**64 - 1, None)
    for wrong in ({"max_tokens": "16"}, {"seed": 2**64}, {"seed": -1}, {"stream": "true"}, {"prompt": [2**31]}):
        with pytest.raises(BadRequest) as ei:
            parse_body(CompletionRequest, body(**wrong))
        assert ei.value.param == next(iter(wrong))
