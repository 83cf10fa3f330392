"""verify.check_values (one bit-level pass per tensor) refuses exactly what the plain rule below (every value
widened to float64, scaled, scanned: what the node checked before) refuses, in every float dtype, at the edges of the
float16 range and for NaN and infinities, in A (unscaled) and B (scaled by lora_alpha / r)."""

import pytest
import torch
from safetensors.torch import save_file

from node.adapters.errors import PackageError
from node.adapters.verify import check_values
from node.adapters.weights import (
    HALF_MAX,
    WEIGHTS_FILE,
    LoraConfig,
    lora_key,
    read_lora_buffer,
    read_safetensors_header,
)

VALUES = [0.0, -1.0, HALF_MAX, -HALF_MAX, 65505.0, -65520.0, 70000.0, 1e300, 8188.0, 8188.5, 8189.0, -8189.0, 16377.0]
VALUES += [float("inf"), float("-inf"), float("nan")]


def check_tensor_values(path, tensors, lora) -> None:
    """The rule as written: every A value, and every B value times the scaling, is finite and fits float16."""
    for name, t in read_lora_buffer(path, tensors)[1].items():
        t = t.double() * (lora.scaling if ".lora_B." in name else 1.0)
        if not bool(torch.isfinite(t).all()) or (t.numel() and float(t.abs().max()) > HALF_MAX):
            raise PackageError(f"{WEIGHTS_FILE}: tensor {name} holds values that are not finite or exceed {HALF_MAX:g}")


SCALINGS = [(16.0, False), (128.0, False), (1.0, False), (7.0, False), (3.0, True)]  # (lora_alpha, use_rslora), r=4


def _accepts(check, path, tensors, lora) -> bool:
    try:
        check(path, tensors, lora)
    except PackageError:
        return False
    return True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_check_values_agrees_with_the_float64_scan(dtype, tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    refused = 0
    for value in VALUES:
        for alpha, rslora in SCALINGS:
            lora = LoraConfig(rank=4, alpha=alpha, targets=("q_proj",), use_rslora=rslora)
            for where in "AB":
                a, b = torch.full((4, 8), 0.5, dtype=dtype), torch.full((8, 4), -0.25, dtype=dtype)
                (a if where == "A" else b)[1, 2] = torch.tensor(value, dtype=torch.float64).to(dtype)
                save_file({lora_key(0, "q_proj", "A"): a, lora_key(0, "q_proj", "B"): b}, str(path))
                tensors = read_safetensors_header(path)
                want = _accepts(check_tensor_values, path, tensors, lora)
                assert _accepts(check_values, path, tensors, lora) == want, (value, alpha, rslora, where)
                refused += not want
    assert refused  # the cases reach both sides of the rule


def test_check_values_refuses_a_file_cut_short(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    a, b = torch.ones(4, 8), torch.ones(8, 4)
    save_file({lora_key(0, "q_proj", "A"): a, lora_key(0, "q_proj", "B"): b}, str(path))
    tensors = read_safetensors_header(path)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 4)
    lora = LoraConfig(rank=4, alpha=8.0, targets=("q_proj",), use_rslora=False)
    with pytest.raises(PackageError, match="cut short"):
        check_values(path, tensors, lora)
