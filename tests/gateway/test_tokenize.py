"""vLLM's /tokenize and /detokenize, /v1/models' max_model_len and chat_template_kwargs, against a real gateway and
a real tiny-model node: /tokenize's count is the prompt_tokens the same prompt is billed, a template variable
reaches the template (and the bill), and what the gateway cannot honour is refused by name."""

from __future__ import annotations

import json

import httpx
import pytest

from node.tiny import CHAT_TEMPLATE
from tests.gateway import TINY
from tests.gateway.conftest import MESSAGES, PROMPT, chat, complete, refused

pytestmark = pytest.mark.integration

CONTEXT = 512  # the tiny bases' max_position_embeddings
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def post(gw, path: str, body: dict, *, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key or gw.api_key}"}
    return httpx.post(gw.url + path, json=body, headers=headers, timeout=30)


def tokenize(gw, **body) -> dict:
    r = post(gw, "/tokenize", {"model": TINY} | body)
    assert r.status_code == 200, r.text
    return r.json()


def error(r: httpx.Response, status: int, param: str | None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    return err["message"]


def test_tokenize_counts_what_a_completion_is_billed(served, oai):
    got = tokenize(served, prompt=PROMPT, return_token_strs=True)
    assert got["count"] == len(got["tokens"]) == len(got["token_strs"]) == complete(oai).usage.prompt_tokens
    assert got["max_model_len"] == CONTEXT
    assert all(isinstance(s, str) and s for s in got["token_strs"])
    assert tokenize(served, prompt=PROMPT)["token_strs"] is None  # only when asked
    back = post(served, "/detokenize", {"model": TINY, "tokens": got["tokens"]})
    assert back.status_code == 200, back.text
    assert back.json()["prompt"].strip() == PROMPT  # the special tokens (BOS) left out


def test_tokenize_counts_what_a_chat_is_billed_tools_included(served, oai):
    plain = tokenize(served, messages=MESSAGES)
    assert plain["count"] == chat(oai).usage.prompt_tokens
    with_tools = tokenize(served, messages=MESSAGES, tools=TOOLS)
    assert with_tools["count"] > plain["count"]  # the template lists the tools
    assert with_tools["count"] == chat(oai, tools=TOOLS).usage.prompt_tokens


def test_chat_template_kwargs_reach_the_template_and_the_bill(served, oai):
    assert "enable_thinking" in CHAT_TEMPLATE  # the tiny template reads the variable only when it is set
    plain = tokenize(served, messages=MESSAGES)["count"]
    thinking_off = tokenize(served, messages=MESSAGES, **NO_THINKING)
    assert thinking_off["count"] > plain
    assert tokenize(served, messages=MESSAGES, chat_template_kwargs={"enable_thinking": True})["count"] == plain
    answer = chat(oai, extra_body=NO_THINKING)
    assert answer.usage.prompt_tokens == thinking_off["count"]


def test_tokenize_shows_the_template_what_a_chat_with_that_tool_choice_shows_it(served, oai):
    """tool_choice "none" shows the template no tools, a named function only that one: /tokenize takes tool_choice
    too, so its count stays the bill (it assumed "auto": 477 tokens counted, 31 billed, in the attack review)."""
    time_tool = {"type": "function", "function": {"name": "now", "description": "the time in a city, as text"}}
    tools = [*TOOLS, time_tool]
    named = {"type": "function", "function": {"name": "now"}}
    for choice in ("none", "auto", "required", named):
        counted = tokenize(served, messages=MESSAGES, tools=tools, tool_choice=choice)["count"]
        assert counted == chat(oai, tools=tools, tool_choice=choice).usage.prompt_tokens, choice
    none = tokenize(served, messages=MESSAGES, tools=tools, tool_choice="none")["count"]
    assert none == tokenize(served, messages=MESSAGES)["count"]


def test_what_cannot_be_honoured_is_refused_by_name(served, oai):
    # the gateway's and transformers' own arguments, and the template's globals (a 500, or every request of a
    # template that calls them failing, in the attack review)
    reserved = ("tokenize", "add_generation_prompt", "messages", "tools", "self", "conversations")
    reserved += ("sanitize_control_tokens", "strftime_now", "raise_exception", "namespace", "range")
    for name in reserved:
        msg = refused(
            lambda name=name: chat(oai, extra_body={"chat_template_kwargs": {name: True}}), "chat_template_kwargs"
        )
        assert name in msg
    deep: object = "x"
    for _ in range(9):
        deep = [deep]
    refused(lambda: chat(oai, extra_body={"chat_template_kwargs": {"v": deep}}), "chat_template_kwargs")
    refused(lambda: chat(oai, extra_body={"chat_template_kwargs": {"v": "x" * 20_000}}), "chat_template_kwargs")
    nested: object = {}
    for _ in range(30):
        nested = {"n": nested}
    deep_tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "default": nested}}}
    refused(lambda: chat(oai, tools=[deep_tool]), "tools")
    empty = [{"role": "user", "content": ""}] * 2049
    refused(lambda: chat(oai, messages=empty), "messages")
    error(post(served, "/tokenize", {"model": TINY, "messages": empty}), 400, "messages")
    refused(lambda: chat(oai, extra_body={"chat_template_kwargs": {"not a name": 1}}), "chat_template_kwargs")
    many = {f"v{i}": i for i in range(17)}
    refused(lambda: chat(oai, extra_body={"chat_template_kwargs": many}), "chat_template_kwargs")

    both = post(served, "/tokenize", {"model": TINY, "prompt": PROMPT, "messages": MESSAGES})
    assert "either prompt" in error(both, 400, "prompt")
    error(post(served, "/tokenize", {"model": TINY}), 400, "prompt")
    error(post(served, "/tokenize", {"model": TINY, "prompt": PROMPT, "tools": TOOLS}), 400, "tools")
    # vLLM's add_special_tokens: only as the ids are sent (a completion's prompt with them, a chat's without)
    error(
        post(served, "/tokenize", {"model": TINY, "prompt": PROMPT, "add_special_tokens": False}),
        400,
        "add_special_tokens",
    )
    error(
        post(served, "/tokenize", {"model": TINY, "messages": MESSAGES, "add_special_tokens": True}),
        400,
        "add_special_tokens",
    )
    for body in ({"prompt": PROMPT}, {"messages": MESSAGES}):
        plain = post(served, "/tokenize", {"model": TINY} | body)
        said = post(served, "/tokenize", {"model": TINY, "add_special_tokens": "prompt" in body} | body)
        assert said.status_code == 200 and said.json()["tokens"] == plain.json()["tokens"]
    error(post(served, "/tokenize", {"model": TINY, "prompt": "x" * 100_000}), 400, "prompt")  # past the context
    long = post(served, "/tokenize", {"model": TINY, "prompt": "the " * CONTEXT})  # past it, found once tokenized
    assert "context holds 512" in error(long, 400, "prompt")
    assert long.json()["error"]["code"] == "context_length_exceeded"
    error(post(served, "/tokenize", {"model": "nobody/nothing", "prompt": PROMPT}), 404, "model")
    error(post(served, "/tokenize", {"model": TINY, "prompt": PROMPT}, key="sk-wrong"), 401, None)

    error(post(served, "/detokenize", {"model": TINY, "tokens": [100_000]}), 400, "tokens")  # not in the vocabulary
    error(post(served, "/detokenize", {"model": TINY, "tokens": [1] * (CONTEXT + 1)}), 400, "tokens")
    error(post(served, "/detokenize", {"model": TINY, "tokens": ["1"]}), 400, "tokens")


def test_models_say_their_context_and_what_they_are(served, oai):
    models = {m.id: m for m in oai.models.list().data}
    base = models[TINY].model_extra
    assert base["max_model_len"] == CONTEXT and (base["root"], base["parent"]) == (base["base_model"]["id"], None)
    assert oai.models.retrieve(TINY).model_extra["max_model_len"] == CONTEXT


def test_a_final_assistant_message_is_continued(served, oai):
    """vLLM's continue_final_message (a prefill: the answer goes on from the assistant's words) and
    add_generation_prompt, in a chat and in /tokenize alike; the answer is only what follows the prefill."""
    prefill = [*MESSAGES, {"role": "assistant", "content": "The capital is"}]
    go_on = {"continue_final_message": True}
    counted = tokenize(served, messages=prefill, **go_on)["count"]
    answer = chat(oai, messages=prefill, temperature=0, extra_body=go_on)
    assert answer.usage.prompt_tokens == counted
    # the default opens a new assistant turn after the prefill: more tokens; without it, fewer
    assert tokenize(served, messages=prefill)["count"] > counted
    closed = tokenize(served, messages=MESSAGES, add_generation_prompt=False)["count"]
    assert closed < tokenize(served, messages=MESSAGES)["count"]
    assert chat(oai, extra_body={"add_generation_prompt": False}).usage.prompt_tokens == closed

    refused(lambda: chat(oai, extra_body=go_on), "continue_final_message")  # the last message is the user's
    calls = [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]
    only_calls = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": calls}]
    refused(lambda: chat(oai, messages=only_calls, extra_body=go_on), "continue_final_message")  # nothing to go on
    both = go_on | {"add_generation_prompt": True}
    refused(lambda: chat(oai, messages=prefill, extra_body=both), "add_generation_prompt")
    error(post(served, "/tokenize", {"model": TINY, "messages": MESSAGES, **go_on}), 400, "continue_final_message")
    error(post(served, "/tokenize", {"model": TINY, "prompt": PROMPT, **go_on}), 400, "continue_final_message")


def _with_call_arguments(arguments: str) -> list[dict]:
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": arguments}}
    return [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ]


def test_tool_call_arguments_in_a_chat_are_counted_and_parsed_off_the_loop(served, monkeypatch):
    """A chat's history carries tool calls' arguments, which the gateway parses (untrusted JSON) for the template:
    3.8 MB of them held its event loop seconds at a time and were refused only after the template rendered them,
    billed nothing (red team). Arguments that cannot fit are refused before anything is parsed; the rest are parsed
    on a worker thread once the chat is long."""
    import asyncio

    import gateway.prompts
    import gateway.tools

    parsed_on_loop: list[bool] = []
    parse = gateway.tools._parsed

    def spy(text: str):
        try:
            asyncio.get_running_loop()
            parsed_on_loop.append(True)
        except RuntimeError:
            parsed_on_loop.append(False)
        return parse(text)

    monkeypatch.setattr(gateway.tools, "_parsed", spy)
    huge = "[" + "[[[[]]]]," * 100_000 + "[]]"
    r = post(served, "/tokenize", {"model": TINY, "messages": _with_call_arguments(huge)})
    assert "at least" in error(r, 400, "messages")  # check_length's: a count by characters, before parsing
    assert parsed_on_loop == []  # refused by its size, unparsed
    monkeypatch.setattr(gateway.prompts, "INLINE_TOKENIZE_CHARS", 100)  # a chat past it is read in a worker thread
    long = json.dumps({"q": "x" * 150})
    r = post(served, "/tokenize", {"model": TINY, "messages": _with_call_arguments(long)})
    assert r.status_code == 200 and parsed_on_loop == [False], r.text
