"""A rogue node's tool-call answer, end to end: the complexity red team's attack on the gateway's `<tool_call>`
parser (gateway/tools.py), through a real gateway (uvicorn on 127.0.0.1) in front of a scripted node, read by the
official openai client as a streamed chat request with tools.

The attack: an answer of 1.2 MB that opens a JSON string in its first `<tool_call>` block, then writes 52,000
`</tool_call><tool_call>` tags (the first block stays undecided to the answer's end, then every tag is decided at
once), or a call and then 40,000 short `<tool_call>{"name"</tool_call>` blocks (each decided as it comes, none a
call). Before the fix the gateway cut each block from the text it held (a copy of the rest of the answer per block)
and sent a chunk per block: 10 to 13 times the answer's bytes in SSE (52,177 chunks for 1,200 token events), 17 to 26
times as long as relaying a plain answer of that size, and /health held 3 to 4 s by the string opened in the first
block.

What holds, each bound against something of the same test (no timing constants):
1. the SSE bytes the client receives: twice the answer (JSON-escaped), and a chunk's envelope for each chunk 2 allows;
2. the chunks: one per token event of the node that brings text, the calls', and the stream's own: text side by side
   goes out as one delta (past MAX_BLOCKS blocks the rest is text), not a chunk a block;
3. the event loop: /health, probed all through the hostile stream, never waits longer than the gateway takes to relay a
   plain answer of the same size in as many token events, and the hostile answer takes at most 5 times that one;
4. the usage: the client's, the usage row's and the node's receipt agree (not disputed), on the tokens the node sent.
And nothing is lost or doubled: the client gets the call, and the rest of the answer as content, exactly.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from dataclasses import dataclass, field

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from common.identity import Identity
from common.wire import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, sse_frame
from gateway.tables import RequestStatus
from ledger.models import RecordStatus
from node.adapters.basemodel import base_model_id
from tests.gateway import TINY
from tests.utils.gateway import StandInNode, poll, record_of, served_gateway

pytestmark = pytest.mark.integration

# The copied base's longest vocabulary entry: a node may send this many characters a token (the gateway's bound is
# the base's longest entry, over a sequence), so the answer comes in 1,200 token events and what is measured is the
# gateway's reading of tool calls, not its relay of each token (the old copies grew with the square of the answer's
# size: at 1.2 MB they stand far above the relay's cost, and above its noise).
LONG_ENTRY = 1000
ANSWER_CHARS = 1_200_000
# A chunk's envelope around its delta (id, object, created, model, choices, index...): well under this.
CHUNK_ENVELOPE = 512
ARGS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": ARGS}}
CALL = TOOL_CALL_OPEN + '{"name": "get_weather", "arguments": {"city": "Paris"}}' + TOOL_CALL_CLOSE


def repeated(head: str, unit: str) -> str:
    return head + unit * ((ANSWER_CHARS - len(head)) // len(unit))


# the answers: name -> (text, the calls in it)
ANSWERS = {
    # plain text of the same size: the baseline of relaying this many bytes
    "benign": (repeated("", "the rain in Spain "), 0),
    # a string opened in the first block: every tag is inside it until the answer ends, then all are decided at once
    "open-string": (repeated(TOOL_CALL_OPEN + '{"name": "', TOOL_CALL_CLOSE + TOOL_CALL_OPEN), 0),
    # a call, then short blocks, each decided as it comes and none a call
    "short-blocks": (repeated(CALL, TOOL_CALL_OPEN + '{"name"' + TOOL_CALL_CLOSE), 1),
}


@dataclass
class ScriptedNode(StandInNode):
    """The stand-in node (tests/utils/gateway.py), whose answer to every generate is `answer`, LONG_ENTRY characters
    a token event, in one write, each with a log-probability; its receipt and usage count the tokens it sent. With
    `hold`, it then sends nothing more until the request is aborted, and ends it so, or until `release` is set, and
    sends one more token (at most 60 s)."""

    answer: str = ""
    hold: bool = False
    release: threading.Event = field(default_factory=threading.Event)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/generate")
        async def generate(request: Request):
            body = await request.json()
            rid = body["request_id"]
            pieces = [self.answer[i : i + LONG_ENTRY] for i in range(0, len(self.answer), LONG_ENTRY)]
            n_prompt = len(body.get("prompt_token_ids") or [])
            self.seen[rid] = [len(pieces), n_prompt, int(time.time() * 1000), body.get("adapter_id")]
            # id 10 decodes to one character: the text is never shorter than the ids say (no dispute for that)
            token = {"type": "token", "token_id": 10, "logprob": -0.5, "top_logprobs": []}
            frames = [sse_frame(token | {"text": p}) for p in pieces]
            hold = self.hold

            async def events():
                yield b"".join(frames)
                reason = "stop"
                for _ in range(600 if hold else 0):
                    if rid in self.aborted:
                        reason = "abort"
                        break
                    if self.release.is_set():
                        self.seen[rid][0] += 1
                        yield sse_frame(token | {"text": "."})
                        break
                    await asyncio.sleep(0.1)
                usage = {"prompt_tokens": n_prompt, "completion_tokens": self.seen[rid][0]}
                yield sse_frame({"type": "done", "finish_reason": reason, "usage": usage, **self.receipt(rid, reason)})

            return StreamingResponse(events(), media_type="text/event-stream")

        app.mount("/", super().app())  # status, receipts, abort: the stand-in's own
        return app


@pytest.fixture(scope="module")
def long_base(tmp_path_factory, tiny_base):
    """The tiny base with a context of 4,096 positions and a vocabulary entry of LONG_ENTRY characters (its own
    folder: the session's tiny base is shared)."""
    from transformers import AutoTokenizer

    base = tmp_path_factory.mktemp("long") / "base"
    shutil.copytree(tiny_base, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 4096}))
    tok = AutoTokenizer.from_pretrained(str(base))
    tok.add_tokens(["=" * LONG_ENTRY])
    tok.save_pretrained(str(base))
    return base


@pytest.fixture(scope="module")
def served(tmp_path_factory, long_base):
    """(gateway, its database engine, an API key, the scripted node, the gateway's service)."""
    from transformers import AutoTokenizer

    node = ScriptedNode(
        Identity.generate(), base_model_id(long_base), tokenizer=AutoTokenizer.from_pretrained(str(long_base))
    )
    with served_gateway(node, tmp_path_factory.mktemp("gw"), long_base, heartbeat_ttl_s=600) as got:
        gw, engine, key, _, service = got
        yield gw, engine, key, node, service


@pytest.fixture(scope="module")
def world(served):
    return served[:4]


class Probe:
    """GET /health over and over on a thread of its own, while a request runs: when each was sent and answered."""

    def __init__(self, url: str) -> None:
        self.url = url + "/health"
        self.answers: list[tuple[float, float, int]] = []  # (sent, answered, status), time.perf_counter()
        self._stop, self._ready = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=120) as http:
            while not self._stop.is_set():
                sent = time.perf_counter()
                status = http.get(self.url).status_code
                self.answers.append((sent, time.perf_counter(), status))
                self._ready.set()

    def __enter__(self) -> Probe:
        self._thread.start()
        assert self._ready.wait(30), "no /health answered before the request"  # probing before the request is sent
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(120)

    def during(self, start: float, end: float) -> list[float]:
        """The latency of each /health in flight at some time between start and end (each answered 200)."""
        assert all(status == 200 for _, _, status in self.answers)
        return [answered - sent for sent, answered, _ in self.answers if answered >= start and sent <= end]


@dataclass
class Relayed:
    """What the client got of one streamed chat answer, and what it took."""

    content: str
    calls: list[dict]
    chunks: int
    sse_bytes: int  # the response body as it came over the wire
    seconds: float  # from the request sent to the stream read to its end
    health: list[float]  # the latency of each /health in flight meanwhile
    usage: object
    rid: str


def relay(world, name: str) -> Relayed:
    """`name`'s answer, asked for as a streamed chat with tools and read to its end, /health probed meanwhile."""
    gw, engine, key, node = world
    node.answer = ANSWERS[name][0]
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=120)
    content, calls, chunks, usage = [], {}, 0, None
    with Probe(gw.url) as probe:
        t0 = time.perf_counter()
        raw = client.chat.completions.with_raw_response.create(
            model=TINY,
            messages=[{"role": "user", "content": "Weather?"}],
            tools=[WEATHER],
            max_tokens=2048,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in raw.parse():
            chunks += 1
            usage = chunk.usage or usage
            for c in chunk.choices:
                content.append(c.delta.content or "")
                for tc in c.delta.tool_calls or ():
                    call = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                    call["name"] += tc.function.name or ""
                    call["arguments"] += tc.function.arguments or ""
        t1 = time.perf_counter()
    return Relayed(
        content="".join(content),
        calls=[calls[i] for i in sorted(calls)],
        chunks=chunks,
        sse_bytes=raw.http_response.num_bytes_downloaded,
        seconds=t1 - t0,
        health=probe.during(t0, t1),
        usage=usage,
        rid=raw.headers["x-request-id"],
    )


@pytest.fixture(scope="module")
def benign(world) -> Relayed:
    """The baseline: a plain answer of the same size, in as many token events, relayed by the same gateway (the
    slower of two, after one that warms the gateway up: its tokenizer's first use, the first connections)."""
    relay(world, "benign")
    runs = [relay(world, "benign") for _ in range(2)]
    for r in runs:  # all text, relayed as the node sent it
        assert r.content == ANSWERS["benign"][0] and not r.calls
    return max(runs, key=lambda r: r.seconds)


@pytest.mark.parametrize("name", ["open-string", "short-blocks"])
def test_a_hostile_tool_answer_costs_what_relaying_its_text_costs(world, benign, name):
    gw, engine, key, node = world
    answer, n_calls = ANSWERS[name]
    events = -(-len(answer) // LONG_ENTRY)  # the node's token events
    got = relay(world, name)
    print(
        f"{name}: answer {len(answer.encode())} B in {events} tokens -> {got.sse_bytes} B of SSE, {got.chunks} chunks, "
        f"{got.seconds:.3f} s, /health at most {max(got.health, default=-1):.4f} s ({len(got.health)} probes); "
        f"benign: {benign.sse_bytes} B, {benign.chunks} chunks, {benign.seconds:.3f} s, /health at most "
        f"{max(benign.health):.4f} s"
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

    # (3) the event loop: /health answered while the hostile stream was relayed, never waiting longer than the gateway
    # takes to relay a whole benign answer of the same size; and the hostile answer takes no more than a few times
    # that benign one (before the fix the string opened in the first block held the loop 3 to 4 s at the answer's
    # end, copying what was left of it once a block, while a benign answer took 0.5 s; both answers took 17 to 26
    # times as long as it)
    assert got.health, "no /health answered while the hostile answer was relayed"
    assert max(got.health) <= benign.seconds, f"/health waited {max(got.health):.3f} s"
    assert got.seconds <= 5 * benign.seconds, f"{got.seconds:.3f} s, a benign answer {benign.seconds:.3f} s"

    # (4) billed as the gateway counted it: the client's usage, the row's, and the node's receipt say the same
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
    events = -(-len(HELD) // LONG_ENTRY)
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
    events = -(-len(HELD) // LONG_ENTRY)
    done, u = record_of(engine, got["rid"])
    assert got["content"] == HELD and u.status != RecordStatus.DISPUTED, u.error
    assert (u.completion_tokens, done.completion_tokens) == (events, events)
