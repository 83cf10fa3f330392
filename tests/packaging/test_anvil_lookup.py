"""Where anvil is found: $LORAMESH_ANVIL, else a checkout's .tools (the pinned version), else PATH; and the one
line that names all three when none has it."""

from __future__ import annotations

import pytest

from devnet import anvil
from devnet.anvil import ANVIL_ENV, CHECKOUT_ANVIL, AnvilError, find_anvil


def _exe(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def places(tmp_path, monkeypatch):
    """A checkout root and a PATH folder, both empty, and no LORAMESH_ANVIL."""
    checkout, bin_dir = tmp_path / "checkout", tmp_path / "bin"
    checkout.mkdir()
    bin_dir.mkdir()
    monkeypatch.setattr(anvil, "CHECKOUT_ROOT", checkout)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv(ANVIL_ENV, raising=False)
    return checkout, bin_dir


def test_env_first_then_checkout_then_path(places, tmp_path, monkeypatch):
    checkout, bin_dir = places
    on_path = _exe(bin_dir / "anvil")
    assert find_anvil() == on_path
    local = _exe(checkout / CHECKOUT_ANVIL)
    assert find_anvil() == local  # the pinned one wins over whatever anvil PATH has
    explicit = _exe(tmp_path / "elsewhere" / "anvil")
    monkeypatch.setenv(ANVIL_ENV, str(explicit))
    assert find_anvil() == explicit


def test_none_found_names_all_three_places(places):
    with pytest.raises(AnvilError) as e:
        find_anvil()
    message = str(e.value)
    assert "\n" not in message
    for hint in (ANVIL_ENV, "PATH", "npm install -g @foundry-rs/anvil-linux-amd64@", "run make setup"):
        assert hint in message, hint


def test_a_wrong_explicit_path_is_an_error_not_a_fallback(places, tmp_path, monkeypatch):
    _, bin_dir = places
    _exe(bin_dir / "anvil")
    monkeypatch.setenv(ANVIL_ENV, str(tmp_path / "missing"))
    with pytest.raises(AnvilError, match=f"anvil not found at .*missing \\({ANVIL_ENV}\\)"):
        find_anvil()
    not_executable = tmp_path / "plain"
    not_executable.write_text("")
    monkeypatch.setenv(ANVIL_ENV, str(not_executable))
    with pytest.raises(AnvilError, match="point LORAMESH_ANVIL at the anvil binary"):
        find_anvil()
