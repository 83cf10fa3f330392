"""Chain and outbox fixtures for these tests (tests/utils/chain.py)."""

import pytest

from ledger.db import init_db, make_engine
from tests.utils.chain import anvil_chain, fresh_chain, start_chain  # noqa: F401 - fixtures for these tests


@pytest.fixture
def engine(tmp_path):
    """A fresh SQLite outbox (test_outbox.py has its own: the default connection settings)."""
    e = make_engine(f"sqlite:///{tmp_path}/outbox.db", immediate=True)
    init_db(e)
    yield e
    e.dispose()


@pytest.fixture(scope="module")
def slow_chain(tmp_path_factory):
    """1-second blocks, so a sent transaction stays in the mempool for a while (one per module)."""
    env = start_chain(tmp_path_factory.mktemp("anvil-1s"), block_time=1.0)
    try:
        yield env
    finally:
        env.anvil.stop()
