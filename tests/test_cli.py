"""The `loramesh` command: every command explains itself, errors are one line, the adapter flow works."""

import json
import os
import subprocess
import sys

import pytest
import typer.main
from typer.testing import CliRunner

from devnet.cli import app

ENV_PASSWORD = {"LORAMESH_KEY_PASSWORD": "pw"}


def all_command_paths():
    root = typer.main.get_command(app)
    out = []

    def walk(cmd, path):
        out.append(path)
        # a group has sub-commands (typer 0.29 vendors its own click: its groups are not click.Group)
        if isinstance(getattr(cmd, "commands", None), dict):
            for name, sub in cmd.commands.items():
                walk(sub, path + [name])

    walk(root, [])
    return out


@pytest.mark.parametrize("path", all_command_paths(), ids=lambda p: " ".join(p) or "root")
def test_every_command_has_help(path):
    result = CliRunner().invoke(app, path + ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    body = result.output.split("Usage:", 1)[1]
    assert len(body.strip().splitlines()) >= 3  # a description or options, not just a usage line


def command_at(path):
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def description(output: str) -> list[str]:
    """The lines of a command's description: after its usage line, before its arguments, options or commands."""
    body = output.split("Usage:", 1)[1].splitlines()[1:]
    heads = [i for i, line in enumerate(body) if line in ("Arguments:", "Options:", "Commands:")]
    return body[: heads[0] if heads else len(body)]


@pytest.mark.parametrize("path", all_command_paths(), ids=lambda p: " ".join(p) or "root")
def test_help_shows_every_word_and_wraps_each_paragraph_once(path):
    """A command's description and every option's help are shown whole (rich markup ate `[@REVISION]`
    once; at 80 columns typer's rich panels cut "LORAMESH_KEY_PAS…"), and at 80 columns each paragraph of the
    description is wrapped by the terminal alone: no line of it ends early where the source's docstring
    happened to break (typer keeps those breaks)."""
    cmd = command_at(path)
    width = 80
    result = CliRunner().invoke(app, path + ["--help"], env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    shown = "".join(result.output.split())  # every character in order, wherever a line was wrapped
    texts = [cmd.help or ""] + [p.help for p in cmd.params if getattr(p, "help", None)]
    for text in texts:
        for paragraph in text.split("\n\n"):
            assert "".join(paragraph.split()) in shown, paragraph

    lines = description(result.output)
    for line, following in zip(lines, lines[1:]):
        if line.strip() and following.strip():  # two lines of one paragraph
            first_word = following.split()[0]
            assert len(line.rstrip()) + 1 + len(first_word) > width - 3, f"broken early: {line!r}"


def run(*args, env=None, cwd=None):
    import os

    return subprocess.run(
        [sys.executable, "-m", "devnet", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **ENV_PASSWORD, **(env or {})},
        timeout=300,
    )


def test_adapter_flow_through_the_cli(tmp_path):
    base, data = tmp_path / "base", tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Symbol of gold?", "completion": " Au."}) + "\n")
    assert run("keys", "new", "--out", str(tmp_path / "k.json")).returncode == 0
    assert run("base", "init-tiny", str(base), "--seed", "3").returncode == 0
    r = run(
        "adapter",
        "train",
        "--base",
        str(base),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "peft"),
        "--steps",
        "5",
        "--rank",
        "2",
    )
    assert r.returncode == 0, r.stderr
    r = run(
        "adapter",
        "pack",
        str(tmp_path / "peft"),
        "--name",
        "me/gold",
        "--key",
        str(tmp_path / "k.json"),
        "--out",
        str(tmp_path / "pkg"),
        "--dataset",
        "gold=0x000000000000000000000000000000000000dEaD:1500",
        "--price-per-1k-tokens",
        "0.001",
    )
    assert r.returncode == 0, r.stderr
    assert "price       0.001 ETH (1000000000000000 wei) per 1,000 tokens" in r.stdout
    r = run("adapter", "verify", str(tmp_path / "pkg"), "--base", str(base))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "pkg" / "loramesh.json").read_text())
    assert manifest["price_per_1k_tokens"] == 10**15
    assert manifest["datasets"][0]["share_bps"] == 1500
    assert "me/gold" in r.stdout and "adapter id" in r.stdout

    weights = tmp_path / "pkg" / "adapter_model.safetensors"
    weights.chmod(0o644)
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    r = run("adapter", "verify", str(tmp_path / "pkg"))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "error: file 'adapter_model.safetensors' does not match its sha256 in the manifest (modified after signing)"
    ]
    assert "Traceback" not in r.stderr


def test_errors_are_one_line_without_traceback(tmp_path):
    r = run("adapter", "verify", str(tmp_path / "missing"))
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: {tmp_path / 'missing'} is not a folder"
    r = run(
        "adapter",
        "pack",
        str(tmp_path),
        "--name",
        "x",
        "--key",
        str(tmp_path / "nokey.json"),
        "--out",
        str(tmp_path / "o"),
        "--dataset",
        "bad-spec",
    )
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "NAME=CONTRIBUTOR_ADDRESS:SHARE_BPS" in r.stderr
    (tmp_path / "bad.jsonl").write_text('{"prompt": 1}\n')
    r = run(
        "adapter", "train", "--base", str(tmp_path), "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "p")
    )
    assert r.returncode == 1 and r.stderr.strip().startswith(f"error: {tmp_path / 'bad.jsonl'}:1: expected")
    assert r.stdout == ""  # no progress bar for training that never started


def test_an_error_quoting_brackets_is_still_one_line(tmp_path):
    """The one-line error was read as rich markup: an error quoting the user's "[/]" failed the handler itself,
    with the traceback it is there to hide."""
    db = f"sqlite:///{tmp_path / 'k.db'}"
    assert run("gateway", "keys", "create", "--name", "web", "--db", db).returncode == 0
    r = run("gateway", "keys", "revoke", "[/]", "--db", db)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: ") and "[/]" in r.stderr and "Traceback" not in r.stderr


def test_log_level_and_format_flags_reach_the_command_and_its_children(tmp_path):
    """`loramesh --log-level debug --log-format json ...` logs as asked, and the processes it starts inherit it
    through the environment; a level that does not exist is a usage error."""
    script = """
import logging, os, sys
from devnet.cli import main
sys.argv = ["loramesh", "--log-level", "debug", "--log-format", "json", "devnet", "status", "--dir", sys.argv[1]]
try:
    main()
except SystemExit:
    pass
logging.getLogger("node.x").debug("hello from the child")
print(os.environ["LORAMESH_LOG_LEVEL"], os.environ["LORAMESH_LOG_FORMAT"])
"""
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().splitlines()[-1] == "DEBUG json", r.stdout + r.stderr
    line = json.loads(r.stderr.strip().splitlines()[-1])
    assert line["level"] == "DEBUG" and line["logger"] == "node.x" and line["message"] == "hello from the child"
    bad = CliRunner().invoke(app, ["--log-level", "loud", "devnet", "status"])
    assert bad.exit_code == 2 and "--log-level" in bad.output
    # the variable's own mistake names the variable (it said "Unknown level: 'LOUD'")
    env = {**os.environ, "LORAMESH_LOG_LEVEL": "loud"}
    r = subprocess.run([sys.executable, "-m", "devnet.cli", "--version"], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and r.stderr.strip() == (
        "error: LORAMESH_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, got 'LOUD'"
    ), r.stderr
    env["LORAMESH_LOG_LEVEL"] = "critical"  # any level logging knows, as before
    r = subprocess.run([sys.executable, "-m", "devnet.cli", "--version"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stderr == "", r.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["gateway", "keys", "list"],
        ["gateway", "keys", "revoke", "1"],
        ["settler", "status"],
        ["settler", "requeue"],
        ["settler", "run", "--key", "settler.key", "--drain"],  # it made an empty one and "settled 0 records"
    ],
    ids=" ".join,
)
def test_a_command_that_reads_a_database_refuses_one_that_is_not_there(tmp_path, command):
    """A mistyped --db is said in one line, not answered with an empty database made on the spot (the
    commands that start the gateway or create a key still make theirs; the settler only reads and settles the
    outbox a gateway made)."""
    missing = tmp_path / "typo" / "gatewya.db"
    r = run(*command, "--db", f"sqlite:///{missing}")
    assert r.returncode == 1, r.stdout
    assert r.stderr.strip() == f"error: no database at {missing}: check --db (this command reads an existing one)"
    assert not missing.parent.exists()


def test_version_is_the_projects():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"loramesh {project['version']}\n"


def test_a_dataset_spec_without_its_share_says_what_is_missing():
    # it said "(not enough values to unpack (expected 2, got 1))"
    from node.cli import parse_dataset

    for spec in ("capitals-qa=0x5b29", "capitals-qa", "=:"):
        with pytest.raises(ValueError, match="expected NAME=CONTRIBUTOR_ADDRESS:SHARE_BPS") as err:
            parse_dataset(spec)
        assert "unpack" not in str(err.value)
    # the address that is paid: a mixed-case one with a wrong checksum is a typo (review)
    with pytest.raises(ValueError, match="has a wrong checksum"):
        parse_dataset("gold=0x000000000000000000000000000000000000dEAD:1500")
    assert parse_dataset("gold=0x000000000000000000000000000000000000dead:1500").contributor.endswith("dEaD")


@pytest.mark.parametrize("entry", ["console-script", "python-m"])
@pytest.mark.parametrize("during", ["ledger.chain", "node.cli", "typer"])
def test_ctrl_c_while_the_command_loads_exits_130_quietly(entry, during):
    """Ctrl-C in the first second (while devnet/cli.py imports everything) printed a 46-line KeyboardInterrupt
    traceback; later it prints "interrupted" and exits 130. The interrupt is raised where SIGINT would raise it:
    inside the import of a module the command loads."""
    script = f"""
import sys

class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == {during!r}:
            raise KeyboardInterrupt

sys.meta_path.insert(0, Interrupt())
sys.argv = ["loramesh", "devnet", "status"]
if {entry!r} == "console-script":  # what the installed `loramesh` script does
    from devnet.cli import main
    sys.exit(main())
import runpy
runpy.run_module("devnet", run_name="__main__")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 130, r.stderr[-3000:]
    assert r.stderr.strip() == "interrupted" and r.stdout == "", r.stderr[-3000:]


def test_a_price_in_wei_where_eth_is_meant_is_refused(tmp_path):
    """The gateway's price limits are in wei, a package's price in ETH: 10^15 (the README's limit) signed a package
    at 10^15 ETH per 1,000 tokens without a word. A bare price that large is refused; a unit says which is meant."""
    from node.cli import parse_price

    assert parse_price("0.001") == parse_price("0.001eth") == parse_price("1000000000000000wei") == 10**15
    assert parse_price("2000000000eth") == 2 * 10**27  # meant, and said so
    for text, wei in (("500000000", "500000000wei"), ("1e15", "1000000000000000wei"), ("1_000_000", "1000000wei")):
        with pytest.raises(ValueError, match=f"For wei write {wei};"):
            parse_price(text)
    with pytest.raises(ValueError, match="digits only"):
        parse_price("²wei")
    r = run(
        "adapter",
        "pack",
        str(tmp_path),
        "--name",
        "me/x",
        "--key",
        str(tmp_path / "k.json"),
        "--out",
        str(tmp_path / "o"),
        "--price-per-1k-tokens",
        "1000000000000000",
    )
    assert r.returncode == 2 and "For wei write 1000000000000000wei" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()
