"""The wheel works outside the repository: built from this tree, installed into a new venv in a temporary folder,
and run from there (`loramesh devnet up`, a node, a gateway, one completion, the explorer, SIGTERM, `loramesh
devnet down`).

The new venv gets loramesh from the wheel alone (--no-deps). Its dependencies come from the venv running the
tests through a .pth file naming that venv's site-packages: a plain path entry, so the editable install's
`__editable__*.pth` there (which would import the repository's code) is never executed; the test checks that
every loramesh package is imported from the new venv. Anvil is found on PATH, as an installed package must.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import pytest

from devnet.anvil import find_anvil, free_port
from node.adapters.basemodel import base_model_name

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "node", "gateway", "ledger", "devnet")
PASSWORD = "wheel-test"


def _run(argv, *, cwd, env, timeout=120) -> str:
    """Run one command to completion; its output, or a failure that shows it."""
    r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, argv))} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _copy_tree(dst: Path) -> None:
    """The files git would commit (tracked, and untracked but not ignored), symlinks kept: the wheel is built
    from a copy because pip builds in place, and build/ and *.egg-info in the repository would be shared by
    concurrent runs (and stale files in build/ can end up in a wheel)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in filter(None, listed):
        rel = raw.decode()
        src, out = REPO / rel, dst / rel
        if not src.is_symlink() and not src.exists():  # deleted in the work tree, not yet in the index
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            out.symlink_to(os.readlink(src))
        elif src.is_file():
            shutil.copy2(src, out)


def _clean_env(venv: Path, path_dirs: list[Path], *, system_path: bool = True) -> dict[str, str]:
    """The environment of everything run from the new venv: no PYTHONPATH and no LORAMESH_* variable (the
    package must find its own files), PATH = the venv's bin, then `path_dirs`, then the system's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAMESH_", "PYTHON", "VIRTUAL_ENV"))}
    system = ["/usr/local/bin", "/usr/bin", "/bin"] if system_path else []
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *map(str, path_dirs), *system])
    env["LORAMESH_KEY_PASSWORD"] = PASSWORD
    env["LORAMESH_LOG_LEVEL"] = "WARNING"
    return env


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A new venv outside the repository with the wheel built from this tree installed, and nothing else."""
    root = tmp_path_factory.mktemp("wheel")
    assert not root.resolve().is_relative_to(REPO)
    _copy_tree(root / "src")
    dist, venv = root / "dist", root / "venv"
    py = [sys.executable, "-m"]
    pip = [*py, "pip", "--disable-pip-version-check"]  # and no look-up on the network
    _run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, root / "src"], cwd=root, env=None)
    (wheel,) = dist.glob("loramesh-*.whl")
    _run([*py, "venv", "--without-pip", venv], cwd=root, env=None)
    python = venv / "bin" / "python"
    _run([*pip, "--python", python, "install", "-q", "--no-deps", "--no-index", wheel], cwd=root, env=None)
    site = Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root, env={}).strip()
    )
    # the dependencies: the site-packages of the venv running this test (sys.prefix's), as plain path entries
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))  # under sys.prefix
    (site / "_loramesh_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    return venv


def test_installed_package_uses_its_own_files(venv, tmp_path):
    env = _clean_env(venv, [], system_path=False)  # not even a system-wide anvil: the failure is checked too
    check = (
        "import json, importlib, os\n"
        f"mods = {{n: importlib.import_module(n).__file__ for n in {PACKAGES!r}}}\n"
        "from ledger.artifacts import CONTRACT_NAMES, artifacts_dir, load_artifact\n"
        "arts = {n: len(load_artifact(n)['abi']) for n in CONTRACT_NAMES}\n"
        "from devnet.anvil import AnvilError, find_anvil\n"
        "try:\n"
        "    find_anvil()\n"
        "    missing = None\n"
        "except AnvilError as e:\n"
        "    missing = str(e)\n"
        "print(json.dumps({'modules': mods, 'artifacts_dir': str(artifacts_dir()), 'abi': arts, 'missing': missing}))"
    )
    out = json.loads(_run([venv / "bin" / "python", "-c", check], cwd=tmp_path, env=env))
    for name, file in out["modules"].items():
        assert Path(file).resolve().is_relative_to(venv.resolve()), f"{name} imported from {file}"
    assert Path(out["artifacts_dir"]).resolve().is_relative_to(venv.resolve())
    assert all(n > 0 for n in out["abi"].values())
    # no LORAMESH_ANVIL, no checkout around the package, no anvil on this PATH: one line naming all three
    assert out["missing"] is not None and "\n" not in out["missing"]
    for hint in ("LORAMESH_ANVIL", "PATH", "run make setup"):
        assert hint in out["missing"]


class Services:
    """The long-running commands of one test, each with its log; all killed at the end if still running."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd, self.env = cwd, env
        self.running: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, argv: list) -> None:
        log = self.cwd / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.running.append((name, proc, log))

    def wait_until(self, ready, what: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for name, proc, log in self.running:
                assert proc.poll() is None, f"{name} exited {proc.returncode}: {log.read_text()[-2000:]}"
            try:
                if ready():
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"not {what} within {timeout:.0f} s"
            time.sleep(0.2)

    def terminate(self) -> None:
        """SIGTERM, as systemd stops them (deploy/*.service): each must stop cleanly, with exit code 0."""
        for _, proc, _ in self.running:
            proc.send_signal(signal.SIGTERM)
        for name, proc, log in self.running:
            assert proc.wait(timeout=30) == 0, f"{name} exited {proc.returncode} on SIGTERM: {log.read_text()[-2000:]}"

    def kill(self) -> None:
        for _, proc, _ in self.running:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def test_devnet_node_gateway_and_explorer_from_the_wheel(venv, tmp_path):
    work = tmp_path / "work"  # the commands' cwd: nothing of the repository around
    work.mkdir()
    env = _clean_env(venv, [find_anvil().parent])  # anvil on PATH, the way an installed package finds it
    loramesh = str(venv / "bin" / "loramesh")
    gw_port, node_port, explorer_port, chain_port = free_port(), free_port(), free_port(), free_port()
    gw, node, explorer = (f"http://127.0.0.1:{p}" for p in (gw_port, node_port, explorer_port))
    db = f"sqlite:///{work / 'gateway.db'}"

    # independent set-up commands at once: the test runs on 2 shared cores, and each start imports a lot
    setup = [
        [loramesh, "keys", "new", "--out", "node.key"],
        [loramesh, "base", "init-tiny", "base"],
        [loramesh, "gateway", "keys", "create", "--db", db, "--name", "wheel"],
    ]
    procs = [
        subprocess.Popen(a, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for a in setup
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for argv, p, out in zip(setup, procs, outs):
        assert p.returncode == 0, f"{' '.join(argv)}: {out}"
    node_address = next(line.split()[1] for line in outs[0].splitlines() if line.strip().startswith("address"))
    auth = {"authorization": f"Bearer {outs[2].strip().splitlines()[-1]}"}

    deployment = work / "devnet" / "deployment.json"
    (work / "node.toml").write_text(
        f'base = "{work / "base"}"\nstore = "{work / "store"}"\nport = {node_port}\nkey = "{work / "node.key"}"\n'
        f'deployment = "{deployment}"\ngateways = ["{gw}"]\ndata_dir = "{work / "node"}"\n'
        "slots = 2\nthreads = 1\nkv_blocks = 64\nheartbeat_interval = 0.5\n"
    )
    services = Services(work, env)
    try:
        devnet = [loramesh, "devnet", "up", "--dir", "devnet", "--port", str(chain_port), "--block-time", "0.2"]
        _run([*devnet, "--fund", node_address], cwd=work, env=env)  # deploys from the wheel's artifacts
        gateway = [loramesh, "gateway", "run", "--deployment", deployment, "--db", db, "--base", "base"]
        services.start("gateway", [*gateway, "--port", str(gw_port)])
        services.start("node", [loramesh, "node", "run", "--config", "node.toml"])  # registers itself on chain

        # the explorer reads the gateway's database: started once the gateway has made its schema
        services.wait_until(lambda: httpx.get(gw + "/health", timeout=2).status_code == 200, "gateway serving")
        explorer_argv = [loramesh, "explorer", "--deployment", deployment, "--db", db, "--port", str(explorer_port)]
        services.start("explorer", explorer_argv)

        def listed() -> list[str]:
            models = httpx.get(gw + "/v1/models", headers=auth, timeout=2)
            return [m["id"] for m in models.json()["data"]] if models.status_code == 200 else []

        services.wait_until(lambda: httpx.get(node + "/health", timeout=2).status_code == 200 and listed(), "ready")
        base = base_model_name(work / "base")
        assert listed() == [base]
        ask = {"model": base, "prompt": "hello", "max_tokens": 2, "temperature": 0}
        r = httpx.post(gw + "/v1/completions", headers=auth, json=ask, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text

        # the explorer's pages, their styles included, come from the package
        services.wait_until(lambda: httpx.get(explorer + "/", timeout=5).status_code == 200, "explorer serving")
        assert "loramesh explorer" in httpx.get(explorer + "/", timeout=5).text
        services.terminate()
    finally:
        services.kill()
        down = subprocess.run(
            [loramesh, "devnet", "down", "--dir", "devnet"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
