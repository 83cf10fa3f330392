"""The explorer at scale: settle N records on anvil, then time its first index, a restart's index, every page,
and its peak memory, for each N given (default 1,000 and 100,000).

Settlement reuses bench/settle.py's set-up (one adapter with two datasets, one node) and outbox filler, and the
Settler itself (batches of 500, 64 in flight) on an anvil that mines each transaction at once. The explorer
runs in a child process per measurement (`--child`), so that its memory is its own and a restart is a real
one: a fresh process on the same data dir, after 1,000 more records were settled. Pages are asked through the
app (Starlette's TestClient, no refresher running), each 5 times; the table shows the median and the worst.
Memory is the child's peak resident set (VmHWM), beside its resident set after imports.

It also times the decoding of RecordsSettled logs, one per batch (slicing the hex as devnet.explorer.decode
does, against web3's process_log after formatting), per record.

    python bench/explorer.py [--records 1000 100000] [--batch 500] [--in-flight 64]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXTRA = 1_000  # records settled between the first index and the restart


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_mb() -> float:
    """This process's peak resident set. VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so
    a child would report the parent's peak (the settling parent holds the whole outbox)."""
    return _status_mb("VmHWM")


# ---- the parent: anvil, settlement, children -----------------------------------------------------------


def settle(client, adapter: str, node: str, folder: Path, total: int, *, batch: int, in_flight: int) -> float:
    from bench.settle import add_records, single
    from ledger.db import init_db, make_engine
    from ledger.settler import Settler
    from ledger.settler_config import SettlerConfig

    engine = make_engine(f"sqlite:///{folder}/ledger.db", immediate=True)
    init_db(engine)
    add_records(engine, single(adapter, node), total)
    settler = Settler(
        engine,
        client.with_account(client.account),
        SettlerConfig(batch_size=batch, interval=0, max_in_flight=in_flight),
    )
    t0 = time.perf_counter()
    settled = settler.drain()
    elapsed = time.perf_counter() - t0
    engine.dispose()
    if settled != total:
        raise RuntimeError(f"settled {settled} of {total} records")
    return elapsed


def child(args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False, timeout=900
    )
    if out.returncode != 0:
        raise RuntimeError(f"child failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_size(n: int, args) -> dict:
    from bench.settle import setup
    from devnet.anvil import Anvil, AnvilConfig, free_port

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cfg = AnvilConfig(port=free_port(), block_time=None, log_file=folder / "anvil.log")
        with Anvil(cfg) as anvil:
            client, adapter, node = setup(anvil.rpc_url)
            client.deployment.save(folder / "deployment.json")
            settle_s = settle(client, adapter, node, folder, n, batch=args.batch, in_flight=args.in_flight)
            common = ["--deployment", str(folder / "deployment.json"), "--db", f"sqlite:///{folder}/ledger.db"]
            common += ["--data-dir", str(folder / "index")]
            first = child([*common, "--pages"])
            extra_folder = folder / "extra"
            extra_folder.mkdir()
            settle(client, adapter, node, extra_folder, EXTRA, batch=args.batch, in_flight=args.in_flight)
            restart = child(common)
            return {"n": n, "settle_s": settle_s, "first": first, "restart": restart}


# ---- the child: one explorer process ---------------------------------------------------------------------


def time_page(client, path: str, runs: int = 5) -> tuple[float, float, int]:
    times, status = [], 0
    for _ in range(runs):
        t0 = time.perf_counter()
        r = client.get(path, follow_redirects=False)
        times.append(time.perf_counter() - t0)
        status = r.status_code
    return statistics.median(times) * 1000, max(times) * 1000, status


def decode_bench(ex, limit: int = 200) -> dict:
    """µs per settled record, decoding the first `limit` RecordsSettled logs (one per batch) two ways: slicing
    the hex as devnet.explorer.decode does, and web3's formatted log (the explorer's path before)."""
    from devnet.explorer import decode as D

    idx = ex.index
    topic = next(t for t, name in idx.topics.items() if name == "RecordsSettled")
    logs: list[dict] = []
    reader = type(idx.reader)(idx.client.w3, idx.client.rpc_url, idx.reader.addresses, max_logs=limit)
    for chunk in reader.chunks(idx.client.deployment.deploy_block, idx.head):
        logs += [lg for lg in chunk.logs if lg["topics"][0] == topic]
        if len(logs) >= limit:
            break
    logs = logs[:limit]
    out: dict = {"logs": len(logs)}
    if not logs:
        return out
    t0 = time.perf_counter()
    records = sum(len(D.records_settled(lg)) for lg in logs)
    out["slice"] = (time.perf_counter() - t0) / records * 1e6
    out["records"] = records
    t0 = time.perf_counter()
    for lg in logs:
        idx.web3_events.decode_raw(lg)
    out["web3"] = (time.perf_counter() - t0) / records * 1e6
    return out


def child_main(args) -> None:
    logging.basicConfig(level=logging.WARNING)
    base = rss_mb()
    from fastapi.testclient import TestClient

    from devnet.explorer import ExplorerConfig, create_app
    from devnet.explorer.service import Explorer

    imported = rss_mb()
    config = ExplorerConfig(deployment=args.deployment, db_url=args.db, data_dir=args.data_dir)
    t0 = time.perf_counter()
    ex = Explorer.open(config)
    before = ex.index.cursor()
    indexed = ex.refresh()
    index_s = time.perf_counter() - t0
    out = {
        "index_s": index_s,
        "from_block": before.block if before else None,
        "to_block": indexed,
        "blocks_read": ex.index.reader.blocks,
        "queries": ex.index.reader.queries,
        "rss_imports_mb": imported,
        "rss_start_mb": base,
        "peak_after_index_mb": peak_mb(),
    }
    with ex.view() as v:
        out["records"] = v.q.usage("all").records
    if args.pages:
        app = create_app(explorer=ex)
        client = TestClient(app)  # not entered: no lifespan, so no refresher competes with the pages
        with ex.view() as v:
            rec = v.q.records(size=1).rows[0]
            oldest = v.q.records(size=1, newest_first=False).rows[0]
            batch = v.q.batches(0, 1).rows[0]
            adapter = v.q.adapters(0, 1).rows[0]
            node = v.q.nodes(0, 1).rows[0]
            batches = v.q.batch_totals()[0]
        records = out["records"]
        paths = [
            "/",
            "/adapters",
            f"/adapters/{adapter.adapter_id}",
            "/datasets",
            "/nodes",
            f"/nodes/{node.node_id}",
            "/batches",
            f"/batches?page={max(0, (batches - 1) // 50)}",
            f"/batches/{batch.batch_id}",
            "/records",
            f"/records?page={max(0, (records - 1) // 100)}",
            f"/records?adapter={adapter.adapter_id}&page={max(0, (records - 1) // 200)}",
            f"/records/{rec.request_id}",
            f"/records/{oldest.request_id}",
            "/disputes",
            "/accounts",
            f"/address/{node.operator}",
            f"/address/{adapter.owner}",
            f"/tx/{batch.tx_hash}",
            f"/search?q={rec.request_id}",
            "/plots/tokens.svg",
            "/plots/rewards.svg",
            "/health",
        ]
        time_page(client, "/health", 1)  # warm the app's first request
        out["pages"] = {p: time_page(client, p) for p in paths}
    out["peak_mb"] = peak_mb()  # before the decoding bench, which holds 20,000 logs four ways
    if args.pages:
        out["decode"] = decode_bench(ex)
    ex.close()
    print(json.dumps(out))


# ---- the table -------------------------------------------------------------------------------------------


def short_path(p: str) -> str:
    import re

    return re.sub(r"0x[0-9a-fA-F]{40,64}", lambda m: m.group(0)[:8] + "…", p)


def report(results: list[dict]) -> None:
    ns = [r["n"] for r in results]
    w = 14
    print()
    print("explorer on anvil (mines each transaction at once); records settled by the Settler in batches of 500")
    print(f"{'':<44}" + "".join(f"{f'N={n:,}':>{w}}" for n in ns) + "   target at 100k")
    rows = [
        ("settle N records (s, not the explorer)", lambda r: f"{r['settle_s']:.1f}", ""),
        ("records indexed", lambda r: f"{r['first']['records']:,}", ""),
        ("first index (s)", lambda r: f"{r['first']['index_s']:.2f}", "<= 10 s"),
        ("  eth_getLogs queries / blocks read", lambda r: f"{r['first']['queries']}/{r['first']['blocks_read']}", ""),
        (f"restart index, +{EXTRA:,} records (s)", lambda r: f"{r['restart']['index_s']:.2f}", "<= 2 s"),
        ("  queries / blocks read", lambda r: f"{r['restart']['queries']}/{r['restart']['blocks_read']}", ""),
        ("peak RSS, first index + pages (MB)", lambda r: f"{r['first']['peak_mb']:.0f}", "< 200 MB"),
        ("  of which RSS after imports (MB)", lambda r: f"{r['first']['rss_imports_mb']:.0f}", ""),
        ("  peak RSS after the index (MB)", lambda r: f"{r['first']['peak_after_index_mb']:.0f}", ""),
        ("peak RSS, restart (MB)", lambda r: f"{r['restart']['peak_mb']:.0f}", ""),
    ]
    for label, get, target in rows:
        print(f"{label:<44}" + "".join(f"{get(r):>{w}}" for r in results) + f"   {target}")
    print("\npages: median / worst of 5, ms (target < 100 ms each at 100k)")
    keys = list(results[0]["first"]["pages"])
    for i, key in enumerate(keys):
        cells = []
        for r in results:
            path = list(r["first"]["pages"])[i]
            med, worst, status = r["first"]["pages"][path]
            cells.append(f"{med:.1f}/{worst:.1f}" + ("" if status in (200, 303) else f"!{status}"))
        print(f"  {short_path(key):<42}" + "".join(f"{c:>{w}}" for c in cells))
    print("\ndecoding RecordsSettled (one log per batch), µs per record")
    for key, label in (
        ("slice", "hex slicing (devnet.explorer.decode)"),
        ("web3", "web3 process_log (formatted log)"),
    ):
        cells = [f"{r['first']['decode'].get(key, float('nan')):.2f}" for r in results]
        print(f"  {label:<42}" + "".join(f"{c:>{w}}" for c in cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, nargs="+", default=[1_000, 100_000])
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--in-flight", type=int, default=64)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pages", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--deployment", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args)
        return
    logging.basicConfig(level=logging.WARNING)
    results = []
    for n in args.records:
        results.append(run_size(n, args))
        print(
            f"N={n:,}: settled in {results[-1]['settle_s']:.1f}s, indexed in {results[-1]['first']['index_s']:.2f}s",
            file=sys.stderr,
        )
    report(results)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
