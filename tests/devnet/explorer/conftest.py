"""Fixtures: one anvil per test module, a settled world on it, the explorer served by real uvicorn."""

import pytest

from devnet.explorer import ExplorerConfig, create_app
from tests.devnet.explorer.scenario import build_world
from tests.utils.chain import anvil_chain  # noqa: F401  (fixture)
from tests.utils.servers import ServerThread


@pytest.fixture(scope="module")
def world(anvil_chain, tmp_path_factory):  # noqa: F811
    return build_world(anvil_chain, tmp_path_factory.mktemp("ledger"))


@pytest.fixture(scope="module")
def explorer_url(anvil_chain, world):  # noqa: F811
    app = create_app(ExplorerConfig(deployment=anvil_chain.deployment_path, db_url=world.db_url))
    with ServerThread(app) as server:
        app.state.explorer.wait_synced()  # pages never wait for the index: the tests wait for it once
        yield server.url
