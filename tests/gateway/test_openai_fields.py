"""Every OpenAI / vLLM field the gateway takes, through the official openai client against a real gateway and a
real tiny-model node (random weights): each is honoured (and shown to change the answer as it should) or refused
by name. Also: n with seeds, a list of prompts, best_of, logprobs whole and streamed, echo, structured output,
the context's limits, and that the oai's usage, the node's receipt and the usage row agree."""

from __future__ import annotations

import openai
import pytest
from sqlmodel import Session

from common.wire import MAX_GBNF_CHARS, MAX_GUIDED_GRAMMAR_CHARS
from gateway.tables import CompletionRecord, RequestStatus
from ledger.models import RecordStatus
from tests.gateway import TINY
from tests.gateway.conftest import MESSAGES, PROMPT, agree, chat, complete, refused, usage_row

pytestmark = pytest.mark.integration

EOS = 2  # the tiny bases' </s>


# ---- fields that were silently ignored: each honoured, or refused by name ----------------------------------


def test_top_k_one_is_greedy(oai):
    greedy = complete(oai, temperature=0).choices[0].text
    assert complete(oai, temperature=1, seed=5, extra_body={"top_k": 1}).choices[0].text == greedy
    assert complete(oai, temperature=1, seed=5, extra_body={"min_p": 1.0}).choices[0].text == greedy
    # without either, the same seed samples something else (the check above is not greedy by chance)
    assert (
        complete(oai, temperature=1.5, seed=5, max_tokens=16).choices[0].text
        != complete(oai, temperature=0, max_tokens=16).choices[0].text
    )


def test_eos_min_tokens_ignore_eos_and_stop_token_ids(oai):
    eos = {"logit_bias": {str(EOS): 100}, "temperature": 0}
    first = complete(oai, **eos)
    assert first.usage.completion_tokens == 1 and first.choices[0].text == ""  # EOS counted, not shown
    assert first.choices[0].finish_reason == "stop"
    held = complete(oai, **eos, extra_body={"min_tokens": 5})
    assert held.usage.completion_tokens >= 5 and held.choices[0].finish_reason == "stop"
    on = complete(oai, **eos, extra_body={"ignore_eos": True})
    assert on.usage.completion_tokens == 8 and on.choices[0].finish_reason == "length"
    # a stop token ends the answer (counted, its text not shown)
    x = complete(oai, temperature=0, logit_bias={"300": 100}, extra_body={"stop_token_ids": [300]})
    assert (x.usage.completion_tokens, x.choices[0].text, x.choices[0].finish_reason) == (1, "", "stop")
    refused(lambda: complete(oai, extra_body={"min_tokens": 9}), "min_tokens")
    refused(lambda: complete(oai, logit_bias={"100000": 1}), "logit_bias")
    refused(lambda: complete(oai, extra_body={"stop_token_ids": [100000]}), "stop_token_ids")


def test_stop_reason_names_the_stop_token_id_or_string(served, oai):
    """vLLM's stop_reason: the stop token id or stop string that ended a choice, whole and streamed, else None;
    the node names the string, and the gateway holds it to the tokens (the usage row is not disputed)."""

    def reason(choice):
        return choice.model_extra["stop_reason"]

    eos = complete(oai, temperature=0, logit_bias={str(EOS): 100})
    assert (eos.choices[0].finish_reason, reason(eos.choices[0])) == ("stop", None)
    # an end token listed as a stop id too is still the end token (vLLM's order)
    both = complete(oai, temperature=0, logit_bias={str(EOS): 100}, extra_body={"stop_token_ids": [EOS]})
    assert reason(both.choices[0]) is None
    by_id = complete(oai, temperature=0, logit_bias={"300": 100}, extra_body={"stop_token_ids": [7, 300]})
    assert reason(by_id.choices[0]) == 300
    greedy = complete(oai, temperature=0, max_tokens=16).choices[0].text
    assert reason(complete(oai, temperature=0, max_tokens=16).choices[0]) is None  # length
    stop = next(greedy[i : i + 2] for i in range(4, len(greedy) - 1) if greedy[i : i + 2].strip())
    ask = dict(temperature=0, max_tokens=16, stop=["\x01never", stop])
    whole = agree(served, oai.completions.with_raw_response.create(model=TINY, prompt=PROMPT, **ask))
    assert whole.choices[0].text == greedy[: greedy.index(stop)] and reason(whole.choices[0]) == stop
    chunks = list(complete(oai, stream=True, **ask))
    ends = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    assert [(c.finish_reason, reason(c)) for c in ends] == [("stop", stop)]
    # vLLM's include_stop_str_in_output: the text ends with the stop string, whole and streamed
    keep = {"extra_body": {"include_stop_str_in_output": True}}
    kept = agree(served, oai.completions.with_raw_response.create(model=TINY, prompt=PROMPT, **ask, **keep))
    assert kept.choices[0].text == greedy[: greedy.index(stop) + len(stop)] and reason(kept.choices[0]) == stop
    streamed = "".join(c.choices[0].text for c in complete(oai, stream=True, **ask, **keep) if c.choices)
    assert streamed == kept.choices[0].text
    said = chat(oai, temperature=0, max_tokens=16).choices[0].message.content
    cut = next(said[i : i + 2] for i in range(2, len(said) - 1) if said[i : i + 2].strip())
    answer = chat(oai, temperature=0, max_tokens=16, stop=[cut])
    assert answer.choices[0].message.content == said[: said.index(cut)] and reason(answer.choices[0]) == cut
    answer = chat(oai, temperature=0, max_tokens=16, stop=[cut], extra_body={"include_stop_str_in_output": True})
    assert answer.choices[0].message.content == said[: said.index(cut) + len(cut)]


def test_truncate_prompt_tokens_keeps_each_prompts_last_tokens(served, oai, tokenizer):
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens, answered and billed as that prompt would be."""
    ids, keep = list(range(5, 25)), {"extra_body": {"truncate_prompt_tokens": 4}}
    ask = dict(model=TINY, prompt=ids, max_tokens=8, temperature=0)
    cut = agree(served, oai.completions.with_raw_response.create(**ask, **keep))
    assert cut.usage.prompt_tokens == 4
    assert cut.choices[0].text == complete(oai, prompt=ids[-4:], temperature=0).choices[0].text
    assert (
        complete(oai, prompt=ids, echo=True, max_tokens=1, **keep)
        .choices[0]
        .text.startswith(tokenizer.decode(ids[-4:]))
    )
    as_text = complete(oai, prompt=[PROMPT, PROMPT + PROMPT], **keep)  # each prompt of a list, text too
    assert as_text.usage.prompt_tokens == 8
    assert complete(oai, prompt=ids, extra_body={"truncate_prompt_tokens": -1}).usage.prompt_tokens == len(ids)
    assert chat(oai, extra_body={"truncate_prompt_tokens": 3}).usage.prompt_tokens == 3
    # a text longer than the context is cut, not refused as too long before it is tokenized (review)
    long, cut = "word " * 2000, {"extra_body": {"truncate_prompt_tokens": 100}}
    assert complete(oai, prompt=long, **cut).usage.prompt_tokens == 100
    assert chat(oai, messages=[{"role": "user", "content": long}], **cut).usage.prompt_tokens == 100
    refused(lambda: complete(oai, extra_body={"truncate_prompt_tokens": 0}), "truncate_prompt_tokens")
    assert "maximum context length" in refused(
        lambda: complete(oai, extra_body={"truncate_prompt_tokens": 10**6}), "truncate_prompt_tokens"
    )


def test_service_tier_is_answered_with_the_tier_that_served(oai):
    assert chat(oai, service_tier="auto").service_tier == "default"
    assert chat(oai).service_tier is None  # named only where the request named it, as OpenAI's
    chunks = list(chat(oai, service_tier="default", stream=True))
    assert chunks and {c.service_tier for c in chunks} == {"default"}


def test_vllms_defaults_are_taken_and_the_other_values_refused_by_name(oai):
    """priority 0, skip_special_tokens true, spaces_between_special_tokens (no effect with a fast tokenizer) and
    add_special_tokens as each endpoint adds them: vLLM's defaults, the answer as without them (they were refused as
    unknown fields). Any other value is refused by name."""
    vllm = {"priority": 0, "skip_special_tokens": True, "spaces_between_special_tokens": False}
    greedy = complete(oai, temperature=0)
    got = complete(oai, temperature=0, extra_body=vllm | {"add_special_tokens": True})
    assert (got.choices[0].text, got.usage.prompt_tokens) == (greedy.choices[0].text, greedy.usage.prompt_tokens)
    greedy = chat(oai, temperature=0)
    got = chat(oai, temperature=0, extra_body=vllm | {"add_special_tokens": False})
    assert (got.choices[0].message.content, got.usage.prompt_tokens) == (
        greedy.choices[0].message.content,
        greedy.usage.prompt_tokens,
    )
    refused(lambda: complete(oai, extra_body={"priority": 1}), "priority")
    refused(lambda: chat(oai, extra_body={"priority": -5}), "priority")
    refused(lambda: complete(oai, extra_body={"add_special_tokens": False}), "add_special_tokens")
    refused(lambda: chat(oai, extra_body={"add_special_tokens": True}), "add_special_tokens")
    refused(lambda: chat(oai, extra_body={"priority": "0"}), "priority")  # strict, as every field


def test_skip_special_tokens_false_writes_their_text_but_the_end_tokens(served, oai):
    """vLLM's skip_special_tokens false (refused before): special tokens' text in the answer, whole and streamed,
    the end token's left out as vLLM leaves it; the gateway's check of the node's text decodes as the node did (the
    usage row is not disputed)."""
    bos = {"logit_bias": {"1": 100}, "temperature": 0, "max_tokens": 3}  # <s>, a special token, drawn each step
    shown = {"skip_special_tokens": False}
    got = agree(served, oai.completions.with_raw_response.create(model=TINY, prompt=PROMPT, **bos, extra_body=shown))
    assert got.choices[0].text == "<s><s><s>" and got.choices[0].finish_reason == "length"
    assert complete(oai, **bos).choices[0].text == ""  # the default: left out
    streamed = complete(oai, **bos, stream=True, extra_body=shown)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == "<s><s><s>"
    reply = agree(
        served, oai.chat.completions.with_raw_response.create(model=TINY, messages=MESSAGES, **bos, extra_body=shown)
    )
    assert reply.choices[0].message.content == "<s><s><s>"
    # the end token ends the answer without its text, shown or not
    eos = {"logit_bias": {str(EOS): 100}, "temperature": 0}
    got = agree(served, oai.completions.with_raw_response.create(model=TINY, prompt=PROMPT, **eos, extra_body=shown))
    assert (got.choices[0].text, got.choices[0].finish_reason, got.usage.completion_tokens) == ("", "stop", 1)


def test_penalties_change_a_greedy_answer(oai):
    greedy = complete(oai, temperature=0, max_tokens=24).choices[0].text
    for field in ({"presence_penalty": 2}, {"frequency_penalty": 2}, {"extra_body": {"repetition_penalty": 2.0}}):
        assert complete(oai, temperature=0, max_tokens=24, **field).choices[0].text != greedy, field


def test_refused_by_name(oai):
    refused(lambda: chat(oai, functions=[{"name": "f"}]), "functions")
    refused(lambda: chat(oai, tool_choice="auto"), "tool_choice")
    refused(lambda: chat(oai, stream_options={"include_usage": True}), "stream_options")
    refused(lambda: complete(oai, stream_options={"include_usage": True}), "stream_options")
    refused(lambda: chat(oai, top_logprobs=2), "top_logprobs")
    refused(lambda: complete(oai, suffix="!"), "suffix")
    refused(lambda: complete(oai, best_of=2, stream=True), "best_of")
    refused(lambda: complete(oai, extra_body={"use_beam_search": True}), "use_beam_search")
    refused(lambda: chat(oai, extra_body={"reasoning_effort": "low"}), "reasoning_effort")


# ---- n, lists of prompts, best_of, and their billing ----------------------------------------------------


def test_n_with_a_seed_is_reproducible_and_billed_as_relayed(served, oai):
    ask = dict(n=3, seed=11, temperature=1.0, max_tokens=10)
    one = agree(served, oai.completions.with_raw_response.create(model=TINY, prompt=PROMPT, **ask))
    again = complete(oai, **ask)
    texts = [c.text for c in one.choices]
    assert [c.index for c in one.choices] == [0, 1, 2] and texts == [c.text for c in again.choices]
    assert len(set(texts)) > 1
    assert one.usage.prompt_tokens == complete(oai, max_tokens=1).usage.prompt_tokens  # the prompt once
    c = agree(served, oai.chat.completions.with_raw_response.create(model=TINY, messages=MESSAGES, **ask))
    assert len({x.message.content for x in c.choices}) > 1 and len(c.choices) == 3


def test_a_list_of_prompts(served, oai):
    prompts = [PROMPT, "Hello world"]
    got = agree(
        served,
        oai.completions.with_raw_response.create(model=TINY, prompt=prompts, n=2, temperature=0, max_tokens=6),
    )
    alone = [complete(oai, prompt=p, temperature=0, max_tokens=6) for p in prompts]
    assert [c.text for c in got.choices] == [alone[0].choices[0].text] * 2 + [alone[1].choices[0].text] * 2
    assert got.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    ids = [[1, 70, 71], [1, 72]]
    assert len(complete(oai, prompt=ids, max_tokens=2).choices) == 2


def test_best_of_returns_the_likeliest_and_bills_all(served, oai):
    ask = dict(seed=3, temperature=1.0, max_tokens=6)
    all3 = complete(oai, n=3, logprobs=0, **ask)
    best = max(all3.choices, key=lambda c: sum(c.logprobs.token_logprobs))
    got = agree(served, oai.completions.with_raw_response.create(model=TINY, prompt=PROMPT, best_of=3, **ask))
    assert [c.text for c in got.choices] == [best.text] and got.choices[0].logprobs is None
    assert got.usage.completion_tokens == all3.usage.completion_tokens  # every sequence made is billed


# ---- logprobs and echo ----------------------------------------------------------------------------------


def test_completion_logprobs_whole_and_streamed(oai):
    whole = complete(oai, temperature=0, logprobs=2).choices[0]
    lp = whole.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    for token, p, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert p <= 0 and len(top) <= 3 and top[token] == p == max(top.values())  # greedy: the likeliest
    chunks = list(complete(oai, temperature=0, logprobs=2, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == lp.tokens
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text


def test_chat_logprobs_whole_and_streamed(oai):
    whole = chat(oai, temperature=0, logprobs=True, top_logprobs=3).choices[0]
    content = whole.logprobs.content
    assert len(content) == 8 and all(len(e.top_logprobs) == 3 for e in content)
    assert all(e.logprob == e.top_logprobs[0].logprob and e.token == e.top_logprobs[0].token for e in content)
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace").startswith(whole.message.content)
    chunks = list(chat(oai, temperature=0, logprobs=True, top_logprobs=3, stream=True))
    streamed = [e.token for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == [e.token for e in content]


def test_return_tokens_as_token_ids_names_each_token_by_its_id(oai, tokenizer):
    """vLLM's return_tokens_as_token_ids: "token_id:<id>" for each token and alternative, whole and streamed (the
    ids decode to the text; offsets and bytes stay the text's)."""
    ids = {"extra_body": {"return_tokens_as_token_ids": True}}
    plain = complete(oai, temperature=0, logprobs=2, echo=True).choices[0]
    named = complete(oai, temperature=0, logprobs=2, echo=True, **ids).choices[0]
    lp = named.logprobs
    assert all(t.startswith("token_id:") for t in lp.tokens) and lp.text_offset == plain.logprobs.text_offset
    assert (
        tokenizer.decode([int(t.split(":")[1]) for t in lp.tokens], skip_special_tokens=True)
        == named.text
        == plain.text
    )
    assert all(top is None or lp.tokens[i] in top for i, top in enumerate(lp.top_logprobs))
    streamed = [
        t
        for c in complete(oai, temperature=0, logprobs=2, stream=True, **ids)
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.tokens
    ]
    assert streamed == lp.tokens[-8:]
    said = chat(oai, temperature=0, logprobs=True, top_logprobs=2, **ids).choices[0].logprobs.content
    before = chat(oai, temperature=0, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    assert [e.bytes for e in said] == [e.bytes for e in before]
    assert all(e.token.startswith("token_id:") and e.top_logprobs[0].token.startswith("token_id:") for e in said)


def test_echo_with_logprobs(oai):
    got = complete(oai, echo=True, logprobs=1, temperature=0, max_tokens=3).choices[0]
    plain = complete(oai, temperature=0, max_tokens=3).choices[0]
    assert got.text == PROMPT + plain.text
    lp = got.logprobs
    assert lp.token_logprobs[0] is None and all(p <= 0 for p in lp.token_logprobs[1:])
    assert len(lp.tokens) == complete(oai, max_tokens=1).usage.prompt_tokens + 3
    streamed = list(complete(oai, echo=True, temperature=0, max_tokens=3, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == got.text


def test_echo_with_max_tokens_zero_scores_the_prompt_alone(served, oai):
    """lm-evaluation-harness asks for a text's log-likelihood so (echo, max_tokens 0, logprobs), as OpenAI's legacy
    API and vLLM take it: it was a 400. The prompt alone comes back, scored; the one token the node makes to get
    there is billed (as vLLM's counts it) and never shown."""
    scored = complete(oai, echo=True, logprobs=2, temperature=0, max_tokens=3).choices[0]
    got = agree(
        served,
        oai.completions.with_raw_response.create(
            model=TINY, prompt=PROMPT, echo=True, logprobs=2, temperature=0, max_tokens=0
        ),
    )
    c, n = got.choices[0], got.usage.prompt_tokens
    assert (c.text, c.finish_reason, got.usage.completion_tokens) == (PROMPT, "length", 1)
    assert c.logprobs.tokens == scored.logprobs.tokens[:n] and len(c.logprobs.tokens) == n
    assert c.logprobs.token_logprobs == scored.logprobs.token_logprobs[:n]
    assert c.logprobs.text_offset == scored.logprobs.text_offset[:n]
    assert c.logprobs.top_logprobs == scored.logprobs.top_logprobs[:n]
    chunks = list(complete(oai, echo=True, logprobs=2, max_tokens=0, stream=True))
    mine = [x.choices[0] for x in chunks if x.choices]
    assert "".join(x.text for x in mine) == PROMPT and [x.finish_reason for x in mine if x.finish_reason] == ["length"]
    assert [t for x in mine if x.logprobs for t in x.logprobs.token_logprobs] == c.logprobs.token_logprobs
    many = complete(oai, prompt=[PROMPT, "Once upon"], n=2, echo=True, max_tokens=0, temperature=1.0)
    assert [x.text for x in many.choices] == [PROMPT, PROMPT, "Once upon", "Once upon"]
    refused(lambda: complete(oai, max_tokens=0), "max_tokens")
    refused(lambda: complete(oai, echo=True, max_tokens=0, extra_body={"min_tokens": 1}), "min_tokens")
    # a prompt filling the whole context (512): one token less is the most that can be scored, and the error says why
    whole = [5 + (i % 200) for i in range(512)]
    assert "one token less" in refused(lambda: complete(oai, prompt=whole, echo=True, max_tokens=0), "prompt")
    assert len(complete(oai, prompt=whole[:511], echo=True, max_tokens=0, logprobs=0).choices[0].logprobs.tokens) == 511
    refused(lambda: chat(oai, max_tokens=0), "max_tokens")


def test_streamed_echo_carries_the_prompts_logprobs(oai):
    # the echoed prompt's chunk was built before the node's prompt-logprobs event was read: its logprobs were
    # empty. Streamed, each choice's entries are the whole answer's, its prompt positions first
    kw = dict(prompt=[PROMPT, "Once upon"], n=2, echo=True, logprobs=2, temperature=0, max_tokens=3)
    whole = complete(oai, **kw).choices
    chunks = list(complete(oai, **kw, stream=True))
    for choice in whole:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        lp = [x.logprobs for x in mine if x.logprobs is not None]
        assert [t for p in lp for t in p.tokens] == choice.logprobs.tokens
        assert [v for p in lp for v in p.token_logprobs] == choice.logprobs.token_logprobs
        assert [o for p in lp for o in p.text_offset] == choice.logprobs.text_offset
        assert mine[0].logprobs.token_logprobs[0] is None and len(mine[0].logprobs.tokens) > 1


def test_echo_with_top_logprobs_of_a_long_prompt(oai):
    # the node's prompt_logprobs event for a prompt of ~480 tokens and 5 top pairs each is ~200 KB: more than
    # a token event may be, and still within what this request can have (gateway.node_client.event_limit)
    prompt = [5 + (i % 200) for i in range(480)]
    got = complete(oai, prompt=prompt, echo=True, logprobs=5, temperature=0, max_tokens=2)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == 482 and lp.token_logprobs[0] is None and len(lp.top_logprobs[1]) >= 5


def test_echo_is_bounded_by_n_times_the_prompts(oai):
    # each choice repeats its prompt (with logprobs, an entry per position): n=16 echoing 8,000-token prompts
    # was a 73 MB answer built on the event loop; `served` answers at most 2,048 positions
    prompt = [5 + (i % 200) for i in range(480)]
    message = refused(lambda: complete(oai, prompt=[prompt] * 2, n=3, echo=True, logprobs=5, max_tokens=1), "echo")
    assert "2880 token positions" in message and "2048" in message and "fewer prompts" in message
    got = complete(oai, prompt=[prompt] * 2, n=2, echo=True, logprobs=5, temperature=0, max_tokens=1)  # 1,920
    assert len(got.choices) == 4 and all(len(c.logprobs.tokens) == 481 for c in got.choices)


def test_prompt_logprobs_score_each_prompt_position_as_vllms_do(served, oai, tokenizer):
    """vLLM's prompt_logprobs (refused as unknown before): each prompt position, the first null, as {token id:
    {logprob, rank, decoded_token}} for the prompt's token and the k most likely; in each completion choice, once
    in a chat's answer; the same scores echo's logprobs give, each cut to its own k where both are asked."""
    ids = tokenizer(PROMPT)["input_ids"]
    got = agree(
        served,
        oai.completions.with_raw_response.create(
            model=TINY,
            prompt=PROMPT,
            max_tokens=2,
            temperature=0,
            echo=True,
            logprobs=1,
            extra_body={"prompt_logprobs": 3},
        ),
    ).choices[0]
    plp, echo = got.prompt_logprobs, got.logprobs
    assert len(plp) == len(ids) and plp[0] is None and echo.token_logprobs[0] is None
    for j in range(1, len(ids)):
        entry = plp[j]
        mine = entry[str(ids[j])]
        assert mine["logprob"] == echo.token_logprobs[j] <= 0 and mine["decoded_token"] == tokenizer.decode([ids[j]])
        assert mine["rank"] == 1 + sum(e["logprob"] > mine["logprob"] for e in entry.values()) or mine["rank"] > 3
        top = sorted((e for e in entry.values() if e["rank"] <= 3), key=lambda e: e["rank"])
        assert [e["rank"] for e in top] == [1, 2, 3] and all(a["logprob"] >= b["logprob"] for a, b in zip(top, top[1:]))
        assert len(echo.top_logprobs[j]) <= 2  # echo's own k (1) and its token, not prompt_logprobs' 3
        assert max(echo.top_logprobs[j].values()) == top[0]["logprob"]
    # n choices of two prompts: each choice scores its own prompt; a chat once, for its rendered prompt
    two = complete(
        oai, prompt=[PROMPT, "Once upon"], n=2, temperature=0, max_tokens=1, extra_body={"prompt_logprobs": 0}
    )
    own = [None] + [{str(ids[j]): plp[j][str(ids[j])]} for j in range(1, len(ids))]  # k 0: the token alone
    assert [c.prompt_logprobs for c in two.choices[:2]] == [own, own]
    assert len(two.choices[2].prompt_logprobs) == len(tokenizer("Once upon")["input_ids"])
    c = chat(oai, temperature=0, max_tokens=2, extra_body={"prompt_logprobs": 1})
    scored = c.model_extra["prompt_logprobs"]
    assert scored[0] is None and len(scored) == c.usage.prompt_tokens and all(1 <= len(e) <= 2 for e in scored[1:])
    # streamed: 0 is taken and answered as without it (vLLM streams no prompt scores); more is refused
    plain = "".join(x.choices[0].text for x in complete(oai, temperature=0, stream=True) if x.choices)
    zero = complete(oai, temperature=0, stream=True, extra_body={"prompt_logprobs": 0})
    assert "".join(x.choices[0].text for x in zero if x.choices) == plain
    refused(lambda: complete(oai, stream=True, extra_body={"prompt_logprobs": 1}), "prompt_logprobs")
    refused(lambda: chat(oai, stream=True, extra_body={"prompt_logprobs": 2}), "prompt_logprobs")
    assert "whole vocabulary" in refused(lambda: complete(oai, extra_body={"prompt_logprobs": -1}), "prompt_logprobs")
    refused(lambda: chat(oai, extra_body={"prompt_logprobs": 21}), "prompt_logprobs")
    # the answer's size is bounded as echo's is: n choices each scoring their prompt count against the same bound
    long = [5 + (i % 200) for i in range(480)]
    message = refused(
        lambda: complete(oai, prompt=[long] * 2, n=3, max_tokens=1, extra_body={"prompt_logprobs": 5}),
        "prompt_logprobs",
    )
    assert "2880 token positions" in message and "2048" in message
    # a position of 21 entries counts as 4 of echo's 6: 480 x 2 x 4 = 3,840; one choice, 1,920, is answered
    message = refused(
        lambda: complete(oai, prompt=long, n=2, max_tokens=1, extra_body={"prompt_logprobs": 20}), "prompt_logprobs"
    )
    assert "3840 token positions" in message and "prompt_logprobs 20 counting as 4" in message
    got = complete(oai, prompt=long, max_tokens=1, extra_body={"prompt_logprobs": 20}).choices[0].prompt_logprobs
    assert len(got) == 480 and all(len(e) in (20, 21) for e in got[1:])


def test_streams_name_their_choices_and_send_no_empty_token(oai):
    chunks = list(complete(oai, n=2, seed=4, temperature=1.0, stream=True, stream_options={"include_usage": True}))
    whole = complete(oai, n=2, seed=4, temperature=1.0)
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(c.text for c in mine) == whole.choices[i].text
        assert all(c.text for c in mine if c.finish_reason is None)  # no empty text chunk
        assert [c.finish_reason for c in mine if c.finish_reason] == [whole.choices[i].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    eos = list(complete(oai, logit_bias={str(EOS): 100}, temperature=0, stream=True))
    assert [c.choices[0].text for c in eos] == [""] and eos[0].choices[0].finish_reason == "stop"


# ---- the context, and max_tokens' defaults --------------------------------------------------------------


def test_context_limits_and_defaults(oai):
    msg = refused(lambda: complete(oai, max_tokens=510), "prompt")
    assert "maximum context length is 512 tokens" in msg and "510 in the completion" in msg
    msg = refused(lambda: chat(oai, max_tokens=510), "messages")
    assert "in the messages" in msg
    assert complete(oai, max_tokens=None, extra_body={"ignore_eos": True}).usage.completion_tokens == 16
    to_context = chat(oai, max_tokens=None, extra_body={"ignore_eos": True})
    assert to_context.usage.prompt_tokens + to_context.usage.completion_tokens == 512
    assert to_context.choices[0].finish_reason == "length"


def test_models_created_is_a_unix_time(served, oai):
    import time

    created = {m.id: m.created for m in oai.models.list()}
    assert abs(created[TINY] - time.time()) < 3600


def test_a_long_whole_answer_is_the_same_built_off_the_event_loop(oai, served):
    """A whole answer of 512 completion tokens or more is built and encoded on a worker thread (n choices with
    logprobs held the event loop for seconds); it is the same answer, its usage agreeing with the node's."""
    raw = oai.completions.with_raw_response.create(
        model=TINY, prompt=PROMPT, max_tokens=300, n=2, logprobs=2, seed=3, extra_body={"ignore_eos": True}
    )
    body = agree(served, raw)
    assert body.usage.completion_tokens == 600 and [c.index for c in body.choices] == [0, 1]
    assert all(len(c.logprobs.tokens) == 300 and c.finish_reason == "length" for c in body.choices)
    again = complete(oai, max_tokens=300, n=2, logprobs=2, seed=3, extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in body.choices]


def test_best_of_equal_to_n_streams_as_n(oai):
    # vLLM's rule: best_of ranks nothing when it equals n, so the stream is n's; only more than n is refused
    chunks = list(complete(oai, n=2, best_of=2, temperature=0, max_tokens=4, stream=True))
    plain = complete(oai, temperature=0, max_tokens=4).choices[0].text
    for i in (0, 1):
        assert "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) == plain
    assert "greater than n" in refused(lambda: list(complete(oai, n=1, best_of=2, stream=True)), "best_of")


def test_vllm_structured_outputs_and_guided_fields(oai):
    """vLLM's structured_outputs (choice, regex, json, json_object, grammar) and the guided_* fields it had before:
    each answer, from random weights, has the shape asked; two constraints, or one the node cannot compile, are
    refused naming the field; structured_outputs.structural_tag is refused by name."""
    import json
    import re

    choices = ["yes", "no", "n/a (maybe)"]
    for extra in ({"structured_outputs": {"choice": choices}}, {"guided_choice": choices}):
        for seed in (1, 2):
            got = chat(oai, temperature=1, seed=seed, max_tokens=16, extra_body=extra).choices[0]
            assert got.message.content in choices and got.finish_reason == "stop", (extra, got)
    pattern = "[a-z]{3}-[0-9]{2}"
    for extra in ({"structured_outputs": {"regex": pattern}}, {"guided_regex": pattern}):
        text = complete(oai, temperature=1, seed=3, max_tokens=16, extra_body=extra).choices[0].text
        assert re.fullmatch(pattern, text), (extra, text)
    schema = {
        "type": "object",
        "properties": {"k": {"enum": ["v", "w"]}},
        "required": ["k"],
        "additionalProperties": False,
    }
    for extra in ({"structured_outputs": {"json": schema}}, {"guided_json": json.dumps(schema)}):
        got = chat(oai, temperature=1, seed=4, max_tokens=32, extra_body=extra).choices[0]
        assert got.finish_reason == "stop" and json.loads(got.message.content)["k"] in ("v", "w"), (extra, got)
    # a grammar in either dialect vLLM's guided_grammar takes (Lark, GBNF)
    lark = 'start: "SELECT " col " FROM " table\ncol: "id" | "name"\ntable: /[a-z]{2,5}/'
    gbnf = 'root ::= "SELECT " col " FROM " table\ncol ::= "id" | "name"\ntable ::= [a-z] [a-z] [a-z]? [a-z]? [a-z]?'
    for extra in ({"structured_outputs": {"grammar": gbnf}}, {"guided_grammar": lark}):
        for seed in (6, 7):
            got = chat(oai, temperature=1, seed=seed, max_tokens=24, extra_body=extra).choices[0]
            assert got.finish_reason == "stop", (extra, got)
            assert re.fullmatch("SELECT (id|name) FROM [a-z]{2,5}", got.message.content), (extra, got)
    got = chat(oai, temperature=1, seed=5, max_tokens=32, extra_body={"structured_outputs": {"json_object": True}})
    assert got.choices[0].message.content.startswith("{")
    # given as vLLM counts them, by not being null: an empty schema is one (any JSON), json_object false is none
    assert chat(oai, max_tokens=4, extra_body={"structured_outputs": {"json": {}, "json_object": False}}).choices

    refused(lambda: chat(oai, extra_body={"guided_regex": "a", "guided_choice": ["b"]}), "guided_choice")
    fmt = {"type": "json_object"}
    refused(lambda: chat(oai, response_format=fmt, extra_body={"guided_regex": "a"}), "guided_regex")
    refused(lambda: chat(oai, extra_body={"structured_outputs": {"structural_tag": "{}"}}), "structured_outputs")
    assert "guided.grammar" in refused(lambda: chat(oai, extra_body={"guided_grammar": "root ::= x"}), "guided_grammar")
    too_long = "start: /x*/ //" + "-" * MAX_GUIDED_GRAMMAR_CHARS
    refused(lambda: chat(oai, extra_body={"structured_outputs": {"grammar": too_long}}), "structured_outputs")
    # GBNF has its own bound (its conversion to Lark grows with the square of its rules), at the gateway as at the
    # node: a grammar this release's nodes refuse, sent on to an older node that serves it, made them look false
    gbnf = 'root ::= "x"\n' + "# comment\n" * (MAX_GBNF_CHARS // 10)
    assert "GBNF" in refused(lambda: chat(oai, extra_body={"guided_grammar": gbnf}), "guided_grammar")
    lark = 'start: "x"\n' + "// comment\n" * (MAX_GBNF_CHARS // 11 + 10)
    assert chat(oai, max_tokens=4, extra_body={"guided_grammar": lark}).choices[0].message.content == "x"
    refused(lambda: chat(oai, extra_body={"structured_outputs": {"regex": "a", "choice": ["b"]}}), "structured_outputs")
    assert "guided.pattern" in refused(lambda: complete(oai, extra_body={"guided_regex": "(unclosed"}), "guided_regex")


def test_continuous_usage_stats_give_the_usage_so_far_on_every_chunk(oai):
    """vLLM's stream_options.continuous_usage_stats: each chunk carries the usage of what was relayed so far,
    counting up to the final usage chunk's (its include_usage defaults to true beside it, as vLLM's does); with
    include_usage false there is none."""
    for options in ({"include_usage": True, "continuous_usage_stats": True}, {"continuous_usage_stats": True}):
        chunks = list(complete(oai, stream=True, max_tokens=6, temperature=0, stream_options=options))
        final = chunks[-1]
        assert final.choices == [] and final.usage.completion_tokens == 6, final
        counts = [c.usage.completion_tokens for c in chunks[:-1] if c.choices and c.choices[0].text]
        assert counts == sorted(counts) and counts[-1] == 6 and len(counts) >= 2, counts
        assert all(c.usage.prompt_tokens == final.usage.prompt_tokens for c in chunks), options
        # cached_tokens comes with the final usage: a running chunk said 0 where the final one said 64
        assert all(c.usage.prompt_tokens_details is None for c in chunks[:-1] if c.choices), options
        assert final.usage.prompt_tokens_details is not None
    quiet = list(complete(oai, stream=True, stream_options={"include_usage": False, "continuous_usage_stats": True}))
    assert all(c.usage is None for c in quiet)
    plain = list(complete(oai, stream=True, stream_options={"include_usage": True}))
    assert all(c.usage is None for c in plain[:-1]) and plain[-1].usage is not None  # OpenAI's: null until the end


def test_an_answer_sent_back_as_history_the_way_the_sdk_gives_it(oai):
    """The openai SDK's message, dumped (annotations: null, audio: null) or as .parse() gives it (parsed, a tool
    call's parsed_arguments), goes back into the next request's messages: taken, not refused by name."""
    first = chat(oai, temperature=0)
    history = [*MESSAGES, first.choices[0].message.model_dump(), {"role": "user", "content": "And of Spain?"}]
    assert "annotations" in history[1] and "audio" in history[1]
    assert chat(oai, messages=history, temperature=0).choices[0].finish_reason in ("stop", "length")
    parsed = {"role": "assistant", "content": None, "parsed": {"k": "v"}, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}", "parsed_arguments": {}}}
    ]}  # fmt: skip
    tool = {"role": "tool", "tool_call_id": "call_1", "content": "done"}
    assert chat(oai, messages=[*MESSAGES, parsed, tool]).choices
    refused(
        lambda: chat(oai, messages=[*MESSAGES, {"role": "assistant", "content": "x", "audio": {"id": "a"}}]), "messages"
    )


def test_schemas_of_products_from_many_clients_leave_the_node_serving(oai):
    """The red team's attack, run for real: six concurrent 2 kB schemas of products (allOf of 4 anyOfs of 9: 6,561
    object shapes), each new (no cache hit), are refused by name; they took 1.3 s each of the node's one compile
    thread to be refused, and queued past the gateway's first-byte timeout they took the node out of routing (a
    plain request after them: 503, no live node). The node keeps serving, a guided request beside them too."""
    import threading

    import openai

    def products(tag: str) -> dict:
        return {
            "allOf": [
                {"anyOf": [{"type": "object", "properties": {f"{tag}{j}_{i}": {"type": "integer"}}} for i in range(9)]}
                for j in range(4)
            ]
        }

    outcomes: list[object] = []

    def attack(tag: str) -> None:
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": products(tag)}}
        try:
            chat(oai, response_format=fmt)
            outcomes.append("served")
        except openai.APIStatusError as e:
            outcomes.append((e.status_code, (e.body or {}).get("param")))

    threads = [threading.Thread(target=attack, args=(f"t{i}_",)) for i in range(6)]
    for t in threads:
        t.start()
    guided = chat(oai, response_format={"type": "json_object"}, max_tokens=4)  # beside them
    for t in threads:
        t.join()
    assert outcomes == [(400, "response_format")] * 6, outcomes
    assert guided.choices[0].finish_reason in ("stop", "length")
    assert chat(oai).choices[0].finish_reason in ("stop", "length")  # the node is still routed to


def test_one_key_cannot_tell_what_another_keys_prompts_left_in_the_prefix_cache(served, oai):
    """Every answer says how many of its prompt tokens the node's prefix cache held (cached_tokens): with one
    cache for all keys, a stranger's key confirmed another's private prompt a KV block (8 tokens here) at a
    time, a right guess reading one block more than a wrong one. Each key's requests now share KV only among
    themselves, through any gateway on the database."""
    import openai

    from gateway.keys import create_key

    prefix = [40 + i for i in range(24)]  # three blocks anyone could know (a product's system prompt)
    secret, wrong = [101, 7, 250, 33, 9, 180, 77, 64], [101, 7, 250, 33, 9, 180, 77, 65]
    key, _ = create_key(served.db, name="stranger")
    stranger = openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def cached(client, ids, salt=None) -> int:
        extra = {} if salt is None else {"extra_body": {"cache_salt": salt}}
        r = client.completions.create(model=TINY, prompt=ids, max_tokens=1, **extra)
        return r.usage.prompt_tokens_details.cached_tokens

    assert cached(oai, prefix + secret + [5]) == 0
    assert cached(oai, prefix + secret + [6]) == 32  # the same key shares its own prompts' KV
    assert cached(stranger, prefix + wrong + [5]) == 0  # nothing of the other key's
    assert cached(stranger, prefix + secret + [5]) == 24  # its own prefix, just sent; not the secret's block
    # vLLM's cache_salt keeps an application's users apart within its key
    assert cached(oai, prefix + secret + [7], salt="user-a") == 0
    assert cached(oai, prefix + secret + [8], salt="user-a") == 32
    assert cached(oai, prefix + secret + [9], salt="user-b") == 0
    assert cached(stranger, prefix + secret + [9], salt="user-a") == 0  # nor does one salt join two keys


def test_one_keys_requests_spend_no_other_keys_grammar(served, oai, tokenizer):
    """Red team: a node's requests of one guided grammar shared the lexer its compiled grammar builds as it goes,
    whose states are bounded. A stranger's key sent twelve requests of another client's guided_regex, sampling
    freely (temperature 2, no end token) through a pattern whose lexer grows with every letter: they spent the
    states, and the client's ordinary greedy request, already running, failed on its next mask (400, its tokens
    billed). Each key's requests now share a compiled grammar only among themselves (its cache salt)."""
    import string
    import threading
    import time

    from gateway.keys import create_key

    pattern = "[a-z]*(" + "|".join(f"{c}[a-z]{{16}}{c}" for c in string.ascii_lowercase) + ")[a-z]*"
    key, _ = create_key(served.db, name="grammar-stranger")
    stranger = openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0, timeout=120)
    ask = {"max_tokens": 300, "extra_body": {"guided_regex": pattern}}
    outcomes: dict[str, object] = {}

    def spend(i: int) -> None:
        try:
            stranger.completions.create(
                model=TINY, prompt=f"Letters {i}:", max_tokens=300, temperature=2.0, seed=i,
                logit_bias={str(tokenizer.eos_token_id): -100}, extra_body={"guided_regex": pattern, "min_tokens": 300},
            )  # fmt: skip
            outcomes[f"stranger{i}"] = "served"
        except openai.APIStatusError as e:
            outcomes[f"stranger{i}"] = e.status_code

    def honest() -> None:
        try:
            outcomes["honest"] = oai.completions.create(model=TINY, prompt="Write letters:", temperature=0, **ask)
        except openai.APIStatusError as e:
            outcomes["honest"] = f"{e.status_code}: {e.message}"

    alone = oai.completions.create(model=TINY, prompt="Write letters:", temperature=0, **ask).choices[0]
    threads = [threading.Thread(target=honest)] + [threading.Thread(target=spend, args=(i,)) for i in range(12)]
    threads[0].start()
    time.sleep(0.3)  # the client's request runs when the stranger's arrive
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join()
    assert 400 in outcomes.values()  # the stranger spent the states of its own grammar
    answer = outcomes["honest"]
    assert not isinstance(answer, str), answer
    assert (answer.choices[0].text, answer.choices[0].finish_reason) == (alone.text, alone.finish_reason)


def test_a_grammar_naming_tokens_is_relayed_and_billed_as_served(served, oai):
    """Lark names a token by its id (`<[2]>`) or a special token's name (`<s>`, `<pad>`), as logit_bias may favour
    any id: special tokens in the middle of an answer (they have no text) are relayed as the node's detokenizer
    gives them, billed as the node counted them (its receipt, the usage row and the client's usage agree), and
    the node is not taken for one that misreported its tokens."""
    ask = {"guided_grammar": 'start: "a" <s> <pad> "b"'}
    for _ in range(2):  # the second served too: its node still routed to
        raw = oai.completions.with_raw_response.create(model=TINY, prompt=PROMPT, max_tokens=8, extra_body=ask)
        body = agree(served, raw)
        assert body.choices[0].text == "ab" and body.choices[0].finish_reason == "stop"
        assert body.usage.completion_tokens == 4  # a, <s>, <pad>, b: the grammar complete, the answer ends


def test_allowed_token_ids_are_the_only_tokens_an_answer_holds(served, oai, tokenizer):
    """vLLM's allowed_token_ids: every token of every choice is one of the listed ids (here the tokens of "x" and
    "y", so the text shows it), streamed or whole, chat or completion, billed as served; an id past the vocabulary
    or an empty list is refused naming the field."""
    import re

    x, y = tokenizer.convert_tokens_to_ids(["x", "y"])
    ask = {"allowed_token_ids": [x, y]}
    raw = oai.completions.with_raw_response.create(
        model=TINY, prompt=PROMPT, max_tokens=12, n=3, temperature=1, seed=1, extra_body=ask
    )
    body = agree(served, raw)
    assert all(re.fullmatch("[xy]{12}", c.text) and c.finish_reason == "length" for c in body.choices), body
    assert len({c.text for c in body.choices}) > 1  # drawn from the two, not one forced
    streamed = chat(oai, max_tokens=8, temperature=0, stream=True, extra_body=ask)
    assert re.fullmatch("[xy]{8}", "".join(c.choices[0].delta.content or "" for c in streamed if c.choices))
    # with the end token listed, an answer may stop there
    eos_too = complete(
        oai, max_tokens=8, temperature=0, logit_bias={str(EOS): 100}, extra_body={"allowed_token_ids": [x, EOS]}
    )
    assert (eos_too.choices[0].text, eos_too.choices[0].finish_reason) == ("", "stop")
    # vLLM's bad_words beside them: "x" banned, only "y" is left
    banned = complete(oai, max_tokens=8, temperature=0, extra_body=ask | {"bad_words": ["x"]})
    assert banned.choices[0].text == "y" * 8
    for blank in ("  ", "\x1c", "\u3000"):  # whitespace to Python (pydantic's \S took "\x1c" for text: a 500)
        refused(lambda b=blank: complete(oai, extra_body={"bad_words": [b]}), "bad_words")
    refused(lambda: complete(oai, extra_body={"bad_words": ["x"] * 65}), "bad_words")
    assert "vocabulary" in refused(
        lambda: complete(oai, extra_body={"allowed_token_ids": [x, 10**6]}), "allowed_token_ids"
    )
    refused(lambda: complete(oai, extra_body={"allowed_token_ids": []}), "allowed_token_ids")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_an_answer_its_own_grammar_fails_is_a_400_billed_as_delivered(served, oai, tokenizer, stream):
    """A request whose grammar the node cannot follow to its end (here: after "x" the grammar wants "y", which
    allowed_token_ids forbids, so no token may follow) fails on its own grammar: the client hears so, naming the
    field. A stream's tokens, sent, are billed; a whole answer's, never sent, are not: the grammar's failure is the
    node's word, and a node that said so of every guided request was paid for answers nobody got (red team). A
    client's grammar built to fail at its end has the node make tokens for nothing, as a client that leaves does:
    a key's --tpm bounds it."""
    (x,) = tokenizer.encode("x", add_special_tokens=False)
    ask = {"guided_grammar": 'start: "x" "y"', "allowed_token_ids": [x, EOS]}
    if stream:
        with oai.completions.with_streaming_response.create(
            model=TINY, prompt=PROMPT, max_tokens=8, stream=True, extra_body=ask
        ) as raw:
            rid, body = raw.headers["x-request-id"], raw.read().decode()
        assert "could not be held to guided_grammar" in body
        # the same error a whole answer gets, not one blaming the node
        assert '"type":"invalid_request_error"' in body and '"param":"guided_grammar"' in body
        assert '"code":"grammar_failed"' in body
    else:
        with pytest.raises(openai.BadRequestError) as ei:
            oai.completions.create(model=TINY, prompt=PROMPT, max_tokens=8, extra_body=ask)
        assert ei.value.body["param"] == "guided_grammar" and "could not be held" in ei.value.body["message"]
        assert ei.value.body["code"] == "grammar_failed"
        rid = ei.value.response.headers["x-request-id"]
    row = usage_row(served, rid)
    assert row.status != RecordStatus.DISPUTED and row.node_completion_tokens >= 1
    assert row.completion_tokens == (row.node_completion_tokens if stream else 0)
    with Session(served.db) as s:
        assert s.get(CompletionRecord, rid).status == RequestStatus.GRAMMAR_FAILED
