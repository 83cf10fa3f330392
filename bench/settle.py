"""Settlement throughput and gas per record at batch sizes 1, 100, 500: the Settler end to end
(SQLite outbox -> batches -> anvil), sequential against pipelined, in one run.

Starts its own anvil (1-second blocks, zero base fee, as the devnet runs), deploys, registers one
adapter with two datasets and one node. For each batch size and mode it fills a fresh outbox (not
timed), then times `Settler.drain()` until every record is settled (receipts awaited, database
committed), after one batch settled untimed (the settler's start-up probe: see run_mode). Modes:
sequential = SettlerConfig(max_in_flight=1), one batch per receipt, as the settler worked before
pipelining; pipelined = --in-flight batches sent before awaiting receipts.
Prints records/s and gas per record, with ratios against batch size 1 and against sequential, and the
settler's CPU per record (its drain's thread: on this shared machine the steadier figure of the two).
A mixed set-up follows (pipelined, batch sizes 100 and 500): records spread over 8 adapters and 4 nodes
(each adapter paying one or two datasets), every tenth a base-model record (adapter id zero).

    python bench/settle.py [--records 600] [--batched-records 20000] [--sustained-records 100000]
                           [--mixed-records 10000] [--seq-seconds 8] [--in-flight 64]

Pipelined settles --records at batch size 1 and --batched-records at 100 and 500, then --sustained-records
at 500 (over many blocks: the settler's sustained rate); sequential settles
about --seq-seconds worth of blocks at each size (it does one batch per block, so more only waits).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from eth_account import Account  # noqa: E402
from sqlmodel import Session, select  # noqa: E402

from common.wire import hex0x, node_id_of  # noqa: E402
from devnet.anvil import DEV_KEYS, Anvil, AnvilConfig, free_port  # noqa: E402
from devnet.deploy import deploy  # noqa: E402
from ledger.chain import ChainClient  # noqa: E402
from ledger.db import init_db, make_engine  # noqa: E402
from ledger.models import SettlementBatch, UsageRecord  # noqa: E402
from ledger.settler import Settler  # noqa: E402
from ledger.settler_config import SettlerConfig  # noqa: E402
from ledger.types import BASE_MODEL_ADAPTER_ID  # noqa: E402

SIZES = (1, 100, 500)
MIXED_SIZES = (100, 500)
MIXED_ADAPTERS, MIXED_NODES, MIXED_BASE_EVERY = 8, 4, 10


def rid() -> str:
    return hex0x(os.urandom(32))


def setup(rpc_url: str):
    settler = Account.from_key(DEV_KEYS[1])  # DEV_KEYS[0] is the admin deploy() uses
    d = deploy(rpc_url, settlers=[settler.address], settler_deposit=1000 * 10**18, fund_amount=0)
    owner, op, p1, p2 = (Account.from_key(k) for k in DEV_KEYS[2:6])
    base, adapter = rid(), rid()
    ChainClient(d, p1).register_dataset("bench-1", rid())
    ChainClient(d, p2).register_dataset("bench-2", rid())
    ds1, ds2 = ChainClient(d).dataset_id("bench-1", p1.address), ChainClient(d).dataset_id("bench-2", p2.address)
    ChainClient(d, owner).register_adapter(
        adapter,
        name="bench",
        version="1",
        base_model=base,
        price_per_1k_tokens=10**12,
        datasets=[(ds1, 3000), (ds2, 2000)],
    )
    node_key = Ed25519PrivateKey.generate()  # the registry takes a node id only with its key's proof
    node = node_id_of(node_key.public_key().public_bytes_raw())
    ChainClient(d, op).register_node(node_key, peer_id="p", multiaddrs=[], api_url="http://x", base_model=base)
    return ChainClient(d, settler), adapter, node


def setup_mixed(client: ChainClient):
    """8 more adapters (one or two datasets each, different prices) and 4 more nodes (two operators)."""
    d = client.deployment
    owners = [Account.from_key(k) for k in DEV_KEYS[2:4]]
    p1, p2 = (Account.from_key(k) for k in DEV_KEYS[4:6])
    ds1, ds2 = ChainClient(d).dataset_id("bench-1", p1.address), ChainClient(d).dataset_id("bench-2", p2.address)
    base, adapters, nodes = rid(), [], []
    for i in range(MIXED_ADAPTERS):
        a = rid()
        ChainClient(d, owners[i % 2]).register_adapter(
            a,
            name=f"mixed-{i}",
            version="1",
            base_model=base,
            price_per_1k_tokens=10**12 + 7_919 * i,
            datasets=[(ds1, 2500)] if i % 2 else [(ds1, 3000), (ds2, 1500)],
        )
        adapters.append(a)
    for i in range(MIXED_NODES):
        key = Ed25519PrivateKey.generate()
        op = Account.from_key(DEV_KEYS[6 + i % 2])
        ChainClient(d, op).register_node(key, peer_id="p", multiaddrs=[], api_url="http://x", base_model=base)
        nodes.append(node_id_of(key.public_key().public_bytes_raw()))
    return adapters, nodes


def single(adapter: str, node: str):
    return lambda i: (adapter, node)


def mixed(adapters: list[str], nodes: list[str]):
    def pick(i: int) -> tuple[str, str]:
        a = BASE_MODEL_ADAPTER_ID if i % MIXED_BASE_EVERY == 0 else adapters[(i * 7) % len(adapters)]
        return a, nodes[(i * 3 + i // 5) % len(nodes)]

    return pick


def add_records(engine, pick, total: int) -> None:
    rows = [
        UsageRecord(
            request_id=rid(),
            adapter_id=pick(i)[0],
            node_id=pick(i)[1],
            prompt_tokens=100 + i % 50,
            completion_tokens=20 + i % 7,
            receipt_json="{}",
            node_signature="bench",
        )
        for i in range(total)
    ]
    with Session(engine) as s:
        s.add_all(rows)
        s.commit()


def run_mode(client: ChainClient, pick, folder: Path, *, batch_size: int, total: int, in_flight: int, tag="") -> dict:
    """Settle `total` records with a settler that is already running: a first batch (its start-up probe,
    one simulated batch awaited alone, as after every restart or refusal) is settled before the clock
    starts, so the figure is the settler's steady throughput."""
    engine = make_engine(f"sqlite:///{folder}/outbox-{tag}{batch_size}-{in_flight}.db", immediate=True)
    init_db(engine)
    settler = Settler(
        engine,
        client.with_account(client.account),
        SettlerConfig(batch_size=batch_size, interval=0, max_in_flight=in_flight),
    )
    add_records(engine, pick, batch_size)
    if settler.drain() != batch_size:
        raise RuntimeError("the warm-up batch did not settle")
    with Session(engine) as s:
        warm = {b.id for b in s.exec(select(SettlementBatch))}
    add_records(engine, pick, total)  # not timed
    t0, cpu0 = time.perf_counter(), time.thread_time()
    settled = settler.drain()  # on this thread: its CPU is the settler's (the lease heartbeat aside)
    elapsed, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
    if settled != total:
        raise RuntimeError(f"settled {settled} of {total} records at batch size {batch_size}")
    with Session(engine) as s:
        hashes = [b.tx_hash for b in s.exec(select(SettlementBatch)) if b.id not in warm]
    gas = sum(client.tx.light_receipt(h)["gasUsed"] for h in hashes)
    engine.dispose()
    return {
        "records": total,
        "txs": len(hashes),
        "seconds": elapsed,
        "rps": total / elapsed,
        "gas_per_record": gas / total,
        "cpu_us": cpu / total * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=600, help="records settled one per transaction (pipelined)")
    ap.add_argument("--batched-records", type=int, default=20_000, help="records at sizes 100 and 500 (pipelined)")
    ap.add_argument(
        "--sustained-records", type=int, default=100_000, help="records of the sustained run at batch size 500"
    )
    ap.add_argument("--mixed-records", type=int, default=10_000, help="records of the mixed set-up at 100 and 500")
    ap.add_argument("--seq-seconds", type=float, default=8.0, help="about how long each sequential run lasts")
    ap.add_argument("--in-flight", type=int, default=64, help="max_in_flight of the pipelined mode")
    ap.add_argument("--block-time", type=float, default=1.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    seq_batches = max(2, round(args.seq_seconds / args.block_time))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = AnvilConfig(port=free_port(), block_time=args.block_time, log_file=Path(tmp) / "anvil.log")
        with Anvil(cfg) as anvil:
            client, adapter, node = setup(anvil.rpc_url)
            one = single(adapter, node)
            for size in SIZES:
                seq = run_mode(client, one, Path(tmp), batch_size=size, total=seq_batches * size, in_flight=1)
                pipe = run_mode(
                    client,
                    one,
                    Path(tmp),
                    batch_size=size,
                    total=args.records if size == 1 else args.batched_records,
                    in_flight=args.in_flight,
                )
                rows.append((size, seq, pipe))
            # at 20,000 records a batch-500 run is two or three blocks, so where in its block the clock
            # started moves it by a third; over more blocks the figure is the settler's sustained rate
            sustained = run_mode(
                client, one, Path(tmp), batch_size=500, total=args.sustained_records, in_flight=args.in_flight
            )
            pick = mixed(*setup_mixed(client))
            mixed_rows = [
                (
                    size,
                    run_mode(
                        client,
                        pick,
                        Path(tmp),
                        batch_size=size,
                        total=args.mixed_records,
                        in_flight=args.in_flight,
                        tag="mixed-",
                    ),
                )
                for size in MIXED_SIZES
            ]
    base = rows[0][2]
    print(
        f"settlement on anvil (block time {args.block_time:g}s): Settler.drain() from a SQLite outbox; "
        f"sequential = max_in_flight 1, pipelined = max_in_flight {args.in_flight}"
    )
    print(
        f"{'batch':>6} {'records':>8} {'txs':>5} {'seconds':>8} {'records/s':>10} {'x vs 1':>7} {'gas/record':>11} "
        f"{'x vs 1':>7} {'seq rec/s':>10} {'pipe/seq':>9} {'cpu us/rec':>11}"
    )
    for size, seq, r in rows:
        print(
            f"{size:>6} {r['records']:>8} {r['txs']:>5} {r['seconds']:>8.2f} {r['rps']:>10.0f} "
            f"{r['rps'] / base['rps']:>7.1f} "
            f"{r['gas_per_record']:>11.0f} {r['gas_per_record'] / base['gas_per_record']:>7.3f} "
            f"{seq['rps']:>10.1f} {r['rps'] / seq['rps']:>9.1f} {r['cpu_us']:>11.1f}"
        )
    r = sustained
    print(
        f"{'500':>6} {r['records']:>8} {r['txs']:>5} {r['seconds']:>8.2f} {r['rps']:>10.0f} "
        f"{r['rps'] / base['rps']:>7.1f} {r['gas_per_record']:>11.0f} "
        f"{r['gas_per_record'] / base['gas_per_record']:>7.3f} {'':>10} {'':>9} {r['cpu_us']:>11.1f}"
        "   (sustained: --sustained-records)"
    )

    print(
        f"\nmixed set-up: {MIXED_ADAPTERS} adapters x {MIXED_NODES} nodes, every {MIXED_BASE_EVERY}th record a "
        "base-model one; pipelined"
    )
    print(
        f"{'batch':>6} {'records':>8} {'txs':>5} {'seconds':>8} {'records/s':>10} {'gas/record':>11} {'x vs 1':>7} "
        f"{'cpu us/rec':>11}"
    )
    for size, r in mixed_rows:
        print(
            f"{size:>6} {r['records']:>8} {r['txs']:>5} {r['seconds']:>8.2f} {r['rps']:>10.0f} "
            f"{r['gas_per_record']:>11.0f} {r['gas_per_record'] / base['gas_per_record']:>7.3f} {r['cpu_us']:>11.1f}"
        )


if __name__ == "__main__":
    main()
