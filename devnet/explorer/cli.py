"""`loramesh explorer`: serve the attribution explorer on a local port until Ctrl-C."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

DEFAULT_DEPLOYMENT = Path(os.environ.get("LORAMESH_DEPLOYMENT", ".loramesh/devnet/deployment.json"))
DEFAULT_DB = os.environ.get("LORAMESH_GATEWAY_DB_URL", "sqlite:///loramesh.db")
DEFAULT_PORT = 8700


class ExplorerPortInUse(RuntimeError):
    """Something already listens where the explorer was asked to."""


def explorer(
    rpc: Annotated[str | None, typer.Option("--rpc", help="Chain JSON-RPC URL (default: the deployment's).")] = None,
    db: Annotated[str, typer.Option("--db", help="Ledger database URL, the gateway's "
                                    "(default $LORAMESH_GATEWAY_DB_URL or sqlite:///loramesh.db).")] = DEFAULT_DB,
    deployment: Annotated[Path, typer.Option("--deployment", help="Deployment file with the contract addresses "
                                             "($LORAMESH_DEPLOYMENT).")] = DEFAULT_DEPLOYMENT,
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="HTTP port.")] = DEFAULT_PORT,
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
) -> None:
    """Serve the attribution explorer: adapters, datasets, nodes, batches, records with checked proofs."""
    import socket

    from devnet.explorer import ExplorerConfig, create_app
    from common.wire import restore_recursion_limit

    restore_recursion_limit()  # web3's py_ecc raised it to 100,000 at import: deep recursion would crash, not raise

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ExplorerPortInUse(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port") from e
    app = create_app(ExplorerConfig(deployment=deployment, db_url=db, rpc_url=rpc))  # checks chain and database
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    typer.echo(f"loramesh explorer on http://{shown}:{port}/ (Ctrl-C to stop)")
    from common.serving import serve

    serve(app, host=host, port=port, name="explorer", graceful_timeout=5)
    typer.echo("explorer stopped")
