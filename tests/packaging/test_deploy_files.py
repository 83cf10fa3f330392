"""The files in deploy/ cannot rot: each example TOML loads through its service's settings class (unknown
names are refused there), and each systemd unit starts a `loramesh` command with options that command has."""

from __future__ import annotations

import configparser
import os
import shlex
from pathlib import Path

import pytest
import typer

from devnet.cli import app
from devnet.explorer.settings import ExplorerSettings
from gateway.settings import GatewaySettings
from ledger.settler_config import SettlerSettings
from node.settings import NodeSettings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
EXAMPLES = {
    "node.toml": NodeSettings,
    "gateway.toml": GatewaySettings,
    "settler.toml": SettlerSettings,
    "explorer.toml": ExplorerSettings,
}
UNITS = {"loramesh-node.service": ("node", "run"), "loramesh-gateway.service": ("gateway", "run")}


@pytest.fixture(autouse=True)
def no_loramesh_env(monkeypatch):
    # the examples alone must load: a LORAMESH_* variable of the machine running the tests would hide a gap
    for name in list(os.environ):
        if name.startswith("LORAMESH_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_config_loads(name):
    settings = EXAMPLES[name].load(DEPLOY / name)
    # every name in the file is a setting (extra="forbid" refuses others): a typo fails here, not at a restart
    assert settings.model_fields_set, name
    if isinstance(settings, NodeSettings):
        settings.daemon_config()  # the daemon's own checks (e.g. bootstrap needs listen)
    elif not isinstance(settings, GatewaySettings):
        settings.config()  # the settler's and the explorer's bounds


def test_example_config_sets_every_required_setting():
    # the node's base, store and port have no default: the example must give them, as an operator must
    node = NodeSettings.load(DEPLOY / "node.toml")
    assert node.base and node.store and node.port


def _unit(name: str) -> configparser.ConfigParser:
    # systemd units are INI-like; strict=False because a unit may repeat a key (Environment=)
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive in systemd
    parser.read_string((DEPLOY / name).read_text())
    return parser


def _walk(argv: list[str]) -> tuple[str, ...]:
    """The subcommand path of `loramesh <argv>`, after checking every option against the commands' own."""
    # duck-typed: typer ships its own copy of click (typer._click), so click's classes are not these
    command = typer.main.get_command(app)
    path: list[str] = []
    args = list(argv)
    while args:
        word = args.pop(0)
        if word.startswith("-"):
            flag = word.split("=", 1)[0]
            params = {opt: p for p in command.params for opt in (*p.opts, *p.secondary_opts)}
            assert flag in params, f"`loramesh {' '.join(path)}` has no option {flag}"
            if not params[flag].is_flag and "=" not in word:
                assert args, f"{flag} needs a value"
                args.pop(0)
        elif hasattr(command, "commands"):
            assert word in command.commands, f"`loramesh {' '.join(path)}` has no command {word!r}"
            command = command.commands[word]
            path.append(word)
        else:
            assert any(p.param_type_name == "argument" for p in command.params), f"unexpected argument {word!r}"
    assert not hasattr(command, "commands"), f"`loramesh {' '.join(path)}` is a group, not a command"
    return tuple(path)


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_starts_a_loramesh_command_it_knows(name):
    service = _unit(name)["Service"]
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name == "loramesh" and Path(argv[0]).is_absolute(), argv[0]  # systemd wants a full path
    assert _walk(argv[1:]) == UNITS[name]
    config = Path(argv[argv.index("--config") + 1])
    assert config.name in EXAMPLES  # the example beside the unit is what it reads


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_runs_hardened_as_its_own_user_and_stops_gracefully(name):
    unit = _unit(name)
    service = unit["Service"]
    assert service["User"] == "loramesh" and service["Group"] == "loramesh"
    assert service["Restart"] == "on-failure"
    # SIGTERM is the services' graceful stop (common/serving.py); uvicorn alone waits 10 s for open streams
    assert service["KillSignal"] == "SIGTERM" and int(service["TimeoutStopSec"]) >= 30
    for option in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert service[option] == "yes", option
    assert service["ProtectSystem"] == "strict"
    # the only writable place is the service's own state folder
    state = "/var/lib/" + service["StateDirectory"]
    assert service["ReadWritePaths"] == state and service["WorkingDirectory"] == state
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_the_walker_refuses_what_loramesh_does_not_know():
    with pytest.raises(AssertionError, match="no option --confg"):
        _walk(["node", "run", "--confg", "x"])
    with pytest.raises(AssertionError, match="no command 'serve'"):
        _walk(["node", "serve"])
    assert _walk(["--log-format", "json", "gateway", "run", "--config", "x"]) == ("gateway", "run")
