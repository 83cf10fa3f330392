"""Log-probabilities (generated and prompt positions) against transformers + PEFT's log_softmax in a mixed batch
of adapters and base rows; several prompts and n sequences per prompt under one request id."""

from __future__ import annotations

import pytest
import torch

from node.engine import (
    FinishEvent,
    GenerationRequest,
    PromptLogprobsEvent,
    RequestError,
    SamplingParams,
    SequenceFinishEvent,
    TokenEvent,
)
from tests.utils.engine import preload, reference_logits

# our engine and transformers both run float32 on CPU; the logits agree to 1e-4 (test_lora_correctness), and
# log_softmax subtracts one logsumexp from them
ATOL = 2e-4


def _prompt(seed: int, n: int) -> list[int]:
    return [1] + torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _run(engine, reqs) -> list:
    for r in reqs:
        engine.add_request(r)
    events = []
    while engine.has_work():
        evs, _ = engine.step()
        events += evs
    return events


def test_logprobs_equal_peft_log_softmax_in_a_mixed_batch(llama_world, references):
    world = llama_world
    engine = world.engine()
    ref = references(world)
    try:
        preload(engine, [a.adapter_id for a in world.adapters])
        rows = [world.adapters[0], None, world.adapters[2], None]
        reqs = []
        for i, a in enumerate(rows):
            params = SamplingParams(
                max_tokens=5, temperature=0.8, seed=i, ignore_eos=True, logprobs=[5, 0, 20, None][i], prompt_logprobs=3
            )
            reqs.append(
                GenerationRequest(f"lp{i}", a.adapter_id if a else None, prompt_token_ids=_prompt(i, 6), params=params)
            )
        events = _run(engine, reqs)
        finals = {e.request_id: e for e in events if isinstance(e, FinishEvent)}
        tokens = [e for e in events if isinstance(e, TokenEvent)]
        prompt_events = {e.request_id: e for e in events if isinstance(e, PromptLogprobsEvent)}
        for i, a in enumerate(rows):
            rid, k = f"lp{i}", reqs[i].params.logprobs
            prompt = reqs[i].prompt_token_ids
            fin = finals[rid]
            out = list(fin.token_ids)
            name = a.name if a else None
            want = reference_logits(ref, name, prompt + out).log_softmax(-1)  # [P + T, V]
            # generated tokens: position P - 1 + t predicts output t
            mine = [e for e in tokens if e.request_id == rid]
            if k is None:
                assert all(e.logprob is None and e.top_logprobs is None for e in mine)
                assert fin.choices[0].logprobs is None
            else:
                assert [lp.token_id for lp in fin.choices[0].logprobs] == out
                for t, e in enumerate(mine):
                    row = want[len(prompt) - 1 + t]
                    assert abs(e.logprob - row[out[t]].item()) < ATOL
                    assert len(e.top_logprobs) == k
                    top = row.topk(k) if k else None
                    if k:
                        assert [tid for tid, _ in e.top_logprobs] == top.indices.tolist()
                        torch.testing.assert_close(
                            torch.tensor([lp for _, lp in e.top_logprobs]), top.values, atol=ATOL, rtol=0
                        )
                    assert fin.choices[0].logprobs[t].logprob == e.logprob
            # the prompt's positions, before any token event of the request
            pe = prompt_events[rid]
            assert pe.prompt_index == 0 and pe.entries[0] is None and len(pe.entries) == len(prompt)
            assert events.index(pe) < events.index(mine[0])
            for j in range(1, len(prompt)):
                entry, row = pe.entries[j], want[j - 1]
                assert entry.token_id == prompt[j] and abs(entry.logprob - row[prompt[j]].item()) < ATOL
                assert [tid for tid, _ in entry.top_logprobs] == row.topk(3).indices.tolist()
                # its rank: 1 + the tokens more likely than it (a token within the tolerance may count either way)
                lp = row[prompt[j]].item()
                assert 1 + (row > lp + ATOL).sum().item() <= entry.rank <= 1 + (row > lp - ATOL).sum().item()
            assert fin.prompt_logprobs == (pe.entries,)
    finally:
        engine.close()


def test_several_prompts_and_n_run_under_one_request(llama_world):
    engine = llama_world.engine()
    try:
        prompts = [_prompt(10, 4), _prompt(11, 7), _prompt(12, 3)]
        params = SamplingParams(max_tokens=6, temperature=1.0, seed=(1 << 64) - 2, n=3, ignore_eos=True)
        events = _run(engine, [GenerationRequest("many", None, prompt_token_ids=prompts, params=params)])
        fin = events[-1]
        assert isinstance(fin, FinishEvent) and sum(isinstance(e, FinishEvent) for e in events) == 1
        assert fin.prompt_tokens == 4 + 1 + 7 + 1 + 3 + 1  # each prompt once, not n times
        assert [c.index for c in fin.choices] == list(range(9))
        assert fin.completion_tokens == 9 * 6 == sum(len(c.token_ids) for c in fin.choices)
        assert fin.finish_reason == "length" and all(c.finish_reason == "length" for c in fin.choices)
        ends = [e for e in events if isinstance(e, SequenceFinishEvent)]
        assert sorted(e.index for e in ends) == list(range(9))
        for c in fin.choices:
            assert [e.token_id for e in events if isinstance(e, TokenEvent) and e.index == c.index] == list(c.token_ids)
        # sequence k draws with seed (seed + k) mod 2^64: the same as a lone request with that seed
        for k in (0, 1, 4, 8):
            p, seed = prompts[k // 3], (params.seed + k) % (1 << 64)
            lone = SamplingParams(max_tokens=6, temperature=1.0, seed=seed, ignore_eos=True)
            alone = engine.generate([GenerationRequest(f"lone{k}", None, prompt_token_ids=p, params=lone)])
            assert alone[f"lone{k}"].token_ids == fin.choices[k].token_ids
        assert len({c.token_ids for c in fin.choices[:3]}) == 3  # the choices of one prompt differ
        # the same request again draws the same
        again = _run(engine, [GenerationRequest("many2", None, prompt_token_ids=prompts, params=params)])[-1]
        assert [c.token_ids for c in again.choices] == [c.token_ids for c in fin.choices]
    finally:
        engine.close()


def test_a_request_of_several_sequences_aborts_together(llama_world):
    engine = llama_world.engine()
    try:
        req = GenerationRequest(
            "ab",
            None,
            prompt_token_ids=[_prompt(1, 4), _prompt(2, 4)],
            params=SamplingParams(max_tokens=50, n=2, ignore_eos=True),
        )
        engine.add_request(req)
        engine.step()
        engine.step()
        fin = engine.abort("ab")
        assert fin.finish_reason == "abort" and not engine.has_work() and "ab" not in engine.requests
        assert fin.completion_tokens == 4 * 2 and [c.finish_reason for c in fin.choices] == ["abort"] * 4
        again = engine.abort("ab")  # what is kept for its receipt: the counts and times
        assert (again.finish_reason, again.completion_tokens, again.finished_at) == (
            "abort",
            fin.completion_tokens,
            fin.finished_at,
        )
        # greedy sequences of one prompt agree
        two = SamplingParams(max_tokens=3, temperature=0, n=2, ignore_eos=True)
        done = engine.generate([GenerationRequest("g", None, prompt_token_ids=_prompt(3, 4), params=two)])["g"]
        assert done.choices[0].token_ids == done.choices[1].token_ids and done.completion_tokens == 6
    finally:
        engine.close()


@pytest.mark.parametrize(
    "ids, n, message",
    [
        ([[1, 2]] * 17, 1, "at most 16 lists"),
        ([[1, 2]] * 5, 13, "5 prompts x n=13 make more than 64 sequences"),
        ([[1, 2], 3], 1, "at most 16 lists"),
    ],
)
def test_too_many_prompts_or_sequences_are_refused(ids, n, message):
    with pytest.raises(RequestError, match=message):
        GenerationRequest("x", None, prompt_token_ids=ids, params=SamplingParams(n=n))


def test_an_empty_prompt_among_several_is_refused(llama_world):
    engine = llama_world.engine()
    try:
        with pytest.raises(RequestError, match="the prompt is empty"):
            engine.add_request(GenerationRequest("e", None, prompt_token_ids=[[1, 2], []]))
        with pytest.raises(RequestError, match="expected ints"):
            engine.add_request(GenerationRequest("e", None, prompt_token_ids=[[1, 2], [True]]))
    finally:
        engine.close()


def test_prompt_scores_are_the_same_scored_in_chunks(monkeypatch):
    """score() makes the logits of a long prompt a chunk of positions at a time (a whole 32,000-token prompt's
    over a 152,000-token vocabulary were 9.7 GB); the entries equal one whole pass."""
    import torch

    from node.engine.layers import logprobs

    hidden = torch.randn(700, 16, generator=torch.Generator().manual_seed(3))
    head = torch.randn(97, 16, generator=torch.Generator().manual_seed(5))
    targets = torch.randint(0, 97, (700,), generator=torch.Generator().manual_seed(4)).tolist()
    rows: list[int] = []

    def logits_of(h: torch.Tensor) -> torch.Tensor:
        rows.append(h.shape[0])
        return (h[:, None, :] * head[None, :, :]).sum(-1)  # each row's own sums, whatever the chunk (a GEMM may not)

    chunked = logprobs.score(hidden, targets, 3, logits_of)
    assert rows == [256, 256, 188]  # never more than SCORE_CHUNK positions' logits at once
    monkeypatch.setattr(logprobs, "SCORE_CHUNK", 10_000)
    whole = logprobs.score(hidden, targets, 3, logits_of)
    assert len(chunked) == 700 and chunked == whole
