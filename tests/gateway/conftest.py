"""Chain fixtures for the gateway's integration tests (tests/utils/chain.py)."""

from tests.utils.chain import anvil_chain  # noqa: F401
