"""The `loramesh` command: every part's sub-commands under one root, errors as one clear line.

The root lives in devnet/, the top of the import graph, because it is the one package allowed to import
every other one. Each package keeps its own commands in its cli.py (node, gateway, ledger, the explorer);
this module adds devnet's own: `loramesh devnet up|down|status` (devnet/lifecycle.py does the work),
`loramesh chain deploy` (devnet/deploy.py, which `devnet up` uses too; here because deploying needs the committed
contract artifacts and devnet/, which ledger/ may not import) and `loramesh demo` (devnet/demo/run.py).
"""

from __future__ import annotations

import sys

# Loading every command takes a second or more (web3, torch, ...): a Ctrl-C meanwhile exits as one later does
# (main()), with "interrupted" and 130, not a traceback through the imports.
try:
    import dataclasses
    import importlib.metadata
    import json
    import logging
    import os
    from pathlib import Path
    from typing import Annotated

    import typer
    from rich.console import Console
    from rich.markup import escape

    from common.help_text import plain_help
    from common.logs import LEVELS, configure_logging
    from devnet.demo.run import run_demo
    from devnet.deploy import (
        DEFAULT_BASE_PRICE,
        DEFAULT_NODE_SHARE_BPS,
        DEFAULT_PRICE_GRACE_S,
        ETHER,
        MAX_PRICE_GRACE_S,
        check_fees,
        deploy_to_file,
    )
    from devnet.explorer.cli import explorer
    from devnet.lifecycle import DEFAULT_PORT, devnet_down, devnet_paths, devnet_status, devnet_up
    from gateway.cli import gateway_app
    from ledger.cli import address_option, rewards_app, settler_app
    from ledger.deployment import DEFAULT_DEVNET_DIR
    from ledger.keys import load_account
    from ledger.transport import GWEI, FeePolicy, gwei, shown_url
    from node.cli import adapter_app, base_app, keys_app, node_app
except KeyboardInterrupt:
    sys.stderr.write("interrupted\n")
    raise SystemExit(130) from None

app = typer.Typer(
    help="loramesh: serve many LoRA adapters on shared base models, with on-chain attribution.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
devnet_app = typer.Typer(help="Local anvil devnet with the loramesh contracts.", no_args_is_help=True)
chain_app = typer.Typer(
    help="The loramesh contracts on any EVM chain (an RPC URL and a funded key).", no_args_is_help=True
)


def _print_version(value: bool) -> None:
    if value:
        try:
            version = importlib.metadata.version("loramesh")
        except importlib.metadata.PackageNotFoundError:  # a checkout run without installing it
            version = "(not installed: see pyproject.toml)"
        typer.echo(f"loramesh {version}")
        raise typer.Exit()


@app.callback()
def _root(
    log_level: Annotated[
        str | None,
        typer.Option(
            "--log-level",
            help="Level of loramesh's own logs: DEBUG, INFO, WARNING or ERROR (default $LORAMESH_LOG_LEVEL, else "
            "INFO). Processes this command starts follow it.",
        ),
    ] = None,
    log_format: Annotated[
        str | None,
        typer.Option(
            "--log-format", help="text, or json for one JSON object per line (default $LORAMESH_LOG_FORMAT, else text)."
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_print_version, help="Print loramesh's version and exit."),
    ] = False,
) -> None:
    """loramesh: serve many LoRA adapters on shared base models, with on-chain attribution."""
    if log_level is not None:
        log_level = log_level.upper()
        if log_level not in LEVELS:
            raise typer.BadParameter(f"{log_level!r} is not one of {', '.join(LEVELS)}", param_hint="--log-level")
        os.environ["LORAMESH_LOG_LEVEL"] = log_level  # the processes a command starts log the same way
    if log_format is not None:
        if log_format not in ("text", "json"):
            raise typer.BadParameter(f"{log_format!r} is not text or json", param_hint="--log-format")
        os.environ["LORAMESH_LOG_FORMAT"] = log_format
    if log_level is not None or log_format is not None:
        configure_logging(log_level, log_format)


app.add_typer(keys_app, name="keys")
app.add_typer(base_app, name="base")
app.add_typer(adapter_app, name="adapter")
app.add_typer(node_app, name="node")
app.add_typer(gateway_app, name="gateway")
app.add_typer(devnet_app, name="devnet")
app.add_typer(chain_app, name="chain")
app.add_typer(rewards_app, name="rewards")
app.add_typer(settler_app, name="settler")
app.command("explorer")(explorer)


# ---- loramesh devnet up|down|status ------------------------------------------------------------------------

DirOpt = Annotated[
    Path, typer.Option("--dir", envvar="LORAMESH_DEVNET_DIR", help="devnet folder: state, pid, log, deployment.json")
]


@devnet_app.command("up")
def devnet_up_cmd(
    folder: DirOpt = DEFAULT_DEVNET_DIR,
    port: Annotated[
        int | None,
        typer.Option("--port", help=f"JSON-RPC port on 127.0.0.1 (default: a running devnet's, else {DEFAULT_PORT})."),
    ] = None,
    fund: Annotated[
        list[str] | None, typer.Option("--fund", help="address to fund (repeatable)", callback=address_option)
    ] = None,
    settler: Annotated[
        list[str] | None,
        typer.Option("--settler", help="address to grant the settler role", callback=address_option),
    ] = None,
    deposit: Annotated[float, typer.Option(help="ETH to prepay as each settler's fee deposit")] = 10.0,
    block_time: Annotated[float, typer.Option(help="seconds per block")] = 1.0,
    node_share: Annotated[
        int | None,
        typer.Option(
            "--node-share-bps",
            min=0,
            max=10_000,
            help="node operator's cut of every adapter fee, in basis points (deployed default 2000); "
            "also changes a running devnet's ledger",
        ),
    ] = None,
    base_price: Annotated[
        int | None,
        typer.Option(
            "--base-price-wei",
            min=0,
            help="fee per 1,000 tokens of a bare base-model request, in wei, all to the serving node "
            "(deployed default 10^14); also changes a running devnet's ledger",
        ),
    ] = None,
) -> None:
    """Start anvil in the background, deploy the contracts (once), fund accounts, set fees."""
    pid_file = devnet_paths(folder)["pid"]
    before = _read_text(pid_file)
    try:
        d = devnet_up(
            folder,
            port,
            fund=fund,
            settlers=settler,
            settler_deposit=int(deposit * ETHER),
            block_time=block_time,
            node_share_bps=node_share,
            base_price=base_price,
        )
    except BaseException:
        if _read_text(pid_file) not in (None, before):  # an anvil this command started: a failed `up` stops it
            devnet_down(folder)
        raise
    typer.echo(
        f"devnet up on {d.rpc_url} (chain {d.chain_id}); registry {d.registry}, ledger {d.ledger}; "
        f"deployment file {devnet_paths(folder)['deployment']}"
    )


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


@devnet_app.command("down")
def devnet_down_cmd(folder: DirOpt = DEFAULT_DEVNET_DIR) -> None:
    """Stop the devnet; its state stays in the folder for the next `up`."""
    typer.echo("devnet stopped" if devnet_down(folder) else f"no devnet running for {folder}")


@devnet_app.command("status")
def devnet_status_cmd(folder: DirOpt = DEFAULT_DEVNET_DIR) -> None:
    """Print the devnet's state as JSON."""
    typer.echo(json.dumps(devnet_status(folder), indent=2, sort_keys=True))


# ---- loramesh chain deploy --------------------------------------------------------------------------------


@chain_app.command("deploy")
def chain_deploy_cmd(
    rpc: Annotated[str, typer.Option("--rpc", help="JSON-RPC URL of the chain")],
    key: Annotated[Path, typer.Option("--key", help="deployer's key file (hex key or identity); becomes the admin")],
    out: Annotated[Path, typer.Option("--out", help="deployment file to write (what --deployment takes)")] = Path(
        "deployment.json"
    ),
    settler: Annotated[
        list[str] | None,
        typer.Option("--settler", help="address to grant the settler role (repeatable)", callback=address_option),
    ] = None,
    deposit: Annotated[float, typer.Option(min=0, help="ETH to prepay as each settler's fee deposit")] = 0.0,
    max_fee_gwei: Annotated[
        float | None,
        typer.Option(
            "--max-fee-gwei",
            min=0,
            max=1e9,
            help="never pay more than this per gas (default $LORAMESH_MAX_FEE_GWEI, else 500); "
            "a base fee above it stops the deploy before it sends",
        ),
    ] = None,
    node_share: Annotated[
        int, typer.Option("--node-share-bps", min=0, max=10_000, help="node operator's cut of every adapter fee")
    ] = DEFAULT_NODE_SHARE_BPS,
    base_price: Annotated[
        int, typer.Option("--base-price-wei", min=0, help="fee per 1,000 tokens of a bare base-model request")
    ] = DEFAULT_BASE_PRICE,
    commit_blocks: Annotated[
        int,
        typer.Option(
            "--commit-blocks",
            min=1,
            help="blocks an adapter registration's commitment waits before the registration reveals it; more "
            "blocks outlast a registration left waiting longer (a public chain: about a minute's worth, e.g. 5)",
        ),
    ] = 5,
    price_grace: Annotated[
        int,
        typer.Option(
            "--price-grace-s",
            min=0,
            max=MAX_PRICE_GRACE_S,
            help="seconds after a price change during which requests admitted before it are still charged the "
            "price they were admitted at (never below the price before); 0 or at least 600; 0 charges every record "
            "the price of the moment it settles, and leaves records admitted before a raise unpaid until the price "
            "comes down",
        ),
    ] = DEFAULT_PRICE_GRACE_S,
    force: Annotated[bool, typer.Option(help="overwrite an existing --out file")] = False,
) -> None:
    """Deploy the registry and ledger to the chain at --rpc, grant settlers, write the deployment file.

    Nothing is funded with gas money here: on a chain that is not ours every account brings its own."""
    if out.exists() and not force:  # the file is the only record of the addresses it names
        raise typer.BadParameter(
            f"{out} exists: pass --force to replace it, or choose another --out", param_hint="--out"
        )
    try:
        check_fees(node_share, base_price, price_grace)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--price-grace-s") from None
    policy = FeePolicy.from_env()
    if max_fee_gwei is not None:
        policy = dataclasses.replace(policy, max_fee=round(max_fee_gwei * GWEI))
    account = load_account(key)
    d = deploy_to_file(
        rpc,
        out,
        deployer_key=account.key,
        node_share_bps=node_share,
        base_price_per_1k_tokens=base_price,
        fund_amount=0,
        settlers=settler or (),
        settler_deposit=int(deposit * ETHER),
        fee_policy=policy,
        commit_blocks=commit_blocks,
        price_grace_s=price_grace,
    )
    typer.echo(
        f"deployed to {shown_url(rpc)} (chain {d.chain_id}, fees capped at {gwei(policy.max_fee)}): "
        f"registry {d.registry}, ledger {d.ledger}, admin {d.deployer}; deployment file {out}"
    )


# ---- loramesh demo -----------------------------------------------------------------------------------------

DEMO_DIR = Path("work/demo")


@app.command("demo")
def demo(
    workdir: Annotated[Path, typer.Option("--dir", help="Working folder for models, keys, logs and state.")] = DEMO_DIR,
    fresh: Annotated[bool, typer.Option(help="Delete the working folder first and redo every stage.")] = False,
    once: Annotated[bool, typer.Option(help="Exit after the checks instead of staying up until Ctrl-C.")] = False,
) -> None:
    """Run the whole network here: devnet, three contributors' adapters, two p2p nodes, the gateway, the explorer.

    Sends real requests through the openai client, waits until every one is settled on chain,
    checks that each is there exactly once and that the rewards add up, and prints who earned what.
    """
    run_demo(workdir, fresh=fresh, once=once)


plain_help(app)  # after the last command is registered: each paragraph of help wraps once, at the terminal


# ---- entry point -------------------------------------------------------------------------------------------

_err = Console(stderr=True, soft_wrap=True, emoji=False)


def main() -> None:
    """Console-script entry point: set up logging once, run the app, turn any failure into one line and exit
    code 1. LORAMESH_DEBUG=1 logs at DEBUG and lets the traceback through."""
    debug = os.environ.get("LORAMESH_DEBUG") == "1"
    try:
        configure_logging(logging.DEBUG if debug else None)
        if debug:  # every logger at DEBUG, the libraries' too (sqlalchemy, httpx, web3): all there is to see
            logging.getLogger().setLevel(logging.DEBUG)
        app()
    except KeyboardInterrupt:
        _err.print("interrupted")
        sys.exit(130)
    except Exception as e:  # the user sees one line; LORAMESH_DEBUG=1 shows the traceback
        if debug:
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _err.print(f"[red]error:[/] {escape(message)}", highlight=False)  # it may quote the user's brackets
        sys.exit(1)


if __name__ == "__main__":
    main()
