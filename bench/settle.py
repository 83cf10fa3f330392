"""Settlement throughput and gas per record at batch sizes 1, 100, 500, against a real anvil.

Starts its own anvil (1-second blocks, zero base fee, as the devnet runs), deploys, registers one
adapter with two datasets and one node, then for each batch size sends every batch without waiting
(pipelined nonces) and waits for all receipts. Prints records/s and gas per record, with ratios
against batch size 1 measured in the same run.

    python bench/settle.py [--records 500] [--batched-records 20000] [--block-time 1]

Batch size 1 settles --records; 100 and 500 settle --batched-records, enough to fill several blocks
(with 1-second blocks a small run measures the block time, not settlement).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eth_account import Account  # noqa: E402

from devnet.anvil import DEV_KEYS, Anvil, AnvilConfig, free_port  # noqa: E402
from devnet.deploy import deploy  # noqa: E402
from ledger.chain import ChainClient  # noqa: E402
from ledger.merkle import MerkleTree  # noqa: E402
from ledger.types import SettleRecord  # noqa: E402


def rid() -> str:
    return "0x" + os.urandom(32).hex()


def setup(rpc_url: str):
    admin, settler = Account.from_key(DEV_KEYS[0]), Account.from_key(DEV_KEYS[1])
    d = deploy(rpc_url, settlers=[settler.address], settler_deposit=1000 * 10**18, fund_amount=0)
    owner, op, p1, p2 = (Account.from_key(k) for k in DEV_KEYS[2:6])
    base, ds1, ds2, adapter, node = rid(), rid(), rid(), rid(), rid()
    ChainClient(d, p1).register_dataset(ds1, rid())
    ChainClient(d, p2).register_dataset(ds2, rid())
    ChainClient(d, owner).register_adapter(adapter, name="bench", version="1", base_model=base,
                                           price_per_1k_tokens=10**12, datasets=[(ds1, 3000), (ds2, 2000)])  # fmt: skip
    ChainClient(d, op).register_node(node, peer_id="p", multiaddrs=[], api_url="http://x", base_model=base)
    return ChainClient(d, settler), adapter, node, admin


def run_size(client: ChainClient, adapter: str, node: str, batch_size: int, total: int) -> dict:
    records = [SettleRecord(rid(), adapter, node, 100 + i % 50, 20 + i % 7) for i in range(total)]
    batches = [records[i:i + batch_size] for i in range(0, total, batch_size)]
    prepared = [(rid(), "0x" + MerkleTree.from_records(b).root.hex(), b) for b in batches]
    t0 = time.perf_counter()
    hashes = [client.send_settle_batch(bid, root, b) for bid, root, b in prepared]
    gas = 0
    for h, (bid, root, b) in zip(hashes, prepared):
        gas += client.wait_settle_batch(h, bid, root, b, timeout=300)["gasUsed"]
    elapsed = time.perf_counter() - t0
    return {"batch": batch_size, "records": total, "txs": len(batches), "seconds": elapsed,
            "rps": total / elapsed, "gas_per_record": gas / total}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=500, help="records settled one per transaction")
    ap.add_argument("--batched-records", type=int, default=20_000, help="records settled at sizes 100 and 500")
    ap.add_argument("--block-time", type=float, default=1.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = AnvilConfig(port=free_port(), block_time=args.block_time, log_file=Path(tmp) / "anvil.log")
        with Anvil(cfg) as anvil:
            client, adapter, node, _ = setup(anvil.rpc_url)
            rows = [run_size(client, adapter, node, size, args.records if size == 1 else args.batched_records)
                    for size in (1, 100, 500)]
    base = rows[0]
    print(f"settlement on anvil (block time {args.block_time:g}s)")
    print(f"{'batch':>6} {'records':>8} {'txs':>5} {'seconds':>8} {'records/s':>10} {'x vs 1':>7} {'gas/record':>11} {'x vs 1':>7}")
    for r in rows:
        print(f"{r['batch']:>6} {r['records']:>8} {r['txs']:>5} {r['seconds']:>8.2f} {r['rps']:>10.0f} {r['rps'] / base['rps']:>7.1f} "
              f"{r['gas_per_record']:>11.0f} {r['gas_per_record'] / base['gas_per_record']:>7.3f}")


if __name__ == "__main__":
    main()
