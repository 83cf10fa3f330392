"""The `loramesh` command: every part's sub-commands under one root, errors as one clear line."""

from __future__ import annotations

import logging
import os
import sys

import typer
from rich.console import Console

from devnet.demo_cli import demo
from devnet.devnet_cli import devnet_app
from devnet.explorer.cli import explorer
from gateway.cli import gateway_app
from ledger.cli import rewards_app, settler_app
from node.cli import adapter_app, base_app, keys_app
from node.node_cli import node_app

app = typer.Typer(
    help="loramesh: serve many LoRA adapters on shared base models, with on-chain attribution.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(keys_app, name="keys")
app.add_typer(base_app, name="base")
app.add_typer(adapter_app, name="adapter")
app.add_typer(node_app, name="node")
app.add_typer(gateway_app, name="gateway")
app.add_typer(devnet_app, name="devnet")
app.add_typer(rewards_app, name="rewards")
app.add_typer(settler_app, name="settler")
app.command("explorer")(explorer)
app.command("demo")(demo)

_err = Console(stderr=True, soft_wrap=True)


def main() -> None:
    """Console-script entry point: run the app, turning any failure into one line and exit code 1."""
    debug = os.environ.get("LORAMESH_DEBUG") == "1"
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app()
    except KeyboardInterrupt:
        _err.print("interrupted")
        sys.exit(130)
    except Exception as e:  # the user sees one line; LORAMESH_DEBUG=1 shows the traceback
        if debug:
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _err.print(f"[red]error:[/] {message}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
