"""SettlerSettings: flags win over LORAMESH_SETTLER_* variables, which win over the --config file, which wins
over the defaults (SettlerConfig's); unknown names in the file are refused."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.settings import SettingsError
from ledger.cli import settler_app
from ledger.deployment import DEFAULT_DEPLOYMENT_PATH
from ledger.settler_config import SettlerConfig, SettlerSettings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in (
        "LORAMESH_SETTLER_DB_URL",
        "LORAMESH_SETTLER_KEY_FILE",
        "LORAMESH_SETTLER_BATCH_SIZE",
        "LORAMESH_SETTLER_DEPLOYMENT",
        "LORAMESH_DEPLOYMENT",
    ):
        monkeypatch.delenv(name, raising=False)


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settler.toml"
    path.write_text(text)
    return path


def test_file_is_read(tmp_path):
    f = _file(tmp_path, 'db_url = "sqlite:///outbox.db"\nkey_file = "settler.key"\nbatch_size = 7\nlease = 9.5\n')
    s = SettlerSettings.load(f)
    assert (s.db_url, s.key_file, s.batch_size, s.lease) == ("sqlite:///outbox.db", Path("settler.key"), 7, 9.5)
    assert s.deployment == DEFAULT_DEPLOYMENT_PATH and s.interval == SettlerConfig().interval
    config = s.config()
    assert (config.batch_size, config.lease, config.max_in_flight) == (7, 9.5, SettlerConfig().max_in_flight)


def test_flag_wins_over_env_over_file(tmp_path, monkeypatch):
    f = _file(tmp_path, 'db_url = "sqlite:///file.db"\nkey_file = "k"\nbatch_size = 7\n')
    monkeypatch.setenv("LORAMESH_SETTLER_BATCH_SIZE", "8")
    monkeypatch.setenv("LORAMESH_SETTLER_DB_URL", "sqlite:///env.db")
    s = SettlerSettings.load(f, batch_size=9, db_url=None)  # a flag not given (None) is no flag
    assert (s.batch_size, s.db_url) == (9, "sqlite:///env.db")
    assert SettlerSettings.load(f).batch_size == 8
    monkeypatch.setenv("LORAMESH_DEPLOYMENT", "elsewhere.json")  # the ledger commands' variable sets it too
    assert SettlerSettings.load(f).deployment == Path("elsewhere.json")
    assert SettlerSettings.load(f, deployment=Path("flag.json")).deployment == Path("flag.json")


def test_unknown_name_refused(tmp_path):
    f = _file(tmp_path, 'db_url = "sqlite:///x.db"\nkey_file = "k"\nbatch_sise = 7\n')
    with pytest.raises(SettingsError, match="batch_sise"):
        SettlerSettings.load(f)
    r = CliRunner().invoke(settler_app, ["run", "--config", str(f)])
    assert r.exit_code == 2 and "batch_sise" in r.output


def test_missing_file_and_bounds_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        SettlerSettings.load(tmp_path / "none.toml", db_url="sqlite:///x.db", key_file="k")
    with pytest.raises(ValueError, match="batch_size"):
        SettlerSettings.load(db_url="sqlite:///x.db", key_file="k", batch_size=0).config()
    r = CliRunner().invoke(settler_app, ["run", "--key", "k"])  # no database named anywhere
    assert r.exit_code == 2 and "db_url" in r.output


def test_fee_caps_and_finality_settings(tmp_path, monkeypatch):
    """max_fee_gwei / max_tip_gwei reach the chain client's FeePolicy, over LORAMESH_MAX_FEE_GWEI; confirmations
    and replace_after reach SettlerConfig."""
    from ledger.transport import GWEI, FeePolicy

    f = _file(tmp_path, 'db_url = "sqlite:///x.db"\nkey_file = "k"\nmax_fee_gwei = 42.5\nconfirmations = 3\n')
    monkeypatch.setenv("LORAMESH_MAX_TIP_GWEI", "2")
    monkeypatch.setenv("LORAMESH_SETTLER_REPLACE_AFTER", "7")
    s = SettlerSettings.load(f)
    policy = s.fee_policy()
    assert (policy.max_fee, policy.max_tip) == (int(42.5 * GWEI), 2 * GWEI)
    assert (s.config().confirmations, s.config().replace_after) == (3, 7.0)
    monkeypatch.delenv("LORAMESH_MAX_TIP_GWEI")
    plain = SettlerSettings.load(None, db_url="sqlite:///x.db", key_file=Path("k"))
    assert plain.fee_policy() == FeePolicy() and plain.config().confirmations == 0
    with pytest.raises(ValueError, match="confirmations"):
        SettlerSettings.load(f, confirmations=5000).config()


def test_errors_name_the_flags_as_the_command_has_them(tmp_path):
    # "give --db-url" named a flag `settler run` does not have (it is --db); a misspelt key got no suggestion
    with pytest.raises(SettingsError, match="missing setting db_url: give --db, LORAMESH_SETTLER_DB_URL or db_url"):
        SettlerSettings.load(None, key_file="k.json")
    cfg = tmp_path / "settler.toml"
    cfg.write_text('db = "sqlite:///x.db"\n')
    with pytest.raises(SettingsError, match=r"unknown setting 'db' in .*settler.toml \(did you mean 'db_url'\?\)"):
        SettlerSettings.load(cfg, key_file="k.json")
