"""The demo's network: a fresh devnet, published adapters, two p2p nodes and a gateway, all real processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
from rich.console import Console

from common.identity import PASSWORD_ENV, load_identity
from devnet.anvil import Anvil, AnvilConfig, free_port
from devnet.demo.stages import DEMO_PASSWORD
from devnet.deploy import ETHER, deploy
from devnet.processes import ManagedProcess, ProcessGroup
from ledger.chain import ChainClient

GATEWAY_DEPOSIT = 10 * ETHER  # prepaid fees the gateway settles from
# the children read their identity's password from the environment; the gateway settles every second
ENV = {PASSWORD_ENV: DEMO_PASSWORD, "LORAMESH_GATEWAY_SETTLE_INTERVAL_S": "1"}
# each node's operator token (node url -> token), read from the data folder the node made it in: the demo
# plays both operators when it hands packages over and asks nodes to fetch
_operator_tokens: dict[str, str] = {}


def start_chain(workdir: Path, identities: dict[str, Path], console: Console) -> tuple[Anvil, Path]:
    """A fresh anvil with our contracts; every identity funded, the gateway a prepaid settler."""
    folder = workdir / "devnet"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "anvil.log").unlink(missing_ok=True)
    anvil = Anvil(AnvilConfig(port=free_port(), log_file=folder / "anvil.log")).start()
    addresses = {name: load_identity(path, DEMO_PASSWORD).address for name, path in identities.items()}
    deployment = deploy(
        anvil.rpc_url,
        fund=list(addresses.values()),
        fund_amount=100 * ETHER,
        settlers=[addresses["gateway"]],
        settler_deposit=GATEWAY_DEPOSIT,
    )
    path = folder / "deployment.json"
    deployment.save(path)
    console.print(f"• devnet up at {anvil.rpc_url} (chain {deployment.chain_id}); contracts deployed")
    return anvil, path


def publish_all(packages, identities: dict[str, Path], deployment_path: Path, console: Console) -> None:
    """Each contributor signs their package for this devnet's registry (chain id and address) and
    registers it, with its dataset, on chain; the first registration of a name makes it theirs."""
    from node.publish import register_package

    for pkg in packages:
        owner = next(n for n, p in identities.items() if load_identity(p, DEMO_PASSWORD).address == pkg.signer)
        client = ChainClient.from_deployment(deployment_path, load_identity(identities[owner], DEMO_PASSWORD).account)
        result = register_package(pkg, client)
        console.print(
            f"• {owner} published {pkg.name} on chain" + (" (already registered)" if not result.registered else "")
        )


def start_nodes(
    group: ProcessGroup,
    workdir: Path,
    base: Path,
    identities: dict[str, Path],
    deployment: Path,
    gateway_url: str,
    console: Console,
) -> list[str]:
    """Two nodes: the second joins the mesh through the first. Each serves the gateway it heartbeats to (it
    learns the gateway's key from it) and keeps its operator token in its own data folder."""
    from node.operator_token import read_operator_token, token_path

    urls: list[str] = []
    bootstrap: list[str] = []
    for i, operator in enumerate(["operator1", "operator2"], 1):
        port, p2p_port = free_port(), free_port()
        data_dir = workdir / f"data-node{i}"
        args = [
            "node",
            "run",
            "--base",
            str(base),
            "--store",
            str(workdir / f"store-node{i}"),
            "--port",
            str(port),
            "--key",
            str(identities[operator]),
            "--deployment",
            str(deployment),
            "--slots",
            "4",
            "--listen",
            f"/ip4/127.0.0.1/tcp/{p2p_port}",
            "--gateway",
            gateway_url,
            "--threads",
            "1",
            "--data-dir",
            str(data_dir),
        ]
        for b in bootstrap:
            args += ["--bootstrap", b]
        proc = group.start(ManagedProcess(f"node{i}", args, workdir / "logs" / f"node{i}.log", env=ENV))
        url = f"http://127.0.0.1:{port}"
        proc.wait_http(url + "/health", timeout=180)
        status = httpx.get(url + "/status", timeout=10).json()
        bootstrap = status["p2p"]["listen_addrs"][:1]
        _operator_tokens[url] = read_operator_token(token_path(data_dir))
        console.print(f"• node{i} up at {url} (operator {operator}, peer {status['p2p']['peer_id'][:16]}…)")
        urls.append(url)
    return urls


def hand_packages_to_nodes(packages, node_urls: list[str], console: Console) -> None:
    """Adapter i goes to node i (modulo the nodes) only: every other node must fetch it through the mesh."""
    from node.publish import upload_to_node

    for i, pkg in enumerate(packages):
        url = node_urls[i % len(node_urls)]
        upload_to_node(pkg, url, operator_token=_operator_tokens[url])
        console.print(f"• {pkg.name} handed to {url}; it seeds it to the mesh")


def create_api_key(db_url: str) -> str:
    """An API key for the demo's client, made with the gateway's own command."""
    out = subprocess.run(
        [sys.executable, "-m", "devnet", "gateway", "keys", "create", "--db", db_url, "--name", "demo"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return out.stdout.strip().splitlines()[-1]


def start_gateway(
    group: ProcessGroup,
    workdir: Path,
    port: int,
    base: Path,
    identities: dict[str, Path],
    deployment: Path,
    db_url: str,
    console: Console,
) -> str:
    """The gateway, which also settles usage on chain as the prepaid settler."""
    args = [
        "gateway",
        "run",
        "--deployment",
        str(deployment),
        "--key",
        str(identities["gateway"]),
        "--db",
        db_url,
        "--port",
        str(port),
        "--base",
        str(base),
    ]
    proc = group.start(ManagedProcess("gateway", args, workdir / "logs" / "gateway.log", env=ENV))
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(url + "/health", timeout=120)
    console.print(f"• gateway up at {url}/v1 (OpenAI API)")
    return url


def wait_for_models(gateway_url: str, api_key: str, names: list[str], group: ProcessGroup, nodes: int) -> None:
    """Until the gateway has heard every node's heartbeat and lists every adapter."""
    gateway = next(p for p in group.procs if p.name == "gateway")

    def ready() -> bool:
        if httpx.get(gateway_url + "/health", timeout=5).json().get("live_nodes") != nodes:
            return False
        r = httpx.get(gateway_url + "/v1/models", headers={"authorization": f"Bearer {api_key}"}, timeout=5)
        listed = {m["id"] for m in r.json().get("data", [])}
        return r.status_code == 200 and set(names) <= listed

    gateway.wait_until(ready, timeout=120, what="every node live and every adapter listed")


def cross_fetch(packages, node_urls: list[str], console: Console) -> None:
    """Ask every node to load the adapters it was not given: each fetches them from its peer over libp2p."""
    for i, url in enumerate(node_urls):
        for j, pkg in enumerate(packages):
            if j % len(node_urls) == i:
                continue
            r = httpx.post(
                f"{url}/v1/adapters/{pkg.adapter_id}/load",
                json={},
                timeout=180,
                headers={"authorization": f"Bearer {_operator_tokens[url]}"},
            )
            if r.status_code != 200:
                raise RuntimeError(f"node{i + 1} could not fetch {pkg.name} through the mesh: {r.text[:200]}")
            transfers = httpx.get(url + "/status", timeout=10).json()["p2p"]["transfers"]
            done = [t for t in transfers if t["adapter_id"] == pkg.adapter_id and t["state"] == "done"]
            how = f"{done[-1]['total'] / 1e6:.1f} MB from peer {str(done[-1]['peer_id'])[:16]}…" if done else "held"
            console.print(f"• node{i + 1} fetched {pkg.name} through the mesh ({how}), verified against its owner")
