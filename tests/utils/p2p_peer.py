"""A standalone p2p peer process driven by JSON lines on stdin (used by integration tests and bench/p2p.py).

    python -m tests.utils.p2p_peer --store DIR --owners FILE [--listen MA] [--bootstrap MA ...] [--config JSON]
        [--faults FILE]

Prints {"peer_id", "addrs"} once ready, then answers one JSON line per command line:
{"cmd": "connect", "addr"}, {"cmd": "announce", "adapter_id"}, {"cmd": "providers", "adapter_id", "wait"},
{"cmd": "fetch", "adapter_id", "providers"}, {"cmd": "status"} (also the announcement book's size),
{"cmd": "quit"}. `--config` sets more P2PConfig fields (tests use small limits). Errors come back as
{"ok": false, "type": <exception class>, "error": <one line>}.

`--owners FILE` is a JSON object {adapter_id: owner address}, re-read on every lookup: the stand-in
for the chain registry (the node daemon passes the registry's lookup). `--faults FILE` is a JSON
object {adapter_id: tamper|stall|drop|oversize}: the peer's server misbehaves on purpose for those
adapters (tests.utils.p2p.FaultyServer).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from common.logs import configure_logging
from node.adapters import AdapterStore
from node.p2p import AdapterServer, P2PConfig, P2PNode
from tests.utils.p2p import FaultyServer


def owners_from_file(path: Path):
    """owner_of(adapter_id) reading a JSON {id: address} file on each call."""

    def owner_of(adapter_id: str) -> str | None:
        try:
            return json.loads(path.read_text()).get(adapter_id)
        except FileNotFoundError:
            return None

    return owner_of


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, type=Path)
    ap.add_argument("--owners", required=True, type=Path)
    ap.add_argument("--base", type=Path, default=None, help="base model folder (checks shapes on install)")
    ap.add_argument("--seed-hex", default=None, help="32-byte node seed as hex (default: random)")
    ap.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0")
    ap.add_argument("--bootstrap", nargs="*", default=[])
    ap.add_argument("--read-timeout", type=float, default=10.0)
    ap.add_argument("--discover-timeout", type=float, default=10.0)
    ap.add_argument("--announce-interval", type=float, default=30.0)
    ap.add_argument("--config", default="{}", help="more P2PConfig fields as a JSON object (tests: small limits)")
    ap.add_argument("--log-level", default="WARNING")
    ap.add_argument("--max-cache-bytes", type=int, default=None, help="the store's bound on what it fetched")
    ap.add_argument("--faults", type=Path, default=None, help="JSON {adapter_id: fault}: serve those adapters badly")
    return ap.parse_args(argv)


def _reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _handle(node: P2PNode, cmd: dict) -> dict:
    op = cmd.get("cmd")
    if op == "connect":
        return {"peer_id": node.connect(cmd["addr"])}
    if op == "announce":
        node.announce(cmd["adapter_id"])
        return {}
    if op == "providers":
        found = node.find_providers(cmd["adapter_id"], wait=float(cmd.get("wait", 0)))
        return {"providers": [{"peer_id": p.peer_id, "addrs": list(p.addrs), "source": p.source} for p in found]}
    if op == "fetch":
        t0 = time.perf_counter()
        pkg = node.fetch(cmd["adapter_id"], providers=cmd.get("providers", ()))
        status = next((t for t in node.transfers() if t.adapter_id == cmd["adapter_id"]), None)
        return {
            "adapter_id": pkg.adapter_id,
            "path": str(pkg.path),
            "signer": pkg.signer,
            "seconds": time.perf_counter() - t0,
            "peer_id": status.peer_id if status else None,
            "attempts": status.attempts if status else 0,
            "bytes": status.total if status else 0,
            "failures": list(status.failures) if status else [],
        }
    if op == "status":
        book_peers, book_ids = node.book_size()
        return {
            "peer_id": node.peer_id,
            "held": node.held,
            "peers": node.connected_peers(),
            "transfers": [asdict(t) for t in node.transfers()],
            "book_peers": book_peers,
            "book_ids": book_ids,
            "dht_keys": node.dht_key_count(),
            "failures": {p: node.failures(p) for p in cmd.get("failures_of", ())},
        }
    raise ValueError(f"unknown command {op!r}")


def run(argv: list[str] | None = None) -> None:
    """Start a peer and serve stdin commands until "quit" or EOF."""
    args = parse_args(argv)
    configure_logging(args.log_level)
    server_factory: type[AdapterServer] = AdapterServer
    if args.faults is not None:
        FaultyServer.faults = json.loads(args.faults.read_text())
        server_factory = FaultyServer
    seed = bytes.fromhex(args.seed_hex) if args.seed_hex else os.urandom(32)
    config = P2PConfig(
        listen=args.listen,
        bootstrap=tuple(args.bootstrap),
        read_timeout=args.read_timeout,
        discover_timeout=args.discover_timeout,
        announce_interval=args.announce_interval,
        **json.loads(args.config),
    )
    node = P2PNode(
        seed=seed,
        store=AdapterStore(args.store, max_cache_bytes=args.max_cache_bytes),
        owner_of=owners_from_file(args.owners),
        config=config,
        base_dir=args.base,
        server_factory=server_factory,
    )
    node.start()
    try:
        _reply({"ok": True, "peer_id": node.peer_id, "addrs": node.listen_addrs})
        for line in sys.stdin:
            if not line.strip():
                continue
            cmd = json.loads(line)
            if cmd.get("cmd") == "quit":
                _reply({"ok": True})
                break
            try:
                _reply({"ok": True, **_handle(node, cmd)})
            except Exception as e:
                status = next((t for t in node.transfers() if t.adapter_id == cmd.get("adapter_id")), None)
                _reply(
                    {
                        "ok": False,
                        "type": type(e).__name__,
                        "error": str(e),
                        "failures": list(status.failures) if status else [],
                    }
                )
    finally:
        node.stop()


if __name__ == "__main__":
    run()
