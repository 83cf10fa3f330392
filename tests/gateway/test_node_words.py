"""A node is a stranger: its words (an error's text, a duplicate key in an event, a status line, its registered URL)
never reach a client's error as the gateway's. A node's reason for refusing a request is shown quoted as its own,
without links; the rest goes to the gateway's log, one line per entry (found by a review).

A stand-in node (tests/utils/gateway.py) with a /v1/generate of its own in front, steered by the prompt."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import httpx
import pytest
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from common.identity import Identity
from common.wire import error_body, sse_frame
from gateway.node_client import NodeClient, NodeUnavailable
from node.adapters.basemodel import base_model_id
from node.heartbeat import make_heartbeat
from tests.gateway import TINY
from tests.utils.gateway import StandInNode, error_of, gateway_over

pytestmark = pytest.mark.integration

PHISH = "Key leaked! rotate at https://evil.example/k"  # < 64 chars: fits a duplicate key's repr


class WordyNode(StandInNode):
    def app(self):
        app = super().app()

        @app.post("/v1/generate")
        async def generate(request: Request):
            body = await request.json()
            prompt = self.tokenizer.decode(body.get("prompt_token_ids") or [])
            rid = body["request_id"]
            self.seen[rid] = [0, len(body.get("prompt_token_ids") or []) or 1, int(time.time() * 1000), None]
            if "REJECT" in prompt:  # a 400 the gateway takes as the client's mistake
                return JSONResponse(error_body(PHISH, code="invalid_request"), 400)
            if "FIVEHUNDRED" in prompt:  # logged with %s: its newlines make log lines of their own
                return JSONResponse(error_body("boom\nCRITICAL gateway.keys: key 0 revoked by admin", code="x"), 500)
            if "GUIDED" in prompt:  # "an older node": its text goes into the 503 when no node serves it
                return JSONResponse(error_body("guided.type must be one of x. " + PHISH, code="x"), 400)

            async def events():
                if "AFTER" in prompt:
                    self.seen[rid][0] += 1
                    yield sse_frame({"type": "token", "text": " t0", "token_id": 10})
                if "BADINDEX" in prompt:  # a choice this request does not have, named by the node's words
                    yield sse_frame({"type": "token", "text": " t1", "token_id": 11, "index": PHISH})
                    return
                # a duplicate key: the parser's error quotes it (64 characters, repr)
                yield f'data: {{"type": "token", "{PHISH}": 1, "{PHISH}": 2}}\n\n'.encode()

            return StreamingResponse(events(), media_type="text/event-stream")

        app.router.routes.insert(0, app.router.routes.pop())  # before the stand-in's own /v1/generate
        return app


@pytest.fixture
def world(tmp_path, tiny_base, tokenizer):
    node = WordyNode(Identity.generate(), base_model_id(tiny_base), tokens=5, tokenizer=tokenizer)
    with gateway_over(node, tmp_path, tiny_base, heartbeat_ttl_s=600) as (gw, engine, key):
        yield gw, key, node


def _post(gw, key, prompt, stream=False):
    return httpx.post(
        gw.url + "/v1/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": TINY, "prompt": prompt, "max_tokens": 3, "stream": stream},
        timeout=30,
    )


@pytest.mark.parametrize("prompt", ["REJECT", "GUIDED", "DUPKEY", "BADINDEX"])
def test_a_nodes_words_do_not_reach_the_clients_error_before_the_first_token(world, prompt):
    gw, key, _ = world
    r = _post(gw, key, prompt)
    msg = error_of(r)["message"]
    assert "evil.example" not in msg
    if prompt == "REJECT":  # the client's mistake, as the node says: its reason, quoted as the node's
        assert r.status_code == 400 and msg == 'the node refused the request: "Key leaked! rotate at [link removed]"'


@pytest.mark.parametrize("prompt", ["DUPKEY AFTER", "BADINDEX AFTER"])
def test_a_nodes_words_do_not_reach_the_clients_error_after_the_first_token(world, prompt):
    gw, key, _ = world
    r = _post(gw, key, prompt, stream=True)
    assert " t0" in r.text
    assert "evil.example" not in r.text


def test_a_nodes_error_text_is_logged_on_one_line(world, caplog):
    gw, key, _ = world
    r = _post(gw, key, "FIVEHUNDRED")
    assert r.status_code == 503
    lines = [rec.getMessage() for rec in caplog.records if "answered 500" in rec.getMessage()]
    assert lines and all("\n" not in m for m in lines)


def _raw_server() -> int:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def serve():
        while True:
            c, _ = srv.accept()
            c.recv(65536)
            c.sendall(f"{PHISH}\r\n\r\n".encode())
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1]


def test_a_status_line_of_the_nodes_words_stays_out_of_the_error():
    port = _raw_server()

    async def go():
        nc = NodeClient(first_byte_timeout=5)
        try:
            await nc.open_stream(f"http://127.0.0.1:{port}", "0x" + "ab" * 20, {"request_id": "x", "max_tokens": 1})
        finally:
            await nc.aclose()

    with pytest.raises(NodeUnavailable) as ei:
        asyncio.run(go())
    assert "evil.example" not in str(ei.value)


def test_a_heartbeats_api_url_makes_no_log_line_of_its_own(world, caplog):
    """A node's signed heartbeat names an api_url (only its scheme is checked) other than its registered one: the
    gateway logs it, one line, a newline in it escaped (red team: it forged an entry of the log); and one line
    for many such heartbeats (red team: its operator wrote a warning as fast as it signed heartbeats)."""
    gw, _, node = world
    forged = "http://x\n2026-12-06 06:30:00 CRITICAL gateway.keys: key 1 revoked by the administrator"
    now_ms = int(time.time() * 1000)
    with caplog.at_level(logging.INFO):
        for i in range(5):
            doc = make_heartbeat(
                node.identity, api_url=forged, base_model_id=node.base_model_id, status=node.status(), ts_ms=now_ms + i
            )
            assert httpx.post(gw.url + "/internal/heartbeat", json=doc, timeout=10).status_code == 200
    lines = [rec.getMessage() for rec in caplog.records if "heartbeats api_url" in rec.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], lines


@pytest.mark.parametrize(
    "words,shown",
    [
        ("see https://evil.example/x now", '"see [link removed] now"'),
        ("x1.HTTP://evil", '"[link removed]"'),  # the run before the scheme goes with it
        ("go to www.evil.example", '"go to [link removed]"'),
        ("the field a.b.c is wrong", '"the field a.b.c is wrong"'),  # a dotted path is no link
    ],
)
def test_a_nodes_reason_is_shown_without_its_links(words, shown):
    from gateway.node_client import _quoted

    assert _quoted(words) == shown


def test_the_link_pattern_starts_once_per_run_of_a_schemes_letters():
    """Tried from every letter of a run with no "://" after it, the pattern cost time growing with the square of
    the run. Each match attempt is counted here by the positions the pattern may start at: one per run."""
    from gateway.node_client import _LINK

    run = "a" * 2_000
    starts = [i for i in range(len(run) + 1) if _LINK.match(run + "://x", i) is not None]
    assert starts == [0]
    assert _LINK.sub("", "word " * 400) == "word " * 400
