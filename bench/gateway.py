"""Latency the gateway adds, and requests/s, direct-to-node versus through-the-gateway, streaming.

Starts one real node (tiny base, one adapter) and one gateway as processes on 127.0.0.1, seeds the
gateway's registry mirror directly (no chain needed: the gateway reads the mirror tables), heartbeats
for the node from here, then measures in the same run:
  - sequential streamed requests, interleaved direct/gateway: time to first token and total, p50/p99;
  - --concurrency clients at once: requests/s both ways.

    python bench/gateway.py [--requests 40] [--max-tokens 8] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
from eth_account import Account  # noqa: E402

from devnet.anvil import free_port  # noqa: E402
from gateway.keys import create_key  # noqa: E402
from node.adapters import AdapterStore  # noqa: E402
from node.basemodel import base_model_id  # noqa: E402
from node.heartbeat import HeartbeatSender  # noqa: E402
from node.keys import create_identity  # noqa: E402
from tests.utils.factories import make_base, make_package  # noqa: E402
from tests.utils.gateway import add_adapter, add_node, make_db  # noqa: E402

PASSWORD = "bench"


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, LORAMESH_KEY_PASSWORD=PASSWORD)
    return subprocess.Popen([sys.executable, *args], stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # fmt: skip


def wait_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{url} exited:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit(f"{url} did not start")


async def one(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> tuple[float, float, int]:
    """(ttft, total) seconds and tokens of one streamed request."""
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url, json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code} {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            ev = json.loads(line[5:])
            if ev.get("type") == "token" or ev.get("choices"):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                tokens += 1
    return ttft or 0.0, time.perf_counter() - t0, tokens


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] * 1000


async def measure(args, node_url: str, gw_url: str, key: str, adapter_id: str, sender: HeartbeatSender) -> None:
    direct = (node_url + "/v1/generate", {"adapter_id": adapter_id, "prompt": "The capital of France is",
                                          "max_tokens": args.max_tokens, "temperature": 0, "stream": True}, {})
    via = (gw_url + "/v1/completions", {"model": "bench/adapter", "prompt": "The capital of France is",
                                        "max_tokens": args.max_tokens, "temperature": 0, "stream": True},
           {"Authorization": f"Bearer {key}"})  # fmt: skip
    sender.start()
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
    await sender.stop()
    rows = {}
    for name, res in seq.items():
        ttft, total = [r[0] for r in res], [r[1] for r in res]
        rows[name] = (pct(ttft, 50), pct(ttft, 99), pct(total, 50), pct(total, 99), rps[name])
    d, g = rows["direct"], rows["gateway"]
    print(f"\nstreamed completions, {args.max_tokens} tokens each, {args.requests} sequential per path, "
          f"concurrency {args.concurrency} for requests/s (tiny base on CPU, 127.0.0.1)\n")
    print("| path | TTFT p50 ms | TTFT p99 ms | total p50 ms | total p99 ms | req/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r[0]:.1f} | {r[1]:.1f} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.1f} |")
    print(f"| added by gateway | {g[0] - d[0]:+.1f} | {g[1] - d[1]:+.1f} | {g[2] - d[2]:+.1f} | {g[3] - d[3]:+.1f} "
          f"| x{g[4] / d[4]:.2f} |")
    print(f"\nratios gateway/direct: TTFT p50 x{g[0] / d[0]:.2f}, total p50 x{g[2] / d[2]:.2f}, "
          f"req/s x{g[4] / d[4]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = make_base(root / "base", seed=0)
        pkg = make_package(base, root / "pkg", account=Account.create(), name="bench/adapter")
        AdapterStore(root / "store").install(pkg.path)
        ident = create_identity(root / "node.key", PASSWORD)
        node_port, gw_port = free_port(), free_port()
        node_url, gw_url = f"http://127.0.0.1:{node_port}", f"http://127.0.0.1:{gw_port}"
        engine = make_db(root / "gw.db")
        add_node(engine, node_id=ident.node_id, base_model=base_model_id(base), api_url=node_url)
        add_adapter(engine, adapter_id=pkg.adapter_id, name="bench/adapter", base_model=base_model_id(base))
        key, _ = create_key(engine, name="bench")
        procs = [
            spawn(["-c", "from node.node_cli import node_app; node_app()", "run", "--base", str(base), "--store",
                   str(root / "store"), "--port", str(node_port), "--key", str(root / "node.key"), "--slots", "2",
                   "--threads", "1", "--kv-blocks", "128"], root / "node.log"),
            spawn(["-m", "gateway.cli", "run", "--db", f"sqlite:///{root / 'gw.db'}", "--port", str(gw_port),
                   "--base", str(base), "--no-settle"], root / "gw.log"),
        ]  # fmt: skip
        try:
            wait_up(node_url + "/health", procs[0], root / "node.log")
            wait_up(gw_url + "/health", procs[1], root / "gw.log")

            async def status():
                async with httpx.AsyncClient(timeout=2) as c:
                    return (await c.get(node_url + "/status")).json()

            sender = HeartbeatSender(ident, [gw_url], api_url=node_url, base_model_id=base_model_id(base),
                                     status_fn=status, interval=1.0)  # fmt: skip
            asyncio.run(measure(args, node_url, gw_url, key, pkg.adapter_id, sender))
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(15)


if __name__ == "__main__":
    main()
