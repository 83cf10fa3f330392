"""`loramesh rewards ...` and `loramesh settler ...` (typer sub-apps mounted by the root command, devnet/cli.py)."""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from common.help_text import plain_help
from common.logs import configure_logging
from common.settings import SettingsError
from common.wire import hex0x, restore_recursion_limit
from ledger.chain import ChainClient
from ledger.db import init_db, make_engine, redact_url
from ledger.deployment import DEFAULT_DEPLOYMENT_PATH
from ledger.keys import load_account
from ledger.rewards import rewards_summary
from ledger.settler import Settler, requeue_set_aside, settler_status
from ledger.settler_config import DEFAULT_LOW_DEPOSIT, MAX_CONFIRMATIONS, SettlerConfig, SettlerSettings
from ledger.transport import shown_url
from ledger.types import BASE_MODEL_ADAPTER_ID, ETHER, checked_address

log = logging.getLogger(__name__)

_D = SettlerConfig()  # the defaults `settler run --help` shows (SettlerSettings takes them from SettlerConfig too)

rewards_app = typer.Typer(help="Rewards accrued from settled inferences.", no_args_is_help=True)
settler_app = typer.Typer(help="Settle the usage-record outbox on chain.", no_args_is_help=True)

DeploymentOpt = Annotated[Path, typer.Option("--deployment", envvar="LORAMESH_DEPLOYMENT", help="deployment file")]
RpcOpt = Annotated[str | None, typer.Option("--rpc", help="JSON-RPC URL (default: the deployment's)")]


def _eth(wei: int) -> str:
    return f"{wei / ETHER:.6f} ETH"


def address_option(value: str | list[str] | None) -> str | list[str] | None:
    """Typer callback for an address argument or option (repeatable or not): checksummed, or a usage error."""
    if value is None:
        return None
    try:
        return checked_address(value) if isinstance(value, str) else [checked_address(v) for v in value]
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def _wei_to_withdraw(value: int | None) -> int | None:
    if value is not None and not 1 <= value < 2**256:
        raise typer.BadParameter(
            f"{value} is no amount to withdraw: give a whole number of wei, at least 1 (leave --amount out to "
            "withdraw everything)"
        )
    return value


def _seconds_above_0(value: float | None) -> float | None:
    if value is not None and not value > 0:
        raise typer.BadParameter(f"{value} is not a number of seconds above 0")
    return value


@rewards_app.command("show")
def rewards_show(
    address: Annotated[str, typer.Argument(help="account to report on", callback=address_option)],
    deployment: DeploymentOpt = DEFAULT_DEPLOYMENT_PATH,
    rpc: RpcOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Accrued, withdrawn and available rewards of ADDRESS, by adapter and by role."""
    client = ChainClient.from_deployment(deployment, rpc_url=rpc)
    summary = rewards_summary(client, address)
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2, sort_keys=True))
        return
    console = Console(soft_wrap=True, emoji=False)  # a line whole, for the terminal to wrap: piped, one line
    console.print(
        f"[bold]{summary.address}[/bold]: accrued {_eth(summary.accrued)}, withdrawn "
        f"{_eth(summary.withdrawn)}, available {_eth(summary.available)} ({summary.available} wei)"
    )
    table = Table(Column("adapter", overflow="fold"), "role", "wei", "ETH")  # a narrow terminal folds ids, not cuts
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
    deployment: DeploymentOpt = DEFAULT_DEPLOYMENT_PATH,
    rpc: RpcOpt = None,
    amount: Annotated[
        int | None, typer.Option(help="wei to withdraw (default: everything)", callback=_wei_to_withdraw)
    ] = None,
) -> None:
    """Withdraw what accrued to the key's address."""
    client = ChainClient.from_deployment(deployment, load_account(key), rpc_url=rpc)
    before = client.rewards_of(client.address).available
    rcpt = client.withdraw() if amount is None else client.withdraw_amount(amount)
    taken = before - client.rewards_of(client.address).available
    typer.echo(f"withdrew {taken} wei ({_eth(taken)}) to {client.address} in tx {hex0x(rcpt['transactionHash'])}")


@settler_app.callback()
def _settler() -> None:
    """Settle the usage-record outbox on chain."""


LowDepositOpt = Annotated[
    int, typer.Option("--low-deposit", min=0, help="wei of deposit left (after in-flight batches) below which to warn")
]


@settler_app.command("run")
def settler_run(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="TOML file of settings, named as the options "
            "with _ (db_url, key_file and rpc_url for --db, --key, --rpc)",
        ),
    ] = None,
    db_url: Annotated[str | None, typer.Option("--db", help="SQLAlchemy URL of the outbox database")] = None,
    key_file: Annotated[
        Path | None, typer.Option("--key", help="settler key file: identity file or hex private key")
    ] = None,
    deployment: Annotated[
        Path | None, typer.Option("--deployment", help=f"deployment file (default {DEFAULT_DEPLOYMENT_PATH})")
    ] = None,
    rpc_url: Annotated[str | None, typer.Option("--rpc", help="JSON-RPC URL (default: the deployment's)")] = None,
    batch_size: Annotated[
        int | None, typer.Option(min=1, max=5_000, help=f"N: records per batch (default {_D.batch_size})")
    ] = None,
    interval: Annotated[
        float | None, typer.Option(min=0, help=f"T: seconds a partial batch may wait (default {_D.interval})")
    ] = None,
    max_in_flight: Annotated[
        int | None,
        typer.Option(
            min=1, max=256, help=f"most batches sent and not yet settled at once (default {_D.max_in_flight})"
        ),
    ] = None,
    max_price_per_1k: Annotated[
        int | None,
        typer.Option(
            "--max-price-per-1k",
            min=0,
            help=f"wei per 1k tokens above which a record is set aside (default {_D.max_price_per_1k})",
        ),
    ] = None,
    max_record_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-record-tokens",
            min=0,
            help=f"prompt + completion tokens above which a record is set aside (default {_D.max_record_tokens})",
        ),
    ] = None,
    low_deposit: Annotated[
        int | None,
        typer.Option(
            "--low-deposit",
            min=0,
            help=f"wei of deposit left (after in-flight batches) below which to warn (default {_D.low_deposit})",
        ),
    ] = None,
    lease: Annotated[
        float | None,
        typer.Option(min=1.0, help=f"seconds a claim on an unfinished batch lasts unrenewed (default {_D.lease})"),
    ] = None,
    confirmations: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=MAX_CONFIRMATIONS,
            help=f"blocks on top of a batch's block before it is final (default {_D.confirmations})",
        ),
    ] = None,
    replace_after: Annotated[
        float | None,
        typer.Option(
            "--replace-after",
            callback=_seconds_above_0,
            help="seconds a batch's transaction may stay unmined before it is replaced with higher fees "
            f"(default {_D.replace_after})",
        ),
    ] = None,
    max_fee_gwei: Annotated[
        float | None,
        typer.Option("--max-fee-gwei", min=0, help="most gwei per gas paid (default: LORAMESH_MAX_FEE_GWEI, 500)"),
    ] = None,
    max_tip_gwei: Annotated[
        float | None,
        typer.Option("--max-tip-gwei", min=0, help="most gwei per gas tipped (default: LORAMESH_MAX_TIP_GWEI, 10)"),
    ] = None,
    drain: Annotated[bool, typer.Option(help="exit once nothing is left to settle")] = False,
) -> None:
    """Run the settler until SIGINT/SIGTERM (--drain: until the outbox is empty); any number may share a database.

    Each setting comes from its flag, else LORAMESH_SETTLER_<NAME>, else the --config file, else its default."""
    settings = settler_settings(
        config,
        db_url=db_url,
        key_file=key_file,
        deployment=deployment,
        rpc_url=rpc_url,
        batch_size=batch_size,
        interval=interval,
        max_in_flight=max_in_flight,
        max_price_per_1k=max_price_per_1k,
        max_record_tokens=max_record_tokens,
        low_deposit=low_deposit,
        lease=lease,
        confirmations=confirmations,
        replace_after=replace_after,
        max_fee_gwei=max_fee_gwei,
        max_tip_gwei=max_tip_gwei,
    )
    n = run_settler(settings, drain=drain)
    typer.echo(f"settled {n} records")


def settler_settings(config: Path | None = None, **flags) -> SettlerSettings:
    """The settler's settings, or a clear command-line error naming what is missing or wrong (the flags' bounds
    are click's; these catch a value out of bounds from LORAMESH_SETTLER_* or the --config file)."""
    try:
        settings = SettlerSettings.load(config, **flags)
    except SettingsError as e:
        raise typer.BadParameter(str(e), param_hint="settler settings") from None
    try:
        settings.config()
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="settler settings") from None
    return settings


def run_settler(
    settings: SettlerSettings, *, drain: bool = False, on_point: Callable[[str], None] | None = None
) -> int:
    """Build the settler `settings` describe and run it until SIGINT/SIGTERM (drain: until nothing is left);
    returns the records settled. on_point: Settler's (the crash tests pass one)."""
    restore_recursion_limit()  # web3's py_ecc raised it at import: a deep RPC answer would crash, not raise
    config = settings.config()
    # the outbox a gateway made: a mistyped path would be a new, empty one, and "settled 0 records"
    engine = make_engine(settings.db_url, immediate=True, create=False)
    init_db(engine)
    client = ChainClient.from_deployment(
        settings.deployment,
        load_account(settings.key_file),
        rpc_url=settings.rpc_url,
        fee_policy=settings.fee_policy(),
    )
    log.info(
        "settler %s settling %s on %s (chain %d): batches of up to %d records, a partial one after %s s",
        client.address,
        redact_url(settings.db_url),
        shown_url(client.rpc_url),
        client.deployment.chain_id,
        config.batch_size,
        config.interval,
    )
    settler = Settler(engine, client, config, on_point=on_point)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return settler.run(stop, drain=drain)


@settler_app.command("status")
def settler_status_cmd(
    db: Annotated[str, typer.Option("--db", help="SQLAlchemy URL of the outbox database")],
    key: Annotated[Path | None, typer.Option("--key", help="settler key file, for its deposit")] = None,
    address: Annotated[
        str | None, typer.Option("--address", help="settler address, for its deposit", callback=address_option)
    ] = None,
    deployment: DeploymentOpt = DEFAULT_DEPLOYMENT_PATH,
    rpc: RpcOpt = None,
    low_deposit: LowDepositOpt = DEFAULT_LOW_DEPOSIT,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Records pending, in flight, set aside, disputed, settled; deposit left and fees pending (--key/--address)."""
    engine = make_engine(db, create=False)
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
    console = Console(soft_wrap=True, emoji=False)
    table = Table("records", "count")
    for k in ("pending", "in_flight", "set_aside", "disputed", "rejected", "settled"):
        extra = f" ({st['set_aside_deposit_short']} for the deposit)" if k == "set_aside" and st[k] else ""
        if k == "settled" and st["settled_unconfirmed"]:  # a reorg may still send these back
            extra = f" ({st['settled_unconfirmed']} not final yet, {st['fees_unconfirmed_wei']} wei)"
        table.add_row(k.replace("_", " "), f"{st[k]}{extra}")
    console.print(table)
    console.print(
        f"batches in flight: {st['batches_in_flight']}; fees pending {st['fees_pending_wei']} wei "
        f"({_eth(st['fees_pending_wei'])}); fees set aside {st['fees_set_aside_wei']} wei"
    )
    if st["settler"] is None:
        console.print("deposit: pass --key or --address to see the settler's deposit")
    elif st["deposit_wei"] is None:
        console.print(f"[red]deposit of {st['settler']} unknown[/red]: {escape(str(st['chain_error']))}")
    else:
        line = (
            f"deposit of {st['settler']}: {st['deposit_wei']} wei, {max(st['deposit_left_wei'], 0)} wei left "
            f"after fees pending ({_eth(max(st['deposit_left_wei'], 0))})"
        )
        console.print(f"[red]LOW DEPOSIT[/red] {line}" if st["deposit_low"] else line)
    if st["deposit_low"]:
        console.print("deposit low: records wait or are set aside until the settler's deposit is topped up")


@settler_app.command("requeue")
def settler_requeue(
    db: Annotated[str, typer.Option("--db", help="SQLAlchemy URL of the outbox database")],
    reason: Annotated[str, typer.Option(help="only records whose reason starts with this")] = "",
) -> None:
    """Put set-aside records back in the outbox, to be priced and bounded again (e.g. after raising the bounds)."""
    engine = make_engine(db, immediate=True, create=False)
    init_db(engine)
    n = requeue_set_aside(engine, reason)
    engine.dispose()
    typer.echo(f"{n} set-aside records back in the outbox")


def main() -> None:
    """Standalone entry, `python -m ledger.cli settler run ...`: these commands without the root `loramesh`
    command (which mounts the same sub-apps)."""
    app = typer.Typer(
        help="loramesh ledger package: rewards and the settler.", no_args_is_help=True, add_completion=False
    )
    app.add_typer(rewards_app, name="rewards")
    app.add_typer(settler_app, name="settler")
    plain_help(app)()


if __name__ == "__main__":
    configure_logging()
    main()
