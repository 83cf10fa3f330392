"""Engine worlds (tiny base + four adapters in a store), built once per session; the device
fixture of the Triton kernel tests (the interpreter on CPU, compiled on CUDA)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors under its interpreter, which is chosen when a kernel is
    # defined: set it before anything imports the engine's Triton modules
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.utils.engine import make_world, reference_model  # noqa: E402

CUDA = torch.cuda.is_available()
TRITON_DEVICES = [
    pytest.param("cpu", id="interpret"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]),
]


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


@pytest.fixture(scope="session")
def references():
    """references(world): the transformers + PEFT model of a world, built once per session."""
    cache = {}

    def get(world):
        if id(world) not in cache:
            cache[id(world)] = reference_model(world)
        return cache[id(world)]

    return get


@pytest.fixture(params=TRITON_DEVICES)
def triton_device(request):
    """'cpu' (kernels under TRITON_INTERPRET=1) or 'cuda' (compiled; marker gpu)."""
    pytest.importorskip("triton")
    if request.param == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CUDA is present: the kernels run compiled, not under the interpreter")
    return torch.device(request.param)
