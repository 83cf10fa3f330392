"""`loramesh explorer`: serve the attribution explorer on a local port until Ctrl-C."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from devnet.explorer.settings import DEFAULT_PORT, ExplorerSettings
from ledger.db import DEFAULT_DB_URL
from ledger.deployment import DEFAULT_DEPLOYMENT_PATH


class ExplorerPortInUse(RuntimeError):
    """Something already listens where the explorer was asked to."""


def explorer(
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML file of settings (db_url, deployment, rpc_url, host, port).")
    ] = None,
    rpc: Annotated[str | None, typer.Option("--rpc", help="Chain JSON-RPC URL (default: the deployment's).")] = None,
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            help=(
                "Ledger database URL, the gateway's (default $LORAMESH_EXPLORER_DB_URL, $LORAMESH_GATEWAY_DB_URL or "
                f"{DEFAULT_DB_URL})."
            ),
        ),
    ] = None,
    deployment: Annotated[
        Path | None,
        typer.Option(
            "--deployment", help=(f"Deployment file with the contract addresses (default {DEFAULT_DEPLOYMENT_PATH}).")
        ),
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", min=1, max=65535, help=f"HTTP port (default {DEFAULT_PORT}).")
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help="Address to bind (default 127.0.0.1).")] = None,
) -> None:
    """Serve the attribution explorer: adapters, datasets, nodes, batches, records with checked proofs.

    Each setting comes from its flag, else LORAMESH_EXPLORER_<NAME>, else the --config file, else its default."""
    import socket

    from common.serving import serve
    from common.settings import SettingsError
    from common.wire import restore_recursion_limit
    from devnet.explorer.main import create_app

    try:
        settings = ExplorerSettings.load(config, rpc_url=rpc, db_url=db, deployment=deployment, port=port, host=host)
    except SettingsError as e:
        raise typer.BadParameter(str(e), param_hint="explorer settings") from None

    restore_recursion_limit()  # web3's py_ecc raised it to 100,000 at import: deep recursion would crash, not raise

    host, port = settings.host, settings.port
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ExplorerPortInUse(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port") from e
    app = create_app(settings.config())  # checks chain and database
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    typer.echo(f"loramesh explorer on http://{shown}:{port}/ (Ctrl-C to stop)")
    serve(app, host=host, port=port, name="explorer", graceful_timeout=5)
    typer.echo("explorer stopped")
