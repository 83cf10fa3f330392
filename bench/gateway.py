"""Latency the gateway adds, and requests/s, direct-to-node versus through-the-gateway, streaming.

Starts anvil with the contracts, one real node daemon (tiny base, one adapter; it registers itself on
chain and heartbeats to the gateway) and one gateway, all as `python -m devnet ...` processes on
127.0.0.1, then measures in the same run:
  - sequential streamed requests, interleaved direct/gateway: time to first token and total, p50/p99;
  - --concurrency clients at once: requests/s both ways.

    python bench/gateway.py [--requests 40] [--max-tokens 8] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from common.identity import create_identity  # noqa: E402
from devnet.anvil import free_port  # noqa: E402
from devnet.processes import ManagedProcess, ProcessGroup  # noqa: E402
from gateway.identity import load_or_create_gateway_key  # noqa: E402
from gateway.keys import create_key  # noqa: E402
from node.operator_token import read_operator_token, token_path  # noqa: E402
from node.publish import publish  # noqa: E402
from node.request_auth import SignedNodeAuth  # noqa: E402
from tests.utils.chain import start_chain  # noqa: E402
from tests.utils.factories import make_base, make_package  # noqa: E402
from tests.utils.gateway import make_db  # noqa: E402

PASSWORD = "bench"
ETHER = 10**18
ENV = {"LORAMESH_KEY_PASSWORD": PASSWORD}


def _text(ev: dict) -> str | None:
    """The text one streamed event carries (None: it is not a token): a node's token event, or an OpenAI
    completion or chat chunk (its last, the finish reason alone, is not a token)."""
    if ev.get("type") == "token":
        return ev.get("text") or ""
    choices = ev.get("choices")
    if not choices:
        return None
    c = choices[0]
    text = c.get("text") or (c.get("delta") or {}).get("content") or ""
    return None if not text and c.get("finish_reason") is not None else text


async def one(
    client: httpx.AsyncClient, url: str, body: dict, headers: dict, auth: httpx.Auth | None = None
) -> tuple[float, float, int]:
    """(ttft, total) seconds and token events of one streamed request. TTFT is the time to the first text,
    on both paths: a node streams every token (a token that ends half a character, as the tiny base's first
    two do for this prompt, is an event with empty text), while the gateway's OpenAI stream sends no chunk
    for a token without text. Timing the node's first event against the gateway's first chunk
    would charge the gateway with the node's next two tokens."""
    if auth is not None:  # a node call: its own request id, so no two signed calls are the same (a replay)
        body = body | {"request_id": "0x" + secrets.token_hex(32)}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url, json=body, headers=headers, auth=auth) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code} {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            text = _text(json.loads(line[5:]))
            if text is None:
                continue
            if ttft is None and text:
                ttft = time.perf_counter() - t0
            tokens += 1
    return ttft or 0.0, time.perf_counter() - t0, tokens


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] * 1000


async def measure(args, node_url: str, gw_url: str, key: str, adapter_id: str, node_auth: httpx.Auth) -> None:
    # the direct path signs its calls as the gateway does (same key, so the node trusts them); the signature
    # is part of what a gateway adds
    direct = (
        node_url + "/v1/generate",
        {
            "adapter_id": adapter_id,
            "prompt": "The capital of France is",
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "stream": True,
        },
        {},
        node_auth,
    )
    via = (
        gw_url + "/v1/completions",
        {
            "model": "bench/adapter",
            "prompt": "The capital of France is",
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "stream": True,
        },
        {"Authorization": f"Bearer {key}"},
    )
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as c:
        for path in (direct, via):  # warm both paths (adapter load, connections)
            for _ in range(3):
                await one(c, *path)
        seq = {"direct": [], "gateway": []}
        for _ in range(args.requests):
            seq["direct"].append(await one(c, *direct))
            seq["gateway"].append(await one(c, *via))
        rps = {}
        for name, path in (("direct", direct), ("gateway", via)):
            n = args.requests * 2
            sem = asyncio.Semaphore(args.concurrency)

            async def go(path=path, sem=sem):
                async with sem:
                    return await one(c, *path)

            t0 = time.perf_counter()
            await asyncio.gather(*(go() for _ in range(n)))
            rps[name] = n / (time.perf_counter() - t0)
    rows = {}
    for name, res in seq.items():
        ttft, total = [r[0] for r in res], [r[1] for r in res]
        rows[name] = (pct(ttft, 50), pct(ttft, 99), pct(total, 50), pct(total, 99), rps[name])
    d, g = rows["direct"], rows["gateway"]
    print(
        f"\nstreamed completions, {args.max_tokens} tokens each, {args.requests} sequential per path, "
        f"concurrency {args.concurrency} for requests/s (tiny base on CPU, 127.0.0.1)\n"
    )
    print("| path | TTFT p50 ms | TTFT p99 ms | total p50 ms | total p99 ms | req/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r[0]:.1f} | {r[1]:.1f} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.1f} |")
    print(
        f"| added by gateway | {g[0] - d[0]:+.1f} | {g[1] - d[1]:+.1f} | {g[2] - d[2]:+.1f} | {g[3] - d[3]:+.1f} "
        f"| x{g[4] / d[4]:.2f} |"
    )
    print(
        f"\nratios gateway/direct: TTFT p50 x{g[0] / d[0]:.2f}, total p50 x{g[2] / d[2]:.2f}, req/s x{g[4] / d[4]:.2f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        chain = start_chain(root / "chain")
        group = ProcessGroup()
        try:
            base = make_base(root / "base", seed=0)
            owner = chain.users[0]
            pkg = make_package(base, root / "pkg", account=owner, name="bench/adapter")
            ident = create_identity(root / "node.key", PASSWORD)
            chain.client(chain.admin).fund([ident.address], ETHER)  # gas for the node's own registration
            engine = make_db(root / "gw.db")
            key, _ = create_key(engine, name="bench")
            engine.dispose()
            gw_key_file = root / "gw.key"
            node_auth = SignedNodeAuth(load_or_create_gateway_key(gw_key_file), ident.node_id)
            node_port, gw_port = free_port(), free_port()
            node_url, gw_url = f"http://127.0.0.1:{node_port}", f"http://127.0.0.1:{gw_port}"
            gateway = group.start(
                ManagedProcess(
                    "gateway",
                    [
                        "gateway",
                        "run",
                        "--deployment",
                        str(chain.deployment_path),
                        "--db",
                        f"sqlite:///{root / 'gw.db'}",
                        "--port",
                        str(gw_port),
                        "--base",
                        str(base),
                        "--no-settle",
                        "--gateway-key-file",
                        str(gw_key_file),
                    ],
                    root / "gw.log",
                    env=ENV,
                )
            )
            node = group.start(
                ManagedProcess(
                    "node",
                    [
                        "node",
                        "run",
                        "--base",
                        str(base),
                        "--store",
                        str(root / "store"),
                        "--port",
                        str(node_port),
                        "--data-dir",
                        str(root / "node-data"),
                        "--key",
                        str(root / "node.key"),
                        "--deployment",
                        str(chain.deployment_path),
                        "--gateway",
                        gw_url,
                        "--slots",
                        "2",
                        "--threads",
                        "1",
                        "--kv-blocks",
                        "128",
                    ],
                    root / "node.log",
                    env=ENV,
                )
            )
            gateway.wait_http(gw_url + "/health")
            node.wait_http(node_url + "/health")
            publish(
                pkg.path,
                chain.client(owner),
                node_url=node_url,  # on chain, then into the node's store
                operator_token=read_operator_token(token_path(root / "node-data")),
            )

            def ready() -> bool:
                models = httpx.get(gw_url + "/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=5)
                live = httpx.get(gw_url + "/health", timeout=5).json()["live_nodes"]
                return live == 1 and "bench/adapter" in {m["id"] for m in models.json().get("data", [])}

            gateway.wait_until(ready, timeout=60, what="the node live and its adapter listed")
            asyncio.run(measure(args, node_url, gw_url, key, pkg.adapter_id, node_auth))
        finally:
            group.stop_all()
            chain.anvil.stop()


if __name__ == "__main__":
    main()
