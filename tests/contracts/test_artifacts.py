"""The committed artifacts are what the sources compile to (solc-js, offline)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOLC = ROOT / ".tools" / "node_modules" / "solc"


def _check(contracts_dir: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LORAMESH_SOLC_JS": str(SOLC)}
    return subprocess.run(
        ["node", str(contracts_dir / "build.mjs"), "--check"], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.fixture(scope="module")
def node_available():
    if shutil.which("node") is None or not SOLC.exists():
        pytest.fail("node and .tools/node_modules/solc are required: run make setup")


def test_committed_artifacts_match_sources(node_available):
    r = _check(ROOT / "contracts")
    assert r.returncode == 0, r.stderr
    assert "artifacts match sources" in r.stdout


def test_check_fails_when_a_source_changes(node_available, tmp_path):
    copy = tmp_path / "contracts"
    shutil.copytree(ROOT / "contracts", copy)
    src = copy / "src" / "AttributionLedger.sol"
    src.write_text(
        src.read_text().replace("uint16 public constant MAX_BPS = 10_000;", "uint16 public constant MAX_BPS = 9_999;")
    )
    r = _check(copy)
    assert r.returncode == 1
    assert "AttributionLedger" in r.stderr and "do not match" in r.stderr
