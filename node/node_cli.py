"""`loramesh node ...`: run a node's engine and HTTP API."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

log = logging.getLogger("node.node_cli")  # a stable name also under `python -m`

node_app = typer.Typer(help="Run a node: the shared-base multi-LoRA engine behind the node HTTP API.",
                       no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@node_app.callback()
def _group() -> None:
    """Run a node: the shared-base multi-LoRA engine behind the node HTTP API."""


def _identity(key: Path | None):
    from node.keys import Identity, load_identity

    if key is None:
        log.warning("no --key given: using an ephemeral node key; receipts will not verify after a restart")
        return Identity.generate()
    return load_identity(key)


@node_app.command("run")
def run(
    base: Annotated[Path, typer.Option("--base", help="Base model folder (Hugging Face safetensors).")],
    store: Annotated[Path, typer.Option("--store", help="Adapter store folder.")],
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="HTTP port.")],
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    slots: Annotated[int, typer.Option("--slots", min=1, help="Adapter slots on the device.")] = 8,
    key: Annotated[Path | None, typer.Option("--key", help="Identity file (password from LORAMESH_KEY_PASSWORD).")] = None,
    max_lora_rank: Annotated[int, typer.Option("--max-lora-rank", min=1, help="Largest adapter rank served.")] = 16,
    kv_blocks: Annotated[int | None, typer.Option("--kv-blocks", min=1, help="KV cache blocks (default: from memory).")] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="torch CPU threads.")] = None,
    deployment: Annotated[Path | None, typer.Option(
        "--deployment", help="Deployment file: register this node on chain and check adapter owners there.")] = None,
    rpc: Annotated[str | None, typer.Option("--rpc", help="Chain JSON-RPC URL (default: the deployment's).")] = None,
    listen: Annotated[str | None, typer.Option(
        "--listen", help="libp2p listen multiaddr, e.g. /ip4/127.0.0.1/tcp/4001 (omit: no p2p).")] = None,
    bootstrap: Annotated[list[str] | None, typer.Option(
        "--bootstrap", help="Peer multiaddr (…/p2p/<peer id>) to join the mesh through; repeatable.")] = None,
    gateway: Annotated[list[str] | None, typer.Option(
        "--gateway", help="Gateway URL to send signed heartbeats to; repeatable.")] = None,
    api_url: Annotated[str | None, typer.Option(
        "--api-url", help="URL gateways use to reach this node (default http://HOST:PORT).")] = None,
    pin: Annotated[list[str] | None, typer.Option("--pin", help="Adapter id to hold in a slot; repeatable.")] = None,
) -> None:
    """Serve the node API until SIGINT/SIGTERM (in-flight requests are aborted with receipts).

    With --deployment the node registers itself on chain (operator = the key's address) and only
    accepts adapters signed by their registered owner; with --listen it joins the p2p mesh and
    fetches adapters it lacks from peers; with --gateway it heartbeats to those gateways.
    """
    from node.basemodel import quiet_transformers
    from node.daemon import DaemonConfig, NodeDaemon
    from node.engine import EngineConfig

    logging.getLogger("node").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_transformers()
    if not (base / "config.json").is_file():
        raise typer.BadParameter(f"{base} is not a base model folder (config.json missing)", param_hint="--base")
    if deployment is not None and key is None:
        raise typer.BadParameter("registering on chain needs the operator's identity file", param_hint="--key")
    identity = _identity(key)
    config = DaemonConfig(base=base, store=store, host=host, port=port, api_url=api_url, deployment=deployment,
                          rpc=rpc, listen=listen, bootstrap=tuple(bootstrap or ()), gateways=tuple(gateway or ()),
                          pins=tuple(pin or ()))
    engine_config = EngineConfig(model_dir=base, device=device, num_slots=slots, max_lora_rank=max_lora_rank,
                                 num_kv_blocks=kv_blocks, threads=threads)
    daemon = NodeDaemon(config, engine_config, identity)
    log.info("node %s serving %s on %s", identity.node_id, daemon.engine.base_model_name, config.public_url)
    from node.serving import serve

    serve(daemon.app, host=host, port=port, name="node")  # shutdown stops heartbeats, the p2p host, the engine


if __name__ == "__main__":
    node_app()
