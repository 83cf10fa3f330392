"""Our engine against transformers + PEFT run one adapter at a time: mixed-batch logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch

from node.engine import TorchLoRAKernel
from tests.utils.engine import greedy, prefill_rows, preload, reference_greedy, reference_logits

ATOL = 1e-4


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [[1] + torch.randint(3, 300, (5 + 3 * i,), generator=g).tolist() for i in range(n)]


@pytest.mark.parametrize("mode", ["grouped", "dense", "gather"])
def test_mixed_batch_logits_match_peft(world, references, mode):
    engine = world.engine(kernel=TorchLoRAKernel(mode))
    try:
        preload(engine, [a.adapter_id for a in world.adapters])
        rows = list(world.adapters) + [None, world.adapters[0], None]  # every adapter, base rows, a repeat
        prompts = _prompts(len(rows))
        for i, (a, p) in enumerate(zip(rows, prompts)):
            engine.add_request(greedy(f"r{i}", a.adapter_id if a else None, p, 1))
        seqs, prefill, failed = engine.scheduler.schedule()
        assert prefill and not failed and len(seqs) == len(rows)
        assert sorted(s.slot for s in seqs) == [-1, -1, 0, 0, 1, 2, 3]
        logits = engine.runner.forward(seqs, True, all_logits=True)
        ref = references(world)
        for s, got, want in prefill_rows(ref, world, seqs, logits):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
            if s.adapter_id is not None:  # the adapter really changes the output
                assert (want - reference_logits(ref, None, s.prompt_token_ids)).abs().max() > 1e-2
    finally:
        engine.close()


def test_greedy_generation_matches_peft_token_for_token(world, references):
    engine = world.engine()
    try:
        rows = list(world.adapters) + [None]
        prompts = _prompts(len(rows))
        reqs = [greedy(f"g{i}", a.adapter_id if a else None, p, 12) for i, (a, p) in enumerate(zip(rows, prompts))]
        done = engine.generate(reqs)
        ref = references(world)
        for i, (a, p) in enumerate(zip(rows, prompts)):
            assert done[f"g{i}"].finish_reason == "length"
            assert list(done[f"g{i}"].token_ids) == reference_greedy(ref, a.name if a else None, p, 12), a
    finally:
        engine.close()
