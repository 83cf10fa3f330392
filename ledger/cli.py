"""`loramesh rewards ...` and `loramesh settler ...` (typer sub-apps mounted by devnet/cli.py)."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ledger.chain import ChainClient
from ledger.db import init_db, make_engine
from ledger.keys import load_account
from ledger.rewards import rewards_summary
from ledger.settler import Settler, requeue_set_aside, settler_status
from ledger.settler_config import (
    DEFAULT_LEASE,
    DEFAULT_LOW_DEPOSIT,
    DEFAULT_MAX_PRICE_PER_1K,
    DEFAULT_MAX_RECORD_TOKENS,
    SettlerConfig,
)
from ledger.types import BASE_MODEL_ADAPTER_ID
from common.wire import restore_recursion_limit

DEFAULT_DEPLOYMENT = Path(os.environ.get("LORAMESH_DEPLOYMENT", ".loramesh/devnet/deployment.json"))
ETHER = 10**18

rewards_app = typer.Typer(help="Rewards accrued from settled inferences.", no_args_is_help=True)
settler_app = typer.Typer(help="Settle the usage-record outbox on chain.", no_args_is_help=True)

DeploymentOpt = Annotated[Path, typer.Option("--deployment", help="deployment file ($LORAMESH_DEPLOYMENT)")]
RpcOpt = Annotated[str | None, typer.Option("--rpc", help="JSON-RPC URL (default: the deployment's)")]


def _eth(wei: int) -> str:
    return f"{wei / ETHER:.6f} ETH"


@rewards_app.command("show")
def rewards_show(
    address: Annotated[str, typer.Argument(help="account to report on")],
    deployment: DeploymentOpt = DEFAULT_DEPLOYMENT,
    rpc: RpcOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Accrued, withdrawn and available rewards of ADDRESS, by adapter and by role."""
    client = ChainClient.from_deployment(deployment, rpc_url=rpc)
    summary = rewards_summary(client, address)
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2, sort_keys=True))
        return
    console = Console()
    console.print(f"[bold]{summary.address}[/bold]: accrued {_eth(summary.accrued)}, withdrawn "
                  f"{_eth(summary.withdrawn)}, available {_eth(summary.available)} ({summary.accrued} wei)")  # fmt: skip
    table = Table("adapter", "role", "wei", "ETH")
    for adapter, roles in sorted(summary.by_adapter.items()):
        for role, amount in sorted(roles.items()):
            label = "base model" if adapter == BASE_MODEL_ADAPTER_ID else adapter
            table.add_row(label, role, str(amount), _eth(amount))
    console.print(table)
    totals = ", ".join(f"{role} {amount}" for role, amount in sorted(summary.by_role.items())) or "none"
    console.print(f"by role (wei): {totals}; {summary.batches} batches")
    console.print("[green]adds up[/green]" if summary.adds_up else "[red]does NOT add up[/red]")


@rewards_app.command("withdraw")
def rewards_withdraw(
    key: Annotated[Path, typer.Option("--key", help="key file: identity file or hex private key")],
    deployment: DeploymentOpt = DEFAULT_DEPLOYMENT,
    rpc: RpcOpt = None,
    amount: Annotated[int | None, typer.Option(help="wei to withdraw (default: everything)")] = None,
) -> None:
    """Withdraw what accrued to the key's address."""
    client = ChainClient.from_deployment(deployment, load_account(key), rpc_url=rpc)
    before = client.rewards_of(client.address).available
    rcpt = client.withdraw() if amount is None else client.withdraw_amount(amount)
    taken = before - client.rewards_of(client.address).available
    typer.echo(f"withdrew {taken} wei ({_eth(taken)}) to {client.address} in tx 0x{bytes(rcpt['transactionHash']).hex()}")


@settler_app.callback()
def _settler() -> None:
    """Settle the usage-record outbox on chain."""


MaxPriceOpt = Annotated[int, typer.Option("--max-price-per-1k", min=0,
                                            help="wei per 1k tokens above which a record is set aside")]
MaxTokensOpt = Annotated[int, typer.Option("--max-record-tokens", min=0,
                                           help="prompt + completion tokens above which a record is set aside")]
LowDepositOpt = Annotated[int, typer.Option("--low-deposit", min=0,
                                            help="wei of deposit left (after in-flight batches) below which to warn")]


@settler_app.command("run")
def settler_run(
    db: Annotated[str, typer.Option("--db", help="SQLAlchemy URL of the outbox database")],
    key: Annotated[Path, typer.Option("--key", help="settler key file: identity file or hex private key")],
    deployment: DeploymentOpt = DEFAULT_DEPLOYMENT,
    rpc: RpcOpt = None,
    batch_size: Annotated[int, typer.Option(help="N: records per batch")] = 100,
    interval: Annotated[float, typer.Option(help="T: seconds a partial batch may wait")] = 5.0,
    max_in_flight: Annotated[int, typer.Option(min=1, help="batches sent before awaiting their receipts")] = 32,
    max_price_per_1k: MaxPriceOpt = DEFAULT_MAX_PRICE_PER_1K,
    max_record_tokens: MaxTokensOpt = DEFAULT_MAX_RECORD_TOKENS,
    low_deposit: LowDepositOpt = DEFAULT_LOW_DEPOSIT,
    lease: Annotated[float, typer.Option(min=1.0, help="seconds a claim on an unfinished batch lasts unrenewed")]
    = DEFAULT_LEASE,
    drain: Annotated[bool, typer.Option(help="exit once nothing is left to settle")] = False,
) -> None:
    """Run the settler until SIGINT/SIGTERM (--drain: until the outbox is empty); any number may share a database."""
    logging.basicConfig(level=os.environ.get("LORAMESH_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    restore_recursion_limit()  # web3's py_ecc raised it at import: a deep RPC answer would crash, not raise
    engine = make_engine(db, immediate=True)
    init_db(engine)
    client = ChainClient.from_deployment(deployment, load_account(key), rpc_url=rpc)
    config = SettlerConfig(batch_size=batch_size, interval=interval, max_in_flight=max_in_flight,
                           max_price_per_1k=max_price_per_1k, max_record_tokens=max_record_tokens,
                           low_deposit=low_deposit, lease=lease)  # fmt: skip
    settler = Settler(engine, client, config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    n = settler.run(stop, drain=drain)
    typer.echo(f"settled {n} records")


@settler_app.command("status")
def settler_status_cmd(
    db: Annotated[str, typer.Option("--db", help="SQLAlchemy URL of the outbox database")],
    key: Annotated[Path | None, typer.Option("--key", help="settler key file, for its deposit")] = None,
    address: Annotated[str | None, typer.Option("--address", help="settler address, for its deposit")] = None,
    deployment: DeploymentOpt = DEFAULT_DEPLOYMENT,
    rpc: RpcOpt = None,
    low_deposit: LowDepositOpt = DEFAULT_LOW_DEPOSIT,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Records pending, in flight, set aside, disputed, settled; deposit left and fees pending (--key/--address)."""
    engine = make_engine(db)
    init_db(engine)
    client = None
    if key is not None:
        account = load_account(key)
        address = address or account.address
    if address is not None:
        client = ChainClient.from_deployment(deployment, rpc_url=rpc, check=False)
    st = settler_status(engine, client, address, low_deposit=low_deposit)
    engine.dispose()
    if as_json:
        typer.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    console = Console()
    table = Table("records", "count")
    for k in ("pending", "in_flight", "set_aside", "disputed", "rejected", "settled"):
        extra = f" ({st['set_aside_deposit_short']} for the deposit)" if k == "set_aside" and st[k] else ""
        table.add_row(k.replace("_", " "), f"{st[k]}{extra}")
    console.print(table)
    console.print(f"batches in flight: {st['batches_in_flight']}; fees pending {st['fees_pending_wei']} wei "
                  f"({_eth(st['fees_pending_wei'])}); fees set aside {st['fees_set_aside_wei']} wei")  # fmt: skip
    if st["settler"] is None:
        console.print("deposit: pass --key or --address to see the settler's deposit")
    elif st["deposit_wei"] is None:
        console.print(f"[red]deposit of {st['settler']} unknown[/red]: {st['chain_error']}")
    else:
        line = (f"deposit of {st['settler']}: {st['deposit_wei']} wei, {max(st['deposit_left_wei'], 0)} wei left "
                f"after fees pending ({_eth(max(st['deposit_left_wei'], 0))})")
        console.print(f"[red]LOW DEPOSIT[/red] {line}" if st["deposit_low"] else line)
    if st["deposit_low"]:
        console.print("deposit low: records wait or are set aside until the settler's deposit is topped up")


@settler_app.command("requeue")
def settler_requeue(
    db: Annotated[str, typer.Option("--db", help="SQLAlchemy URL of the outbox database")],
    reason: Annotated[str, typer.Option(help="only records whose reason starts with this")] = "",
) -> None:
    """Put set-aside records back in the outbox, to be priced and bounded again (e.g. after raising the bounds)."""
    engine = make_engine(db, immediate=True)
    init_db(engine)
    n = requeue_set_aside(engine, reason)
    engine.dispose()
    typer.echo(f"{n} set-aside records back in the outbox")


def main() -> None:
    """Standalone entry: `python -m ledger.cli settler run ...` (the lead mounts the sub-apps)."""
    app = typer.Typer(no_args_is_help=True)
    app.add_typer(rewards_app, name="rewards")
    app.add_typer(settler_app, name="settler")
    app()


if __name__ == "__main__":
    main()
