"""The torch kernel's grouped row layouts (padded, runs, sorted) in every batch shape that picks
them: against a per-token loop at the kernel, and against transformers + PEFT in the engine."""

from __future__ import annotations

import pytest
import torch

from node.engine import LoRAMapping, TorchLoRAKernel
from node.engine.lora.kernels.torch_ref import LAYOUTS
from tests.utils.engine import greedy, prefill_rows, preload, reference_greedy

S, R, D_IN, OUTS = 4, 4, 24, (16, 8, 8)  # a fused q/k/v-like projection, slices of unequal width

# name: (token slots, layout chosen by batch, padded groups gathered rather than sliced)
BATCHES = {
    "interleaved": ([0, 1, 2, 3, 0, 1, 2, 3], "padded", False),
    "sorted-uniform": ([0, 0, 1, 1, 2, 2], "padded", False),  # packed rows are the tokens
    "base-rows": ([1, -1, 2, 1, -1, 2, -1], "padded", False),
    "hole-in-range": ([0, 2, 0, 2], "padded", False),  # slot 1 is an all-padding group
    "scattered": ([0, 3, 0, 3, 0, 3], "padded", True),
    "one-token": ([3], "padded", False),
    "uneven": ([1] + [0] * 20 + [2] + [0] * 20, "sorted", False),
    "long-groups": ([i % 2 for i in range(40)], "sorted", False),
    "prefill-runs": ([2] * 20 + [-1] * 5 + [0] * 17 + [2] * 16, "runs", False),
    "one-slot": ([1] * 16, "runs", False),
}


def _weights(dtype=torch.float64):
    """Stacks as the runner lays them out: views into one [S+1, P] buffer (rows strided), the zero
    row S, a rank-2 adapter padded to R in slot 1, and a block-diagonal fused B."""
    g = torch.Generator().manual_seed(0)
    n, out = len(OUTS), sum(OUTS)
    a_size, b_size = n * R * D_IN, n * R * out
    buf = torch.zeros(S + 1, a_size + b_size + 5, dtype=dtype)
    a = buf[:, :a_size].view(S + 1, n * R, D_IN)
    b = buf[:, a_size : a_size + b_size].view(S + 1, n * R, out)
    a[:S] = torch.randn(S, n * R, D_IN, generator=g, dtype=dtype)
    col = 0
    for i, o in enumerate(OUTS):
        b[:S, i * R : (i + 1) * R, col : col + o] = torch.randn(S, R, o, generator=g, dtype=dtype)
        col += o
    a[1, 2:R].zero_()
    b[1, 2:R].zero_()
    return a, b


def _per_token(y, x, a, b, slots, offset=0):
    want = y.clone()
    out = b.shape[2]
    for t, s in enumerate(slots):
        if s >= 0:
            want[t, offset : offset + out] += b[s].t() @ (a[s] @ x[t])
    return want


@pytest.mark.parametrize("layout", [None, *LAYOUTS])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_grouped_layouts_match_a_per_token_loop(batch, layout):
    slots, chosen, gathered = BATCHES[batch]
    a, b = _weights()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(slots), D_IN, generator=g, dtype=torch.float64)
    y = torch.randn(len(slots), sum(OUTS), generator=g, dtype=torch.float64)
    want = _per_token(y, x, a, b, slots)
    mapping = LoRAMapping(S, TorchLoRAKernel("grouped", layout))
    mapping.set_token_slots(slots)
    assert mapping.meta.layout == (layout or chosen)
    if layout is None:
        assert (mapping.meta.group_slots is not None) == gathered
    mapping.add_lora(y, x, a, b, OUTS)
    torch.testing.assert_close(y, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_expand_into_an_offset_column_slice_leaves_the_rest(layout):
    slots = [2, 0, -1, 2, 0]
    a, b = _weights()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(len(slots), D_IN, generator=g, dtype=torch.float64)
    y = torch.randn(len(slots), sum(OUTS) + 10, generator=g, dtype=torch.float64)
    want = _per_token(y, x, a, b, slots, offset=6)
    kernel = TorchLoRAKernel("grouped", layout)
    meta = kernel.prepare(torch.tensor(slots), S, slots)
    kernel.expand(y, kernel.shrink(x, a, meta), b, meta, 6, OUTS)
    torch.testing.assert_close(y, want, atol=1e-12, rtol=1e-12)


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="layout 'tiled' is not one of padded, sorted, runs"):
        TorchLoRAKernel("grouped", "tiled")


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [[1] + torch.randint(3, 300, (4 + 5 * i,), generator=g).tolist() for i in range(n)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_matches_peft_on_a_mixed_prefill(world, references, layout):
    engine = world.engine(kernel=TorchLoRAKernel("grouped", layout))
    try:
        preload(engine, [a.adapter_id for a in world.adapters])
        rows = [world.adapters[1], None, world.adapters[0], world.adapters[1], *world.adapters[2:]]
        for i, (a, p) in enumerate(zip(rows, _prompts(len(rows)))):
            engine.add_request(greedy(f"r{i}", a.adapter_id if a else None, p, 1))
        seqs, prefill, failed = engine.scheduler.schedule()
        assert prefill and not failed and len(seqs) == len(rows)
        logits = engine.runner.forward(seqs, True, all_logits=True)
        assert engine.mapping.meta.layout == layout
        for _, got, want in prefill_rows(references(world), world, seqs, logits):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    finally:
        engine.close()


@pytest.mark.parametrize("layout", [None, *LAYOUTS])
def test_each_layout_generates_peft_greedy_tokens(llama_world, references, layout):
    world = llama_world
    engine = world.engine(kernel=TorchLoRAKernel("grouped", layout))
    try:
        rows = [world.adapters[0], world.adapters[2], None, world.adapters[0], world.adapters[3], world.adapters[2]]
        prompts = _prompts(len(rows))
        done = engine.generate(
            [greedy(f"g{i}", a.adapter_id if a else None, p, 8) for i, (a, p) in enumerate(zip(rows, prompts))]
        )
        ref = references(world)
        for i, (a, p) in enumerate(zip(rows, prompts)):
            assert list(done[f"g{i}"].token_ids) == reference_greedy(ref, a.name if a else None, p, 8), (i, a)
    finally:
        engine.close()


def test_a_batch_without_adapter_tokens_adds_nothing():
    a, b = _weights()
    kernel = TorchLoRAKernel()
    meta = kernel.prepare(torch.tensor([-1, -1]), S, [-1, -1])
    x, y = torch.ones(2, D_IN, dtype=torch.float64), torch.ones(2, sum(OUTS), dtype=torch.float64)
    kernel.expand(y, kernel.shrink(x, a, meta), b, meta, 0, OUTS)
    assert torch.equal(y, torch.ones(2, sum(OUTS), dtype=torch.float64))
