"""`loramesh devnet up|down|status` with a real detached anvil: state survives, clear errors."""

import json
import socket

import pytest
from eth_account import Account
from typer.testing import CliRunner

from devnet.anvil import AnvilError, PortInUseError, free_port, pid_alive
from devnet.cli import devnet_app
from devnet.lifecycle import devnet_down, devnet_up
from ledger.chain import ChainClient
from ledger.errors import DeploymentMismatch
from tests.utils.chain import rand_id

pytestmark = pytest.mark.integration
runner = CliRunner()


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "devnet"
    yield d
    devnet_down(d)  # never leave anvil running, also on failure


def _up(folder, port, *extra):
    return runner.invoke(devnet_app, ["up", "--dir", str(folder), "--port", str(port), "--block-time", "0.2", *extra])


def test_up_status_down_up_keeps_state(folder):
    port = free_port()
    user, gateway = Account.create(), Account.create()
    r = _up(folder, port, "--fund", user.address, "--settler", gateway.address, "--deposit", "2")
    assert r.exit_code == 0, r.output
    deployment = json.loads((folder / "deployment.json").read_text())
    assert deployment["chain_id"] == 424242 and deployment["rpc_url"] == f"http://127.0.0.1:{port}"
    client = ChainClient.from_deployment(folder / "deployment.json")
    assert client.balance(user.address) == 100 * 10**18
    assert client.is_settler(gateway.address) and client.deposit_of(gateway.address) == 2 * 10**18
    from devnet.anvil import DEV_KEYS

    contributor = Account.from_key(DEV_KEYS[3])
    client.with_account(contributor).register_dataset("kept", rand_id())
    ds = client.dataset_id("kept", contributor.address)

    status = json.loads(runner.invoke(devnet_app, ["status", "--dir", str(folder)]).output)
    assert status["running"] and status["chain_id"] == 424242
    assert status["deployment"]["contracts"] == deployment["contracts"]
    pid = status["pid"]

    r = _up(folder, port)  # already running: idempotent
    assert r.exit_code == 0, r.output
    assert json.loads(runner.invoke(devnet_app, ["status", "--dir", str(folder)]).output)["pid"] == pid

    assert "stopped" in runner.invoke(devnet_app, ["down", "--dir", str(folder)]).output
    assert not pid_alive(pid)
    assert not json.loads(runner.invoke(devnet_app, ["status", "--dir", str(folder)]).output)["running"]
    assert "no devnet running" in runner.invoke(devnet_app, ["down", "--dir", str(folder)]).output

    r = _up(folder, port)
    assert r.exit_code == 0, r.output
    client = ChainClient.from_deployment(folder / "deployment.json")
    assert client.get_dataset(ds).dataset_id == ds  # state survived down/up
    assert json.loads((folder / "deployment.json").read_text())["contracts"] == deployment["contracts"]


def test_port_in_use_is_a_clear_error(folder):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = _up(folder, s.getsockname()[1])
    assert isinstance(r.exception, PortInUseError)
    assert "already in use" in str(r.exception)


def test_deployment_not_matching_the_chain(folder):
    port = free_port()
    assert _up(folder, port).exit_code == 0
    devnet_down(folder)
    (folder / "state.json").unlink()  # the chain is reset, the deployment file stays
    with pytest.raises(DeploymentMismatch, match="no AdapterRegistry code"):
        devnet_up(folder, port, block_time=0.2)
    assert not (folder / "anvil.pid").exists()  # the anvil it started was stopped again


def test_missing_anvil_says_run_make_setup(folder, monkeypatch):
    monkeypatch.setenv("LORAMESH_ANVIL", str(folder / "no-anvil"))
    with pytest.raises(AnvilError, match="run make setup"):
        devnet_up(folder, free_port())


def test_second_port_for_running_devnet_is_refused(folder):
    port = free_port()
    assert _up(folder, port).exit_code == 0
    with pytest.raises(AnvilError, match="already runs on port"):
        devnet_up(folder, free_port())


def test_fee_settings_at_deploy_and_on_a_running_devnet(folder):
    port = free_port()
    r = _up(folder, port, "--node-share-bps", "3000", "--base-price-wei", "5")
    assert r.exit_code == 0, r.output
    client = ChainClient.from_deployment(folder / "deployment.json")
    assert client.node_share_bps() == 3000 and client.base_price() == 5
    saved = json.loads((folder / "deployment.json").read_text())
    assert saved["node_share_bps"] == 3000 and saved["base_price_per_1k_tokens"] == 5

    # running: the admin changes it in place (README walk-through: with no --port, the running devnet's, where
    # the default port was taken and refused as a second one)
    r = runner.invoke(devnet_app, ["up", "--dir", str(folder), "--base-price-wei", "7"])
    assert r.exit_code == 0, r.output
    assert client.base_price() == 7 and client.node_share_bps() == 3000
    assert json.loads((folder / "deployment.json").read_text())["base_price_per_1k_tokens"] == 7

    r = _up(folder, port, "--node-share-bps", "10001")
    assert r.exit_code == 2 and "--node-share-bps" in r.output and client.node_share_bps() == 3000


@pytest.mark.parametrize("started", [1, None], ids=["another-start-time", "old-file-not-anvil"])
def test_a_stale_pid_file_never_signals_the_process_that_now_has_its_pid(folder, started):
    # after a SIGKILL or a reboot the pid in the file may be another process's: `devnet down` sent it SIGTERM
    import subprocess
    import sys

    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folder.mkdir(parents=True)
        info = {"pid": stranger.pid, "port": free_port()} | ({} if started is None else {"started": started})
        (folder / "anvil.pid").write_text(json.dumps(info))
        r = runner.invoke(devnet_app, ["status", "--dir", str(folder)])
        assert r.exit_code == 0 and '"running": false' in r.output, r.output
        assert devnet_down(folder) is False and stranger.poll() is None
        assert not (folder / "anvil.pid").exists()
    finally:
        stranger.kill()
        stranger.wait()


def test_an_interrupted_start_leaves_no_anvil_and_no_pid_file(folder, monkeypatch):
    # Ctrl-C while anvil started left it running in its own session with no pid file: `down` did not know
    # it, and the next `up` found its port taken
    import devnet.anvil as anvil_mod

    spawned = []

    def interrupted(url, *, timeout, proc):
        spawned.append((proc.pid, json.loads((folder / "anvil.pid").read_text())["pid"]))  # written already
        raise KeyboardInterrupt

    monkeypatch.setattr(anvil_mod, "wait_ready", interrupted)
    port = free_port()
    with pytest.raises(KeyboardInterrupt):
        devnet_up(folder, port)
    [(pid, written)] = spawned
    assert written == pid and not pid_alive(pid) and not (folder / "anvil.pid").exists()
    monkeypatch.undo()
    assert _up(folder, port).exit_code == 0  # the port is free again


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("flag", ["--fund", "--settler"])
def test_a_bad_address_is_refused_before_anvil_starts(folder, flag):
    # `--fund notanaddress` printed web3's "when sending a str, it must be a hex string" and left anvil running
    port = free_port()
    r = _up(folder, port, flag, Account.create().address, flag, "notanaddress")
    assert r.exit_code == 2, r.output
    assert "Usage:" in r.output and flag in r.output and "'notanaddress' is not an address" in r.output, r.output
    assert "hex string" not in r.output
    assert not (folder / "anvil.pid").exists() and not _port_open(port)


def test_a_failed_up_stops_the_anvil_it_started(folder):
    port = free_port()
    # a settler deposit more than the devnet's admin holds fails after anvil started and the contracts went out
    r = _up(folder, port, "--settler", Account.create().address, "--deposit", "1000000000")
    assert r.exit_code != 0 and r.exception is not None
    assert not (folder / "anvil.pid").exists() and not _port_open(port)
    # a devnet that was already running is left running when an `up` on it fails
    assert _up(folder, port).exit_code == 0
    pid = json.loads((folder / "anvil.pid").read_text())["pid"]
    r = _up(folder, port, "--settler", Account.create().address, "--deposit", "1000000000")
    assert r.exit_code != 0 and pid_alive(pid)
