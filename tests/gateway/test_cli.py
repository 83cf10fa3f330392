"""`loramesh gateway keys ...` and the refusals of `gateway run`."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.cli import gateway_app
from gateway.keys import lookup_key
from ledger.db import make_engine

runner = CliRunner()


def test_keys_create_list_revoke(tmp_path):
    db = f"sqlite:///{tmp_path / 'k.db'}"
    r = runner.invoke(
        gateway_app,
        ["keys", "create", "--name", "web", "--rpm", "5", "--tpm", "900", "--adapters", "acme/a,acme/b", "--db", db],
    )
    assert r.exit_code == 0, r.output
    secret = r.output.strip().splitlines()[-1]
    key = lookup_key(make_engine(db), secret)
    assert (key.name, key.requests_per_minute, key.tokens_per_minute, key.adapters) == (
        "web",
        5,
        900,
        {"acme/a", "acme/b"},
    )
    listing = runner.invoke(gateway_app, ["keys", "list", "--db", db])
    assert listing.exit_code == 0 and key.prefix in listing.output and secret not in listing.output
    r = runner.invoke(gateway_app, ["keys", "revoke", str(key.id), "--db", db])
    assert r.exit_code == 0 and "revoked" in r.output
    assert lookup_key(make_engine(db), secret) is None


@pytest.mark.parametrize("name", ["ops [/] team", "[bold]x[/bold]", "ops:100:team"])
def test_a_key_name_is_printed_as_it_is_never_read_as_markup(tmp_path, name):
    """rich read a key's name as markup: "[/]" failed `keys create` after the key was stored and before its secret
    was shown, then every `keys list`; "[bold]x[/bold]" was listed as "x", and ":100:" as an emoji."""
    db = f"sqlite:///{tmp_path / 'k.db'}"
    r = runner.invoke(gateway_app, ["keys", "create", "--name", name, "--db", db])
    assert r.exit_code == 0 and f"({name})" in r.output, r.output
    secret = r.output.strip().splitlines()[-1]
    assert lookup_key(make_engine(db, create=False), secret) is not None
    listing = runner.invoke(gateway_app, ["keys", "list", "--db", db])
    assert listing.exit_code == 0 and name[:6] in listing.output, listing.output  # the table folds the rest


def test_revoke_unknown_key_fails(tmp_path):
    db = f"sqlite:///{tmp_path / 'k.db'}"
    assert runner.invoke(gateway_app, ["keys", "create", "--name", "web", "--db", db]).exit_code == 0
    r = runner.invoke(gateway_app, ["keys", "revoke", "lm-nothing", "--db", db])
    assert r.exit_code != 0 and "no API key" in str(r.exception)


def test_run_refuses_key_without_chain(tmp_path):
    (tmp_path / "k").write_text("00" * 32)
    r = runner.invoke(gateway_app, ["run", "--key", str(tmp_path / "k"), "--db", f"sqlite:///{tmp_path / 'g.db'}"])
    assert r.exit_code != 0 and "--deployment" in r.output + str(r.exception)


def test_settings_from_env(monkeypatch):
    from gateway.settings import GatewaySettings

    monkeypatch.setenv("LORAMESH_GATEWAY_OWNERS_K", "3")
    monkeypatch.setenv("LORAMESH_GATEWAY_DB_URL", "sqlite:///x.db")
    monkeypatch.setenv("LORAMESH_GATEWAY_BASES", "work/base other/base")  # space-separated, as the node's lists
    s = GatewaySettings()
    assert (s.owners_k, s.db_url, s.bases) == (3, "sqlite:///x.db", [Path("work/base"), Path("other/base")])
    monkeypatch.setenv("LORAMESH_GATEWAY_BASES", '["my base", "b"]')  # or a JSON list, for a path with a space
    assert GatewaySettings().bases == [Path("my base"), Path("b")]
    monkeypatch.setenv("LORAMESH_GATEWAY_DB_URL", "x.db")
    with pytest.raises(ValueError, match="not a database URL"):
        GatewaySettings()


def test_settings_from_a_config_file_flags_and_env_win(tmp_path, monkeypatch):
    from gateway.cli import gateway_settings

    config = tmp_path / "gateway.toml"
    config.write_text('port = 9100\nowners_k = 5\nhost = "0.0.0.0"\ndb_url = "sqlite:///from-file.db"\n')
    s = gateway_settings(config)
    assert (s.port, s.owners_k, s.host, s.db_url) == (9100, 5, "0.0.0.0", "sqlite:///from-file.db")
    monkeypatch.setenv("LORAMESH_GATEWAY_OWNERS_K", "3")
    s = gateway_settings(config, port=9200, host=None)  # a flag not given (None) leaves the file's value
    assert (s.port, s.owners_k, s.host) == (9200, 3, "0.0.0.0")  # flag over file, env over file


def test_an_unknown_name_in_the_config_file_is_refused_in_one_line(tmp_path):
    import typer

    from gateway.cli import gateway_settings

    config = tmp_path / "gateway.toml"
    config.write_text("port = 9100\nowner_k = 5\n")  # a typo of owners_k
    with pytest.raises(typer.BadParameter) as refused:
        gateway_settings(config)
    message = refused.value.format_message()
    assert len(message.splitlines()) == 1 and "owner_k" in message, message
    r = runner.invoke(gateway_app, ["run", "--config", str(config), "--db", f"sqlite:///{tmp_path / 'g.db'}"])
    assert r.exit_code != 0  # nothing served on settings it could not read
    with pytest.raises(typer.BadParameter, match="does not exist"):
        gateway_settings(tmp_path / "missing.toml")


def test_keys_update_and_run_options(tmp_path):
    db = f"sqlite:///{tmp_path / 'k.db'}"
    created = runner.invoke(gateway_app, ["keys", "create", "--name", "x", "--db", db])
    assert created.exit_code == 0, created.output
    r = runner.invoke(gateway_app, ["keys", "update", "lm-nothing", "--rpm", "3", "--db", db])
    assert r.exit_code != 0 and "no API key" in r.output
    key = lookup_key(make_engine(db), created.output.strip().splitlines()[-1])
    r = runner.invoke(
        gateway_app,
        ["keys", "update", str(key.id), "--max-price-per-1k-tokens", "5", "--default-max-price", "--db", db],
    )
    assert r.exit_code != 0
    r = runner.invoke(
        gateway_app, ["keys", "update", key.prefix, "--rpm", "7", "--max-price-per-1k-tokens", "5", "--db", db]
    )
    assert r.exit_code == 0, r.output
    from gateway.keys import list_keys

    (info,) = list_keys(make_engine(db))
    assert (info.requests_per_minute, info.max_price_per_1k_tokens) == (7, 5)
    r = runner.invoke(gateway_app, ["keys", "update", key.prefix, "--tpm", "90", "--db", db])
    assert r.exit_code == 0, r.output
    (info,) = list_keys(make_engine(db))
    assert (info.requests_per_minute, info.tokens_per_minute) == (7, 90)
    # a limit, once set, can be dropped again (each on its own; the other limits stay)
    r = runner.invoke(gateway_app, ["keys", "update", key.prefix, "--rpm", "2", "--unlimited-rpm", "--db", db])
    assert r.exit_code != 0 and "not both" in r.output
    r = runner.invoke(gateway_app, ["keys", "update", key.prefix, "--unlimited-rpm", "--db", db])
    assert r.exit_code == 0, r.output
    (info,) = list_keys(make_engine(db))
    assert (info.requests_per_minute, info.tokens_per_minute, info.max_price_per_1k_tokens) == (None, 90, 5)
    r = runner.invoke(gateway_app, ["keys", "update", key.prefix, "--unlimited-tpm", "--default-max-price", "--db", db])
    assert r.exit_code == 0 and "rpm -, tpm -" in r.output, r.output
    (info,) = list_keys(make_engine(db))
    assert (info.requests_per_minute, info.tokens_per_minute, info.max_price_per_1k_tokens) == (None, None, None)
    help_text = runner.invoke(gateway_app, ["run", "--help"], env={"COLUMNS": "200"}).output
    assert "--default-max-price-per-1k-tokens" in help_text


def test_a_keys_command_names_a_bad_variable_as_gateway_run_does(monkeypatch):
    """`gateway keys list` with the gateway's env file sourced failed "1 validation error for GatewaySettings" on any
    bad LORAMESH_GATEWAY_* value, naming neither the variable nor the fix, and took a misspelt one without a word."""
    monkeypatch.setenv("LORAMESH_GATEWAY_PORT", "abc")
    r = runner.invoke(gateway_app, ["keys", "list"])
    assert r.exit_code == 2 and "setting port: " in r.output and "(set by LORAMESH_GATEWAY_PORT)" in r.output, r.output
    monkeypatch.delenv("LORAMESH_GATEWAY_PORT")
    monkeypatch.setenv("LORAMESH_GATEWAY_PROT", "1")
    r = runner.invoke(gateway_app, ["keys", "list"])
    assert r.exit_code == 2 and "unknown setting LORAMESH_GATEWAY_PROT" in r.output, r.output


def test_a_busy_port_is_found_before_the_app_is_built_or_announced(tmp_path, monkeypatch, caplog):
    """ "gateway on http://..." was logged, then "did not start" (the port was bound by uvicorn, after the app was
    built and the line written)."""
    import logging
    import socket

    from common.serving import ServerDidNotStart
    from gateway import main

    def no_app(*_a, **_k):
        raise AssertionError("the app was built for a port that cannot be served")

    monkeypatch.setattr(main, "create_app", no_app)
    with socket.socket() as taken, caplog.at_level(logging.INFO):
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(gateway_app, ["run", "--port", str(port), "--db", f"sqlite:///{tmp_path / 'g.db'}"])
    assert isinstance(result.exception, ServerDidNotStart), result.output
    assert str(result.exception) == f"gateway did not start on 127.0.0.1:{port}: address already in use"
    assert not [r for r in caplog.records if r.getMessage().startswith("gateway on ")]
