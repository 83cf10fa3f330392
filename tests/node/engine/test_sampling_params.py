"""The OpenAI/vLLM sampling parameters: logit_bias, min_tokens, presence/frequency/repetition penalties, min_p,
stop_token_ids; each checked against a plain per-row reference on the logits, on both samplers (the per-row CPU
one and the batched device one, run here on CPU tensors), in batches that mix them with plain rows."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from node.engine import FinishEvent, GenerationRequest, RequestError, SamplingParams
from node.engine.layers.logits_processor import process_logits
from node.engine.layers.sampler import draw_on_device, sample, sample_batched, sample_on_device
from tests.utils.engine import greedy

EOS = (2,)
V = 40


def reference(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """One row, token by token, as the OpenAI/HF/vLLM documents state it."""
    out = logits.clone().double()
    for t, b in p.logit_bias:
        out[t] += b
    if len(output) < p.min_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else set(EOS)):
            out[t] = -math.inf
    if p.allowed_token_ids is not None:
        for t in set(range(len(out))) - set(p.allowed_token_ids):
            out[t] = -math.inf
    for w in p.bad_words:
        before = list(w[:-1])
        if len(before) <= len(output) and output[len(output) - len(before) :] == before:
            out[w[-1]] = -math.inf
    for t in set(prompt) | set(output):
        if out[t] > 0:
            out[t] /= p.repetition_penalty
        else:
            out[t] *= p.repetition_penalty
    for t in set(output):
        out[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return out.float()


ROWS = [
    (SamplingParams(temperature=0), [1, 2], [3]),  # plain
    (SamplingParams(logit_bias={5: 7.5, 9: -100}), [1], []),
    (SamplingParams(min_tokens=2, stop_token_ids=(11, 12)), [4], [5]),
    (SamplingParams(min_tokens=2, stop_token_ids=(11,), ignore_eos=True), [4], [5]),
    (SamplingParams(min_tokens=1), [4], [5]),  # already past min_tokens: nothing banned
    (SamplingParams(presence_penalty=1.5, frequency_penalty=-0.5), [7, 8], [3, 3, 3, 6, 7]),
    (SamplingParams(repetition_penalty=1.7), [7, 8, 8], [3, 9]),
    (
        SamplingParams(repetition_penalty=0.6, presence_penalty=-2, frequency_penalty=2, logit_bias={3: 1.0}),
        [1, 2, 3],
        [3, 3, 20, 21],
    ),
    (SamplingParams(allowed_token_ids=(17, 3, 9, 3)), [1], []),
    (
        SamplingParams(allowed_token_ids=(2, 5, 30), logit_bias={5: 3.0, 7: 50}, repetition_penalty=1.3, min_tokens=3),
        [5],
        [5, 30],
    ),
    # bad words: one-token (4), completed by the output's end (3 5 -> 6; 5 -> 7), not (9 3 -> 8: the output ends
    # 3 5; 1 2 -> 10: only in the prompt), and one longer than the output (3 5 5 5 -> 11)
    (SamplingParams(bad_words=[(4,), (3, 5, 6), (5, 7), (9, 3, 8), (1, 2, 10), (3, 5, 5, 5, 11)]), [1, 2], [3, 5]),
    (SamplingParams(bad_words=[(6, 12)], repetition_penalty=1.2), [6], []),  # nothing generated yet: none
    (SamplingParams(temperature=0.5), [1], [2, 2]),  # plain
]


def batch(seed=0):
    logits = torch.randn(len(ROWS), V, generator=torch.Generator().manual_seed(seed)) * 3
    params = [r[0] for r in ROWS]
    return logits, params, [r[1] for r in ROWS], [r[2] for r in ROWS]


def test_each_processor_matches_the_reference_in_a_mixed_batch():
    logits, params, prompts, outputs = batch()
    before = logits.clone()
    got = process_logits(logits, params, prompts, outputs, EOS)
    assert torch.equal(logits, before)  # the caller's logits are left alone
    for i, (p, prompt, output) in enumerate(ROWS):
        assert torch.allclose(got[i], reference(logits[i], p, prompt, output), atol=1e-5), i
    # the rows that ask nothing are untouched, exactly
    assert torch.equal(got[0], logits[0]) and torch.equal(got[-1], logits[-1])
    assert got[2, 11] == got[2, 12] == got[2, 2] == -math.inf and got[3, 2] != -math.inf
    # allowed ids: every other id is out, the bias of one not allowed (7) included; min_tokens bans the end (2)
    assert torch.isfinite(got[-5]).nonzero().flatten().tolist() == [3, 9, 17]
    assert torch.isfinite(got[-4]).nonzero().flatten().tolist() == [5, 30]
    assert (~torch.isfinite(got[-3])).nonzero().flatten().tolist() == [4, 6, 7]
    assert torch.isfinite(got[-2]).all()


def test_a_prompt_given_as_its_distinct_ids_is_penalized_as_its_list_is():
    """The engine gives each row's prompt as the tensor of its distinct ids a sequence makes once
    (Sequence.prompt_seen): the list copied and made a tensor at each step cost 16 rows of a 32k-token prompt 80 ms
    a step (complexity red team). The penalty is the list's."""
    logits, params, prompts, outputs = batch(2)
    as_ids = [torch.unique(torch.tensor(p, dtype=torch.int64)) for p in prompts]
    assert torch.equal(
        process_logits(logits, params, as_ids, outputs, EOS), process_logits(logits, params, prompts, outputs, EOS)
    )


def test_a_sequence_makes_its_prompts_distinct_ids_once():
    from node.engine.sequence import Sequence

    seq = Sequence("r", None, [5, 3, 5, 9, 3], SamplingParams(repetition_penalty=1.2), None, torch.device("cpu"), 0)
    assert seq.prompt_seen().tolist() == [3, 5, 9] and seq.prompt_seen() is seq.prompt_seen()


def test_plain_rows_cost_nothing():
    logits = torch.randn(4, V)
    plain = [SamplingParams(), SamplingParams(temperature=0, top_k=3, min_p=0.2)] * 2
    assert process_logits(logits, plain, None, None, EOS) is logits


def test_both_samplers_pick_the_processed_argmax_and_greedy_rows_ignore_their_neighbours():
    logits, params, prompts, outputs = batch(1)
    greedy_params = [SamplingParams(**{**_kwargs(p), "temperature": 0}) for p in params]
    want = [int(reference(logits[i], p, prompts[i], outputs[i]).argmax()) for i, p in enumerate(greedy_params)]
    gens = [torch.Generator() for _ in params]
    assert sample(logits, greedy_params, gens, prompts=prompts, outputs=outputs, eos_ids=EOS) == want
    steps = list(range(len(params)))
    assert sample_on_device(logits, greedy_params, steps, steps, prompts=prompts, outputs=outputs, eos_ids=EOS) == want
    # a greedy row's token is the same alone and beside sampled, penalized, biased rows
    mixed = [greedy_params[5]] + params
    alone = sample(logits[5:6], [greedy_params[5]], gens[:1], prompts=prompts[5:6], outputs=outputs[5:6], eos_ids=EOS)
    lg = torch.cat([logits[5:6], logits])
    both = sample(
        lg,
        mixed,
        [torch.Generator() for _ in mixed],
        prompts=prompts[5:6] + prompts,
        outputs=outputs[5:6] + outputs,
        eos_ids=EOS,
    )
    assert both[0] == alone[0] == want[5]
    dev = draw_on_device(
        lg,
        mixed,
        list(range(len(mixed))),
        [0] * len(mixed),
        prompts=prompts[5:6] + prompts,
        outputs=outputs[5:6] + outputs,
        eos_ids=EOS,
    )
    assert int(dev[0]) == want[5]


def _kwargs(p: SamplingParams) -> dict:
    return {f.name: getattr(p, f.name) for f in dataclasses.fields(SamplingParams) if f.init}


def test_a_biased_token_is_drawn_and_a_banned_one_never():
    logits = torch.zeros(300, V)
    sure = SamplingParams(temperature=1.0, logit_bias={17: 100})
    never = SamplingParams(temperature=1.0, logit_bias={t: -100 for t in range(V) if t != 4})
    params = [sure, never] * 150
    gens = [torch.Generator().manual_seed(i) for i in range(300)]
    got = sample(logits, params, gens)
    assert set(got[0::2]) == {17} and set(got[1::2]) == {4}
    got = sample_on_device(logits, params, list(range(300)), [0] * 300)
    assert set(got[0::2]) == {17} and set(got[1::2]) == {4}


@pytest.mark.parametrize("sampler", ["per-row", "batched"])
def test_min_p_keeps_the_tokens_at_least_min_p_times_the_best(sampler):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.log(probs).expand(2000, -1).contiguous()
    n = logits.shape[0]
    if sampler == "per-row":
        p = SamplingParams(temperature=1.0, min_p=0.35)  # 0.35 * 0.5 = 0.175: keeps 0.5 and 0.3
        got = sample(logits, [p] * n, [torch.Generator().manual_seed(i) for i in range(n)])
    else:
        f = lambda x: torch.full((n,), x, dtype=torch.float64)  # noqa: E731
        got = sample_batched(
            logits,
            f(1.0),
            torch.zeros(n, dtype=torch.int64),
            f(1.0),
            torch.arange(n),
            torch.zeros(n, dtype=torch.int64),
            f(0.35),
        ).tolist()
    assert set(got) == {0, 1}
    share = got.count(0) / n
    assert abs(share - 0.5 / 0.8) < 0.05, share  # renormalised over what is kept


def test_seeded_draws_with_every_processor_repeat():
    logits, params, prompts, outputs = batch(2)
    hot = [SamplingParams(**{**_kwargs(p), "temperature": 0.9, "top_k": 20, "min_p": 0.01}) for p in params]
    kw = dict(prompts=prompts, outputs=outputs, eos_ids=EOS)

    def cpu():
        return sample(logits, hot, [torch.Generator().manual_seed(i) for i in range(len(hot))], **kw)

    assert cpu() == cpu()
    seeds = [(1 << 64) - 1 - i for i in range(len(hot))]
    assert sample_on_device(logits, hot, seeds, [3] * len(hot), **kw) == sample_on_device(
        logits, hot, seeds, [3] * len(hot), **kw
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"presence_penalty": 2.5}, "presence_penalty must be a number in \\[-2, 2\\]"),
        ({"frequency_penalty": -3}, "frequency_penalty must be"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty must be"),
        ({"repetition_penalty": 0}, "repetition_penalty must be a number in \\(0, 2\\]"),
        ({"repetition_penalty": 2.01}, "repetition_penalty must be"),
        ({"min_p": 1.5}, "min_p must be"),
        ({"min_p": -0.1}, "min_p must be"),
        ({"min_tokens": 17}, "min_tokens must be an integer in \\[0, 16\\]"),
        ({"min_tokens": -1}, "min_tokens must be"),
        ({"logit_bias": {5: 101}}, "logit_bias\\[5\\] must be a number in \\[-100, 100\\]"),
        ({"logit_bias": {-1: 1}}, "logit_bias keys must be token ids"),
        ({"logit_bias": {i: 1 for i in range(301)}}, "logit_bias holds 301 entries; at most 300"),
        ({"stop_token_ids": tuple(range(17))}, "stop_token_ids must be at most 16"),
        ({"stop_token_ids": (-3,)}, "stop_token_ids must be"),
        ({"logprobs": 21}, "logprobs must be an integer in \\[0, 20\\]"),
        ({"logprobs": -1}, "logprobs must be"),
        ({"prompt_logprobs": 21}, "prompt_logprobs must be"),
        ({"n": 0}, "n must be an integer in \\[1, 16\\]"),
        # a top_k past int64 (or float32's integers) failed the whole engine step, every row beside it too
        ({"top_k": 2**63}, "top_k must be an integer in \\[0, 2147483647\\]"),
        ({"top_k": 10**400}, "top_k must be"),
        ({"top_k": -1}, "top_k must be"),
        ({"n": 17}, "n must be"),
        ({"guided": {"type": "json_object"}}, "guided must be a GuidedSpec"),
        ({"allowed_token_ids": ()}, "allowed_token_ids must be 1 to 4096 token ids"),
        ({"allowed_token_ids": (3, -1)}, "allowed_token_ids must be"),
        ({"allowed_token_ids": (True,)}, "allowed_token_ids must be"),
        ({"allowed_token_ids": tuple(range(4097))}, "allowed_token_ids must be 1 to 4096"),
        ({"bad_words": [()]}, "bad_words must be at most 128 non-empty"),
        ({"bad_words": [(1, -2)]}, "bad_words must be"),
        ({"bad_words": [(1,)] * 129}, "bad_words must be at most 128"),
        ({"bad_words": [tuple(range(2049))] * 2}, "4096 ids in all"),
    ],
)
def test_bad_new_params_are_refused(kwargs, message):
    with pytest.raises(RequestError, match=message):
        SamplingParams(**kwargs)


def test_good_params_are_kept():
    p = SamplingParams(logit_bias={9: 1, 3: -2.5}, stop_token_ids=[4, 5], logprobs=0, prompt_logprobs=20, n=16)
    assert p.logit_bias == ((3, -2.5), (9, 1.0)) and p.stop_token_ids == (4, 5)
    assert p.processed and not p.penalized and not SamplingParams().processed
    allowed = SamplingParams(allowed_token_ids=[9, 3, 9])
    assert allowed.allowed_token_ids == (3, 9) and allowed.processed and allowed.token_ids() == [3, 9]
    words = SamplingParams(bad_words=[[4, 5], (6,)])
    assert words.bad_words == ((4, 5), (6,)) and words.processed and words.token_ids() == [4, 5, 6]


# ---- through the engine ----


def test_stop_token_ids_end_a_sequence_with_stop_and_min_tokens_hold_it_back(llama_world):
    engine = llama_world.engine()
    try:
        ids = [1, 5, 6, 7]
        free = engine.generate([greedy("free", None, ids, 8)])["free"]
        stop_at = free.token_ids[3]
        first = free.token_ids.index(stop_at)
        got = engine.generate([greedy("stop", None, ids, 8, stop_token_ids=(stop_at,))])["stop"]
        assert got.finish_reason == "stop" and got.token_ids == free.token_ids[: first + 1]
        # min_tokens: the stop token cannot come before it (so the greedy path changes at `first`)
        held = engine.generate([greedy("held", None, ids, 8, stop_token_ids=(stop_at,), min_tokens=first + 2)])["held"]
        assert stop_at not in held.token_ids[: first + 2] and len(held.token_ids) >= first + 2
        with pytest.raises(RequestError, match="not in the vocabulary"):
            engine.add_request(greedy("bad", None, ids, 4, logit_bias={10**6: 1.0}))
    finally:
        engine.close()


def test_a_bad_word_is_never_completed(llama_world):
    """vLLM's bad_words as token sequences through the engine: the greedy path's first two tokens as a bad word,
    the path turns away where it would complete it; a one-token bad word never comes."""
    engine = llama_world.engine()
    try:
        ids = [1, 5, 6, 7]
        free = engine.generate([greedy("free", None, ids, 10)])["free"].token_ids
        word = tuple(free[:2])
        got = engine.generate([greedy("banned", None, ids, 10, bad_words=[word])])["banned"].token_ids
        assert got[0] == free[0] and got[1] != free[1]
        assert all(tuple(got[i : i + 2]) != word for i in range(len(got) - 1))
        one = engine.generate([greedy("one", None, ids, 10, bad_words=[(free[0],)])])["one"].token_ids
        assert free[0] not in one
    finally:
        engine.close()


def test_allowed_token_ids_are_the_only_tokens_drawn(llama_world):
    """vLLM's allowed_token_ids through the engine: greedy and sampled sequences draw only the listed ids (the
    end token among them only where listed), beside a free row whose tokens are those it draws alone."""
    engine = llama_world.engine()
    try:
        ids = [1, 5, 6, 7]
        free = engine.generate([greedy("free", None, ids, 12)])["free"]
        allowed = tuple(t for t in range(40, 60) if t not in free.token_ids)
        reqs = [greedy("only", None, ids, 12, allowed_token_ids=allowed), greedy("free2", None, ids, 12)]
        reqs += [
            GenerationRequest(
                f"s{i}",
                None,
                prompt_token_ids=ids,
                params=SamplingParams(max_tokens=12, seed=i, allowed_token_ids=allowed),
            )
            for i in range(3)
        ]
        got = engine.generate(reqs)
        assert got["free2"].token_ids == free.token_ids
        for rid in ("only", "s0", "s1", "s2"):
            assert len(got[rid].token_ids) == 12 and set(got[rid].token_ids) <= set(allowed), got[rid]
        assert len({tuple(got[f"s{i}"].token_ids) for i in range(3)}) > 1  # sampled: the list constrains only
        with pytest.raises(RequestError, match="allowed_token_ids is not in the vocabulary"):
            engine.add_request(greedy("bad", None, ids, 4, allowed_token_ids=(3, 10**6)))
    finally:
        engine.close()


@pytest.mark.parametrize("sampler", ["per-row", "batched"])
def test_untruncated_rows_draw_unsorted_with_the_right_frequencies_whatever_their_neighbours(sampler):
    probs = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.05])
    n = 6000
    logits = torch.log(probs).expand(n, -1).contiguous()
    plain = SamplingParams(temperature=1.0)
    cut = SamplingParams(temperature=1.0, top_k=2)
    mixed = [plain if i % 2 else cut for i in range(n)]

    def draw(params):
        if sampler == "per-row":
            return sample(logits, params, [torch.Generator().manual_seed(i) for i in range(n)])
        return sample_on_device(logits, params, list(range(n)), [0] * n)

    got = draw([plain] * n)
    freq = torch.bincount(torch.tensor(got), minlength=5).double() / n
    assert (freq - probs.double()).abs().max() < 0.02, freq
    both = draw(mixed)
    assert both[1::2] == got[1::2]  # a plain row draws the same beside rows that sort
    assert set(both[0::2]) == {1, 3}


def test_a_request_that_breaks_the_sampler_fails_alone(llama_world):
    # parameters past every check (here a top_k no float holds, set behind SamplingParams' back, as a check
    # that missed one would let through) made the whole step fail: every request batched beside it ended with
    # an error. The step samples its requests one by one after such a failure, from where the failed try
    # started: a seeded request draws what it draws alone, a guided one reports the model's own log-probs.
    from node.engine.grammar import GuidedSpec

    engine = llama_world.engine()
    guided = GuidedSpec.from_wire({"type": "json_object"})

    def victims(tag: str) -> list[GenerationRequest]:
        seeded = SamplingParams(max_tokens=6, temperature=1.0, seed=7, ignore_eos=True)
        shaped = SamplingParams(max_tokens=6, temperature=1.0, seed=8, guided=guided, logprobs=3)
        two = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, n=2)
        return [
            greedy(f"greedy{tag}", None, [1, 2, 3], 6),
            GenerationRequest(f"seeded{tag}", None, prompt_token_ids=[9, 8, 7], params=seeded),
            GenerationRequest(f"guided{tag}", None, prompt_token_ids=[5, 6], params=shaped),
            GenerationRequest(f"two{tag}", None, prompt_token_ids=[7, 8], params=two),
        ]

    try:
        alone = engine.generate(victims(""))
        hot = SamplingParams(max_tokens=6, temperature=1.0, top_p=0.9, ignore_eos=True)
        object.__setattr__(hot, "top_k", 10**400)
        rogue = GenerationRequest("rogue", None, prompt_token_ids=[4, 5, 6], params=hot)
        done = engine.generate([rogue, *victims("-beside")])
        assert done["rogue"].finish_reason == "error" and "OverflowError" in done["rogue"].error
        for rid, want in alone.items():
            got = done[f"{rid}-beside"]
            assert got.error is None and got.token_ids == want.token_ids, rid
            assert [c.token_ids for c in got.choices] == [c.token_ids for c in want.choices], rid
        lps = [
            [(e.token_id, e.logprob) for e in fin.choices[0].logprobs]
            for fin in (alone["guided"], done["guided-beside"])
        ]
        assert lps[0] == lps[1] and all(lp > -1e9 for _, lp in lps[0])
    finally:
        engine.close()


REPEAT = [5, 6, 7, 8, 9, 10, 11, 12] * 6  # a prompt the n-gram drafter finds drafts in


def _beside_a_rogue(engine, tag: str, poison_before: int | None = None, also=None):
    """A rogue, a greedy and a seeded sampled request together (the last two draft: their prompt repeats itself):
    their ends, and the steps that drafted. Just before step `poison_before` the rogue's top_k is set past every
    check (prefill steps never draft), and `also()` is called."""
    hot = SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True)
    seeded = SamplingParams(max_tokens=30, temperature=0.5, seed=3, ignore_eos=True)
    for r in (
        GenerationRequest(f"rogue{tag}", None, prompt_token_ids=[1, 2, 3], params=hot),
        greedy(f"greedy{tag}", None, REPEAT, 30),
        GenerationRequest(f"seeded{tag}", None, prompt_token_ids=REPEAT, params=seeded),
    ):
        engine.add_request(r)
    done, drafting, step = {}, [], 0
    while engine.has_work():
        if step == poison_before:
            object.__setattr__(hot, "top_k", 10**400)
            if also is not None:
                also()
        drafted = engine.spec_draft_tokens
        done |= {e.request_id: e for e in engine.step()[0] if isinstance(e, FinishEvent)}
        if engine.spec_draft_tokens > drafted:
            drafting.append(step)
        step += 1
    return done, drafting


def test_a_request_that_breaks_the_sampler_fails_alone_in_a_drafting_step(llama_world):
    # red team: a step where any row drafts (speculative "ngram", the default) sampled and verified its whole batch
    # at once, outside the retry request by request above: from its decoding steps on, a rogue request failed
    # every request batched beside it. Here it fails in the first step in which the others draft (found by a first
    # run of the same requests: their drafts follow their own tokens). The seeded one draws what it draws alone.
    engine = llama_world.engine(num_kv_blocks=256)
    try:
        clean, drafting = _beside_a_rogue(engine, "")
        assert drafting and drafting[0] > 0 and all(v.error is None for v in clean.values())
        done, _ = _beside_a_rogue(engine, "-beside", poison_before=drafting[0])
        rogue = done["rogue-beside"]
        assert rogue.finish_reason == "error" and "OverflowError" in rogue.error
        assert len(rogue.token_ids) == len(clean["rogue"].token_ids[: drafting[0]])  # it failed in that step
        for rid in ("greedy", "seeded"):
            got = done[f"{rid}-beside"]
            assert got.error is None and got.token_ids == clean[rid].token_ids, rid
    finally:
        engine.close()


def test_a_request_failed_apart_is_ended_even_when_its_step_then_fails(llama_world, monkeypatch):
    # review: the drafting step ended the rogue (its group gone from the engine) in an expression the step's
    # emission then broke off: its end event was dropped, and its client waited for an answer that never came
    engine = llama_world.engine(num_kv_blocks=256)
    try:
        _, drafting = _beside_a_rogue(engine, "")

        def broken_emission() -> None:
            def emit(s, t, lp):
                monkeypatch.undo()  # once: the step fails, the engine goes on
                raise RuntimeError("emission failed")

            monkeypatch.setattr(engine, "_emit", emit)

        done, _ = _beside_a_rogue(engine, "-b", poison_before=drafting[0], also=broken_emission)
        assert "OverflowError" in done["rogue-b"].error and "emission failed" in done["greedy-b"].error
        assert set(done) == {"rogue-b", "greedy-b", "seeded-b"} and not engine.requests
    finally:
        engine.close()
