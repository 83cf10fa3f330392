"""The batched on-device sampler of the CUDA path: the same rules as the per-row sampler (greedy,
temperature, top-k, top-p), randomness a pure function of (seed, token index), no host sync."""

from __future__ import annotations

import pytest
import torch

from node.engine import SamplingParams
from node.engine.layers.sampler import sample_batched, sample_on_device, uniform_from

DEVICES = [
    pytest.param("cpu"),
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
    ),
]


def draw(logits, temp, k, p, seeds, steps):
    dev = logits.device
    n = logits.shape[0]

    def col(v, dt):
        return torch.tensor(v if isinstance(v, list) else [v] * n, dtype=dt, device=dev)

    return sample_batched(
        logits,
        col(temp, torch.float64),
        col(k, torch.int64),
        col(p, torch.float64),
        col(seeds, torch.int64),
        col(steps, torch.int64),
    ).cpu()


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_top_k_1_and_tiny_top_p_pick_the_argmax(device):
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(1)).to(device)
    argmax = logits.argmax(-1).cpu()
    steps = list(range(6))
    assert torch.equal(draw(logits, 0.0, 0, 1.0, 1, steps), argmax)
    assert torch.equal(draw(logits, 1.5, 1, 1.0, 1, steps), argmax)
    assert torch.equal(draw(logits, 1.5, 0, 1e-6, 1, steps), argmax)


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_and_top_p_restrict_the_draws(device):
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(2)).to(device)
    best = set(logits[0].topk(3).indices.tolist())
    rows = logits.expand(400, -1).contiguous()
    got = set(draw(rows, 5.0, 3, 1.0, 9, list(range(400))).tolist())
    assert got == best
    probs = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], device=device)).expand(400, -1).contiguous()
    assert set(draw(probs, 1.0, 0, 0.7, 9, list(range(400))).tolist()) == {0, 1}


@pytest.mark.parametrize("device", DEVICES)
def test_draw_frequencies_follow_the_distribution(device):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    rows = torch.log(probs).expand(8000, -1).contiguous().to(device)
    got = draw(rows, 1.0, 0, 1.0, 1234, list(range(8000)))
    freq = torch.bincount(got, minlength=4).double() / 8000
    assert (freq - probs.double()).abs().max() < 0.02, freq


@pytest.mark.parametrize("device", DEVICES)
def test_a_rows_draw_depends_on_its_seed_and_step_only(device):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 64, generator=g).to(device)
    alone = draw(logits[2:3], 1.0, 0, 1.0, 42, 7)
    batch = draw(logits, [0.0, 1.0, 1.0, 0.7], [0, 5, 0, 0], [1.0, 0.9, 1.0, 1.0], [1, 2, 42, 3], [0, 0, 7, 9])
    assert batch[2] == alone[0]
    assert torch.equal(draw(logits, 1.0, 0, 1.0, 42, 7), draw(logits, 1.0, 0, 1.0, 42, 7))
    # different steps of one request draw different numbers (a resumed request redraws the same)
    u = uniform_from(torch.full((1000,), 42), torch.arange(1000))
    assert u.unique().numel() == 1000 and 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.03


@pytest.mark.parametrize("device", DEVICES)
def test_sample_on_device_mixes_greedy_and_sampled_rows(device):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(4)).to(device)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=0)]
    assert sample_on_device(logits, params, [1, 2, 3], [0, 0, 0]) == logits.argmax(-1).tolist()
    greedy_only = [SamplingParams(temperature=0)] * 3
    assert sample_on_device(logits, greedy_only, [1, 2, 3], [0, 5, 9]) == logits.argmax(-1).tolist()
    hot = [SamplingParams(temperature=1.0, seed=5)] * 3
    first = sample_on_device(logits, hot, [5, 5, 5], [0, 0, 0])
    assert first == sample_on_device(logits, hot, [5, 5, 5], [0, 0, 0])
    assert all(0 <= t < 50 for t in first)
