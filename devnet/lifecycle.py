"""The devnet behind `loramesh devnet up|down|status`: a detached anvil with our contracts that outlives the
command, its pid, state, log and deployment file kept in one folder (ledger.deployment.DEFAULT_DEVNET_DIR
unless told otherwise)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from eth_account import Account

from devnet.anvil import DEV_KEYS, Anvil, AnvilConfig, AnvilError, pid_alive, process_started, rpc, stop_pid
from devnet.deploy import DEFAULT_FUND, check_fees, deploy_to_file, setup_accounts
from ledger.chain import ChainClient
from ledger.deployment import DEFAULT_DEPLOYMENT_PATH, Deployment
from ledger.errors import DeploymentMismatch

DEFAULT_PORT = 8545


def devnet_paths(folder: Path) -> dict[str, Path]:
    """Where the folder keeps anvil's pid and port, its state, its log, and the deployment file (named as in
    the default folder, so every command's default deployment path finds it)."""
    folder = Path(folder)
    return {
        "pid": folder / "anvil.pid",
        "state": folder / "state.json",
        "log": folder / "anvil.log",
        "deployment": folder / DEFAULT_DEPLOYMENT_PATH.name,
    }


def _read_pid(folder: Path) -> dict | None:
    """The folder's running anvil ({"pid", "port", "started"}), None when its pid file names no process or
    another one than it was written for (the pid was reused after a SIGKILL or a reboot): that process is
    never signalled."""
    try:
        info = json.loads(devnet_paths(folder)["pid"].read_text())
        pid = int(info["pid"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    if not pid_alive(pid):
        return None
    started = process_started(pid)
    if "started" in info:
        return info if started is None or started == info["started"] else None
    try:  # a pid file written before start times were: trust only an anvil
        return info if b"anvil" in Path(f"/proc/{pid}/cmdline").read_bytes() else None
    except OSError:
        return info


def _write_pid(folder: Path, pid: int, port: int) -> None:
    """The pid file, written whole (a temporary file renamed over it) as soon as anvil exists."""
    path = devnet_paths(folder)["pid"]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"pid": pid, "port": port, "started": process_started(pid)}))
    os.replace(tmp, path)


def devnet_up(
    folder: Path,
    port: int | None = None,
    *,
    fund: list[str] | None = None,
    settlers: list[str] | None = None,
    settler_deposit: int = 0,
    fund_amount: int = DEFAULT_FUND,
    block_time: float | None = 1.0,
    node_share_bps: int | None = None,
    base_price: int | None = None,
) -> Deployment:
    """Start anvil in the background (or find it running), deploy once, fund; returns the deployment.
    `node_share_bps` / `base_price` (wei per 1,000 base-model tokens), when given, are deployed with or
    set on the running ledger by its admin (the devnet's first key), for batches settled afterwards. `port`:
    where anvil listens (None: the running devnet's, else DEFAULT_PORT)."""
    folder = Path(folder)
    paths = devnet_paths(folder)
    running = _read_pid(folder)
    if running is not None and port is not None and running.get("port") != port:
        raise AnvilError(
            f"the devnet in {folder} already runs on port {running['port']}, not {port}: leave --port out (or give "
            f"{running['port']}) to use it, or run loramesh devnet down first to move it"
        )
    if port is None:
        port = running["port"] if running is not None else DEFAULT_PORT
    if running is None:
        anvil = Anvil(
            AnvilConfig(
                port=port, state_file=paths["state"], log_file=paths["log"], block_time=block_time, state_interval=5
            )
        )
        folder.mkdir(parents=True, exist_ok=True)
        try:
            anvil.start(detached=True, on_spawn=lambda proc: _write_pid(folder, proc.pid, port))
        except BaseException:  # anvil was stopped (Anvil.start): its pid file goes too
            paths["pid"].unlink(missing_ok=True)
            raise
    rpc_url = f"http://127.0.0.1:{port}"
    admin = Account.from_key(DEV_KEYS[0])
    try:
        if paths["deployment"].exists():
            deployment = Deployment.load(paths["deployment"])
            client = ChainClient.from_deployment(deployment, admin, rpc_url=rpc_url)  # checks the chain
            if deployment.rpc_url != rpc_url:
                deployment.rpc_url = rpc_url
                deployment.save(paths["deployment"])
            setup_accounts(
                client,
                fund=fund or (),
                fund_amount=fund_amount,
                settlers=settlers or (),
                settler_deposit=settler_deposit,
            )
            if _set_fees(client, deployment, node_share_bps, base_price):
                deployment.save(paths["deployment"])
        else:
            fees = {
                k: v
                for k, v in (("node_share_bps", node_share_bps), ("base_price_per_1k_tokens", base_price))
                if v is not None
            }
            deployment = deploy_to_file(
                rpc_url,
                paths["deployment"],
                fund=fund or (),
                fund_amount=fund_amount,
                settlers=settlers or (),
                settler_deposit=settler_deposit,
                **fees,
            )
    except DeploymentMismatch:
        if running is None:
            devnet_down(folder)
        raise
    return deployment


def _set_fees(client: ChainClient, deployment: Deployment, node_share_bps: int | None, base_price: int | None) -> bool:
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


def devnet_down(folder: Path) -> bool:
    """Stop the folder's anvil (it writes its state on the way out); False when none was running."""
    paths = devnet_paths(Path(folder))
    info = _read_pid(Path(folder))
    paths["pid"].unlink(missing_ok=True)
    if info is None:
        return False
    stop_pid(int(info["pid"]))
    return True


def devnet_status(folder: Path) -> dict:
    """Whether the folder's anvil runs, where, at which block, and the deployment's addresses."""
    paths = devnet_paths(Path(folder))
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
