"""The torch LoRA kernel (both strategies) against a per-token loop, ranks padded, -1 = base only."""

from __future__ import annotations

import pytest
import torch

from node.engine import LoRAMapping, TorchLoRAKernel


@pytest.mark.parametrize(
    "order",
    [[0, 1, -1, 2, 2, 0, -1, 1, 0, 2], [2, 0, -1, 2, 2, 0, -1, 0, 0, 2]],
    ids=["consecutive-slots", "scattered-slots"],
)
@pytest.mark.parametrize("mode", ["grouped", "dense", "gather", None])
def test_shrink_expand_match_a_per_token_loop(mode, order):
    g = torch.Generator().manual_seed(0)
    s, r, d_in, outs, t = 3, 8, 24, (16, 8), 10
    a = torch.randn(s + 1, len(outs) * r, d_in, generator=g)
    bs = [torch.randn(s + 1, r, o, generator=g) for o in outs]
    a[s].zero_()
    for b in bs:
        b[s].zero_()
    a[1, 2:r].zero_()  # slot 1 holds a rank-2 adapter padded to r
    bs[0][1, 2:].zero_()
    b_fused = torch.zeros(s + 1, len(outs) * r, sum(outs))  # block-diagonal
    b_fused[:, :r, : outs[0]] = bs[0]
    b_fused[:, r:, outs[0] :] = bs[1]
    x = torch.randn(t, d_in, generator=g)
    slots = torch.tensor(order)
    y = torch.randn(t, sum(outs), generator=g)
    want = y.clone()
    for i in range(t):
        si = int(slots[i])
        if si < 0:
            continue
        h = a[si] @ x[i]
        want[i, : outs[0]] += bs[0][si].t() @ h[:r]
        want[i, outs[0] :] += bs[1][si].t() @ h[r:]
    mapping = LoRAMapping(s, TorchLoRAKernel(mode))
    mapping.set_token_slots(slots.tolist())
    mapping.add_lora(y, x, a, b_fused)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


def test_inactive_mapping_leaves_output_untouched():
    mapping = LoRAMapping(2)
    mapping.set_token_slots([-1, -1])
    assert not mapping.active
    y = torch.ones(2, 4)
    mapping.add_lora(y, torch.ones(2, 3), torch.ones(3, 2, 3), torch.ones(3, 2, 4))
    assert torch.equal(y, torch.ones(2, 4))


def test_unknown_kernel_mode_is_refused():
    with pytest.raises(ValueError, match="mode 'fast' is not one of"):
        TorchLoRAKernel("fast")
