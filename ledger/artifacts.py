"""Compiled contract artifacts (contracts/artifacts/<Name>.json, written by contracts/build.mjs)."""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

from ledger.errors import LedgerError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONTRACT_NAMES = ("AdapterRegistry", "AttributionLedger")


def artifacts_dir() -> Path:
    """Where artifacts are read from: $LORAMESH_ARTIFACTS_DIR, else contracts/artifacts in the repo."""
    env = os.environ.get("LORAMESH_ARTIFACTS_DIR")
    return Path(env) if env else REPO_ROOT / "contracts" / "artifacts"


@cache
def load_artifact(name: str) -> dict:
    """One artifact: abi, bytecode, deployedBytecode, compiler, sourcesSha256."""
    path = artifacts_dir() / f"{name}.json"
    try:
        art = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise LedgerError(f"contract artifact {path} is missing: run node contracts/build.mjs") from e
    except ValueError as e:
        raise LedgerError(f"contract artifact {path} is not valid JSON: {e}") from e
    for key in ("abi", "bytecode", "deployedBytecode"):
        if key not in art:
            raise LedgerError(f"contract artifact {path} lacks {key!r}: rebuild with node contracts/build.mjs")
    return art
