"""The explorer's settings: ExplorerSettings, the service's (`loramesh explorer`: flags, LORAMESH_EXPLORER_*
variables, a TOML file), and ExplorerConfig, where an Explorer reads from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from common.settings import ServiceSettings
from ledger.db import DEFAULT_DB_URL
from ledger.deployment import DEFAULT_DEPLOYMENT_PATH

DEFAULT_PORT = 8700
# Blocks a log waits under the chain's head before the explorer shows it. 0 on the devnet: anvil is its only
# block producer and never reorganizes by itself, and the tests' anvil mines a block only when a transaction
# comes, so any other number would hide the last batches until unrelated transactions arrive. On a public
# chain, set the chain's reorg depth (e.g. 12 to 64 on Ethereum); a deeper reorg is still noticed (the
# indexed block's hash changes) and the index rebuilt.
DEFAULT_CONFIRMATIONS = 0


@dataclass(slots=True)
class ExplorerConfig:
    """Where the explorer reads from (a deployment file, an optional RPC URL override, the ledger database URL),
    where it keeps its index (`data_dir`, default: an `explorer` folder beside the deployment file) and how it
    follows the chain (blocks a log waits under the head before it shows; seconds between refreshes)."""

    deployment: Path
    db_url: str
    rpc_url: str | None = None
    data_dir: Path | None = None
    confirmations: int = DEFAULT_CONFIRMATIONS
    refresh_interval: float = 1.0

    def __post_init__(self) -> None:
        self.deployment = Path(self.deployment)
        if "://" not in self.db_url:
            raise ValueError(f"db_url {self.db_url!r} is not a database URL (expected e.g. {DEFAULT_DB_URL})")
        if self.confirmations < 0:
            raise ValueError(f"confirmations must be 0 or more, got {self.confirmations}")
        if self.refresh_interval <= 0:
            raise ValueError(f"refresh_interval must be positive, got {self.refresh_interval}")

    @property
    def index_dir(self) -> Path:
        """Where the index database lives: one index per deployment file, by default."""
        return Path(self.data_dir) if self.data_dir is not None else self.deployment.parent / "explorer"


class ExplorerSettings(ServiceSettings):
    """Everything `loramesh explorer` needs; each field can come from LORAMESH_EXPLORER_<NAME> or a TOML file
    (`--config`)."""

    model_config = SettingsConfigDict(env_prefix="LORAMESH_EXPLORER_", extra="forbid")

    # the ledger database is the gateway's, so the gateway's own variable names it too
    db_url: str = Field(
        DEFAULT_DB_URL, validation_alias=AliasChoices("db_url", "LORAMESH_EXPLORER_DB_URL", "LORAMESH_GATEWAY_DB_URL")
    )
    # the deployment file; LORAMESH_DEPLOYMENT, read by the ledger commands too, also sets it
    deployment: Path = Field(
        DEFAULT_DEPLOYMENT_PATH,
        validation_alias=AliasChoices("deployment", "LORAMESH_EXPLORER_DEPLOYMENT", "LORAMESH_DEPLOYMENT"),
    )
    rpc_url: str | None = None  # default: the deployment file's
    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_PORT, ge=1, le=65535)
    data_dir: Path | None = None  # the index database's folder; default: `explorer` beside the deployment file
    confirmations: int = Field(DEFAULT_CONFIRMATIONS, ge=0)
    refresh_interval: float = Field(1.0, gt=0)

    def config(self) -> ExplorerConfig:
        return ExplorerConfig(
            deployment=self.deployment,
            db_url=self.db_url,
            rpc_url=self.rpc_url,
            data_dir=self.data_dir,
            confirmations=self.confirmations,
            refresh_interval=self.refresh_interval,
        )
