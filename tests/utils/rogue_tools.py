"""A rogue node's tool-call answers, shared by their end-to-end test (tests/gateway/test_rogue_tool_answers.py) and
their bench (bench/tool_answers.py): a scripted node sending any answer in long token events, a tiny base with a
vocabulary entry that long, and a streamed chat with tools read by the official openai client."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import openai
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from common.identity import Identity
from common.wire import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, sse_frame
from node.adapters.basemodel import base_model_id
from tests.gateway import TINY
from tests.utils.gateway import StandInNode, served_gateway

# The copied base's longest vocabulary entry: a node may send this many characters a token (the gateway's bound is
# the base's longest entry, over a sequence), so the answer comes in 1,200 token events and what is measured is the
# gateway's reading of tool calls, not its relay of each token (the old copies grew with the square of the answer's
# size: at 1.2 MB they stand far above the relay's cost, and above its noise).
LONG_ENTRY = 1000
ANSWER_CHARS = 1_200_000
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


def token_events(answer: str) -> int:
    """How many token events the scripted node sends `answer` in."""
    return -(-len(answer) // LONG_ENTRY)


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


def make_long_base(tiny_base: Path, dest: Path) -> Path:
    """A copy of the tiny base at `dest` with a context of 4,096 positions and a vocabulary entry of LONG_ENTRY
    characters."""
    from transformers import AutoTokenizer

    shutil.copytree(tiny_base, dest)
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 4096}))
    tok = AutoTokenizer.from_pretrained(str(dest))
    tok.add_tokens(["=" * LONG_ENTRY])
    tok.save_pretrained(str(dest))
    return dest


@contextmanager
def served_scripted(long_base: Path, tmp: Path):
    """A real gateway in front of a ScriptedNode of `long_base`: (gateway, its database engine, an API key, the
    scripted node, the gateway's service)."""
    from transformers import AutoTokenizer

    node = ScriptedNode(
        Identity.generate(), base_model_id(long_base), tokenizer=AutoTokenizer.from_pretrained(str(long_base))
    )
    with served_gateway(node, tmp, long_base, heartbeat_ttl_s=600) as (gw, engine, key, _, service):
        yield gw, engine, key, node, service


@dataclass
class Relayed:
    """What the client got of one streamed chat answer, and what it took."""

    content: str
    calls: list[dict]
    chunks: int
    sse_bytes: int  # the response body as it came over the wire
    seconds: float  # from the request sent to the stream read to its end
    usage: object
    rid: str


def relay(gw_url: str, key: str, node: ScriptedNode, name: str) -> Relayed:
    """ANSWERS[name], sent by `node`, asked for through the gateway as a streamed chat with tools and read to its
    end."""
    node.answer = ANSWERS[name][0]
    client = openai.OpenAI(base_url=gw_url + "/v1", api_key=key, max_retries=0, timeout=120)
    content, calls, chunks, usage = [], {}, 0, None
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
    return Relayed(
        content="".join(content),
        calls=[calls[i] for i in sorted(calls)],
        chunks=chunks,
        sse_bytes=raw.http_response.num_bytes_downloaded,
        seconds=time.perf_counter() - t0,
        usage=usage,
        rid=raw.headers["x-request-id"],
    )
