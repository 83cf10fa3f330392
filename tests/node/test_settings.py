"""node.settings: `loramesh node run`'s settings from flags, LORAMESH_NODE_*, a TOML config file, then defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.settings import SettingsError
from node.settings import NodeSettings

KEY_A, KEY_B = "a" * 64, "b" * 64


@pytest.fixture(autouse=True)
def _no_node_env(monkeypatch):
    """The tests set the variables they read; none leaks in from the environment that runs them."""
    import os

    for name in list(os.environ):
        if name.startswith("LORAMESH_NODE_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_a_config_file_is_read_and_feeds_the_daemon_and_the_engine(tmp_path):
    config = write(
        tmp_path,
        'base = "models/tiny"\nstore = "st"\nport = 8123\nslots = 3\nkv_blocks = 64\n'
        'gateways = ["http://127.0.0.1:8000"]\ntrust_gateway_keys = ["' + KEY_A + '"]\n'
        "heartbeat_interval = 0.5\n",
    )
    s = NodeSettings.load(config)
    assert (s.base, s.store, s.port, s.slots) == (Path("models/tiny"), Path("st"), 8123, 3)
    daemon = s.daemon_config()
    assert daemon.port == 8123 and daemon.gateways == ("http://127.0.0.1:8000",)
    assert daemon.trusted_gateway_keys == (KEY_A,) and daemon.heartbeat_interval == 0.5
    engine = s.engine_config()
    assert engine.model_dir == Path("models/tiny") and engine.num_slots == 3 and engine.num_kv_blocks == 64


def test_what_is_not_set_takes_the_daemons_and_the_engines_defaults():
    from node.daemon import DaemonConfig
    from node.engine import EngineConfig

    s = NodeSettings.load(None, base=Path("b"), store=Path("s"), port=1)
    assert s.daemon_config() == DaemonConfig(base=Path("b"), store=Path("s"), port=1)
    assert s.engine_config() == EngineConfig(model_dir=Path("b"))


def test_flags_win_over_the_environment_which_wins_over_the_file(tmp_path, monkeypatch):
    config = write(tmp_path, 'base = "b"\nstore = "s"\nport = 1\nhost = "file"\n')
    assert NodeSettings.load(config).host == "file"
    monkeypatch.setenv("LORAMESH_NODE_HOST", "env")
    assert NodeSettings.load(config).host == "env"
    assert NodeSettings.load(config, host="flag", port=None).host == "flag"  # a flag not given (None) is no flag
    assert NodeSettings.load(config, port=None).port == 1


def test_the_environment_alone_works_lists_space_separated(monkeypatch):
    monkeypatch.setenv("LORAMESH_NODE_BASE", "b")
    monkeypatch.setenv("LORAMESH_NODE_STORE", "s")
    monkeypatch.setenv("LORAMESH_NODE_PORT", "8101")
    monkeypatch.setenv("LORAMESH_NODE_TRUST_GATEWAY_KEYS", f"{KEY_A} {KEY_B}")
    monkeypatch.setenv("LORAMESH_NODE_DATA_DIR", "/tmp/node-data")
    monkeypatch.setenv("LORAMESH_NODE_OPERATOR_TOKEN", "x")  # the publisher's variable: not a node setting
    s = NodeSettings.load()
    assert s.trust_gateway_keys == (KEY_A, KEY_B) and s.port == 8101
    assert s.daemon_config().data_dir == Path("/tmp/node-data")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('base = "b"\nstore = "s"\nport = 1\nprot = 2\n', "unknown setting 'prot' in "),
        ('store = "s"\nport = 1\n', "missing setting base: give --base, LORAMESH_NODE_BASE or base in a --config file"),
        ('base = "b"\nstore = "s"\nport = 70000\n', "setting port: "),
        ('base = "b"\nstore = "s"\nport = 1\nslots = 0\n', "setting slots: "),
        ('base = "b"\nstore = "s"\nport = 1\nheartbeat_interval = inf\n', "Input should be a finite number"),
    ],
)
def test_a_bad_setting_is_refused_in_one_line(tmp_path, text, message):
    with pytest.raises(SettingsError) as e:
        NodeSettings.load(write(tmp_path, text))
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_misspelled_variable_is_refused_as_a_misspelled_key_is(tmp_path, monkeypatch):
    """README walk-through: LORAMESH_GATEWAY_PROT=5 left the gateway's port at 8000, without a word (the
    environment was read for the names it knows, and the rest ignored)."""
    from gateway.settings import GatewaySettings

    monkeypatch.setenv("LORAMESH_NODE_PROT", "5")
    with pytest.raises(
        SettingsError,
        match=r"^unknown setting LORAMESH_NODE_PROT in the environment \(did you mean LORAMESH_NODE_PORT\?\)$",
    ):
        NodeSettings.load(None, base=Path("b"), store=Path("s"), port=1)
    monkeypatch.delenv("LORAMESH_NODE_PROT")
    monkeypatch.setenv("LORAMESH_GATEWAY_ZZZ", "1")
    with pytest.raises(SettingsError, match=r"^unknown setting LORAMESH_GATEWAY_ZZZ in the environment$"):
        GatewaySettings.load(None)
    assert NodeSettings.load(None, base=Path("b"), store=Path("s"), port=1).port == 1  # another service's prefix


def test_node_run_refuses_an_unknown_setting_in_its_config_file_in_one_line(tmp_path):
    from node.cli import app

    config = write(tmp_path, f'base = "{tmp_path}"\nstore = "s"\nport = 1\nslots = 2\nprot = 2\n')
    result = CliRunner().invoke(app, ["node", "run", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert "unknown setting 'prot'" in result.output
    result = CliRunner().invoke(app, ["node", "run", "--config", str(tmp_path / "missing.toml")])
    assert result.exit_code == 2 and "does not exist" in result.output, result.output


def test_prefix_caching_is_on_unless_turned_off(tmp_path, monkeypatch):
    assert NodeSettings.load(None, base=Path("b"), store=Path("s"), port=1).engine_config().enable_prefix_caching
    off = write(tmp_path, 'base = "b"\nstore = "s"\nport = 1\nprefix_caching = false\n')
    assert not NodeSettings.load(off).engine_config().enable_prefix_caching
    monkeypatch.setenv("LORAMESH_NODE_PREFIX_CACHING", "true")
    assert NodeSettings.load(off).engine_config().enable_prefix_caching


def test_speculative_decoding_is_ngram_unless_turned_off(tmp_path, monkeypatch):
    assert NodeSettings.load(None, base=Path("b"), store=Path("s"), port=1).engine_config().speculative == "ngram"
    off = write(tmp_path, 'base = "b"\nstore = "s"\nport = 1\nspeculative = "off"\n')
    assert NodeSettings.load(off).engine_config().speculative == "off"
    monkeypatch.setenv("LORAMESH_NODE_SPECULATIVE", "medusa")
    with pytest.raises(ValueError, match="speculative 'medusa' is not one of ngram, off"):
        NodeSettings.load(off).engine_config()


def test_kv_cache_dtype_is_auto_unless_set_and_a_bad_one_is_one_line(tmp_path, monkeypatch):
    assert NodeSettings.load(None, base=Path("b"), store=Path("s"), port=1).engine_config().kv_cache_dtype == "auto"
    fp8 = write(tmp_path, 'base = "b"\nstore = "s"\nport = 1\nkv_cache_dtype = "fp8"\n')
    assert NodeSettings.load(fp8).engine_config().kv_cache_dtype == "fp8"
    monkeypatch.setenv("LORAMESH_NODE_KV_CACHE_DTYPE", "int4")
    with pytest.raises(SettingsError) as e:
        NodeSettings.load(fp8)
    assert str(e.value) == (
        "setting kv_cache_dtype: --kv-cache-dtype 'int4' is not supported; expected one of auto, fp8 "
        "(set by LORAMESH_NODE_KV_CACHE_DTYPE)"  # the variable, not the file it overrides
    ), str(e.value)


def test_the_host_pool_is_the_engines_default_unless_set(tmp_path, monkeypatch):
    assert NodeSettings.load(None, base=Path("b"), store=Path("s"), port=1).engine_config().host_pool_buffers is None
    off = write(tmp_path, 'base = "b"\nstore = "s"\nport = 1\nhost_pool_buffers = 0\n')
    assert NodeSettings.load(off).engine_config().host_pool_buffers == 0
    monkeypatch.setenv("LORAMESH_NODE_HOST_POOL_BUFFERS", "6")
    assert NodeSettings.load(off).engine_config().host_pool_buffers == 6
    monkeypatch.setenv("LORAMESH_NODE_HOST_POOL_BUFFERS", "-1")
    with pytest.raises(SettingsError, match="host_pool_buffers"):
        NodeSettings.load(off)


def test_node_run_on_a_busy_port_says_so_before_loading_the_base(tmp_path, tiny_base, monkeypatch):
    """The port is taken before the engine loads its weights (minutes on a large base) and before the daemon
    registers or heartbeats: a busy port used to be found only after all that, at uvicorn's bind."""
    import socket

    from common.serving import ServerDidNotStart
    from node import cli, daemon

    def no_engine(*_a, **_k):
        raise AssertionError("the base was loaded for a port that cannot be served")

    monkeypatch.setattr(daemon, "NodeDaemon", no_engine)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["node", "run", "--base", str(tiny_base), "--store", str(tmp_path / "s"), "--port", str(port)]
        result = CliRunner().invoke(cli.app, args)
    assert isinstance(result.exception, ServerDidNotStart), result.output
    assert str(result.exception) == f"node did not start on 127.0.0.1:{port}: address already in use"


@pytest.mark.parametrize(("host", "port"), [("127.0.0.1", 0), ("0.0.0.0", 8101), ("::", 8101)])
def test_a_node_nobody_could_reach_at_its_url_is_refused_before_it_registers(host, port):
    """`--port 0` registered http://127.0.0.1:0 on chain (and --host 0.0.0.0 http://0.0.0.0:port) over the node's
    good registration; its heartbeats named that URL too."""
    from node.daemon import DaemonConfig

    with pytest.raises(ValueError, match="give --api-url"):
        DaemonConfig(base=Path("b"), store=Path("s"), host=host, port=port)
    given = DaemonConfig(base=Path("b"), store=Path("s"), host=host, port=port, api_url="https://node.example")
    assert given.public_url == "https://node.example"


def test_a_bad_value_says_where_it_was_set_and_a_file_that_is_no_toml_is_named(tmp_path, monkeypatch):
    """A bad value named no source (flag, variable or file: which to fix?), and a config file that is not TOML gave
    "Invalid value (at line 1, column 9)" without the file's name, as an error other than a setting's."""
    config = write(tmp_path, 'base = "b"\nstore = "s"\nport = 1\nslots = "many"\n')
    with pytest.raises(SettingsError, match=rf"^setting slots: .* \(set in {config}\)$"):
        NodeSettings.load(config)
    monkeypatch.setenv("LORAMESH_NODE_SLOTS", "abc")
    with pytest.raises(SettingsError, match=r"^setting slots: .* \(set by LORAMESH_NODE_SLOTS\)$"):
        NodeSettings.load(config)
    with pytest.raises(SettingsError, match=r"^setting slots: .* \(set by --slots\)$"):
        NodeSettings.load(config, slots=0)
    broken = write(tmp_path, "slots = \n")
    with pytest.raises(SettingsError, match=rf"^config file {broken} is not TOML: "):
        NodeSettings.load(broken)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("gateways", ("notaurl",), "gateway URL 'notaurl' is not http"), ("pins", ("0x12",), "pinned adapter '0x12'")],
)
def test_a_gateway_or_pin_that_could_never_work_is_refused_at_start(field, value, message):
    """A bad --gateway or --pin was taken, then failed in the log at every beat (or once) while the node looked up."""
    from node.daemon import DaemonConfig

    with pytest.raises(ValueError, match=message):
        DaemonConfig(base=Path("b"), store=Path("s"), **{field: value})


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    bad = tmp_path / "node.toml"
    bad.write_bytes(b'base = "\x80"\n')
    with pytest.raises(SettingsError, match=rf"^config file {bad} is not TOML: "):
        NodeSettings.load(bad)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "tpu"], "device 'tpu' is not supported"),
        (["--speculative", "foo"], "speculative 'foo' is not one of ngram, off"),
        # torch.set_num_threads(100_000) ended the process with SIGSEGV after the weights loaded
        (["--threads", "100000"], "threads must be in 1..1024, got 100000"),
    ],
)
def test_an_engine_setting_it_cannot_run_is_a_usage_error_before_the_password(tmp_path, tiny_base, flags, message):
    """These were found only after the password prompt and the weights' load, and ended with exit code 1."""
    from node import cli

    key = tmp_path / "op.json"
    key.write_text("{}")  # never read: the settings are refused first
    args = ["node", "run", "--base", str(tiny_base), "--store", str(tmp_path / "s"), "--port", "8101"]
    result = CliRunner().invoke(cli.app, [*args, "--key", str(key), *flags], env={"LORAMESH_KEY_PASSWORD": ""})
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_more_slots_or_kv_blocks_than_memory_is_one_line_naming_them(tiny_base):
    """`node run --slots 100000` ended with torch's allocator trace ("[enforce fail at alloc_cpu.cpp:127] ...")."""
    from node.engine import EngineConfig, LLMEngine

    with pytest.raises(ValueError, match=r"^1000000000 adapter slots of rank 16 need [\d.]+ GiB of cpu memory"):
        LLMEngine(EngineConfig(tiny_base, num_slots=10**9, num_kv_blocks=4))
    with pytest.raises(ValueError, match=r"^10000000000000 KV cache blocks need [\d.]+ GiB of cpu memory, more than"):
        LLMEngine(EngineConfig(tiny_base, num_kv_blocks=10**13))


@pytest.mark.parametrize("name", ["heartbeat_max_skew_s", "db_busy_timeout_s", "node_timeout_s"])
def test_no_gateway_setting_is_infinite(tmp_path, name):
    """`inf` passed `gt=0`, then failed where it was used: int(inf) on every database connection (red team)."""
    from gateway.settings import GatewaySettings

    with pytest.raises(SettingsError, match=f"setting {name}: Input should be a finite number"):
        GatewaySettings.load(write(tmp_path, f"{name} = inf\n"))
