"""A small node process for gateway tests: it speaks the node API contract (node/api.py), heartbeats to a
gateway and, given a deployment, registers itself on chain like a real node. Its tokens are made up.

    python -m tests.utils.rogue_node --key node.key --port 9100 --gateway http://127.0.0.1:8000 \\
        --base-model 0x... [--deployment deployment.json] [--mode rogue|honest] [--tokens 2] [--delay 0]

--mode rogue: every request streams `--tokens` tokens, then a correctly signed receipt claiming
5,000,000 prompt and 5,000,000 completion tokens (the attack of a node that bills what it never served).
--mode honest: the receipt says what it streamed (for tests that kill it mid-stream). --ignore-abort: an
aborted request streams on, without delay, to its last token and a receipt for all of them (the attack of a
node that wants to be paid for tokens the client never got). --trust <gateway key hex>: generate, load and
abort calls must be signed by that gateway key for this node (node.request_auth), as a real node checks them;
otherwise they get 401/403 (every call is recorded in <key file>.calls, one line each). The key file is a
node identity (common.identity; password from LORAMESH_KEY_PASSWORD).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from common.identity import load_identity
from common.wire import error_body, sse_frame
from node.heartbeat import HeartbeatSender
from node.receipts import make_receipt, sign_receipt
from node.request_auth import RequestAuthError, verify_request

ROGUE_CLAIM = 5_000_000
log = logging.getLogger("rogue_node")


def register(identity, deployment: Path, api_url: str, base_model: str) -> None:
    """On chain, as `loramesh node run` does (the operator is the identity's own EVM account)."""
    from ledger.chain import ChainClient
    from node.registration import ensure_registered

    client = ChainClient.from_deployment(deployment, account=identity.account)
    kw = dict(peer_id="12D3KooWrogue", multiaddrs=["/ip4/127.0.0.1/tcp/1"], api_url=api_url, base_model=base_model)
    if "node_key" in inspect.signature(ensure_registered).parameters:  # registration proves the node key
        ensure_registered(client, identity.node_key, **kw)
    else:
        ensure_registered(client, node_id=identity.node_id, **kw)


def make_app(identity, args) -> FastAPI:
    receipts: dict[str, dict] = {}
    running: dict[str, dict] = {}  # request id -> {"produced", "prompt", "started", "adapter", "aborted"}
    api_url = f"http://127.0.0.1:{args.port}"

    def status() -> dict:
        return {
            "node_id": identity.node_id,
            "public_key": identity.node_public_key.hex(),
            "base_model": {"name": "tiny", "id": args.base_model},
            "resident_adapters": [],
            "free_slots": 4,
            "num_slots": 4,
            "queue_depth": 0,
            "running": len(running),
            "tokens_per_s": 0.0,
            "device": "cpu",
        }

    def signed(rid: str, reason: str) -> dict:
        st = running.get(rid) or {}
        claim = args.mode == "rogue"
        r = make_receipt(
            request_id=rid,
            adapter_id=st.get("adapter"),
            node_id=identity.node_id,
            prompt_tokens=ROGUE_CLAIM if claim else st.get("prompt", 0),
            completion_tokens=ROGUE_CLAIM if claim else st.get("produced", 0),
            finish_reason=reason,
            started_at=st.get("started", 0),
            finished_at=int(time.time() * 1000),
        )
        out = receipts[rid] = {"receipt": r, "signature": sign_receipt(r, identity.node_key)}
        return out

    @asynccontextmanager
    async def lifespan(app):
        if args.deployment:
            await asyncio.to_thread(register, identity, Path(args.deployment), api_url, args.base_model)
        sender = HeartbeatSender(
            identity,
            [args.gateway],
            api_url=api_url,
            base_model_id=args.base_model,
            status_fn=status,
            interval=args.heartbeat_s,
        ).start()
        try:
            yield
        finally:
            await sender.stop()

    app = FastAPI(lifespan=lifespan)

    @app.middleware("http")
    async def signed_calls(request: Request, call_next):
        if request.method != "POST" or not args.trust:
            return await call_next(request)
        body = await request.body()
        try:
            who = verify_request(
                request.headers,
                method="POST",
                path=request.url.path,
                node_id=identity.node_id,
                body=body,
                trusted={args.trust},
            )
        except RequestAuthError as e:
            who = f"refused {e.status}"
            answer = JSONResponse(error_body(e.message, type="authentication_error", code=e.code), e.status)
        else:
            answer = None
        with open(args.key + ".calls", "a") as f:
            f.write(f"{request.url.path} {who}\n")
        return answer or await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/status")
    async def get_status():
        return status()

    @app.post("/v1/requests/{rid}/abort")
    async def abort(rid: str):
        if rid in running:
            running[rid]["aborted"] = True
            return signed(rid, "abort")
        if rid in receipts:
            return receipts[rid]
        return JSONResponse(error_body("unknown", type="x", code="request_not_found"), 404)

    @app.get("/v1/requests/{rid}/receipt")
    async def receipt(rid: str):
        if rid in receipts:
            return receipts[rid] | {"public_key": identity.node_public_key.hex()}
        code = (409, "request_running") if rid in running else (404, "receipt_not_found")
        return JSONResponse(error_body("no receipt", type="x", code=code[1]), code[0])

    @app.post("/v1/generate")
    async def generate(request: Request):
        body = await request.json()
        rid = body["request_id"]
        prompt = len(body.get("prompt_token_ids") or []) or len((body.get("prompt") or "").split())
        st = running[rid] = {
            "produced": 0,
            "prompt": prompt,
            "started": int(time.time() * 1000),
            "adapter": body.get("adapter_id"),
            "aborted": False,
        }
        limit = min(int(body.get("max_tokens", 16)), args.tokens)

        async def events():
            try:
                for i in range(limit):
                    if args.delay and not (st["aborted"] and args.ignore_abort):
                        await asyncio.sleep(args.delay)
                    if st["aborted"] and not args.ignore_abort:
                        yield sse_frame({"type": "done", "finish_reason": "abort", **receipts[rid]})
                        return
                    st["produced"] += 1
                    yield sse_frame({"type": "token", "text": f" w{i}", "token_id": 100 + i})
                reason = "length" if limit == int(body.get("max_tokens", 16)) else "stop"
                s = signed(rid, reason)
                r = s["receipt"]
                usage = {
                    "prompt_tokens": r["prompt_tokens"],
                    "completion_tokens": r["completion_tokens"],
                    "total_tokens": r["prompt_tokens"] + r["completion_tokens"],
                    # a rogue claims more cached prompt tokens than the prompt has (an honest node: at most it)
                    "prompt_tokens_details": {"cached_tokens": r["prompt_tokens"] + 10**9},
                }  # the claim, as the node API
                if args.mode == "rogue":  # and that it wrote more than the prompt (an honest node of before: no word)
                    usage["prompt_tokens_details"]["cache_write_tokens"] = 10**9
                yield sse_frame({"type": "done", "finish_reason": reason, "usage": usage, **s})
            finally:
                if rid not in receipts:  # the gateway went away mid-stream: keep a receipt of what was sent
                    signed(rid, "abort")
                running.pop(rid, None)

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--key", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--gateway", required=True)
    p.add_argument("--base-model", required=True)
    p.add_argument("--deployment")
    p.add_argument("--mode", choices=("rogue", "honest"), default="rogue")
    p.add_argument("--tokens", type=int, default=2)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--heartbeat-s", type=float, default=0.5)
    p.add_argument("--ignore-abort", action="store_true")
    p.add_argument("--trust", default="", help="gateway key (hex) whose signed calls are accepted")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import os

    import uvicorn

    identity = load_identity(args.key, os.environ.get("LORAMESH_KEY_PASSWORD"))
    uvicorn.run(make_app(identity, args), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
