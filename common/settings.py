"""The base of every service's settings: fields from the environment (each service its own prefix,
LORAMESH_NODE_*, LORAMESH_GATEWAY_*, LORAMESH_SETTLER_*, LORAMESH_EXPLORER_*), then from a TOML config
file, then the field's default. Command-line flags are passed as init values and win over both.

A config file holds the same names as the fields, e.g. for `loramesh gateway run --config gateway.toml`:

    port = 8000
    db_url = "postgresql+psycopg://loramesh@db/loramesh"

Unknown names in the file are refused (extra="forbid"), so a typo is an error, not a silent default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, TomlConfigSettingsSource


class ServiceSettings(BaseSettings):
    """Subclass with `model_config = SettingsConfigDict(env_prefix="LORAMESH_<SERVICE>_", extra="forbid")`;
    load with `load(config_file, **flags)`."""

    # the TOML file read by `load`; set per call, never a field (it is not a setting of the service)
    _config_file: ClassVar[Path | None] = None

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls._config_file))
        return tuple(sources)

    @classmethod
    def load(cls, config_file: Path | None = None, **flags: Any):
        """Settings from flags (those not None), the environment, `config_file` (TOML), then defaults."""
        if config_file is not None and not Path(config_file).is_file():
            raise ValueError(f"config file {config_file} does not exist")
        given = {k: v for k, v in flags.items() if v is not None}
        previous, cls._config_file = cls._config_file, Path(config_file) if config_file else None
        try:
            return cls(**given)
        finally:
            cls._config_file = previous
