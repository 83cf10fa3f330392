"""A row with nothing to draw from (NaN or +inf logits, every token banned) stops its own sequence, never the
batch: one request used to fail every request of its step (torch.multinomial raising on NaN)."""

from __future__ import annotations

import torch

from node.engine import GenerationRequest, SamplingParams
from node.engine.grammar import GuidedSpec
from node.engine.layers.sampler import draw_on_device, only_eos_when_dead, sample

EOS = 2


def test_dead_rows_become_eos_only_and_live_rows_are_untouched():
    logits = torch.randn(5, 50)
    logits[1, 7] = float("nan")
    logits[2, 3] = float("inf")
    logits[3] = float("-inf")
    logits[4, :10] = float("-inf")  # some banned tokens: still alive
    out = only_eos_when_dead(logits, [EOS])
    for r in (1, 2, 3):
        assert out[r].argmax() == EOS and torch.isinf(out[r]).sum() == 49
    assert torch.equal(out[0], logits[0]) and torch.equal(out[4], logits[4])


def test_a_dead_row_stops_while_its_neighbours_draw_what_they_would_have():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    dead = logits.clone()
    dead[1] = float("nan")
    params = [SamplingParams(temperature=0.8, seed=s, max_tokens=4) for s in (1, 2, 3)]

    def gens():
        return [torch.Generator().manual_seed(s) for s in (1, 2, 3)]

    alone = sample(logits, params, gens(), eos_ids=[EOS])
    mixed = sample(dead, params, gens(), eos_ids=[EOS])
    assert mixed[1] == EOS and mixed[0] == alone[0] and mixed[2] == alone[2]
    on_device = draw_on_device(dead, params, [1, 2, 3], [0, 0, 0], eos_ids=[EOS]).tolist()
    assert on_device[1] == EOS


def test_a_penalty_that_overflows_stops_only_its_own_request(llama_world):
    """repetition_penalty 1e-300 is 0 in float32: dividing by it gives +inf logits. Its neighbours, streaming in
    the same steps, finish exactly as they do alone."""
    engine = llama_world.engine(num_kv_blocks=200)
    try:

        def req(rid, **kw):
            params = SamplingParams(max_tokens=12, temperature=0.7, seed=5, ignore_eos=True, **kw)
            return GenerationRequest(rid, None, prompt_token_ids=[1, 11, 12, 13], params=params)

        alone = engine.generate([req("v0"), req("v1")])
        mixed = engine.generate([req("v0"), req("bad", repetition_penalty=1e-300), req("v1")])
        for rid in ("v0", "v1"):
            assert mixed[rid].token_ids == alone[rid].token_ids and mixed[rid].finish_reason == "length"
        assert mixed["bad"].finish_reason != "error"
    finally:
        engine.close()


def test_a_grammar_whose_only_token_min_tokens_bans_fails_that_request_alone(llama_world):
    """The schema allows one token next; it is also a stop token, which min_tokens bans until the 10th: nothing
    is left to draw from. That request fails, saying why (it ended "stop" with a text its schema does not take,
    as if it matched, until guided answers that cannot go on became errors); the free row beside it runs to its
    length."""
    engine = llama_world.engine(num_kv_blocks=200)
    try:
        spec = GuidedSpec.from_wire({"type": "json_schema", "schema": {"enum": ["abcdef"]}})
        probe = SamplingParams(max_tokens=30, temperature=0.0, guided=spec)
        path = engine.generate([GenerationRequest("probe", None, prompt_token_ids=[1, 5, 6], params=probe)])
        second = path["probe"].token_ids[1]  # what the grammar allows after the opening quote's token
        trapped = SamplingParams(
            max_tokens=30, temperature=0.9, seed=1, min_tokens=10, stop_token_ids=[second], guided=spec
        )
        free = SamplingParams(max_tokens=30, temperature=0.9, seed=2, ignore_eos=True)
        out = engine.generate(
            [
                GenerationRequest("trapped", None, prompt_token_ids=[1, 5, 6], params=trapped),
                GenerationRequest("free", None, prompt_token_ids=[1, 7, 8], params=free),
            ]
        )
        assert out["free"].finish_reason == "length" and len(out["free"].token_ids) == 30
        assert out["trapped"].finish_reason == "error" and len(out["trapped"].token_ids) == 2
        assert "could not be enforced" in out["trapped"].error
    finally:
        engine.close()
