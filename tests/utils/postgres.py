"""A throwaway PostgreSQL cluster for tests and benches: initdb + pg_ctl (Debian's `postgresql`
package, installed by scripts/setup.sh --browser) in a temporary folder, listening on 127.0.0.1 on
a free port, trust authentication, stopped and deleted afterwards.

    from tests.utils.postgres import postgres  # noqa: F401 - the module-scoped fixture
    def test_x(postgres): url = postgres.new_database("x")  # postgresql+psycopg://...

As root, initdb and the server run as the `postgres` user (PostgreSQL refuses root) in a folder it owns.
Without the binaries or the psycopg driver the fixture skips the test, saying what to install; under
CI (CI=true, where the set-up installs both) it fails instead, so a missing install step never passes
as a skipped check.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from devnet.anvil import free_port


def pg_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl, if any."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    found = [d for d in found if (d / "pg_ctl").exists()]
    return max(found, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0) if found else None


def missing() -> str | None:
    """Why a cluster cannot be started here, or None."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the psycopg driver is not installed (pip install 'psycopg[binary]', in the test extras)"
    if pg_bin_dir() is None:
        return "PostgreSQL is not installed (scripts/setup.sh --browser, or apt-get install postgresql)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser to start PostgreSQL as the postgres user"
    return None


@dataclass
class PgCluster:
    bin_dir: Path
    folder: Path
    port: int
    as_user: list[str]

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self, name: str) -> str:
        """CREATE DATABASE `name` (dropped first if it exists); returns its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        try:
            self._run(str(self.bin_dir / "pg_ctl"), "stop", "-D", str(self.data), "-m", "immediate", "-w")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.folder, ignore_errors=True)


def start_postgres() -> PgCluster:
    """initdb and start a cluster in a fresh temporary folder; the caller stops it."""
    why = missing()
    if why:
        raise RuntimeError(why)
    bin_dir = pg_bin_dir()
    folder = Path(tempfile.mkdtemp(prefix="loramesh-pg-"))  # under /tmp: the postgres user can reach it
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    cluster = PgCluster(bin_dir, folder, free_port(), as_user)
    try:
        cluster._run(
            str(bin_dir / "initdb"),
            "-D",
            str(cluster.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
            timeout=120,
        )
        opts = (
            f"-p {cluster.port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        cluster._run(
            str(bin_dir / "pg_ctl"),
            "start",
            "-D",
            str(cluster.data),
            "-w",
            "-t",
            "60",
            "-o",
            opts,
            "-l",
            str(folder / "postgres.log"),
            timeout=90,
        )
    except BaseException as e:
        log_file = folder / "postgres.log"
        detail = log_file.read_text()[-2000:] if log_file.exists() else ""
        if isinstance(e, subprocess.CalledProcessError):
            detail = (e.stderr or "")[-2000:] + detail
        cluster.stop()
        raise RuntimeError(f"could not start PostgreSQL: {e}\n{detail}") from e
    return cluster


@pytest.fixture(scope="module")
def postgres():
    """One throwaway PostgreSQL cluster per test module (skips when PostgreSQL is not installed)."""
    why = missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL tests cannot run under CI: {why}")
        pytest.skip(why)
    cluster = start_postgres()
    try:
        yield cluster
    finally:
        cluster.stop()
