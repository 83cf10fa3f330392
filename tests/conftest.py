"""Fixtures shared by every test tier."""

from __future__ import annotations

import pytest
import torch
from eth_account import Account

from tests.utils.chain import anvil_chain, fresh_chain, grace_chain  # noqa: F401  (fixtures)
from tests.utils.factories import make_base

# Two cores are shared by the test runner and the processes it starts.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny Llama base model folder, made once per test session."""
    return make_base(tmp_path_factory.mktemp("base") / "tiny", seed=0)


@pytest.fixture(scope="session")
def publisher():
    """An EVM account that signs packages."""
    return Account.from_key("0x" + "11" * 32)
