"""The base of every service's settings: fields from the environment (each service its own prefix,
LORAMESH_NODE_*, LORAMESH_GATEWAY_*, LORAMESH_SETTLER_*, LORAMESH_EXPLORER_*), then from a TOML config
file, then the field's default. Command-line flags are passed as init values and win over both.

A config file holds the same names as the fields, e.g. for `loramesh gateway run --config gateway.toml`:

    port = 8000
    db_url = "postgresql+psycopg://loramesh@db/loramesh"

Unknown names in the file are refused (extra="forbid"), so a typo is an error, not a silent default.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import ValidationError
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

WordList = Annotated[tuple[str, ...], NoDecode]  # a list; space-separated in the environment (split_words)


def split_words(value: Any) -> Any:
    """A list setting from the environment (`field_validator(..., mode="before")`): its words, as a shell's
    `PEERS="a b"`, or a JSON list (`'["a b", "c"]'`, for items with spaces); what a file or a flag gave (a list
    already) as it is."""
    if not isinstance(value, str):
        return value
    if value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except ValueError as e:
            raise ValueError(f"{value[:80]!r} is neither words nor a JSON list: {e}") from None
    return tuple(value.split())


class SettingsError(ValueError):
    """Settings that cannot be used, in one line naming the setting: unknown, missing, out of range, or a
    config file that is not there."""


class ServiceSettings(BaseSettings):
    """Subclass with `model_config = SettingsConfigDict(env_prefix="LORAMESH_<SERVICE>_", extra="forbid")`;
    load with `load(config_file, **flags)`."""

    # no setting is infinite or NaN (merged into each subclass's config): `inf` passed `gt=0` and then failed
    # where it was used, a traceback on every database connection (red team)
    model_config = SettingsConfigDict(allow_inf_nan=False)

    # the TOML file read by `load`; set per call, never a field (it is not a setting of the service)
    _config_file: ClassVar[Path | None] = None
    # a setting whose command-line flag is not its name with - for _ (db_url: --db), as errors name it
    FLAGS: ClassVar[dict[str, str]] = {}
    # variables of the service's prefix that are read elsewhere, not settings (the rest of the prefix is refused)
    OTHER_VARIABLES: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
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
        """Settings from flags (those not None), the environment, `config_file` (TOML), then defaults;
        SettingsError (one line) for a missing, unknown or bad setting."""
        if config_file is not None and not Path(config_file).is_file():
            raise SettingsError(f"config file {config_file} does not exist")
        cls._check_environment()
        given = {k: v for k, v in flags.items() if v is not None}
        previous, cls._config_file = cls._config_file, Path(config_file) if config_file else None
        try:
            return cls(**given)
        except ValidationError as e:
            raise SettingsError(cls._one_line(e, config_file, given)) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise SettingsError(f"config file {config_file} is not TOML: {e}") from None
        except OSError as e:
            raise SettingsError(f"config file {config_file} cannot be read: {e.strerror or e}") from None
        finally:
            cls._config_file = previous

    @classmethod
    def _check_environment(cls) -> None:
        """A variable of the service's prefix naming no setting is refused, as an unknown key of the file is: the
        environment is read without complaint otherwise, and LORAMESH_GATEWAY_PROT=5 left the port at 8000."""
        prefix = cls.model_config.get("env_prefix", "").upper()
        if not prefix:
            return
        for var in sorted(os.environ):
            upper = var.upper()
            if not upper.startswith(prefix) or upper in cls.OTHER_VARIABLES:
                continue
            name = upper[len(prefix) :].lower()
            if name not in cls.model_fields:
                close = difflib.get_close_matches(name, cls.model_fields, n=1, cutoff=0.5)
                hint = f" (did you mean {prefix}{close[0].upper()}?)" if close else ""
                raise SettingsError(f"unknown setting {var} in the environment{hint}")

    @classmethod
    def _one_line(cls, e: ValidationError, config_file: Path | None, given: dict[str, Any]) -> str:
        # the first problem, named as the user wrote it: a flag, an environment variable or a file's key
        # a misspelt key first: it is often why a setting reads as missing
        errors = e.errors()
        err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
        name = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            where = f" in {config_file}" if config_file else ""
            close = difflib.get_close_matches(name, cls.model_fields, n=1, cutoff=0.5)
            return f"unknown setting {name!r}{where}" + (f" (did you mean {close[0]!r}?)" if close else "")
        if err["type"] == "missing":
            prefix = cls.model_config.get("env_prefix", "")
            return (
                f"missing setting {name}: give {cls._flag(name)}, {prefix}{name.upper()} or {name} in a --config file"
            )
        return f"setting {name}: {err['msg'].removeprefix('Value error, ')}{cls._source(name, config_file, given)}"

    @classmethod
    def _flag(cls, name: str) -> str:
        """The command-line flag of a setting."""
        return cls.FLAGS.get(name, "--" + name.replace("_", "-"))

    @classmethod
    def _source(cls, name: str, config_file: Path | None, given: dict[str, Any]) -> str:
        """Where a bad value came from, in the order they win: a flag, the environment, the config file."""
        if name in given:
            return f" (set by {cls._flag(name)})"
        var = cls.model_config.get("env_prefix", "").upper() + name.upper()
        if any(v.upper() == var for v in os.environ):
            return f" (set by {var})"
        return f" (set in {config_file})" if config_file else ""
