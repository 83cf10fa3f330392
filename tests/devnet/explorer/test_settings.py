"""ExplorerSettings: flags win over LORAMESH_EXPLORER_* variables (and the gateway's database variable), which
win over the --config file, which wins over the defaults; unknown names in the file are refused."""

from pathlib import Path

import pytest
import typer

from common.settings import SettingsError
from devnet.explorer import ExplorerConfig, ExplorerSettings
from devnet.explorer.cli import explorer
from ledger.db import DEFAULT_DB_URL
from ledger.deployment import DEFAULT_DEPLOYMENT_PATH


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in (
        "LORAMESH_EXPLORER_DB_URL",
        "LORAMESH_GATEWAY_DB_URL",
        "LORAMESH_EXPLORER_PORT",
        "LORAMESH_EXPLORER_DEPLOYMENT",
        "LORAMESH_DEPLOYMENT",
    ):
        monkeypatch.delenv(name, raising=False)


def test_defaults_and_file(tmp_path):
    s = ExplorerSettings.load()
    assert (s.db_url, s.deployment, s.port, s.host) == (DEFAULT_DB_URL, DEFAULT_DEPLOYMENT_PATH, 8700, "127.0.0.1")
    f = tmp_path / "explorer.toml"
    f.write_text('db_url = "sqlite:///ledger.db"\nport = 8800\ndeployment = "d.json"\nrpc_url = "http://x:1"\n')
    s = ExplorerSettings.load(f)
    assert (s.db_url, s.port, s.deployment, s.rpc_url) == ("sqlite:///ledger.db", 8800, Path("d.json"), "http://x:1")
    assert s.config() == ExplorerConfig(deployment=Path("d.json"), db_url="sqlite:///ledger.db", rpc_url="http://x:1")


def test_flag_wins_over_env_over_file(tmp_path, monkeypatch):
    f = tmp_path / "explorer.toml"
    f.write_text('db_url = "sqlite:///file.db"\nport = 8800\n')
    monkeypatch.setenv("LORAMESH_GATEWAY_DB_URL", "sqlite:///gateway.db")  # the gateway's database
    monkeypatch.setenv("LORAMESH_EXPLORER_PORT", "8801")
    s = ExplorerSettings.load(f)
    assert (s.db_url, s.port) == ("sqlite:///gateway.db", 8801)
    monkeypatch.setenv("LORAMESH_EXPLORER_DB_URL", "sqlite:///explorer.db")  # the explorer's own wins
    assert ExplorerSettings.load(f).db_url == "sqlite:///explorer.db"
    s = ExplorerSettings.load(f, db_url="sqlite:///flag.db", port=8802, host=None)
    assert (s.db_url, s.port, s.host) == ("sqlite:///flag.db", 8802, "127.0.0.1")


def test_unknown_name_refused(tmp_path):
    f = tmp_path / "explorer.toml"
    f.write_text('db = "sqlite:///x.db"\n')
    with pytest.raises(SettingsError, match="db"):
        ExplorerSettings.load(f)
    with pytest.raises(typer.BadParameter, match="db"):
        explorer(config=f)
    with pytest.raises(typer.BadParameter, match="does not exist"):
        explorer(config=tmp_path / "none.toml")
