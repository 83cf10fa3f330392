"""An identity file is read within limits: nested JSON and huge scrypt costs are refused in one line
before any parsing recursion or key derivation (it may come from anyone's disk or download)."""

from __future__ import annotations

import json
import time

import pytest

from common.identity import IdentityError, create_identity, load_identity


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "id.json"
    create_identity(path, "pw")
    return path


def test_nested_identity_file_is_refused(tmp_path):
    path = tmp_path / "id.json"
    path.write_text('{"format":' + "[" * 50_000)
    with pytest.raises(IdentityError, match="nested deeper than 8 levels"):
        load_identity(path, "pw")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d["node_key"].update(n=2**30), "node_key asks for scrypt cost n=1073741824"),
        (lambda d: d["evm_keystore"]["crypto"]["kdfparams"].update(n=2**24), "evm_keystore asks for scrypt cost"),
        (lambda d: d["node_key"].update(n=3), "node_key asks for scrypt cost n=3"),
        (lambda d: d["node_key"].update(r=1024), "r=1024"),
    ],
)
def test_scrypt_cost_bombs_are_refused_before_deriving(key_file, tmp_path, edit, match):
    doc = json.loads(key_file.read_text())
    edit(doc)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    t0 = time.monotonic()
    with pytest.raises(IdentityError, match=match):
        load_identity(bad, "pw")
    assert time.monotonic() - t0 < 1.0


def test_good_identity_file_still_loads(key_file):
    assert load_identity(key_file, "pw").address == json.loads(key_file.read_text())["address"]
