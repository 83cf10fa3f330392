"""`loramesh node ...`: run a node's engine and HTTP API."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from node.adapters.limits import MAX_LORA_RANK

log = logging.getLogger("node.node_cli")  # a stable name also under `python -m`

node_app = typer.Typer(help="Run a node: the shared-base multi-LoRA engine behind the node HTTP API.",
                       no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@node_app.callback()
def _group() -> None:
    """Run a node: the shared-base multi-LoRA engine behind the node HTTP API."""


def _identity(key: Path | None):
    from common.identity import Identity, load_identity

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
    max_lora_rank: Annotated[int, typer.Option("--max-lora-rank", min=1, max=MAX_LORA_RANK, help=(
        "Largest adapter rank served (packages above the network's limit never verify)."))] = MAX_LORA_RANK,
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
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", envvar="LORAMESH_NODE_DATA_DIR",
        help="Node data folder; holds operator.token (made on first start). Default .loramesh/node.")] = None,
    trust_gateway_key: Annotated[list[str] | None, typer.Option(
        "--trust-gateway-key", envvar="LORAMESH_NODE_TRUST_GATEWAY_KEYS",
        help="Gateway public key (64 hex) whose signed calls are served; repeatable (env: space-separated). "
             "Default: the keys the --gateway URLs announce.")] = None,
    max_package_bytes: Annotated[int | None, typer.Option(
        "--max-package-bytes", min=1, help="Largest adapter package accepted by upload (default 4 GiB).")] = None,
) -> None:
    """Serve the node API until SIGINT/SIGTERM (in-flight requests are aborted with receipts).

    With --deployment the node registers itself on chain (operator = the key's address) and only
    accepts adapters signed by their registered owner; with --listen it joins the p2p mesh and
    fetches adapters it lacks from peers; with --gateway it heartbeats to those gateways.
    Generation is served only to gateways it trusts (--trust-gateway-key, else the --gateway URLs' keys);
    upload needs the operator's token (`Authorization: Bearer`, from <data dir>/operator.token), which
    load/pin and abort take too.
    """
    from node.adapters.basemodel import quiet_transformers
    from common.wire import restore_recursion_limit
    from node.daemon import DaemonConfig, NodeDaemon
    from node.engine import EngineConfig
    from node.operator_token import DEFAULT_DATA_DIR
    from node.upload import MAX_PACKAGE_BYTES

    logging.getLogger("node").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_transformers()
    if not (base / "config.json").is_file():
        raise typer.BadParameter(f"{base} is not a base model folder (config.json missing)", param_hint="--base")
    if deployment is not None and key is None:
        raise typer.BadParameter("registering on chain needs the operator's identity file", param_hint="--key")
    identity = _identity(key)
    try:
        config = DaemonConfig(base=base, store=store, host=host, port=port, api_url=api_url, deployment=deployment,
                              rpc=rpc, listen=listen, bootstrap=tuple(bootstrap or ()), gateways=tuple(gateway or ()),
                              pins=tuple(pin or ()), data_dir=data_dir or DEFAULT_DATA_DIR,
                              trusted_gateway_keys=tuple(trust_gateway_key or ()),
                              max_package_bytes=max_package_bytes or MAX_PACKAGE_BYTES)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    engine_config = EngineConfig(model_dir=base, device=device, num_slots=slots, max_lora_rank=max_lora_rank,
                                 num_kv_blocks=kv_blocks, threads=threads)
    daemon = NodeDaemon(config, engine_config, identity)
    restore_recursion_limit()  # py_ecc, imported with the chain libraries, raises it to 100,000
    log.info("node %s serving %s on %s", identity.node_id, daemon.engine.base_model_name, config.public_url)
    log.info("operator token (for upload, load/pin, abort) is in %s", daemon.operator_token_path)
    if config.trusted_gateway_keys:
        log.info("serving gateways with keys %s", ", ".join(k[:16] for k in config.trusted_gateway_keys))
    elif config.gateways:
        log.info("serving the gateways it heartbeats to, by the keys they announce")
    else:
        log.warning("no --gateway and no --trust-gateway-key: no gateway can send this node requests")
    from common.serving import serve

    serve(daemon.app, host=host, port=port, name="node")  # shutdown stops heartbeats, the p2p host, the engine


if __name__ == "__main__":
    node_app()
