"""The attribution explorer: a local web page over the chain (indexed into its own database) and the ledger
database.

The names below load on first use (PEP 562), so that importing one module of the package (the root command
imports devnet.explorer.cli) does not load the web app, web3 and SQLAlchemy with it.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "create_app": "devnet.explorer.main",
    "Explorer": "devnet.explorer.service",
    "ExplorerConfig": "devnet.explorer.settings",
    "ExplorerSettings": "devnet.explorer.settings",
    "ExplorerDatabaseError": "devnet.explorer.store",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
