"""Engine worlds (tiny base + four adapters in a store), built once per session."""

from __future__ import annotations

import pytest

from tests.utils.engine import make_world


@pytest.fixture(scope="session")
def llama_world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("llama-world"), model_type="llama")


@pytest.fixture(scope="session")
def qwen2_world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("qwen2-world"), model_type="qwen2")


@pytest.fixture(scope="session")
def qwen3_world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("qwen3-world"), model_type="qwen3")


@pytest.fixture(scope="session", params=["llama", "qwen2", "qwen3"])
def world(request):
    return request.getfixturevalue(f"{request.param}_world")
