"""Speculative decoding (n-gram drafts, speculative.py): greedy answers are token for token those of plain decoding
in a mixed batch of adapters and base-only rows (stop strings, stop tokens, EOS and max_tokens landing inside a
draft included, with the prefix cache on too, every KV block accounted for after every step); seeded sampled answers
follow plain sampling's distribution (a chi-square test on a vocabulary cut to four tokens); a copying prompt gets
drafts accepted, in fewer steps than tokens."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from node.engine import GenerationRequest, SamplingParams
from node.engine.speculative import propose
from tests.node.engine.test_prefix_cache import check_pool, run
from tests.utils.engine import greedy, preload

TURN = [7, 8, 9, 10]  # a follow-up question
COPY = [1] + [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51] * 3  # a prompt that repeats itself


def _tokens(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (n,), generator=g).tolist()


def test_propose_takes_the_latest_longest_match():
    assert propose([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 2, 1, 3) == [7, 8]  # latest of two 3-token matches
    assert propose([5, 6, 1, 2, 9, 2, 4, 4, 1, 2], 3, 1, 3) == [9, 2, 4]  # "1 2" beats the later "2"
    assert propose([5, 6, 1, 2, 9, 2, 4, 4, 1, 2], 3, 1, 1) == [4, 4, 1]  # unigram only: the latest "2"
    assert propose([1, 2, 3, 4], 4, 1, 3) == []  # nothing repeats
    assert propose([7, 7], 4, 1, 3) == [7]  # the match may overlap the suffix; the draft stops at the end
    assert propose([1, 2, 1, 2, 1, 2], 4, 2, 2) == [1, 2, 1, 2]  # in a loop, an earlier hit gives the full k
    assert propose([1, 2, 3, 1, 2], 4, 3, 3) == []  # n below ngram_min never matches
    assert propose([256, 1, 256, 1], 2, 1, 1) == [256, 1]  # the byte search keeps only whole-token hits
    assert propose([1, 0, 0, 0, 2, 1], 2, 1, 1) == [0, 0]  # 0x01 inside an int is not a token 1


def _mixed(world, n: int = 24, **kw) -> list[GenerationRequest]:
    """Base-only and every adapter, copying prompts (drafts) and a random one (few drafts), one with logprobs."""
    ids = [None] + [a.adapter_id for a in world.adapters]
    reqs = [greedy(f"copy-{i}", aid, COPY[: 20 + 3 * i], n, **kw) for i, aid in enumerate(ids)]
    reqs.append(greedy("random", ids[1], [1] + _tokens(7, 30), n, **kw))
    reqs.append(greedy("logprobs", ids[2], COPY, n, logprobs=3, **kw))
    return reqs


def _engines(world, **kw):
    plain = world.engine(speculative="off", **kw)
    spec = world.engine(speculative="ngram", **kw)
    for e in (plain, spec):
        preload(e, [a.adapter_id for a in world.adapters])
    return plain, spec


def _same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for rid, w in want.items():
        g = got[rid]
        assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason), rid
        if w.choices[0].logprobs is not None:
            for a, b in zip(g.choices[0].logprobs, w.choices[0].logprobs, strict=True):
                assert a.token_id == b.token_id
                assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
                assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]


def test_greedy_equals_plain_decoding_in_a_mixed_batch(llama_world):
    plain, spec = _engines(llama_world, enable_prefix_caching=False)
    want = run(plain, _mixed(llama_world))
    got = run(spec, _mixed(llama_world))
    _same(got, want)
    assert spec.spec_accepted_tokens > 0 and plain.spec_draft_tokens == 0
    assert spec.blocks.num_free == spec.blocks.num_blocks  # every block back, the drafted ones too

    # stops inside a draft: max_tokens, a stop token, a stop string and EOS cut at a token plain decoding
    # reaches mid-way; spec drafts run past them and must be dropped
    by_id = {r.request_id: r for r in _mixed(llama_world)}
    cut = []
    for rid, ev in want.items():
        toks = ev.token_ids
        r = by_id[rid]
        for kind, at in (("max", 7), ("stop_tok", 9), ("stop_str", 11)):
            p = r.params
            if kind == "max":
                p = dataclasses.replace(p, max_tokens=at)
            elif kind == "stop_tok":
                p = dataclasses.replace(p, stop_token_ids=(toks[at],))
            else:
                text = plain.tokenizer.decode(list(toks))
                stop = plain.tokenizer.decode(list(toks[at : at + 2]))
                if not stop.strip() or stop not in text:
                    continue
                p = dataclasses.replace(p, stop=(stop,))
            cut.append(dataclasses.replace(r, request_id=f"{rid}-{kind}", params=p))
    want_cut = run(plain, cut)
    got_cut = run(spec, [dataclasses.replace(r) for r in cut])
    _same(got_cut, want_cut)
    assert any(len(e.token_ids) < 24 for e in want_cut.values())

    # EOS (not ignored): make a token every copy answer produces the node's EOS on both engines
    eos = want["copy-1"].token_ids[8]
    plain.eos_ids = spec.eos_ids = frozenset({eos})
    eos_reqs = lambda: [  # noqa: E731
        dataclasses.replace(r, params=dataclasses.replace(r.params, ignore_eos=False)) for r in _mixed(llama_world)
    ]
    want_eos, got_eos = run(plain, eos_reqs()), run(spec, eos_reqs())
    _same(got_eos, want_eos)
    assert want_eos["copy-1"].token_ids[-1] == eos and want_eos["copy-1"].finish_reason == "stop"
    for e in (plain, spec):
        e.close()


def test_prefix_cache_and_speculation_give_plain_answers(qwen3_world):
    """Follow-up turns (prompt = an earlier prompt + its answer + a new question) read KV that speculative steps
    wrote and registered: a block registered over a rejected draft's KV, or over its newest token's (never written
    when the answer ends there), would change them. Answers end at EOS (several choices of EOS token) or at
    max_tokens, at different lengths, so some end on a block edge inside a speculative step."""
    plain, spec = _engines(qwen3_world, enable_prefix_caching=False)
    cached = qwen3_world.engine(speculative="ngram", enable_prefix_caching=True)
    preload(cached, [a.adapter_id for a in qwen3_world.adapters])
    first = _mixed(qwen3_world, n=30)
    probe = run(plain, first)
    eos_choices = [None, *dict.fromkeys(probe["copy-3"].token_ids[3:12])]
    for k, eos in enumerate(eos_choices):
        turn = [
            dataclasses.replace(
                r, request_id=f"{r.request_id}-{k}", params=dataclasses.replace(r.params, ignore_eos=eos is None)
            )
            for r in first
        ]
        for e in (plain, spec, cached):
            e.eos_ids = frozenset({eos if eos is not None else 0})
        want = run(plain, turn)
        _same(run(cached, turn), want)
        follow = [
            dataclasses.replace(
                r,
                request_id=r.request_id + "-2",
                prompt_token_ids=[*r.prompt_token_ids, *want[r.request_id].token_ids, *TURN],
            )
            for r in turn
        ]
        hits = cached.blocks.hits
        want2 = run(plain, follow)
        _same(run(cached, follow), want2)
        _same(run(spec, follow), want2)
        assert cached.blocks.hits - hits > 0
    assert cached.spec_accepted_tokens > 0
    for e in (plain, spec, cached):
        e.close()


def test_copying_prompt_accepts_drafts_in_fewer_steps(llama_world):
    engine = llama_world.engine(speculative="ngram", num_speculative_tokens=4)
    engine.add_request(greedy("c", None, COPY, 30))
    steps = 0
    while engine.has_work():
        engine.step()
        check_pool(engine)
        steps += 1
    assert engine.spec_draft_tokens > 0 and engine.spec_accepted_tokens > 0
    assert engine.spec_accepted_tokens <= engine.spec_draft_tokens
    assert steps < 30  # a prefill plus fewer decode steps than the 29 a plain run takes
    m = engine.metrics_snapshot()
    assert m["spec_accepted_tokens"] == engine.spec_accepted_tokens
    engine.close()


# ---- sampled rows: the distribution of plain sampling ----
ALLOWED = (40, 41, 42, 43)  # the vocabulary cut to four tokens (a +60 logit bias): every token is in the prompt
SAMPLES = 480  # per engine and kind: 30 requests of n = 16 sequences, each request its own seed


def _sampled_requests(tag: str, adapter_id, **kw) -> list[GenerationRequest]:
    bias = tuple((t, 60.0) for t in ALLOWED)
    prompt = [1] + [40, 41, 42, 43, 42, 41] * 3
    return [
        GenerationRequest(
            f"{tag}-{k}",
            adapter_id,
            prompt_token_ids=prompt,
            params=SamplingParams(
                n=16, max_tokens=4, temperature=1.0, seed=1000 * k + 17, logit_bias=bias, ignore_eos=True, **kw
            ),
        )
        for k in range(SAMPLES // 16)
    ]


def _chi_square_p(a: list[tuple], b: list[tuple]) -> float:
    """Two-sample chi-square test of homogeneity over the outcomes of a and b (cells with few counts pooled)."""
    from collections import Counter

    ca, cb = Counter(a), Counter(b)
    cells = sorted(set(ca) | set(cb), key=lambda c: -(ca[c] + cb[c]))
    big = [c for c in cells if ca[c] + cb[c] >= 10]
    rest = [c for c in cells if c not in big]
    rows = [(ca[c], cb[c]) for c in big] + ([(sum(ca[c] for c in rest), sum(cb[c] for c in rest))] if rest else [])
    na, nb = len(a), len(b)
    stat = 0.0
    for x, y in rows:
        tot = x + y
        for obs, n in ((x, na), (y, nb)):
            exp = tot * n / (na + nb)
            stat += (obs - exp) ** 2 / exp
    df = len(rows) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))


@pytest.mark.parametrize(
    "extra",
    [pytest.param({}, id="temperature"), pytest.param({"frequency_penalty": 1.5, "top_k": 3}, id="penalty-topk")],
)
def test_sampled_outputs_follow_plain_sampling(llama_world, extra):
    """Joint (token 2, token 3, token 4) frequencies, which speculative steps produce (the prefill's token 1 is
    drawn as always), against plain decoding's; seeds are fixed, so the test is deterministic. A verifier that
    accepted every draft, or rejected without removing the draft, fails it by a wide margin."""
    aid = llama_world.adapters[0].adapter_id
    plain, spec = _engines(llama_world, num_kv_blocks=512, max_num_seqs=96, ngram_min=1)
    out = {}
    for name, e in (("plain", plain), ("spec", spec)):
        done = run(e, _sampled_requests(name, aid, **extra), check=False)
        out[name] = [c.token_ids[1:] for ev in done.values() for c in ev.choices]
        assert all(len(c) == 3 and set(c) <= set(ALLOWED) for c in out[name])
    assert spec.spec_draft_tokens > SAMPLES and 0 < spec.spec_accepted_tokens < spec.spec_draft_tokens
    assert _chi_square_p(out["spec"], out["plain"]) > 1e-3
    for e in (plain, spec):
        e.close()
