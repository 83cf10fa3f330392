"""`loramesh devnet up|down|status`: a detached anvil with our contracts, state kept in a folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from eth_account import Account

from devnet.anvil import DEV_KEYS, Anvil, AnvilConfig, AnvilError, pid_alive, rpc, stop_pid
from devnet.deploy import DEFAULT_FUND, check_fees, deploy_to_file, setup_accounts
from ledger.chain import ChainClient
from ledger.deployment import Deployment
from ledger.errors import DeploymentMismatch

DEFAULT_DIR = Path(os.environ.get("LORAMESH_DEVNET_DIR", ".loramesh/devnet"))
DEFAULT_PORT = 8545
ETHER = 10**18

devnet_app = typer.Typer(help="Local anvil devnet with the loramesh contracts.", no_args_is_help=True)


def _paths(folder: Path) -> dict[str, Path]:
    return {"pid": folder / "anvil.pid", "state": folder / "state.json", "log": folder / "anvil.log",
            "deployment": folder / "deployment.json"}  # fmt: skip


def _read_pid(folder: Path) -> dict | None:
    try:
        info = json.loads(_paths(folder)["pid"].read_text())
        return info if pid_alive(int(info["pid"])) else None
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def devnet_up(folder: Path = DEFAULT_DIR, port: int = DEFAULT_PORT, *, fund: list[str] | None = None,
              settlers: list[str] | None = None, settler_deposit: int = 0, fund_amount: int = DEFAULT_FUND,
              block_time: float | None = 1.0, node_share_bps: int | None = None,
              base_price: int | None = None) -> Deployment:  # fmt: skip
    """Start anvil in the background (or find it running), deploy once, fund; returns the deployment.
    `node_share_bps` / `base_price` (wei per 1,000 base-model tokens), when given, are deployed with or
    set on the running ledger by its admin (the devnet's first key), for batches settled afterwards."""
    folder = Path(folder)
    paths = _paths(folder)
    running = _read_pid(folder)
    if running is not None and running.get("port") != port:
        raise AnvilError(f"the devnet in {folder} already runs on port {running['port']}: run loramesh devnet down first")
    if running is None:
        anvil = Anvil(AnvilConfig(port=port, state_file=paths["state"], log_file=paths["log"],
                                  block_time=block_time, state_interval=5))  # fmt: skip
        anvil.start(detached=True)
        paths["pid"].write_text(json.dumps({"pid": anvil.proc.pid, "port": port}))
    rpc_url = f"http://127.0.0.1:{port}"
    admin = Account.from_key(DEV_KEYS[0])
    try:
        if paths["deployment"].exists():
            deployment = Deployment.load(paths["deployment"])
            client = ChainClient.from_deployment(deployment, admin, rpc_url=rpc_url)  # checks the chain
            if deployment.rpc_url != rpc_url:
                deployment.rpc_url = rpc_url
                deployment.save(paths["deployment"])
            setup_accounts(client, fund=fund or (), fund_amount=fund_amount, settlers=settlers or (),
                           settler_deposit=settler_deposit)  # fmt: skip
            if _set_fees(client, deployment, node_share_bps, base_price):
                deployment.save(paths["deployment"])
        else:
            fees = {k: v for k, v in (("node_share_bps", node_share_bps), ("base_price_per_1k_tokens", base_price))
                    if v is not None}
            deployment = deploy_to_file(rpc_url, paths["deployment"], fund=fund or (), fund_amount=fund_amount,
                                        settlers=settlers or (), settler_deposit=settler_deposit, **fees)  # fmt: skip
    except DeploymentMismatch:
        if running is None:
            devnet_down(folder)
        raise
    return deployment


def _set_fees(client: ChainClient, deployment: Deployment, node_share_bps: int | None,
              base_price: int | None) -> bool:
    """Change the running ledger's fee settings that were given; True when the deployment changed."""
    check_fees(node_share_bps, base_price)
    changed = False
    if node_share_bps is not None and node_share_bps != client.node_share_bps():
        client.set_node_share_bps(node_share_bps)
        deployment.node_share_bps, changed = node_share_bps, True
    if base_price is not None and base_price != client.base_price():
        client.set_base_price(base_price)
        deployment.base_price_per_1k_tokens, changed = base_price, True
    return changed


def devnet_down(folder: Path = DEFAULT_DIR) -> bool:
    """Stop the folder's anvil (it writes its state on the way out); False when none was running."""
    paths = _paths(Path(folder))
    info = _read_pid(Path(folder))
    paths["pid"].unlink(missing_ok=True)
    if info is None:
        return False
    stop_pid(int(info["pid"]))
    return True


def devnet_status(folder: Path = DEFAULT_DIR) -> dict:
    """Whether the folder's anvil runs, where, at which block, and the deployment's addresses."""
    paths = _paths(Path(folder))
    info = _read_pid(Path(folder))
    out: dict = {"dir": str(folder), "running": info is not None}
    if info is not None:
        url = f"http://127.0.0.1:{info['port']}"
        out.update(pid=info["pid"], rpc_url=url)
        try:
            out["chain_id"] = int(rpc(url, "eth_chainId"), 16)
            out["block"] = int(rpc(url, "eth_blockNumber"), 16)
        except AnvilError as e:
            out["error"] = str(e)
    if paths["deployment"].exists():
        out["deployment"] = Deployment.load(paths["deployment"]).to_dict()
    return out


DirOpt = Annotated[Path, typer.Option("--dir", help="devnet folder: state, pid, log, deployment.json")]


@devnet_app.command("up")
def up_cmd(
    folder: DirOpt = DEFAULT_DIR,
    port: Annotated[int, typer.Option("--port", help="JSON-RPC port on 127.0.0.1")] = DEFAULT_PORT,
    fund: Annotated[list[str] | None, typer.Option("--fund", help="address to fund (repeatable)")] = None,
    settler: Annotated[list[str] | None, typer.Option("--settler", help="address to grant the settler role")] = None,
    deposit: Annotated[float, typer.Option(help="ETH to prepay as each settler's fee deposit")] = 10.0,
    block_time: Annotated[float, typer.Option(help="seconds per block")] = 1.0,
    node_share: Annotated[int | None, typer.Option(
        "--node-share-bps", min=0, max=10_000,
        help="node operator's cut of every adapter fee, in basis points (deployed default 2000); "
             "also changes a running devnet's ledger")] = None,
    base_price: Annotated[int | None, typer.Option(
        "--base-price-wei", min=0,
        help="fee per 1,000 tokens of a bare base-model request, in wei, all to the serving node "
             "(deployed default 10^14); also changes a running devnet's ledger")] = None,
) -> None:
    """Start anvil in the background, deploy the contracts (once), fund accounts, set fees."""
    d = devnet_up(folder, port, fund=fund, settlers=settler, settler_deposit=int(deposit * ETHER),
                  block_time=block_time, node_share_bps=node_share, base_price=base_price)  # fmt: skip
    typer.echo(f"devnet up on {d.rpc_url} (chain {d.chain_id}); registry {d.registry}, ledger {d.ledger}; "
               f"deployment file {_paths(folder)['deployment']}")  # fmt: skip


@devnet_app.command("down")
def down_cmd(folder: DirOpt = DEFAULT_DIR) -> None:
    """Stop the devnet; its state stays in the folder for the next `up`."""
    typer.echo("devnet stopped" if devnet_down(folder) else f"no devnet running for {folder}")


@devnet_app.command("status")
def status_cmd(folder: DirOpt = DEFAULT_DIR) -> None:
    """Print the devnet's state as JSON."""
    typer.echo(json.dumps(devnet_status(folder), indent=2, sort_keys=True))
