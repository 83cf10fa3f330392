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


@dataclass(slots=True)
class ExplorerConfig:
    """Where the explorer reads from: a deployment file, an optional RPC URL override, a database URL."""

    deployment: Path
    db_url: str
    rpc_url: str | None = None

    def __post_init__(self) -> None:
        self.deployment = Path(self.deployment)
        if "://" not in self.db_url:
            raise ValueError(f"db_url {self.db_url!r} is not a database URL (expected e.g. {DEFAULT_DB_URL})")


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

    def config(self) -> ExplorerConfig:
        return ExplorerConfig(deployment=self.deployment, db_url=self.db_url, rpc_url=self.rpc_url)
