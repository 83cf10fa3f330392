"""Gateway test factories: registry mirror rows, and a stand-in node that speaks
the node API contract (for unit tests of the proxy only; integration tests use the real node)."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlmodel import Session, SQLModel, select

import gateway.tables  # noqa: F401 - registers the gateway's tables
from common.wire import error_body, sse_frame
from gateway.keys import create_key
from gateway.main import create_app
from gateway.request import ABORT_DRAIN_TIMEOUT_S
from gateway.settings import GatewaySettings
from gateway.tables import CompletionRecord
from ledger.db import init_db, make_engine
from ledger.models import AdapterMirror, NameMirror, NodeMirror, UsageRecord
from node.heartbeat import HeartbeatSender
from node.receipts import make_receipt, sign_receipt
from tests.utils.servers import ServerThread


def make_db(path: Path):
    """A SQLite database with the ledger's and the gateway's tables."""
    engine = make_engine(f"sqlite:///{path}")
    init_db(engine)
    SQLModel.metadata.create_all(engine)
    return engine


def add_node(
    engine, *, node_id: str, base_model: str, api_url: str, active: bool = True, operator: str = "0x" + "ab" * 20
) -> None:
    """A NodeMirror row, as the registry sync would write it."""
    with Session(engine) as s:
        s.merge(
            NodeMirror(
                node_id=node_id,
                operator=operator,
                active=active,
                base_model=base_model,
                peer_id="12D3KooWtest",
                api_url=api_url,
                multiaddrs_json="[]",
                registered_block=1,
                updated_block=1,
            )
        )
        s.commit()


def add_adapter(
    engine,
    *,
    adapter_id: str,
    name: str,
    base_model: str,
    block: int = 1,
    owner: str = "0x" + "cd" * 20,
    price: int = 0,
) -> None:
    """An AdapterMirror row published by `owner`, and the name's row (owned by its first publisher)."""
    with Session(engine) as s:
        s.merge(
            AdapterMirror(
                adapter_id=adapter_id,
                owner=owner,
                publisher=owner,
                name=name,
                version="1.0.0",
                predecessor="0x" + "00" * 32,
                base_model=base_model,
                price_per_1k_tokens=str(price),
                datasets_json="[]",
                registered_block=block,
                updated_block=block,
            )
        )
        if s.get(NameMirror, name) is None:
            s.add(NameMirror(name=name, owner=owner, registered_block=block, updated_block=block))
        s.commit()


@dataclass
class StandInNode:
    """Behaviour of the stand-in node: `tokens` per request, `delay` between them. Prompts steer it:
    'FAIL_EARLY' -> 500 before streaming, 'ENGINE_ERROR' -> error event before any token,
    'CUT_AFTER_2' -> the connection drops after two tokens, 'STOP_AT_3' -> finish_reason stop after 3,
    'TOO_LONG' -> 400 context_length_exceeded.
    Misbehaviour, honest or not: 'CUT_KEEP_GOING' -> the connection drops after two tokens while the node
    goes on to 10 (its abort receipt says 10); 'STALL_AFTER_ABORT' -> one token, then nothing for longer
    than the gateway's drain (6 tokens made, 5 of them never sent); 'BURST_AFTER_ABORT' -> one token, then,
    once aborted, every other token up to max_tokens and done (it ignores the abort); 'PINGS_AFTER_TOKEN' /
    'PINGS_AFTER_ERROR' -> one token / an error event, then events of an unknown type without end;
    'COMMENTS_ONLY' / 'COMMENTS_AFTER_TOKEN' -> nothing / one token, then SSE comment lines without end (each
    byte keeps the connection's read timeout from firing); 'DRIP_LINE' -> one data line that never ends, a
    byte every 0.1 s; 'FAT_TEXT' -> tokens each carrying 60,000
    characters of text; 'WILD_IDS' -> tokens with ids far outside any vocabulary, 20 alternatives each;
    'PAST_EOS' -> one token, the base's end-of-sequence token (or, when the request names stop_token_ids, its
    first one), then <pad> tokens (no text) up to max_tokens, and a receipt claiming them all; 'EMPTY_PAD' -> one
    token, then tokens whose text it sends empty though their ids decode to the base's longest text, up to
    max_tokens, and a receipt claiming them all; 'PAST_STOP' -> token 10 ("(" on the tiny base: ask with stop "(")
    with no text, then tokens with their text up to max_tokens, claimed (an honest node stops at the stop string);
    'OPERATOR_ABORT' -> token 10 with no text (held back by an honest node asked to stop at "(("), then the done
    event of a request its operator aborted; 'HUGE_LOGPROB' -> tokens as usual, the second with a logprob of
    10**400; 'GATE_AFTER_1' -> one token, then nothing until `gate` is set (at most 60 s), then the rest;
    'ENGINE_ERROR' (+ 'AFTER_1': after one token; + 'GUIDED': coded guided_failed, as a request's own grammar
    failing it; + 'THEN_CLOSE': the stream then ends with no done event); 'PADDED_HALF_CHAR' -> as an honest node
    of a base with padded rows sends ids 161 (the first byte of "€"), seven ids past the tokenizer (no text), then
    227 108 (the rest of "€") and "x": each token's text as the node's detokenizer gives it, with the request's
    stop strings."""

    identity: object
    base_model_id: str
    base_model_name: str = "tiny-test"
    tokens: int = 5
    delay: float = 0.0
    gate: threading.Event = field(default_factory=threading.Event)
    requests: list[dict] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    resident: list[str] = field(default_factory=list)
    queue_depth: int = 0
    fail_early: bool = False  # answer every generate with a 500
    reject_all: bool = False  # answer every generate with a 400 invalid_request (a node blaming every client)
    answer_status: int | None = None  # answer every generate with this status (503 slots_busy, 404, ...)
    first_event_after: float = 0.0  # headers at once, then nothing this long (a cold adapter being fetched)
    engine_error: bool = False  # every request as 'ENGINE_ERROR' asks
    seen: dict = field(default_factory=dict)  # request id -> [produced, prompt_tokens, started_ms, adapter]
    running: set = field(default_factory=set)  # request ids streaming now
    receipts: dict = field(default_factory=dict)  # request id -> its final signed receipt (GET .../receipt)
    tokenizer: object = None  # the base's tokenizer: prompts arrive as token ids
    ignore_max_tokens: bool = False  # stream `tokens` tokens whatever max_tokens says (a misbehaving node)
    features: list[str] | None = None  # its status's "features" (None: not listed, as an older release's)

    def receipt(self, rid: str, reason: str) -> dict:
        produced, prompt_tokens, started, adapter = self.seen[rid]
        r = make_receipt(
            request_id=rid,
            adapter_id=adapter,
            node_id=self.identity.node_id,
            prompt_tokens=prompt_tokens,
            completion_tokens=produced,
            finish_reason=reason,
            started_at=started,
            finished_at=int(time.time() * 1000),
        )
        out = self.receipts[rid] = {"receipt": r, "signature": sign_receipt(r, self.identity.node_key)}
        return out

    def status(self) -> dict:
        listed = {} if self.features is None else {"features": self.features}
        return listed | {
            "node_id": self.identity.node_id,
            "public_key": self.identity.node_public_key.hex(),
            "base_model": {"name": self.base_model_name, "id": self.base_model_id},
            "resident_adapters": [
                {"adapter_id": a, "name": "", "slot": i, "pinned": False} for i, a in enumerate(self.resident)
            ],
            "free_slots": 4 - len(self.resident),
            "num_slots": 4,
            "queue_depth": self.queue_depth,
            "running": len(self.running),
            "tokens_per_s": 0.0,
            "device": "cpu",
        }

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/status")
        async def status():
            return self.status()

        @app.post("/v1/adapters/{adapter_id}/load")
        async def load(adapter_id: str):
            self.loaded.append(adapter_id)
            if adapter_id not in self.resident:
                self.resident.append(adapter_id)
            return {"adapter_id": adapter_id, "slot": 0, "pinned": False}

        @app.post("/v1/requests/{rid}/abort")
        async def abort(rid: str):
            if rid not in self.seen:
                return JSONResponse(error_body("unknown", type="x", code="request_not_found"), 404)
            if rid not in self.running and rid in self.receipts:  # finished: its final receipt
                return self.receipts[rid]
            self.aborted.append(rid)
            return self.receipt(rid, "abort")

        @app.get("/v1/requests/{rid}/receipt")
        async def stored_receipt(rid: str):
            if rid in self.receipts:
                return self.receipts[rid] | {"public_key": self.identity.node_public_key.hex()}
            code = (409, "request_running") if rid in self.running else (404, "receipt_not_found")
            return JSONResponse(error_body("no receipt", type="x", code=code[1]), code[0])

        @app.post("/v1/generate")
        async def generate(request: Request):
            body = await request.json()
            self.requests.append(body)
            # the gateway sends token ids: decoded with the base's tokenizer, they steer the stand-in as text
            ids = body.get("prompt_token_ids") or []
            prompt = body.get("prompt") or (self.tokenizer.decode(ids) if self.tokenizer is not None else "")
            if self.fail_early or "FAIL_EARLY" in prompt:
                return JSONResponse(error_body("boom", type="server_error", code="x"), 500)
            if self.reject_all:
                return JSONResponse(error_body("your request is malformed", code="invalid_request"), 400)
            if self.answer_status is not None:
                return JSONResponse(error_body("not now", code="slots_busy"), self.answer_status)
            if "TOO_LONG" in prompt:
                return JSONResponse(
                    error_body("prompt is 900 tokens, the context holds 512", code="context_length_exceeded"), 400
                )
            rid = body["request_id"]
            n_prompt = len(body.get("prompt_token_ids") or prompt.split()) or 1
            self.seen[rid] = [0, n_prompt, int(time.time() * 1000), body.get("adapter_id")]
            limit = min(body["max_tokens"], 3 if "STOP_AT_3" in prompt else self.tokens)
            if self.ignore_max_tokens:
                limit = self.tokens

            async def events():
                self.running.add(rid)
                try:
                    async for ev in produce():
                        yield ev
                finally:
                    self.running.discard(rid)

            async def produce():
                if self.first_event_after:
                    await asyncio.sleep(self.first_event_after)
                if "DRIP_LINE" in prompt:  # one line that never ends, a byte at a time
                    yield b"data: {"
                    for _ in range(10**6):
                        yield b" "
                        await asyncio.sleep(0.1)
                    return
                if "COMMENTS_" in prompt:
                    if "AFTER_TOKEN" in prompt:
                        self.seen[rid][0] += 1
                        yield sse_frame({"type": "token", "text": " t0", "token_id": 10})
                    for _ in range(10**6):  # until the gateway hangs up
                        yield b": still here\n\n"
                        await asyncio.sleep(0.05)
                    return
                if "FAT_TEXT" in prompt or "WILD_IDS" in prompt:
                    for i in range(limit):
                        self.seen[rid][0] += 1
                        if "FAT_TEXT" in prompt:
                            yield sse_frame({"type": "token", "text": "A" * 60_000, "token_id": 10})
                        else:
                            wild = [[2**30 + i * 20 + j, -1.0] for j in range(20)]
                            tid = 2**30 + i
                            yield sse_frame({"type": "token", "text": " t", "token_id": tid, "top_logprobs": wild})
                    yield sse_frame({"type": "done", "finish_reason": "length", **self.receipt(rid, "length")})
                    return
                if "EMPTY_PAD" in prompt:  # invisible padding before the end: text the ids do not have
                    tok = self.tokenizer
                    pad = max(range(len(tok)), key=lambda i: len(tok.decode([i], skip_special_tokens=True)))
                    for i in range(body["max_tokens"]):
                        self.seen[rid][0] += 1
                        ev = (
                            {"type": "token", "text": " t0", "token_id": 10}
                            if i == 0
                            else {"text": "", "token_id": pad}
                        )
                        yield sse_frame({"type": "token"} | ev)
                    yield sse_frame({"type": "done", "finish_reason": "length", **self.receipt(rid, "length")})
                    return
                if "PAST_STOP" in prompt or "OPERATOR_ABORT" in prompt:
                    self.seen[rid][0] += 1
                    yield sse_frame({"type": "token", "text": "", "token_id": 10})
                    if "OPERATOR_ABORT" in prompt:
                        yield sse_frame({"type": "done", "finish_reason": "abort", **self.receipt(rid, "abort")})
                        return
                    for _ in range(1, body["max_tokens"]):
                        self.seen[rid][0] += 1
                        yield sse_frame({"type": "token", "text": self.tokenizer.decode([300]), "token_id": 300})
                    yield sse_frame({"type": "done", "finish_reason": "length", **self.receipt(rid, "length")})
                    return
                if "PADDED_HALF_CHAR" in prompt:
                    from node.adapters.detokenizer import TextStream

                    stream = TextStream(self.tokenizer, tuple(body.get("stop") or ()))
                    ids = (
                        [161]
                        + [len(self.tokenizer)] * 7
                        + [227, 108]
                        + self.tokenizer.encode("x", add_special_tokens=False)
                    )
                    reason = "length"
                    for tid in ids[: body["max_tokens"]]:
                        self.seen[rid][0] += 1
                        text, stopped = stream.push(tid)
                        yield sse_frame({"type": "token", "text": text, "token_id": tid})
                        if stopped:
                            reason = "stop"
                            break
                    else:
                        yield sse_frame({"type": "token", "text": stream.flush(), "token_id": 2})
                        self.seen[rid][0] += 1
                        reason = "stop"
                    yield sse_frame({"type": "done", "finish_reason": reason, **self.receipt(rid, reason)})
                    return
                if "PAST_EOS" in prompt:  # invisible padding after the sequence's end, claimed in the receipt
                    stops = body.get("stop_token_ids") or []
                    end = stops[0] if stops else (self.tokenizer.eos_token_id if self.tokenizer is not None else 2)
                    for i in range(body["max_tokens"]):
                        self.seen[rid][0] += 1
                        tid = 10 if i == 0 else end if i == 1 else 0  # <pad>: no text, truly
                        yield sse_frame({"type": "token", "text": " t0" if i == 0 else "", "token_id": tid})
                    yield sse_frame({"type": "done", "finish_reason": "length", **self.receipt(rid, "length")})
                    return
                if "PINGS_AFTER" in prompt:
                    if "TOKEN" in prompt:
                        self.seen[rid][0] += 1
                        yield sse_frame({"type": "token", "text": " t0", "token_id": 10})
                    else:
                        yield sse_frame({"type": "error", "message": "engine broke"})
                    for _ in range(10**6):  # until the gateway hangs up
                        yield sse_frame({"type": "ping"})
                        await asyncio.sleep(0.001)
                    return
                if "_AFTER_ABORT" in prompt:
                    self.seen[rid][0] += 1
                    yield sse_frame({"type": "token", "text": " t0", "token_id": 10})
                    if "STALL" in prompt:
                        self.seen[rid][0] = 6  # made, not sent yet: the abort's receipt counts them
                        await asyncio.sleep(ABORT_DRAIN_TIMEOUT_S + 2)
                        return
                    for _ in range(400):
                        if rid in self.aborted:
                            break
                        await asyncio.sleep(0.025)
                    burst = []  # one write: the gateway reads them all well within its drain
                    for i in range(1, body["max_tokens"]):
                        self.seen[rid][0] += 1
                        burst.append(sse_frame({"type": "token", "text": f" t{i}", "token_id": 10 + i}))
                    yield b"".join(burst) + sse_frame(
                        {"type": "done", "finish_reason": "abort", **self.receipt(rid, "abort")}
                    )
                    return
                if "ENGINE_ERROR" in prompt or self.engine_error:
                    if "AFTER_1" in prompt:  # one token relayed, then the engine's error
                        self.seen[rid][0] += 1
                        yield sse_frame({"type": "token", "text": " t0", "token_id": 10})
                    code = "guided_failed" if "GUIDED" in prompt else "engine_error"
                    yield sse_frame({"type": "error", "message": "engine broke", "code": code})
                    if "THEN_CLOSE" in prompt:  # no done event: the stream just ends
                        raise RuntimeError("node crashed after its error")
                    yield sse_frame({"type": "done", "finish_reason": "abort", **self.receipt(rid, "abort")})
                    return
                for i in range(limit):
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    if "GATE_AFTER_1" in prompt and i == 1:
                        for _ in range(1200):  # longer than the tests' 30 s read timeout
                            if self.gate.is_set():
                                break
                            await asyncio.sleep(0.05)
                    if rid in self.aborted:  # as the real node: an aborted request ends with its receipt
                        s = self.receipt(rid, "abort")
                        yield sse_frame({"type": "done", "finish_reason": "abort", **s})
                        return
                    if "CUT_KEEP_GOING" in prompt and i == 2:
                        self.seen[rid][0] += 8  # the node made 8 more before it noticed the broken stream
                        raise RuntimeError("connection dropped mid-stream")
                    if "CUT_AFTER_2" in prompt and i == 2:
                        raise RuntimeError("node crashed mid-stream")
                    self.seen[rid][0] += 1
                    ev = {"type": "token", "text": f" t{i}", "token_id": 10 + i}
                    if "HUGE_LOGPROB" in prompt:  # a JSON integer no float holds
                        ev["logprob"] = 10**400 if i == 1 else -0.5
                    yield sse_frame(ev)
                reason = "stop" if limit < min(body["max_tokens"], self.tokens) or limit == 3 else "length"
                s = self.receipt(rid, reason)
                usage = {"prompt_tokens": n_prompt, "completion_tokens": limit, "total_tokens": n_prompt + limit}
                yield sse_frame({"type": "done", "finish_reason": reason, "usage": usage, **s})

            return StreamingResponse(events(), media_type="text/event-stream")

        return app


def start_script_node(
    root: Path,
    name: str,
    gw_url: str,
    base: str,
    *,
    mode: str,
    chain=None,
    tokens: int = 2,
    delay: float = 0.0,
    port: int | None = None,
    password: str = "script",
    extra_args: tuple[str, ...] = (),
):
    """A tests/utils/rogue_node.py process with an identity of its own; (process, identity, url). With a
    chain (tests.utils.chain.ChainEnv) it is funded and registers itself there; without one, give the
    gateway a NodeMirror row for it (add_node) at the returned url."""
    import subprocess
    import sys

    from common.identity import create_identity
    from devnet.anvil import free_port

    key = root / f"{name}.key"
    identity = create_identity(key, password)
    if chain is not None:
        chain.client(chain.admin).fund([identity.address], 10**18)  # gas for its registration
    port = port or free_port()
    args = [
        sys.executable,
        "-m",
        "tests.utils.rogue_node",
        "--key",
        str(key),
        "--port",
        str(port),
        "--gateway",
        gw_url,
        "--base-model",
        base,
        "--mode",
        mode,
        "--tokens",
        str(tokens),
        "--delay",
        str(delay),
    ]
    if chain is not None:
        args += ["--deployment", str(chain.deployment_path)]
    args += list(extra_args)
    with (root / f"{name}.log").open("ab") as log:
        env = {"LORAMESH_KEY_PASSWORD": password, "PATH": "/usr/bin:/bin"}
        proc = subprocess.Popen(
            args,
            cwd=Path(__file__).resolve().parents[2],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    return proc, identity, f"http://127.0.0.1:{port}"


def poll(fn, timeout: float = 10.0, interval: float = 0.05):
    """Call fn until it returns something truthy; that value, or AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def record_of(engine, rid: str) -> tuple:
    """(completion record, usage record) of request `rid`, once its usage record is written (up to 20 s)."""

    def get():
        with Session(engine) as s:
            u = s.exec(select(UsageRecord).where(UsageRecord.request_id == rid)).first()
            return u and (s.get(CompletionRecord, rid), u)

    return poll(get, timeout=20)


def get_json(url: str, **kw) -> dict:
    return httpx.get(url, timeout=10, **kw).json()


def start_gateway_process(
    root: Path,
    db_url: str,
    *,
    bases: tuple[Path, ...] = (),
    port: int | None = None,
    env: dict[str, str] | None = None,
    name: str = "gateway",
    extra_args: tuple[str, ...] = (),
):
    """`loramesh gateway run` as a process of its own (a crash ends it, not the test); (process, url). The
    caller waits for it (process.wait_http(url + "/health")) and stops it."""
    from devnet.anvil import free_port
    from devnet.processes import ManagedProcess

    port = port or free_port()
    args = ["gateway", "run", "--db", db_url, "--port", str(port), "--no-settle", *extra_args]
    for b in bases:
        args += ["--base", str(b)]
    proc = ManagedProcess(name, args, root / f"{name}.log", env=env).start()
    return proc, f"http://127.0.0.1:{port}"


def error_of(r: httpx.Response) -> dict:
    """The OpenAI error object of a refused request (AssertionError when it is not one)."""
    assert r.headers.get("content-type", "").startswith("application/json"), (r.status_code, r.text[:200])
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), err
    return err


@contextmanager
def served_gateway(node: StandInNode, tmp_path: Path, tiny_base: Path, **settings):
    """A real gateway (database in tmp_path, serving tiny_base) in front of `node`, served and registered,
    which has heartbeated once: (gateway server, its database engine, an API key, the node's heartbeat sender, the
    gateway's service object). Both stop at the end."""
    engine = make_db(tmp_path / "gw.db")
    node_srv = ServerThread(node.app()).start()
    add_node(engine, node_id=node.identity.node_id, base_model=node.base_model_id, api_url=node_srv.url)
    key, _ = create_key(engine, name="app")
    db_url = f"sqlite:///{tmp_path / 'gw.db'}"
    app = create_app(GatewaySettings(db_url=db_url, bases=[tiny_base], **settings))
    gw = ServerThread(app).start()
    sender = HeartbeatSender(
        node.identity, [gw.url], api_url=node_srv.url, base_model_id=node.base_model_id, status_fn=node.status
    )
    try:
        assert asyncio.run(sender.send_once()) == {gw.url: 200}
        yield gw, engine, key, sender, app.state.gateway
    finally:
        gw.stop()  # again after a test's own stop is harmless
        node_srv.stop()
        engine.dispose()


@contextmanager
def gateway_over(node: StandInNode, tmp_path: Path, tiny_base: Path, **settings):
    """served_gateway's (gateway server, its database engine, an API key)."""
    with served_gateway(node, tmp_path, tiny_base, **settings) as (gw, engine, key, _, _):
        yield gw, engine, key
