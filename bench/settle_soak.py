"""Soak: many settlers, one PostgreSQL database, one ledger. Two `loramesh settler run` processes
(each with its own settler key) settle while two writer processes (standing in for gateways) insert
records concurrently through ledger.outbox.add_usage_record, one request per transaction. Afterwards
it checks, from the chain itself, that every request was settled exactly once (raw eth_getLogs of
RecordSettled) and that no settlement transaction reverted (the receipt of every transaction sent to
the ledger), and prints a short table. Exit status 1 when either check fails.

Starts its own anvil (1-second blocks, as the devnet runs) and a throwaway PostgreSQL cluster
(tests/utils/postgres.py; or --db URL for an existing database, which must be empty).

    python bench/settle_soak.py [--records 3000] [--rate 40] [--writers 2] [--settlers 2]
                                [--batch-size 100] [--interval 2] [--max-in-flight 8] [--block-time 1]

--rate is records per second over all writers (the demo network's attack: 40 records/s for 75 s).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlmodel import Session, select  # noqa: E402

from ledger.db import init_db, make_engine  # noqa: E402
from ledger.models import SettlementBatch  # noqa: E402
from ledger.outbox import add_usage_record, count_by_status  # noqa: E402
from ledger.types import BASE_MODEL_ADAPTER_ID  # noqa: E402

ETHER = 10**18


def writer(args) -> None:
    """One stand-in gateway: --count records over adapters/nodes, one per transaction, at --rate per
    second; the request ids go to --out, one per line, as each commits."""
    engine = make_engine(args.db)
    pairs = [p.split(":") for p in args.pairs.split(",")]
    t0 = time.monotonic()
    with open(args.out, "w") as out:
        for i in range(args.count):
            adapter, node = pairs[i % len(pairs)]
            rid = "0x" + os.urandom(32).hex()
            with Session(engine) as s:
                add_usage_record(
                    s,
                    request_id=rid,
                    adapter_id=adapter,
                    node_id=node,
                    prompt_tokens=60 + i % 200,
                    completion_tokens=10 + i % 90,
                    receipt_json={"request_id": rid},
                    node_signature="soak",
                )
                s.commit()
            out.write(rid + "\n")
            out.flush()
            ahead = t0 + (i + 1) / args.rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    engine.dispose()


def soak(args) -> int:
    from tests.ledger.audit import ledger_transactions, record_settled_counts, stop_settlers
    from tests.utils.chain import register_sample, start_chain
    from tests.utils.postgres import start_postgres

    tmp = Path(tempfile.mkdtemp(prefix="loramesh-soak-"))
    env = start_chain(tmp / "anvil", block_time=args.block_time)
    cluster = None
    procs: list[subprocess.Popen] = []
    try:
        if args.db:
            db_url = args.db
        else:
            cluster = start_postgres()
            db_url = cluster.new_database("soak")
        engine = make_engine(db_url)
        init_db(engine)
        regs = [register_sample(env, price=10**12), register_sample(env, price=3 * 10**12, shares=(2500,))]
        pairs = [f"{r.adapter_id}:{r.node_id}" for r in regs] + [f"{BASE_MODEL_ADAPTER_ID}:{regs[0].node_id}"]
        accounts = [env.settler] + [env.new_account(10 * ETHER) for _ in range(args.settlers - 1)]
        admin = env.client(env.admin)
        for a in accounts[1:]:
            admin.grant_settler(a.address)
            admin.deposit_for(a.address, 100 * ETHER)
        client = env.client()
        start_block = client.block_number() + 1
        child_env = {**os.environ, "PYTHONPATH": str(ROOT), "LORAMESH_LOG_LEVEL": "INFO"}
        for i, a in enumerate(accounts):
            key = tmp / f"settler-{i}.key"
            key.write_text(a.key.hex())
            cmd = [
                sys.executable,
                "-m",
                "ledger.cli",
                "settler",
                "run",
                "--db",
                db_url,
                "--deployment",
                str(env.deployment_path),
                "--key",
                str(key),
                "--batch-size",
                str(args.batch_size),
                "--interval",
                str(args.interval),
                "--max-in-flight",
                str(args.max_in_flight),
            ]
            procs.append(
                subprocess.Popen(
                    cmd, cwd=ROOT, env=child_env, stdout=subprocess.DEVNULL, stderr=(tmp / f"settler-{i}.log").open("w")
                )
            )
        per = [
            args.records // args.writers + (1 if i < args.records % args.writers else 0) for i in range(args.writers)
        ]
        t0 = time.monotonic()
        writers = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--writer",
                    "--db",
                    db_url,
                    "--count",
                    str(n),
                    "--rate",
                    str(args.rate / args.writers),
                    "--pairs",
                    ",".join(pairs),
                    "--out",
                    str(tmp / f"writer-{i}.ids"),
                ],
                cwd=ROOT,
                env=child_env,
            )
            for i, n in enumerate(per)
        ]
        for w in writers:
            w.wait()
        written_at = time.monotonic()
        if any(w.returncode for w in writers):
            print("a writer failed", file=sys.stderr)
            return 1
        deadline = written_at + args.timeout
        while True:
            with Session(engine) as s:
                counts = count_by_status(s)
            if counts.get("settled", 0) + counts.get("set_aside", 0) + counts.get("rejected", 0) >= args.records:
                break
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                print(f"gave up waiting: {counts}", file=sys.stderr)
                break
            time.sleep(0.5)
        settled_at = time.monotonic()
    finally:
        stop_settlers(procs)

    try:
        ids = [line.strip() for i in range(args.writers) for line in (tmp / f"writer-{i}.ids").read_text().split()]
        on_chain = record_settled_counts(client.w3, env.deployment.ledger, start_block)
        txs = ledger_transactions(client.w3, env.deployment.ledger, start_block, [a.address for a in accounts])
        with Session(engine) as s:
            counts = count_by_status(s)
            batches = list(s.exec(select(SettlementBatch)))
        engine.dispose()
    finally:
        env.anvil.stop()
        if cluster is not None:
            cluster.stop()
    once = sum(1 for r in ids if on_chain.get(r) == 1)
    twice = sum(1 for r in ids if on_chain.get(r, 0) > 1)
    missing = sum(1 for r in ids if r not in on_chain)
    extra = len(set(on_chain) - set(ids))
    reverted = sum(t.status != 1 for t in txs)
    by_settler = Counter(b.settler.lower() for b in batches if b.settler)
    per_settler = ", ".join(
        f"{a.address[:8]}…: {by_settler.get(a.address.lower(), 0)} batches, "
        f"{sum(t.sender == a.address.lower() for t in txs)} txs"
        for a in accounts
    )
    write_s, tail_s = written_at - t0, settled_at - written_at
    rows = [
        ("records written", f"{len(ids)} by {args.writers} writers in {write_s:.1f}s ({len(ids) / write_s:.1f}/s)"),
        ("settlers", f"{len(accounts)} processes on PostgreSQL: {per_settler}"),
        ("outbox afterwards", ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))),
        ("on chain exactly once", f"{once}"),
        ("on chain more than once", f"{twice}"),
        ("missing on chain", f"{missing}"),
        ("settled but never written", f"{extra}"),
        ("settlement transactions", f"{len(txs)} in {len({t.block for t in txs})} blocks"),
        ("reverted", f"{reverted}"),
        ("batches", f"{len(batches)} ({Counter(b.status for b in batches)})"),
        ("last record settled", f"{tail_s:.1f}s after the writers finished"),
    ]
    width = max(len(k) for k, _ in rows)
    print(
        f"settlement soak: anvil block time {args.block_time:g}s, batch size {args.batch_size}, "
        f"interval {args.interval:g}s, max in flight {args.max_in_flight}"
    )
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    ok = once == len(ids) == args.records and not (twice or missing or extra or reverted)
    print("PASS: every request on chain exactly once, no settlement transaction reverted" if ok else "FAIL")
    if ok:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"logs in {tmp}", file=sys.stderr)
    return 0 if ok else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=40.0, help="records per second over all writers")
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--settlers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--max-in-flight", type=int, default=8)
    ap.add_argument("--block-time", type=float, default=1.0)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for settlement after writing")
    ap.add_argument("--db", help="SQLAlchemy URL of an empty database (default: a throwaway PostgreSQL cluster)")
    # writer mode (internal)
    ap.add_argument("--writer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--pairs", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.writer:
        writer(args)
        return
    sys.exit(soak(args))


if __name__ == "__main__":
    main()
