"""Soak: two real gateways, two in-process settlers, one PostgreSQL database, one ledger.

Starts, as processes on 127.0.0.1: a throwaway PostgreSQL cluster (tests/utils/postgres.py), anvil
with 1-second blocks and the contracts, one real node daemon (tiny base, one published adapter; it
registers itself on chain and heartbeats to both gateways) and TWO `loramesh gateway run` processes on
the same database URL, each with --base (it tokenizes) and its own --key: a granted settler account
with its own deposit, so each gateway runs its in-process settler. Then --requests requests are sent,
alternately to each gateway, --concurrency at a time (adapter and base model, completions and chat,
streamed with usage and not), keeping for each the gateway's request id (X-Request-Id; the body's `id`
is checked against it) and the usage the client was shown.

When the outbox has nothing pending or submitted (and no request is open), the gateways are stopped
and the chain itself is read (raw eth_getLogs of RecordSettled and the receipt of every transaction
sent to the ledger, tests/ledger/audit.py): every completed request must be on chain exactly once,
none missing, nothing settled that no client got, no settlement transaction reverted, each outbox row
billing what its client was shown, and the tokens (and fee) on chain equal to what the client was
shown. Prints a short table; exit status 1 when any check fails (logs are then kept).

    python bench/gateway_soak.py [--requests 2000] [--concurrency 16] [--max-tokens 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from sqlmodel import Session, select  # noqa: E402

from devnet.anvil import free_port  # noqa: E402
from devnet.processes import ManagedProcess, ProcessGroup  # noqa: E402

PASSWORD = "bench"
ETHER = 10**18
ENV = {"LORAMESH_KEY_PASSWORD": PASSWORD}
PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fib(n):",
    "Rain in the mountains",
    "A short list of colours:",
    "Ledger entry 42",
]
WARM_UP = 4  # sequential first requests: each gateway x (adapter, base model); not in the requests/s


@dataclass
class Shown:
    """One request as its client saw it."""

    index: int
    gateway: int
    model: str
    chat: bool
    stream: bool
    request_id: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    token_events: int = 0
    error: str | None = None


class Stop(Exception):
    """SIGTERM: unwind through the cleanup like Ctrl-C."""


def _sigterm(*_) -> None:
    raise Stop("SIGTERM")


async def one(client: httpx.AsyncClient, url: str, key: str, s: Shown, max_tokens: int, prompt: str) -> None:
    """Send request `s` and fill in what its client was shown (or the error)."""
    body: dict = {"model": s.model, "max_tokens": max_tokens}
    if s.chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if s.stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    path = url + ("/v1/chat/completions" if s.chat else "/v1/completions")
    prefix = "chatcmpl-" if s.chat else "cmpl-"
    headers = {"Authorization": f"Bearer {key}"}
    try:
        if not s.stream:
            r = await client.post(path, json=body, headers=headers)
            if r.status_code != 200:
                s.error = f"HTTP {r.status_code}: {r.text[:200]}"
                return
            doc = r.json()
            s.request_id = r.headers.get("x-request-id")
            if not s.request_id or doc.get("id") != prefix + s.request_id[2:]:
                s.error = f"id {doc.get('id')!r} does not match X-Request-Id {s.request_id!r}"
                return
            s.prompt_tokens, s.completion_tokens = doc["usage"]["prompt_tokens"], doc["usage"]["completion_tokens"]
            return
        async with client.stream("POST", path, json=body, headers=headers) as r:
            if r.status_code != 200:
                s.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return
            s.request_id = r.headers.get("x-request-id")
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    continue
                ev = json.loads(data)
                if "error" in ev:
                    s.error = f"stream error: {ev['error']}"
                    return
                if not s.request_id or ev.get("id") != prefix + s.request_id[2:]:
                    s.error = f"chunk id {ev.get('id')!r} does not match X-Request-Id {s.request_id!r}"
                    return
                for c in ev.get("choices") or ():
                    if c.get("finish_reason") is None and ("text" in c or "role" not in c.get("delta", {})):
                        s.token_events += 1  # one event per token (a chat stream opens with a role chunk)
                if ev.get("usage"):
                    s.prompt_tokens = ev["usage"]["prompt_tokens"]
                    s.completion_tokens = ev["usage"]["completion_tokens"]
            if not done or s.prompt_tokens is None:
                s.error = "stream ended without usage and [DONE]"
    except (httpx.HTTPError, ValueError, KeyError) as e:
        s.error = f"{type(e).__name__}: {e}"


async def load(args, urls: list[str], key: str, models: list[str]) -> tuple[list[Shown], float]:
    """--requests requests over the gateways: the first WARM_UP one at a time (the node loads the
    adapter on first use), the rest --concurrency at a time. (What each client saw, seconds the rest took.)"""
    shown = []
    for i in range(args.requests):
        # gateway alternates; model, endpoint and streaming cycle at other periods so every mix occurs
        shown.append(
            Shown(i, i % len(urls), models[(i // 2) % len(models)], chat=(i // 4) % 2 == 1, stream=(i // 8) % 2 == 1)
        )
    sem = asyncio.Semaphore(args.concurrency)
    limits = httpx.Limits(max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency * 2)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def go(s: Shown) -> None:
            async with sem:
                await one(client, urls[s.gateway], key, s, args.max_tokens, PROMPTS[s.index % len(PROMPTS)])

        for s in shown[:WARM_UP]:
            await go(s)
        t0 = time.monotonic()
        await asyncio.gather(*(go(s) for s in shown[WARM_UP:]))
        return shown, time.monotonic() - t0


def record_settled_logs(client, from_block: int) -> dict[str, list[tuple[int, int, int, str]]]:
    """request id -> [(prompt tokens, completion tokens, fee, adapter id)] of every time the chain settled it,
    decoded in bulk from the RecordsSettled logs (ChainClient.settled_records)."""
    out: dict[str, list] = {}
    for r in client.settled_records(from_block=from_block):
        out.setdefault(r.request_id, []).append((r.prompt_tokens, r.completion_tokens, r.fee, r.adapter_id))
    return out


def soak(args) -> int:
    import gateway.tables  # noqa: F401 - registers the gateway's tables
    from common.identity import create_identity
    from gateway.keys import create_key
    from gateway.tables import CompletionRecord
    from ledger.db import init_db, make_engine
    from ledger.models import SettlementBatch, UsageRecord
    from ledger.outbox import count_by_status
    from ledger.types import BASE_MODEL_ADAPTER_ID
    from node.operator_token import read_operator_token, token_path
    from node.publish import publish
    from tests.ledger.audit import ledger_transactions, record_settled_counts
    from tests.utils.chain import start_chain
    from tests.utils.factories import make_base, make_package
    from tests.utils.postgres import start_postgres

    tmp = Path(tempfile.mkdtemp(prefix="loramesh-gwsoak-"))
    print(f"logs in {tmp} (deleted after a pass)", flush=True)
    group = ProcessGroup()
    chain = cluster = engine = None
    t_start = time.monotonic()
    try:
        cluster = start_postgres()
        db_url = cluster.new_database("gwsoak")
        chain = start_chain(tmp / "chain", block_time=1.0)
        engine = make_engine(db_url)
        init_db(engine)  # every registered table, the gateway's included
        api_key, _ = create_key(engine, name="soak")

        # two settler accounts, each granted with its own deposit: the fixture's, and a fresh one
        admin = chain.client(chain.admin)
        settlers = [chain.settler, chain.new_account(10 * ETHER)]
        admin.grant_settler(settlers[1].address)
        admin.deposit_for(settlers[1].address, 100 * ETHER)
        for i, a in enumerate(settlers):
            (tmp / f"settler-{i}.key").write_text(a.key.hex())

        base = make_base(tmp / "base", seed=0)
        owner = chain.users[0]
        pkg = make_package(base, tmp / "pkg", account=owner, name="soak/adapter")
        ident = create_identity(tmp / "node.key", PASSWORD)
        admin.fund([ident.address], ETHER)  # gas for the node's own registration
        start_block = chain.client().block_number() + 1

        gw_ports, node_port = [free_port(), free_port()], free_port()
        urls = [f"http://127.0.0.1:{p}" for p in gw_ports]
        node_url = f"http://127.0.0.1:{node_port}"
        gw_env = ENV | {
            "LORAMESH_GATEWAY_SETTLE_INTERVAL_S": str(args.settle_interval),
            "LORAMESH_GATEWAY_SETTLE_BATCH_SIZE": str(args.batch_size),
        }
        gateways = [
            group.start(
                ManagedProcess(
                    f"gateway-{i}",
                    [
                        "gateway",
                        "run",
                        "--deployment",
                        str(chain.deployment_path),
                        "--db",
                        db_url,
                        "--port",
                        str(port),
                        "--base",
                        str(base),
                        "--key",
                        str(tmp / f"settler-{i}.key"),
                    ],
                    tmp / f"gateway-{i}.log",
                    env=gw_env,
                )
            )
            for i, port in enumerate(gw_ports)
        ]
        node = group.start(
            ManagedProcess(
                "node",
                [
                    "node",
                    "run",
                    "--base",
                    str(base),
                    "--store",
                    str(tmp / "store"),
                    "--port",
                    str(node_port),
                    "--data-dir",
                    str(tmp / "node-data"),
                    "--key",
                    str(tmp / "node.key"),
                    "--deployment",
                    str(chain.deployment_path),
                    *[a for u in urls for a in ("--gateway", u)],
                    "--slots",
                    "2",
                    "--threads",
                    str(args.node_threads),
                    "--kv-blocks",
                    "256",
                ],
                tmp / "node.log",
                env=ENV,
            )
        )
        for g, u in zip(gateways, urls):
            g.wait_http(u + "/health")
        node.wait_http(node_url + "/health")
        publish(
            pkg.path,
            chain.client(owner),
            node_url=node_url,  # on chain, then into the node's store
            operator_token=read_operator_token(token_path(tmp / "node-data")),
        )

        listed: dict[str, dict] = {}

        def ready(u: str) -> bool:
            models = httpx.get(u + "/v1/models", headers={"authorization": f"Bearer {api_key}"}, timeout=5).json()
            live = httpx.get(u + "/health", timeout=5).json()["live_nodes"]
            by_id = {m["id"]: m for m in models.get("data", [])}
            if live != 1 or "soak/adapter" not in by_id or not any(m["adapter_id"] is None for m in by_id.values()):
                return False
            listed.update(by_id)
            return True

        for g, u in zip(gateways, urls):
            g.wait_until(lambda u=u: ready(u), timeout=90, what="the node live and its adapter listed")
        base_name = next(name for name, m in listed.items() if m["adapter_id"] is None)
        models = ["soak/adapter", base_name]
        adapter = listed["soak/adapter"]
        price_of = {
            adapter["adapter_id"].lower(): int(adapter["price_per_1k_tokens_wei"]),
            BASE_MODEL_ADAPTER_ID.lower(): int(listed[base_name]["price_per_1k_tokens_wei"]),
        }
        print(
            f"ready after {time.monotonic() - t_start:.0f}s: 2 gateways, node {node_url}, models {models}; "
            f"sending {args.requests} requests, concurrency {args.concurrency}",
            flush=True,
        )

        shown, load_s = asyncio.run(load(args, urls, api_key, models))
        ok_shown = [s for s in shown if s.error is None]
        print(f"{len(ok_shown)}/{len(shown)} requests completed in {load_s:.1f}s; waiting for settlement", flush=True)

        t_loaded = time.monotonic()
        deadline = t_loaded + args.timeout
        while True:
            with Session(engine) as s:
                counts = count_by_status(s)
                open_n = len(s.exec(select(CompletionRecord.request_id).where(CompletionRecord.status == "open")).all())
            if not counts.get("pending") and not counts.get("submitted") and not open_n:
                break
            dead = [p.name for p in gateways if not p.alive()]
            if time.monotonic() > deadline or dead:
                print(f"gave up waiting for settlement: {counts}, {open_n} open, dead: {dead}", file=sys.stderr)
                break
            time.sleep(0.5)
        settle_tail_s = time.monotonic() - t_loaded
        wall_s = time.monotonic() - t_start
        codes = group.stop_all()  # gateways stop their settlers on SIGINT
        logged_errors = sum(
            1
            for p in gateways + [node]
            for line in p.log_path.read_text(errors="replace").splitlines()
            if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")
        )

        with Session(engine) as s:
            rows = {r.request_id.lower(): r for r in s.exec(select(UsageRecord))}
            batches = list(s.exec(select(SettlementBatch)))
            instances = Counter(r.instance_id for r in s.exec(select(CompletionRecord)))
            counts = count_by_status(s)
        client = chain.client()
        on_chain = record_settled_counts(client.w3, chain.deployment.ledger, start_block)
        logs = record_settled_logs(client, start_block)
        txs = ledger_transactions(client.w3, chain.deployment.ledger, start_block, [a.address for a in settlers])
    finally:
        group.stop_all()
        if engine is not None:
            engine.dispose()
        if chain is not None:
            chain.anvil.stop()
        if cluster is not None:
            cluster.stop()

    ids = [s.request_id.lower() for s in ok_shown]
    once = sum(1 for r in ids if on_chain.get(r) == 1)
    dup = sum(1 for r in ids if on_chain.get(r, 0) > 1)
    missing = sum(1 for r in ids if r not in on_chain)
    extra = len(set(on_chain) - set(ids))
    no_row = sum(1 for r in ids if r not in rows)
    rows_not_shown = len(set(rows) - set(ids))
    reverted = sum(t.status != 1 for t in txs)
    row_mismatch = sum(
        1
        for s in ok_shown
        if (r := rows.get(s.request_id.lower())) is not None
        and (r.prompt_tokens, r.completion_tokens) != (s.prompt_tokens, s.completion_tokens)
    )
    chain_mismatch = fee_mismatch = 0
    for s in ok_shown:
        for p, c, fee, adapter in logs.get(s.request_id.lower(), ()):
            chain_mismatch += (p, c) != (s.prompt_tokens, s.completion_tokens)
            fee_mismatch += fee != price_of.get(adapter, -1) * (p + c) // 1000
    stream_mismatch = sum(1 for s in ok_shown if s.stream and s.token_events != s.completion_tokens)
    shown_tokens = sum(s.prompt_tokens + s.completion_tokens for s in ok_shown)
    chain_tokens = sum(p + c for evs in logs.values() for p, c, _, _ in evs)
    errors = Counter(s.error.split(":")[0] for s in shown if s.error)

    per_gw = ", ".join(f"gateway {g}: {sum(s.gateway == g for s in ok_shown)}" for g in range(2))
    by_settler = Counter(b.settler.lower() for b in batches if b.settler)
    per_settler = ", ".join(
        f"gateway {i} ({a.address[:8]}…): {by_settler.get(a.address.lower(), 0)} batches, "
        f"{sum(t.sender == a.address.lower() for t in txs)} txs"
        for i, a in enumerate(settlers)
    )
    mix = Counter((s.model != "soak/adapter", s.chat, s.stream) for s in ok_shown)
    table = [
        (
            "requests",
            f"{len(shown)} sent, {len(ok_shown)} completed, {len(shown) - len(ok_shown)} failed "
            f"{dict(errors) if errors else ''}",
        ),
        ("per gateway", f"{per_gw} (gateway instances in the database: {len(instances)})"),
        (
            "mix",
            f"adapter {sum(v for k, v in mix.items() if not k[0])} / base {sum(v for k, v in mix.items() if k[0])}"
            f", chat {sum(s.chat for s in ok_shown)}, streamed {sum(s.stream for s in ok_shown)}, "
            f"max_tokens {args.max_tokens}",
        ),
        (
            "load",
            f"{len(shown) - WARM_UP} requests (after {WARM_UP} warm-up) in {load_s:.1f}s at concurrency "
            f"{args.concurrency}: {(len(shown) - WARM_UP) / load_s:.1f} requests/s",
        ),
        ("settlers", per_settler),
        ("batches", f"{len(batches)} ({dict(Counter(b.status for b in batches))})"),
        ("outbox afterwards", ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))),
        ("on chain exactly once", f"{once} of {len(ids)}"),
        ("duplicates / missing", f"{dup} / {missing}"),
        (
            "settled, no client got it",
            f"{extra} (outbox rows no client got: {rows_not_shown}; completed without a row: {no_row})",
        ),
        ("settlement transactions", f"{len(txs)} in {len({t.block for t in txs})} blocks, {reverted} reverted"),
        (
            "billed == shown",
            f"outbox {len(ok_shown) - row_mismatch - no_row}/{len(ok_shown)}, on chain tokens "
            f"{chain_tokens} vs shown {shown_tokens}, {chain_mismatch} records differ, "
            f"{fee_mismatch} fees != price x tokens / 1000",
        ),
        ("streamed token events", f"{stream_mismatch} streams where events != usage.completion_tokens"),
        ("last record settled", f"{settle_tail_s:.1f}s after the last response"),
        ("processes", f"exit codes {codes}, {logged_errors} error lines in the gateway and node logs"),
        ("wall time", f"{wall_s:.0f}s (setup, load, settlement)"),
    ]
    width = max(len(k) for k, _ in table)
    print(
        f"\ngateway soak: 2 gateways + their settlers on PostgreSQL, 1 node, anvil 1 s blocks, "
        f"settle batch {args.batch_size}, interval {args.settle_interval:g}s"
    )
    for k, v in table:
        print(f"  {k:<{width}}  {v}")
    checks = {
        "every request completed": len(ok_shown) == len(shown) == args.requests,
        "every completed request on chain exactly once": once == len(ids) and not (dup or missing),
        "nothing settled that no client got": not extra and not rows_not_shown and not no_row,
        "no settlement transaction reverted": not reverted,
        "billed tokens == shown usage": not row_mismatch and not chain_mismatch and chain_tokens == shown_tokens,
        "fee == price x tokens / 1000": not fee_mismatch,
        # a short run can fit in one settler's steps; at soak size both must have taken batches
        "both settlers settled batches": args.requests < 1000
        or all(by_settler.get(a.address.lower()) for a in settlers),
        "no errors logged, every process exited 0": not logged_errors and not any(codes.values()),
        "outbox drained": not counts.get("pending") and not counts.get("submitted"),
    }
    failed = [name for name, good in checks.items() if not good]
    print("PASS: " + "; ".join(checks) if not failed else "FAIL: " + "; ".join(failed))
    if failed:
        bad = [s for s in shown if s.error][:5]
        for s in bad:
            print(
                f"  request {s.index} (gateway {s.gateway}, {s.model}, chat={s.chat}, stream={s.stream}): {s.error}",
                file=sys.stderr,
            )
        print(f"logs in {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=100, help="settle batch size of each gateway")
    ap.add_argument("--settle-interval", type=float, default=2.0, help="seconds between each settler's steps")
    ap.add_argument("--node-threads", type=int, default=1, help="torch CPU threads of the node")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for settlement after the load")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (a `cmd &`)
    try:
        code = soak(args)
    except (KeyboardInterrupt, Stop):
        print("interrupted: every process stopped", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
