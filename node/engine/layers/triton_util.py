"""What every Triton kernel of the engine shares: whether kernels run under Triton's interpreter,
and the one check that a tensor is somewhere they can run.

Triton picks the interpreter when a kernel is defined, from TRITON_INTERPRET in the environment,
so the flag is read once, at import, as Triton reads it: set it before the engine's Triton modules
are imported (the engine tests' conftest does)."""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class TritonUnavailableError(RuntimeError):
    """Triton kernels were asked to run where they cannot (CPU tensors without the interpreter)."""


def check_device(dev: torch.device) -> None:
    """Raise TritonUnavailableError unless a Triton kernel can run on `dev` (CUDA, or any device
    under the interpreter)."""
    if dev.type != "cuda" and not INTERPRET:
        raise TritonUnavailableError(
            f"Triton kernels need CUDA tensors (got {dev.type}), or TRITON_INTERPRET=1 set before import"
        )
