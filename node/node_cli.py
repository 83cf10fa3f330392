"""`loramesh node ...`: run a node's engine and HTTP API."""

from __future__ import annotations

import contextlib
import logging
import signal
from pathlib import Path
from typing import Annotated

import typer
import uvicorn

log = logging.getLogger("node.node_cli")  # a stable name also under `python -m`

node_app = typer.Typer(help="Run a node: the shared-base multi-LoRA engine behind the node HTTP API.",
                       no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


class NodeServer(uvicorn.Server):
    """uvicorn re-raises SIGINT/SIGTERM after shutting down; a node stops gracefully and exits 0."""

    @contextlib.contextmanager
    def capture_signals(self):
        def handle(sig, frame):
            if self.should_exit:  # a second signal: stop waiting for open connections
                self.force_exit = True
            self.should_exit = True
            log.info("received %s: shutting down", signal.Signals(sig).name)

        old = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


@node_app.callback()
def _group() -> None:
    """Run a node: the shared-base multi-LoRA engine behind the node HTTP API."""


def _node_key(key: Path | None):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if key is None:
        log.warning("no --key given: using an ephemeral node key; receipts will not verify after a restart")
        return Ed25519PrivateKey.generate()
    from node.keys import load_identity

    return load_identity(key).node_key


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
) -> None:
    """Serve the node API until SIGINT/SIGTERM (in-flight requests are aborted with receipts)."""
    from node.adapters import AdapterStore
    from node.api import create_app
    from node.basemodel import quiet_transformers
    from node.engine import Engine, EngineConfig

    logging.getLogger("node").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_transformers()
    if not (base / "config.json").is_file():
        raise typer.BadParameter(f"{base} is not a base model folder (config.json missing)", param_hint="--base")
    node_key = _node_key(key)
    config = EngineConfig(model_dir=base, device=device, num_slots=slots, max_lora_rank=max_lora_rank,
                          num_kv_blocks=kv_blocks, threads=threads)
    engine = Engine(config, store=AdapterStore(store))
    app = create_app(engine, node_key)
    from node.receipts import node_id_of, public_key_bytes

    log.info("node %s serving %s on http://%s:%d", node_id_of(public_key_bytes(node_key)), engine.base_model_name,
             host, port)
    server = NodeServer(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                        timeout_graceful_shutdown=10, lifespan="on"))
    server.run()  # lifespan shutdown closes the engine (in-flight requests end as aborted)
    log.info("node stopped")


if __name__ == "__main__":
    node_app()
