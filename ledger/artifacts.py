"""Compiled contract artifacts (<Name>.json, written by contracts/build.mjs into contracts/artifacts).

ledger/contracts is a symlink to contracts/artifacts, so the same files are found beside this module in a
checkout (editable install) and in the wheel, where setuptools copies them in as package data: a symlink
rather than a copy or a build hook keeps one set of files and one place to look.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

from ledger.errors import LedgerError

PACKAGED_DIR = Path(__file__).resolve().parent / "contracts"
CONTRACT_NAMES = ("AdapterRegistry", "AttributionLedger")


def artifacts_dir() -> Path:
    """Where artifacts are read from: $LORAMESH_ARTIFACTS_DIR, else the package's own (ledger/contracts)."""
    env = os.environ.get("LORAMESH_ARTIFACTS_DIR")
    return Path(env) if env else PACKAGED_DIR


@cache
def load_artifact(name: str) -> dict:
    """One artifact: abi, bytecode, deployedBytecode, compiler, sourcesSha256."""
    path = artifacts_dir() / f"{name}.json"
    try:
        art = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise LedgerError(
            f"contract artifact {path} is missing: in a checkout run node contracts/build.mjs, else reinstall loramesh"
        ) from e
    except ValueError as e:
        raise LedgerError(f"contract artifact {path} is not valid JSON: {e}") from e
    for key in ("abi", "bytecode", "deployedBytecode"):
        if key not in art:
            raise LedgerError(f"contract artifact {path} lacks {key!r}: rebuild with node contracts/build.mjs")
    return art
