"""Fetch-and-verify of a 160 MB adapter package between two node processes on loopback, beside a raw
py-libp2p stream of the same bytes (same host stack: TCP + Noise + Yamux) measured in the same run,
the two taking turns so that both see the same load.

    .venv/bin/python bench/p2p.py [--runs 3] [--work DIR]

Prints a table; nothing is asserted (performance lives here, not in tests).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SELF = str(Path(__file__).resolve())
REPO = Path(SELF).parents[1]
sys.path.insert(0, str(REPO))

RAW_PROTOCOL = "/loramesh-bench/raw/1.0.0"
# A rank-16 LoRA (the largest rank nodes serve) of every target of a Llama-2-7B-shaped base in fp32:
# 32 layers x 7 targets, 160 MB. The base is its config.json only: verification reads the base's
# shapes and id from it, and 27 GB of base weights would add nothing to a transfer measurement.
BASE_CONFIG = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    head_dim=128,
)
RANK = 16
from node.adapters.weights import LORA_TARGETS as TARGETS  # noqa: E402

# -- raw baseline: one host serves a file's bytes, the other reads them to EOF ---------------------


def _raw_config(listen: str):
    from node.p2p.config import P2PConfig

    return P2PConfig(listen=listen)


async def _raw_serve(path: Path) -> None:
    import trio
    from libp2p.custom_types import TProtocol
    from multiaddr import Multiaddr

    from node.p2p.host import build_host, full_addrs
    from node.p2p.protocol import MAX_PAYLOAD

    _, host = build_host(os.urandom(32), _raw_config("/ip4/127.0.0.1/tcp/0"))

    async def handler(stream) -> None:
        await stream.read(1)
        with open(path, "rb") as f:
            while chunk := f.read(MAX_PAYLOAD):
                await stream.write(chunk)
        await stream.close()

    host.set_stream_handler(TProtocol(RAW_PROTOCOL), handler)
    async with host.run(listen_addrs=[Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        print(json.dumps({"addr": full_addrs(host)[0]}), flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the parent closes stdin


async def _raw_fetch(addr: str) -> None:
    """One raw run per line on stdin (the parent interleaves them with fetches), a JSON line each."""
    import trio
    from libp2p.custom_types import TProtocol
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from multiaddr import Multiaddr

    from node.p2p.host import build_host
    from node.p2p.protocol import HEADER, MAX_PAYLOAD

    _, host = build_host(os.urandom(32), _raw_config("/ip4/127.0.0.1/tcp/0"))
    async with host.run(listen_addrs=[Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        info = info_from_p2p_addr(Multiaddr(addr))
        await host.connect(info)
        print(json.dumps({"ready": True}), flush=True)
        while await trio.to_thread.run_sync(sys.stdin.readline):
            t0 = time.perf_counter()
            stream = await host.new_stream(info.peer_id, [TProtocol(RAW_PROTOCOL)])
            await stream.write(b"g")
            n = 0
            while True:
                try:
                    with trio.fail_after(10):
                        chunk = await stream.read(MAX_PAYLOAD + HEADER.size)  # a whole frame's worth
                except EOFError:
                    break
                except Exception:  # a reset after the last byte ends the run too
                    break
                if not chunk:
                    break
                n += len(chunk)
            print(json.dumps({"bytes": n, "seconds": time.perf_counter() - t0}), flush=True)


class RawPair:
    """A raw server and a raw client process; run() moves the file once and returns (bytes, seconds)."""

    def __init__(self, path: Path) -> None:
        self.server = subprocess.Popen(
            [sys.executable, SELF, "--raw-serve", str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        addr = json.loads(self.server.stdout.readline())["addr"]
        self.client = subprocess.Popen(
            [sys.executable, SELF, "--raw-fetch", addr], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        json.loads(self.client.stdout.readline())

    def run(self) -> tuple[int, float]:
        self.client.stdin.write("go\n")
        self.client.stdin.flush()
        got = json.loads(self.client.stdout.readline())
        return got["bytes"], got["seconds"]

    def close(self) -> None:
        for proc in (self.client, self.server):
            proc.stdin.close()
            proc.wait(30)


# -- the real thing ----------------------------------------------------------------------------


def _make_package(work: Path):
    """A signed package of the size above, written directly with safetensors (PEFT's key names and
    adapter_config.json come from a real PEFT adapter of a tiny base, made first)."""
    import numpy as np
    from eth_account import Account
    from safetensors.numpy import save_file

    from node.adapters import pack_adapter
    from node.adapters.basemodel import NAME_KEY
    from node.adapters.weights import config_module_dims, lora_key
    from tests.utils.factories import make_base, make_peft_adapter

    tiny = make_base(work / "tiny-base", hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4)
    peft = make_peft_adapter(tiny, work / "bench-peft", rank=RANK, targets=TARGETS)
    config = json.loads((tiny / "config.json").read_text())
    config.update(BASE_CONFIG, **{NAME_KEY: "bench-llama2-7b-shape"})
    base = work / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(config))
    peft_config = json.loads((peft / "adapter_config.json").read_text())
    peft_config["base_model_name_or_path"] = str(base)
    (peft / "adapter_config.json").write_text(json.dumps(peft_config))
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(BASE_CONFIG["num_hidden_layers"]):
        for target, (fan_in, fan_out) in config_module_dims(config).items():
            if target in TARGETS:
                for ab, shape in (("A", (RANK, fan_in)), ("B", (fan_out, RANK))):
                    tensors[lora_key(layer, target, ab)] = rng.standard_normal(shape, dtype=np.float32) * 0.02
    save_file(tensors, str(peft / "adapter_model.safetensors"))
    owner = Account.create()
    pkg = pack_adapter(peft, work / "bench-pkg", name="bench", account=owner, base_dir=base)
    return base, owner.address, pkg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--raw-serve", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--raw-fetch", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.raw_serve or args.raw_fetch:
        import trio

        from node.p2p.host import route_libp2p_logging

        route_libp2p_logging()
        trio.run(_raw_serve, args.raw_serve) if args.raw_serve else trio.run(_raw_fetch, args.raw_fetch)
        return

    from node.adapters import AdapterStore, verify_package
    from tests.utils.p2p import PeerProcess

    with tempfile.TemporaryDirectory(prefix="loramesh-bench-p2p-") as tmp:
        work = args.work or Path(tmp)
        t0 = time.perf_counter()
        base, owner, pkg = _make_package(work)
        size = sum(f.size for f in pkg.manifest.files)
        weights = pkg.path / "adapter_model.safetensors"
        print(
            f"package {pkg.adapter_id[:18]}…: {size / 1e6:.1f} MB in {len(pkg.manifest.files)} files "
            f"(built in {time.perf_counter() - t0:.1f}s)",
            flush=True,
        )

        owners = work / "owners.json"
        owners.write_text(json.dumps({pkg.adapter_id: owner}))
        AdapterStore(work / "a").install(pkg.path)
        store_b = AdapterStore(work / "b")
        a = PeerProcess(store=work / "a", owners=owners, base=base, read_timeout=10, log_path=work / "a.log")
        b = raw = None
        fetch, raw_runs = [], []
        try:
            b = PeerProcess(store=work / "b", owners=owners, base=base, read_timeout=10, log_path=work / "b.log")
            raw = RawPair(weights)

            def fetch_once() -> float:
                store_b.remove(pkg.adapter_id)
                got = b.call("fetch", timeout=600, adapter_id=pkg.adapter_id, providers=[a.addrs[0]])
                if not got["ok"]:
                    raise RuntimeError(f"fetch failed: {got}")
                return got["seconds"]

            # One of each first, not counted: imports and first dials. Then raw and fetch runs take
            # turns (in alternating order), so both see the same load on a shared machine.
            raw.run(), fetch_once()
            for i in range(args.runs):
                if i % 2:
                    fetch.append(fetch_once())
                    raw_runs.append(raw.run())
                else:
                    raw_runs.append(raw.run())
                    fetch.append(fetch_once())
        finally:
            if raw is not None:
                raw.close()
            if b is not None:
                b.stop()
            a.stop()

        verify = []
        for _ in range(args.runs):
            t = time.perf_counter()
            verify_package(store_b.path_for(pkg.adapter_id), base_dir=base, expected_owner=owner)
            verify.append(time.perf_counter() - t)

        raw_bytes = raw_runs[0][0]
        if any(n != weights.stat().st_size for n, _ in raw_runs):
            raise RuntimeError(f"raw stream moved {raw_bytes} bytes, expected {weights.stat().st_size}")
        raw_s = statistics.median(s for _, s in raw_runs)

    mb = size / 1e6
    raw_best = min(s for _, s in raw_runs)
    rows = [
        ("raw py-libp2p stream (baseline)", raw_bytes / 1e6, raw_s, raw_best),
        ("fetch + verify + install (loramesh)", mb, statistics.median(fetch), min(fetch)),
        ("  of which: verify_package alone", mb, statistics.median(verify), min(verify)),
    ]
    # The best run is what the code costs when nothing else wants the cores; the median, what it
    # costs on this machine today. Both ratios are against the raw stream measured the same way.
    print(f"\nloopback, two processes, TCP + Noise + Yamux, {args.runs} runs each (raw and fetch interleaved)")
    print(f"{'path':<38} {'MB':>6} {'median s':>9} {'MB/s':>7} {'x raw':>6} {'best s':>7} {'MB/s':>7} {'x raw':>6}")
    for name, m, med, best in rows:
        print(
            f"{name:<38} {m:>6.1f} {med:>9.2f} {m / med:>7.1f} {raw_s / med * m / (raw_bytes / 1e6):>6.2f} "
            f"{best:>7.2f} {m / best:>7.1f} {raw_best / best * m / (raw_bytes / 1e6):>6.2f}"
        )
    pairs = " ".join(f"{r / f:.2f}" for (_, r), f in zip(raw_runs, fetch, strict=True))
    print(f"x raw of each fetch against the raw run beside it: {pairs}")


if __name__ == "__main__":
    main()
