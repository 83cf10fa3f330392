"""The attribution explorer: a local web page over the chain and the ledger database."""

from devnet.explorer.app import create_app
from devnet.explorer.service import Explorer, ExplorerConfig
from devnet.explorer.store import ExplorerDatabaseError

__all__ = ["Explorer", "ExplorerConfig", "ExplorerDatabaseError", "create_app"]
