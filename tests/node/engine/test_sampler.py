"""Sampling rules and their parameter checks."""

from __future__ import annotations

import pytest
import torch

from node.engine import RequestError, SamplingParams
from node.engine.layers.sampler import sample


def _gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_greedy_top_k_1_and_tiny_top_p_pick_the_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    argmax = logits.argmax(-1).tolist()
    assert sample(logits, [SamplingParams(temperature=0)] * 4, _gens(4)) == argmax
    assert sample(logits, [SamplingParams(temperature=1.5, top_k=1)] * 4, _gens(4)) == argmax
    assert sample(logits, [SamplingParams(temperature=1.5, top_p=1e-6)] * 4, _gens(4)) == argmax


def test_top_k_restricts_draws_to_the_k_best():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(2))
    best = set(logits[0].topk(3).indices.tolist())
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, [SamplingParams(temperature=5.0, top_k=3)], [g])[0] for _ in range(200)}
    assert draws <= best and len(draws) == 3


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, [SamplingParams(temperature=1.0, top_p=0.7)], [g])[0] for _ in range(200)}
    assert draws == {0, 1}


def test_a_rows_draw_does_not_depend_on_its_neighbours():
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    p = SamplingParams(temperature=1.0)
    alone = sample(logits[1:2], [p], [torch.Generator().manual_seed(42)])
    batch = sample(
        logits,
        [SamplingParams(temperature=0), p, p],
        [torch.Generator().manual_seed(7), torch.Generator().manual_seed(42), torch.Generator()],
    )
    assert batch[1] == alone[0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"temperature": -0.1}, "temperature must be a finite number >= 0"),
        ({"temperature": float("inf")}, "temperature must be a finite number >= 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
        ({"temperature": 1e39}, "temperature must be a finite number >= 0 and <= 1e\\+06"),  # inf as a float32
        ({"top_p": 0.0}, "top_p must be in"),
        ({"top_p": 1.5}, "top_p must be in"),
        ({"top_k": -1}, "top_k must be an integer in \\[0, "),
        ({"stop": ("a", "b", "c", "d", "e")}, "stop must be at most 4"),
        ({"stop": ("",)}, "stop must be at most 4 non-empty strings"),
    ],
)
def test_bad_sampling_params_are_refused(kwargs, message):
    with pytest.raises(RequestError, match=message):
        SamplingParams(**kwargs)


def test_a_temperature_too_small_to_divide_by_samples_greedily():
    # logits / 1e-308 overflow float32 to inf and the draw fails (an engine error before)
    assert SamplingParams(temperature=1e-308).temperature == 0.0
    assert SamplingParams(temperature=0.5).temperature == 0.5
