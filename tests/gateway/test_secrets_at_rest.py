"""What the gateway keeps and logs of its secrets: its SQLite database (API key hashes, usage) and its
gateway key file are created 0600 whatever the umask (found: gateway.db world-readable), the key persists
across restarts, and a database URL's password never reaches the log (found: written there at start)."""

from __future__ import annotations

import os
import stat

import httpx
import pytest

from gateway.identity import load_or_create_gateway_key
from gateway.main import create_app
from gateway.settings import GatewaySettings
from ledger.db import redact_url
from node.request_auth import gateway_public_key_hex
from tests.utils.gateway import start_gateway_process
from tests.utils.postgres import postgres  # noqa: F401 - the module-scoped fixture


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def open_umask():
    old = os.umask(0o022)  # the usual default: files world-readable unless created otherwise
    try:
        yield
    finally:
        os.umask(old)


def test_database_and_gateway_key_are_0600_and_the_key_persists(tmp_path, open_umask):
    settings = GatewaySettings(db_url=f"sqlite:///{tmp_path / 'gateway.db'}", gateway_key_file=tmp_path / "gw.key")
    first = create_app(settings).state.gateway
    assert mode(tmp_path / "gateway.db") == 0o600 and mode(tmp_path / "gw.key") == 0o600
    again = create_app(settings).state.gateway
    assert again.gateway_key_hex == first.gateway_key_hex and len(first.gateway_key_hex) == 64
    ephemeral = create_app(GatewaySettings(db_url=f"sqlite:///{tmp_path / 'other.db'}")).state.gateway
    assert ephemeral.gateway_key_hex != first.gateway_key_hex


def test_an_existing_world_readable_database_is_made_0600(tmp_path, open_umask):
    db = tmp_path / "gateway.db"
    db.touch(mode=0o644)
    os.chmod(db, 0o644)
    create_app(GatewaySettings(db_url=f"sqlite:///{db}"))
    assert mode(db) == 0o600


def test_redact_url():
    assert redact_url("postgresql+psycopg://gw:s3cret@db:5432/x") == "postgresql+psycopg://gw:***@db:5432/x"
    assert redact_url("sqlite:///gateway.db") == "sqlite:///gateway.db"


@pytest.mark.integration
def test_the_database_password_is_not_logged(tmp_path, postgres):  # noqa: F811
    url = postgres.new_database("gw_secret").replace("postgres@", "postgres:Hunter2Secret@")  # trust auth ignores it
    key_file = tmp_path / "gateway.key"
    gw, gw_url = start_gateway_process(tmp_path, url, extra_args=("--gateway-key-file", str(key_file)))
    try:
        gw.wait_http(gw_url + "/health")
        key = httpx.get(gw_url + "/internal/gateway-key", timeout=5).json()["gateway_key"]
    finally:
        gw.stop()
    text = gw.log_path.read_text()
    assert "Hunter2Secret" not in text and "postgres:***@" in text, text[-2000:]
    assert f"gateway key {key}" in text  # node operators take it from the log for their allow-list
    assert mode(key_file) == 0o600 and gateway_public_key_hex(load_or_create_gateway_key(key_file)) == key


def test_keys_create_makes_the_database_0600(tmp_path, open_umask):
    from typer.testing import CliRunner

    from gateway.cli import gateway_app

    result = CliRunner().invoke(gateway_app, ["keys", "create", "--db", f"sqlite:///{tmp_path / 'keys.db'}"])
    assert result.exit_code == 0, result.output
    assert mode(tmp_path / "keys.db") == 0o600
