"""What an anonymous flood of heartbeats costs a gateway's other answers, as ratios against the same gateway idle in
the same run. `POST /internal/heartbeat` is public (its signature and the chain's registry are its authentication),
so anyone may send it bodies that parse to nothing a heartbeat is.

    python bench/heartbeat_flood.py [--seconds 5] [--body-kib 250] [--connections 8] [--rounds 2]

A real gateway (`loramesh gateway run`, its own process) while a client process floods the route over --connections
connections with bodies of --body-kib KiB: `junk` (bytes that are no JSON, refused at their first byte), `objects`
(`[{},{},...]`: a Python call an object), `arrays` (`[[],[],...]`: allocated by the ten thousand, they set the
garbage collector off over the gateway's heap), `keys` (one object of many keys) and `numbers` (`[1.5,1.5,...]`); a
heartbeat may hold 1,024 objects and arrays and 8,192 values. Meanwhile GET /health is timed every 20 ms. Per flood
and round: /health's median and 90th percentile, its ratio to idle, and the heartbeats answered (by status). The
default body is about the largest the gateway reads (`max_heartbeat_bytes`, 256 KiB); a larger one is refused with
413 before it is read. No assertions: never run as a test."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from tests.utils.gateway import make_db, start_gateway_process  # noqa: E402

KINDS = ("junk", "objects", "arrays", "keys", "numbers")


def body_of(kind: str, size: int) -> bytes:
    if kind == "junk":
        return b"x" * size
    if kind == "keys":
        n, keys = 0, []
        while n < size - 16:
            keys.append(b'"%d":0' % len(keys))
            n += len(keys[-1]) + 1
        return b"{" + b",".join(keys) + b"}"
    item = {"objects": b"{}", "arrays": b"[]", "numbers": b"1.5"}[kind]
    return b"[" + (item + b",") * ((size - 10) // (len(item) + 1)) + item + b"]"


async def _flood(url: str, kind: str, size: int, seconds: float, connections: int) -> dict[int, int]:
    import aiohttp

    body, codes, end = body_of(kind, size), {}, time.monotonic() + seconds
    async with aiohttp.ClientSession() as s:

        async def worker() -> None:
            while time.monotonic() < end:
                try:
                    async with s.post(url + "/internal/heartbeat", data=body) as r:
                        await r.read()
                        codes[r.status] = codes.get(r.status, 0) + 1
                except aiohttp.ClientError:
                    await asyncio.sleep(0.01)

        await asyncio.gather(*(worker() for _ in range(connections)))
    return codes


def probe(url: str, seconds: float) -> list[float]:
    """GET /health every 20 ms for `seconds`: each answer's time in ms."""
    out, end = [], time.monotonic() + seconds
    with httpx.Client(timeout=30) as c:
        while time.monotonic() < end:
            t = time.perf_counter()
            c.get(url + "/health")
            out.append((time.perf_counter() - t) * 1000)
            time.sleep(0.02)
    return sorted(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--body-kib", type=int, default=250)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--flood", nargs=2, help=argparse.SUPPRESS)  # the client process: URL KIND
    a = ap.parse_args()
    size = a.body_kib << 10
    if a.flood:
        print(asyncio.run(_flood(a.flood[0], a.flood[1], size, a.seconds + 1.5, a.connections)), flush=True)
        return
    root = Path(tempfile.mkdtemp(prefix="bench-heartbeat-"))
    make_db(root / "gw.db")
    proc, url = start_gateway_process(root, f"sqlite:///{root / 'gw.db'}")
    try:
        proc.wait_http(url + "/health", timeout=120)
        flood = f"flood ({a.body_kib} KiB bodies, {a.connections} connections)"
        print(f"| round | {flood} | /health median ms | p90 ms | / idle | heartbeats answered |")
        print("|---|---|---:|---:|---:|---|")
        for rnd in range(1, a.rounds + 1):
            idle = statistics.median(probe(url, a.seconds))
            print(f"| {rnd} | none | {idle:.1f} | | 1.00x | |", flush=True)
            for kind in KINDS:
                args = [sys.executable, __file__, "--seconds", str(a.seconds), "--body-kib", str(a.body_kib)]
                args += ["--connections", str(a.connections), "--flood", url, kind]
                flood = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
                time.sleep(1.0)
                lat = probe(url, a.seconds)
                codes = flood.communicate()[0].strip()
                med, p90 = statistics.median(lat), lat[int(len(lat) * 0.9)]
                print(f"| {rnd} | {kind} | {med:.1f} | {p90:.1f} | {med / idle:.2f}x | {codes} |", flush=True)
    finally:
        proc.stop()


if __name__ == "__main__":
    main()
