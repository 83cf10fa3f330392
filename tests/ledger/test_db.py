"""Database files and URLs: a SQLite file the ledger creates is 0600, and a URL's password is never shown."""

import logging
import os
import stat
import subprocess
import sys

import pytest
from sqlmodel import Session

from devnet.anvil import free_port
from ledger.db import DamagedDatabase, init_db, make_engine, redact_url
from ledger.outbox import add_usage_record
from tests.utils.chain import rand_id

SECRET = "s3cret-Pa55word"


@pytest.fixture
def open_umask():
    """The usual umask (022): a file created without care would be world-readable."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_sqlite_database_and_its_wal_are_created_0600(tmp_path, open_umask):
    path = tmp_path / "state" / "gateway.db"
    engine = make_engine(f"sqlite:///{path}", immediate=True)
    init_db(engine)
    with Session(engine) as s:
        add_usage_record(
            s, request_id=rand_id(), adapter_id=rand_id(), node_id=rand_id(), prompt_tokens=1, completion_tokens=1
        )
        s.commit()
    files = [p for p in path.parent.iterdir() if p.name.startswith("gateway.db")]
    assert {p.name for p in files} >= {"gateway.db", "gateway.db-wal"}
    assert {p.name: _mode(p) for p in files} == {p.name: 0o600 for p in files}
    engine.dispose()


def test_an_existing_database_keeps_its_mode(tmp_path, open_umask):
    path = tmp_path / "shared.db"
    path.touch(mode=0o640)
    make_engine(f"sqlite:///{path}").dispose()
    assert _mode(path) == 0o640  # the operator's choice: not ours to change


def test_a_home_relative_path_is_the_file_in_home(tmp_path, monkeypatch):
    """`sqlite:///~/x.db` is x.db in the home folder, created there and opened there (SQLite itself would
    open a folder named ~ in the working directory)."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    engine = make_engine("sqlite:///~/x.db")
    init_db(engine)
    engine.dispose()
    assert (home / "x.db").exists() and list(work.iterdir()) == []
    init_db(make_engine("sqlite:///~/x.db", create=False))  # what exists there opens


def test_memory_and_uri_databases_create_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for url in ("sqlite://", "sqlite:///:memory:", "sqlite:///file:mem1?mode=memory&uri=true"):
        init_db(make_engine(url))
    assert list(tmp_path.iterdir()) == []


def test_redact_url_hides_the_password():
    url = f"postgresql+psycopg://loramesh:{SECRET}@db.example:5432/ledger"
    assert redact_url(url) == "postgresql+psycopg://loramesh:***@db.example:5432/ledger"
    assert SECRET not in redact_url(f"postgresql://u:{SECRET}@h:notaport/db")


def test_a_malformed_url_is_refused_without_its_password():
    with pytest.raises(ValueError, match="is not valid") as e:
        make_engine(f"postgresql://u:{SECRET}@host:notaport/db")
    assert SECRET not in str(e.value)


def test_unreachable_postgres_password_not_in_logs_or_cli_output(tmp_path, caplog):
    """The settler's commands on a database that refuses them: the password appears nowhere the operator reads."""
    url = f"postgresql+psycopg://loramesh:{SECRET}@127.0.0.1:{free_port()}/ledger"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(Exception) as e:
        init_db(make_engine(url))
    assert SECRET not in str(e.value) and SECRET not in caplog.text
    from typer.testing import CliRunner

    from devnet.cli import app

    for args in (
        ["settler", "status", "--db", url],
        ["settler", "requeue", "--db", url],
        ["settler", "run", "--db", url, "--key", str(tmp_path / "none.key"), "--drain"],
        ["settler", "status", "--db", f"postgresql://u:{SECRET}@host:notaport/db"],
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code != 0, (args, result.output)
        # what `loramesh` prints is the exception's first line (devnet/cli.main): no part of it may hold the secret
        assert SECRET not in result.output + str(result.exception), (args, result.output, result.exception)
    assert SECRET not in caplog.text
    # the whole traceback (LORAMESH_DEBUG=1) of a real process, with the settler's logging at DEBUG
    env = {**os.environ, "LORAMESH_LOG_LEVEL": "DEBUG", "LORAMESH_DEBUG": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "devnet", "settler", "run", "--db", url, "--key", str(tmp_path / "none.key"), "--drain"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode != 0 and "OperationalError" in out.stderr, out.stderr[-2000:]
    assert SECRET not in out.stdout + out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("content", [b"garbage " * 200, b"SQLite format 3\0" + b"\xff" * 200])
def test_a_file_that_is_not_a_database_is_named_in_one_line(tmp_path, content):
    # `gateway keys list` on a damaged file printed "(sqlite3.DatabaseError) file is not a database", naming
    # no file (the operator had passed two: --db and a key file)
    path = tmp_path / "gw.db"
    path.write_bytes(content)
    with pytest.raises(DamagedDatabase) as err:
        init_db(make_engine(f"sqlite:///{path}"))
    assert str(path) in str(err.value) and "\n" not in str(err.value) and "move it aside" in str(err.value)
    assert path.read_bytes() == content  # left as it was
