"""`explorer` (mounted as `loramesh explorer`): serves until Ctrl-C, and refuses clearly what it cannot read."""

import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from sqlalchemy import create_engine

from devnet.anvil import free_port
from devnet.explorer import Explorer, ExplorerDatabaseError, create_app
from devnet.explorer.cli import ExplorerPortInUse, explorer
from devnet.explorer.store import LedgerStore, open_ledger_db
from ledger.chain import ChainClient
from ledger.errors import ChainUnavailable, DeploymentMismatch
from tests.devnet.explorer.htmlq import text_of
from tests.utils.servers import ServerThread

pytestmark = pytest.mark.integration

RUN = "import typer; from devnet.explorer.cli import explorer; typer.run(explorer)"


def test_serves_until_ctrl_c(anvil_chain, world):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            RUN,
            "--rpc",
            anvil_chain.rpc_url,
            "--db",
            world.db_url,
            "--deployment",
            str(anvil_chain.deployment_path),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # up, then indexed to the head (in the background: pages are served meanwhile)
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
                if health["synced"]:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "explorer did not come up"
            time.sleep(0.2)
        assert health["ok"] and health["records"] == len(world.settled) + 1
        assert "verified" in httpx.get(f"http://127.0.0.1:{port}/records/{world.settled[0]}", timeout=30).text
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert f"http://127.0.0.1:{port}/" in out and "explorer stopped" in out


def _run(anvil_chain, **kw):
    args = {
        "rpc": None,
        "db": "sqlite:///unused.db",
        "deployment": anvil_chain.deployment_path,
        "port": free_port(),
        "host": "127.0.0.1",
    } | kw
    explorer(**args)


def test_missing_database_is_refused(anvil_chain, tmp_path):
    with pytest.raises(ExplorerDatabaseError, match="does not exist"):
        _run(anvil_chain, db=f"sqlite:///{tmp_path}/nothing.db")
    assert not (tmp_path / "nothing.db").exists()  # the explorer never creates a database


def test_database_without_ledger_tables_is_refused(anvil_chain, tmp_path):
    path = tmp_path / "other.db"
    create_engine(f"sqlite:///{path}").connect().close()
    with pytest.raises(ExplorerDatabaseError, match="usage_records"):
        _run(anvil_chain, db=f"sqlite:///{path}")


def test_port_in_use_is_refused(anvil_chain, world):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ExplorerPortInUse, match="pick another --port"):
            _run(anvil_chain, db=world.db_url, port=s.getsockname()[1])


def test_stale_deployment_file_is_refused(anvil_chain, world, tmp_path):
    data = anvil_chain.deployment.to_dict()
    data["contracts"]["AdapterRegistry"] = "0x" + "12" * 20  # no code there
    stale = tmp_path / "deployment.json"
    stale.write_text(json.dumps(data))
    with pytest.raises(DeploymentMismatch, match="no AdapterRegistry code"):
        _run(anvil_chain, db=world.db_url, deployment=stale)


def test_unreachable_chain_at_start_is_refused(anvil_chain, world):
    with pytest.raises(ChainUnavailable, match="unreachable"):
        _run(anvil_chain, db=world.db_url, rpc=f"http://127.0.0.1:{free_port()}")


def test_chain_gone_while_serving_gives_503(anvil_chain, world):
    dead = f"http://127.0.0.1:{free_port()}"
    ex = Explorer(ChainClient(anvil_chain.deployment, rpc_url=dead), LedgerStore(open_ledger_db(world.db_url)))
    with ServerThread(create_app(explorer=ex)) as server:
        r = httpx.get(server.url + "/", timeout=30)
    assert r.status_code == 503
    assert f"chain at {dead} is unreachable" in text_of(r.text, "error-message")
