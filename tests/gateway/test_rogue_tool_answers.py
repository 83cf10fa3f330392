"""A rogue node's tool-call answer, end to end: the complexity red team's attack on the gateway's `<tool_call>`
parser (gateway/tools.py), through a real gateway (uvicorn on 127.0.0.1) in front of a scripted node, read by the
official openai client as a streamed chat request with tools (the parts: tests/utils/rogue_tools.py).

The attack: an answer of 1.2 MB that opens a JSON string in its first `<tool_call>` block, then writes 52,000
`</tool_call><tool_call>` tags (the first block stays undecided to the answer's end, then every tag is decided at
once), or a call and then 40,000 short `<tool_call>{"name"</tool_call>` blocks (each decided as it comes, none a
call). Before the fix the gateway cut each block from the text it held (a copy of the rest of the answer per block)
and sent a chunk per block: 10 to 13 times the answer's bytes in SSE (52,177 chunks for 1,200 token events), 17 to 26
times as long as relaying a plain answer of that size, and /health held 3 to 4 s by the string opened in the first
block.

What holds, each bound counted from the answer (no clock is read):
1. the SSE bytes the client receives: twice the answer (JSON-escaped), and a chunk's envelope for each chunk 2 allows;
2. the chunks: one per token event of the node that brings text, the calls', and the stream's own: text side by side
   goes out as one delta (past MAX_BLOCKS blocks the rest is text), not a chunk a block;
3. the usage: the client's, the usage row's and the node's receipt agree (not disputed), on the tokens the node sent.
And nothing is lost or doubled: the client gets the call, and the rest of the answer as content, exactly.
What the answers cost the gateway's event loop against a plain answer of the same size is measured by
bench/tool_answers.py; that the parser reads and copies each answer once is counted in tests/gateway/test_tool_plan.py.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from common.wire import TOOL_CALL_OPEN
from gateway.tables import RequestStatus
from ledger.models import RecordStatus
from tests.gateway import TINY
from tests.utils.gateway import poll, record_of
from tests.utils.rogue_tools import (
    ANSWERS,
    CALL,
    LONG_ENTRY,
    WEATHER,
    make_long_base,
    relay,
    served_scripted,
    token_events,
)

pytestmark = pytest.mark.integration

# A chunk's envelope around its delta (id, object, created, model, choices, index...): well under this.
CHUNK_ENVELOPE = 512


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_base):
    """(gateway, its database engine, an API key, the scripted node, the gateway's service)."""
    long_base = make_long_base(tiny_base, tmp_path_factory.mktemp("long") / "base")
    with served_scripted(long_base, tmp_path_factory.mktemp("gw")) as got:
        yield got


@pytest.fixture(scope="module")
def world(served):
    return served[:4]


@pytest.mark.parametrize("name", ["open-string", "short-blocks"])
def test_a_hostile_tool_answer_costs_what_relaying_its_text_costs(world, name):
    gw, engine, key, node = world
    answer, n_calls = ANSWERS[name]
    events = token_events(answer)
    got = relay(gw.url, key, node, name)
    print(
        f"{name}: answer {len(answer.encode())} B in {events} tokens -> {got.sse_bytes} B of SSE, {got.chunks} chunks"
    )
    # nothing lost or doubled: the answer is its calls and the rest as content
    if n_calls:
        assert got.calls == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
        assert got.content == answer[len(CALL) :]
    else:
        assert not got.calls and got.content == answer

    # (2) a chunk per token event that brings text, one more for the stream's close, a call's own and the text after
    # it, and the stream's role, finish and usage chunks: not one per block
    chunk_bound = events + 1 + 2 * n_calls + 3
    assert got.chunks <= chunk_bound, f"{got.chunks} chunks for {events} token events"
    # (1) the bytes: the answer JSON-escaped (twice its size at most) and, per chunk allowed, its envelope
    byte_bound = 2 * len(answer.encode()) + CHUNK_ENVELOPE * chunk_bound
    assert got.sse_bytes <= byte_bound, f"{got.sse_bytes} B of SSE for {len(answer.encode())} B of answer"

    # (3) billed as the gateway counted it: the client's usage, the row's, and the node's receipt say the same
    done, u = record_of(engine, got.rid)
    assert done.status == RequestStatus.OK and u.status != RecordStatus.DISPUTED, (done.error, u.error)
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (u.prompt_tokens, u.completion_tokens)
    assert (u.node_prompt_tokens, u.node_completion_tokens) == (u.prompt_tokens, u.completion_tokens)
    assert u.completion_tokens == events


HELD = TOOL_CALL_OPEN + '{"name": "get_weather", "arguments": {"city": "' + "Paris " * 300


def stream_chat(gw, secret: str, body: dict, got: dict) -> None:
    """A streamed chat read until its end, or until nothing came for 2 s (the client leaves): its request id, the
    text it received as content and, with logprobs, the positions it received (each with its token's text)."""
    try:
        with httpx.stream(
            "POST",
            gw.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {secret}"},
            json=body,
            timeout=httpx.Timeout(30, read=2),
        ) as r:
            got["rid"] = r.headers["x-request-id"]
            for line in r.iter_lines():
                for c in json.loads(line[6:]).get("choices", ()) if line.startswith("data: {") else ():
                    got["content"] += c["delta"].get("content") or ""
                    got["logprobs"] += len((c.get("logprobs") or {}).get("content") or ())
    except httpx.ReadTimeout:
        pass  # the client gives up waiting


@pytest.mark.parametrize("case", ["text", "held for a call", "held, logprobs shown"])
def test_a_streaming_client_that_leaves_pays_none_of_the_text_held_back_for_a_call(world, case):
    """A node opened a `<tool_call>` block and sent nothing more: the gateway holds the block's text back (it may
    yet be a call) until it is decided, and the client, having read nothing, leaves at its timeout. Its tokens were
    relayed to the gateway's answer, never to the client: they were billed (red team: 173 tokens settled, none
    delivered). The same text without tools reaches the client, and is billed; so does the held text's logprobs
    entries (each token's text), which go out as they come (re-attack: read so, 153 tokens were free)."""
    gw, engine, key, node = world
    node.answer, node.hold = HELD, True
    events = token_events(HELD)
    body = {"model": TINY, "messages": [{"role": "user", "content": "Weather?"}], "max_tokens": 64, "stream": True}
    body |= {"tools": [WEATHER]} if case != "text" else {}
    body |= {"logprobs": True} if case == "held, logprobs shown" else {}
    got = {"content": "", "logprobs": 0, "rid": None}
    try:
        stream_chat(gw, key, body, got)
    finally:
        node.answer, node.hold = "", False
    done, u = record_of(engine, got["rid"])
    assert done.status == RequestStatus.CLIENT_CLOSED and u.status != RecordStatus.DISPUTED, (done.error, u.error)
    assert u.node_completion_tokens == events
    assert got["content"] == (HELD if case == "text" else "")
    assert got["logprobs"] == (events if case == "held, logprobs shown" else 0)
    assert (u.completion_tokens, done.completion_tokens) == ((0, 0) if case == "held for a call" else (events, events))


def test_a_revoked_keys_stream_is_billed_the_held_text_it_is_then_sent(served):
    """A key revoked while its stream holds a tool call's text back: the stream ends at the node's next token, the
    held text sent to the client before the error, and billed (re-attack: counted as never sent, it was free)."""
    from gateway.keys import create_key, revoke_key

    gw, engine, _, node, service = served
    secret, info = create_key(engine, name="revoked mid-call")
    node.answer, node.hold = HELD, True
    node.release.clear()
    body = {"model": TINY, "messages": [{"role": "user", "content": "Weather?"}], "max_tokens": 64, "stream": True}
    got = {"content": "", "logprobs": 0, "rid": None}
    client = threading.Thread(target=stream_chat, args=(gw, secret, body | {"tools": [WEATHER]}, got), daemon=True)
    client.start()
    try:
        poll(lambda: got["rid"], timeout=30)  # the stream is open: the node sent what it holds
        revoke_key(engine, info.id)
        service.admission.refresh_revoked(3600)
        assert info.id in service.admission.revoked
        node.release.set()  # the node's next token: the gateway ends the stream there
        client.join(30)
    finally:
        node.answer, node.hold = "", False
        node.release.set()
    events = token_events(HELD)
    done, u = record_of(engine, got["rid"])
    assert got["content"] == HELD and u.status != RecordStatus.DISPUTED, u.error
    assert (u.completion_tokens, done.completion_tokens) == (events, events)


def test_a_lorax_streams_last_token_held_for_a_finish_that_never_comes_is_not_billed(world):
    """A LoRAX stream's last token (its max_new_tokens-th) goes out with the finish, as LoRAX's last frame: a node
    that sends it and then nothing, until the client leaves, had it billed, never sent (red team: 4 billed, 3
    received)."""
    gw, engine, key, node = world
    node.answer, node.hold = "x" * (3 * LONG_ENTRY), True
    node.release.clear()  # nothing more comes
    frames, rid = 0, None
    try:
        with httpx.stream(
            "POST",
            gw.url + "/generate_stream",
            headers={"Authorization": f"Bearer {key}"},
            json={"inputs": "Weather?", "parameters": {"max_new_tokens": 3}},
            timeout=httpx.Timeout(30, read=2),
        ) as r:
            rid = r.headers["x-request-id"]
            for line in r.iter_lines():
                frames += line.startswith("data:")
    except httpx.ReadTimeout:
        pass  # the client gives up waiting
    finally:
        node.answer, node.hold = "", False
    done, u = record_of(engine, rid)
    assert done.status == RequestStatus.CLIENT_CLOSED and u.status != RecordStatus.DISPUTED, (done.error, u.error)
    assert (frames, u.node_completion_tokens) == (2, 3)
    assert (u.completion_tokens, done.completion_tokens) == (2, 2)
