"""Chain fixtures for these tests (tests/utils/chain.py)."""

from tests.utils.chain import anvil_chain, fresh_chain  # noqa: F401
