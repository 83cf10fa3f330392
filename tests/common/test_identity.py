import json
import os
import stat

import pytest

from common.identity import IdentityError, create_identity, load_identity
from common.wire import node_id_of


def test_identity_round_trip_and_file_mode(tmp_path):
    path = tmp_path / "id.json"
    made = create_identity(path, "pw")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = load_identity(path, "pw")
    assert loaded.address == made.address
    assert loaded.node_seed == made.node_seed
    assert loaded.node_id == node_id_of(made.node_public_key)
    doc = json.loads(path.read_text())
    assert made.node_seed.hex() not in path.read_text()  # the node key is encrypted too
    assert doc["evm_keystore"]["crypto"]["kdf"] == "scrypt"


def test_password_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMESH_KEY_PASSWORD", "from-env")
    made = create_identity(tmp_path / "id.json")
    assert load_identity(tmp_path / "id.json").address == made.address
    with pytest.raises(IdentityError, match="wrong password"):
        load_identity(tmp_path / "id.json", "other")


def test_refuses_overwrite_missing_and_damaged_files(tmp_path):
    path = tmp_path / "id.json"
    create_identity(path, "pw")
    with pytest.raises(IdentityError, match="already exists"):
        create_identity(path, "pw")
    with pytest.raises(IdentityError, match="not found"):
        load_identity(tmp_path / "nope.json", "pw")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(IdentityError, match="not readable JSON"):
        load_identity(tmp_path / "junk.json", "pw")
    (tmp_path / "other.json").write_text('{"format": "something-else"}')
    with pytest.raises(IdentityError, match="not a loramesh identity file"):
        load_identity(tmp_path / "other.json", "pw")
    doc = json.loads(path.read_text())
    doc["node_key"]["ciphertext"] = doc["node_key"]["ciphertext"][:-4] + "AAAA"
    path.write_text(json.dumps(doc))
    with pytest.raises(IdentityError, match="wrong password or damaged"):
        load_identity(path, "pw")


def test_a_new_key_gets_no_empty_password(tmp_path, monkeypatch):
    """`export LORAMESH_KEY_PASSWORD=$PW` with PW unset made a key anyone could open, without a word."""
    monkeypatch.setenv("LORAMESH_KEY_PASSWORD", "")
    with pytest.raises(IdentityError, match="LORAMESH_KEY_PASSWORD is set but empty"):
        create_identity(tmp_path / "id.json")
    with pytest.raises(IdentityError, match="the password given is empty"):
        create_identity(tmp_path / "id.json", "")
    assert not (tmp_path / "id.json").exists()


def _show(path, *flags, password=None):
    from typer.testing import CliRunner

    from node.cli import keys_app

    env = {"LORAMESH_KEY_PASSWORD": password} if password is not None else {}
    return CliRunner().invoke(keys_app, ["show", str(path), *flags], env=env)


def test_keys_show_needs_no_password_and_check_unlocks(tmp_path, monkeypatch):
    """`keys show` printed an address only after asking for the password, which the address is not secret behind
    (README: `devnet up --fund $(loramesh keys show alice.json | awk ...)`)."""
    monkeypatch.delenv("LORAMESH_KEY_PASSWORD", raising=False)
    path = tmp_path / "id.json"
    made = create_identity(path, "pw")
    shown = _show(path)
    assert shown.exit_code == 0, shown.output
    assert shown.output.split() == ["address", made.address, "node", "id", made.node_id]
    checked = _show(path, "--check", password="pw")
    assert checked.exit_code == 0 and made.node_id in checked.output and "the keys match" in checked.output
    wrong = _show(path, "--check", password="other")
    assert isinstance(wrong.exception, IdentityError) and "wrong password" in str(wrong.exception)


def test_keys_show_refuses_what_the_file_cannot_back(tmp_path):
    path = tmp_path / "id.json"
    create_identity(path, "pw")
    doc = json.loads(path.read_text())
    other = create_identity(tmp_path / "other.json", "pw")
    bad_id = dict(doc, node_id=other.node_id)
    (tmp_path / "bad_id.json").write_text(json.dumps(bad_id))
    r = _show(tmp_path / "bad_id.json")
    assert "node id is not its node public key's" in str(r.exception)
    bad_address = dict(doc, address="0x[bold]" + "0" * 32)
    (tmp_path / "bad_address.json").write_text(json.dumps(bad_address))
    assert "address is not 0x followed by 40 hex digits" in str(_show(tmp_path / "bad_address.json").exception)
    # a node key swapped consistently (public key and id) reads, but does not unlock as the file states
    swapped = dict(doc, node_id=other.node_id, node_public_key=other.node_public_key.hex())
    (tmp_path / "swapped.json").write_text(json.dumps(swapped))
    assert _show(tmp_path / "swapped.json").exit_code == 0
    with pytest.raises(IdentityError, match="do not match the address and node id it states"):
        load_identity(tmp_path / "swapped.json", "pw")
