"""Continuous batching, preemption, fairness: a request's tokens never depend on what runs beside it."""

from __future__ import annotations

import torch

from node.engine import GenerationRequest, SamplingParams
from tests.utils.engine import greedy, preload


def _prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, 300, (n,), generator=g).tolist()


def _sampled(rid: str, adapter_id, ids, n: int, seed: int) -> GenerationRequest:
    params = SamplingParams(max_tokens=n, temperature=0.9, top_p=0.95, top_k=50, seed=seed, ignore_eos=True)
    return GenerationRequest(rid, adapter_id, prompt_token_ids=ids, params=params)


def _alone(world, req_factory) -> tuple[int, ...]:
    engine = world.engine()
    try:
        return engine.generate([req_factory()])["x"].token_ids
    finally:
        engine.close()


def test_requests_arriving_mid_decode_produce_what_they_would_alone(llama_world):
    w = llama_world
    a0, a1, a2 = (a.adapter_id for a in w.adapters[:3])
    late = [
        lambda: greedy("x", a2, _prompt(1, 9), 10),
        lambda: _sampled("x", a0, _prompt(2, 6), 10, seed=5),
        lambda: greedy("x", None, _prompt(3, 12), 10),
    ]
    alone = [_alone(w, f) for f in late]
    engine = w.engine()
    try:
        preload(engine, [a0, a1, a2])
        engine.add_request(greedy("bg0", a0, _prompt(10, 7), 30))
        engine.add_request(_sampled("bg1", a1, _prompt(11, 4), 30, seed=9))
        done = {}
        for i, f in enumerate(late):
            for _ in range(3):  # let the running batch decode, then join it
                events, _ = engine.step()
                done.update({e.request_id: e for e in events if hasattr(e, "finish_reason")})
            req = f()
            req.request_id = f"late{i}"
            engine.add_request(req)
        while engine.has_work():
            events, _ = engine.step()
            done.update({e.request_id: e for e in events if hasattr(e, "finish_reason")})
        for i in range(len(late)):
            assert done[f"late{i}"].token_ids == alone[i]
    finally:
        engine.close()


def test_preemption_and_resumption_give_identical_results(llama_world):
    w = llama_world
    ids = [a.adapter_id for a in w.adapters] + [None]

    def reqs():
        out = []
        for i, aid in enumerate(ids):
            if i % 2:
                out.append(_sampled(f"p{i}", aid, _prompt(20 + i, 6 + i), 20, seed=i))
            else:
                out.append(greedy(f"p{i}", aid, _prompt(20 + i, 6 + i), 20))
        return out

    roomy = w.engine(num_kv_blocks=200, block_size=4)
    tight = w.engine(num_kv_blocks=18, block_size=4)  # 72 tokens for five sequences of up to 30
    try:
        want = roomy.generate(reqs())
        got = tight.generate(reqs())
        assert roomy.scheduler.num_preemptions == 0
        assert tight.scheduler.num_preemptions > 0
        for rid, ev in want.items():
            assert got[rid].token_ids == ev.token_ids, rid
            assert got[rid].finish_reason == "length" and got[rid].prompt_tokens == ev.prompt_tokens
        assert tight.blocks.num_free == 18  # everything returned
    finally:
        roomy.close()
        tight.close()


def test_admission_is_round_robin_across_adapters(llama_world):
    w = llama_world
    hot, cold = w.adapters[0].adapter_id, w.adapters[1].adapter_id
    engine = w.engine(max_num_seqs=3)
    try:
        preload(engine, [hot, cold])
        for i in range(6):
            engine.add_request(greedy(f"hot{i}", hot, _prompt(i, 4), 2))
        engine.add_request(greedy("cold0", cold, _prompt(9, 4), 2))
        engine.add_request(greedy("base0", None, _prompt(8, 4), 2))
        seqs, prefill, _ = engine.scheduler.schedule()
        # one from each adapter before the hot adapter's second request
        assert prefill and [s.request_id for s in seqs] == ["hot0", "cold0", "base0"]
    finally:
        engine.close()


def test_request_for_loading_adapter_waits_while_others_decode(llama_world):
    w = llama_world
    aid = w.adapters[2].adapter_id
    want = _alone(w, lambda: greedy("x", aid, _prompt(2, 5), 3))
    engine = w.engine()
    try:
        engine.add_request(greedy("base", None, _prompt(1, 5), 3))
        engine.add_request(greedy("lora", aid, _prompt(2, 5), 3))
        events, _ = engine.step()
        # the adapter is not decoded yet: the base request runs without it
        assert [e.request_id for e in events] == ["base"]
        assert engine.scheduler.num_waiting == 1
        done = engine.generate([])
        assert set(done) == {"base", "lora"}
        assert done["lora"].token_ids == want
    finally:
        engine.close()


def test_seeded_sampling_is_reproducible_and_seed_dependent(llama_world):
    w = llama_world
    aid = w.adapters[0].adapter_id
    a = _alone(w, lambda: _sampled("x", aid, _prompt(5, 5), 12, seed=1))
    b = _alone(w, lambda: _sampled("x", aid, _prompt(5, 5), 12, seed=1))
    c = _alone(w, lambda: _sampled("x", aid, _prompt(5, 5), 12, seed=2))
    assert a == b and a != c
