"""Choices gathered from a node's events (gateway/choices.py) and named by the gateway's tokenizer
(gateway/logprobs.py): order of n x prompts, best_of's pick, echo, logprobs in OpenAI's two shapes, tool calls,
the streamed chunks (no empty chunk for a token without text), and the node body's fields."""

from __future__ import annotations

import json

import pytest

from gateway.choices import Choices
from gateway.logprobs import TokenTexts
from gateway.openai_api import ChatRequest, ChunkBuilder, CompletionRequest, parse_body, to_node_request
from gateway.router import Target
from gateway.tools import tool_plan

RID = "0x" + "ab" * 32
EOS = 2


@pytest.fixture(scope="module")
def tok(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_base))


@pytest.fixture(scope="module")
def texts(tok):
    return TokenTexts(tok)


def token(k: int, tid: int, text: str, lp: float | None = None, top=()) -> dict:
    ev = {"type": "token", "index": k, "token_id": tid, "text": text}
    if lp is not None:
        ev |= {"logprob": lp, "top_logprobs": [list(p) for p in top]}
    return ev


def feed(c: Choices, events: list[dict]) -> None:
    for ev in events:
        if ev["type"] == "token":
            k = c.index_of(ev)
            assert not c.full(k)
            c.take_token(k, ev)
        elif ev["type"] == "finish":
            c.take_finish(c.index_of(ev), ev)
        else:
            assert c.take_prompt(ev)


def frames(raw: bytes) -> list[dict]:
    return [json.loads(f[6:]) for f in raw.split(b"\n\n") if f]


def test_token_texts_give_each_tokens_bytes(tok, texts):
    text = "The capital is Paris. ünïcode ✓"
    ids = tok.encode(text, add_special_tokens=False)
    assert b"".join(texts.get(i)[1] for i in ids) == text.encode()
    assert texts.get(EOS) == ("</s>", b"</s>") and EOS in texts.special

    # a token that is half of a character is its bytes, and its text says so without failing
    def whole(raw: bytes) -> bool:
        try:
            raw.decode()
        except UnicodeDecodeError:
            return False
        return True

    partial = [i for i in ids if not whole(texts.get(i)[1])]
    assert partial and all("\ufffd" in texts.text(i) for i in partial)


def test_n_choices_per_prompt_in_openai_order(texts):
    c = Choices(chat=False, prompts=[[1, 5], [1, 6, 7]], per_prompt=2, n=2, max_tokens=3)
    feed(c, [token(3, 40, "d"), token(0, 41, "a"), token(1, 42, "b"), token(2, 43, "c"), token(0, 44, "a")])
    feed(c, [{"type": "finish", "index": k, "finish_reason": "stop"} for k in (0, 1, 2)])
    got = c.answer("length", cut=False)
    assert [(x["index"], x["text"], x["finish_reason"]) for x in got] == [
        (0, "aa", "stop"),
        (1, "b", "stop"),
        (2, "c", "stop"),
        (3, "d", "length"),  # no finish event of its own: the request's
    ]
    assert c.relayed == 5 and not c.full(3) and c.full(1)  # a finished sequence takes no more


def test_best_of_returns_the_n_most_likely_renumbered(texts):
    c = Choices(chat=False, prompts=[[1], [1]], per_prompt=3, n=1, max_tokens=4, texts=texts)
    sums = {0: -3.0, 1: -1.0, 2: -2.0, 3: -0.5, 4: -9.0, 5: -0.7}
    for k, lp in sums.items():
        feed(c, [token(k, 40 + k, f"s{k}", lp / 2), token(k, 50, "!", lp / 2)])
    got = c.answer("stop", cut=False)
    assert [(x["index"], x["text"]) for x in got] == [(0, "s1!"), (1, "s3!")]
    assert got[0]["logprobs"] is None  # ranked by them, not asked for them
    assert c.relayed == 12  # every sequence made is billed


def test_completion_logprobs_with_echo(tok, texts):
    prompt = tok.encode("Paris")
    entries = [None] + [{"token_id": t, "logprob": -1.5, "top_logprobs": [[t, -1.5], [9, -2.0]]} for t in prompt[1:]]
    c = Choices(
        chat=False, prompts=[prompt], per_prompt=1, n=1, max_tokens=4, logprobs=True, echo=True,
        prompt_texts=["Paris"], texts=texts,
    )  # fmt: skip
    feed(c, [{"type": "prompt_logprobs", "prompt_index": 0, "entries": entries}])
    feed(c, [token(0, 70, " is", -0.25, [(70, -0.25), (71, -3.0)]), token(0, EOS, "", -0.5, [(EOS, -0.5)])])
    (got,) = c.answer("stop", cut=False)
    lp = got["logprobs"]
    assert got["text"] == "Paris is"
    assert lp["tokens"][0] == "<s>" and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == [-1.5] * (len(prompt) - 1) + [-0.25, -0.5]
    assert len(lp["tokens"]) == len(prompt) + 2 and lp["tokens"][-1] == "</s>"
    assert lp["top_logprobs"][-2] == {texts.text(70): -0.25, texts.text(71): -3.0}
    # offsets into the echoed text: BOS takes no room, the completion starts after the prompt
    assert lp["text_offset"][0] == lp["text_offset"][1] == 0 and lp["text_offset"][-2:] == [5, 8]
    # the sampled token is listed beside the most likely ones, as OpenAI lists it (logprobs=0)
    c0 = Choices(chat=False, prompts=[[1]], per_prompt=1, n=1, max_tokens=2, logprobs=True, texts=texts)
    feed(c0, [token(0, 70, " is", -0.25, [])])
    assert c0.answer("stop", cut=False)[0]["logprobs"]["top_logprobs"] == [{texts.text(70): -0.25}]


def test_prompt_logprobs_as_a_hostile_node_sends_them(texts):
    """vLLM's prompt_logprobs read from a node that sends more alternatives than asked and ranks that are not
    ranks: each position lists k at most, a rank is taken only as a count (else where the token stands among the
    top, else null); a prompt the node sent no scores for is null at each position."""
    prompt = [1, 70, 71, 72]
    entries = [
        None,
        {"token_id": 70, "logprob": -0.5, "top_logprobs": [[70, -0.5]] + [[200 + i, -1.0 - i] for i in range(30)]},
        {"token_id": 71, "logprob": -3.0, "top_logprobs": [[9, -0.1], [71, -3.0]], "rank": True},
        {"token_id": 72, "logprob": -7.0, "top_logprobs": [[9, -0.1], [8, -0.2]], "rank": -4},
    ]
    c = Choices(
        chat=False, prompts=[prompt, [1, 5]], per_prompt=1, n=1, max_tokens=4, logprobs=True, echo=True,
        prompt_texts=["a", "b"], texts=texts, echo_top=1, prompt_top=2,
    )  # fmt: skip
    feed(c, [{"type": "prompt_logprobs", "prompt_index": 0, "entries": entries}])
    feed(c, [token(0, 5, "x", -0.25, [(5, -0.25)]), token(1, 5, "x", -0.25, [(5, -0.25)])])
    first, second = c.answer("length", cut=False)
    plp = first["prompt_logprobs"]
    assert plp[0] is None and [len(e) for e in plp[1:]] == [2, 2, 3]
    assert plp[1]["70"] == {"logprob": -0.5, "rank": 1, "decoded_token": texts.text(70)}
    assert plp[1]["200"]["rank"] == 2 and plp[2]["71"]["rank"] == 2 and plp[3]["72"]["rank"] is None
    assert [len(t) for t in first["logprobs"]["top_logprobs"][1:4]] == [1, 2, 2]  # echo's k 1, and its own token
    assert second["prompt_logprobs"] == [None, None]
    c.prompt_top = None  # not asked: no field, as before
    assert "prompt_logprobs" not in c.answer("length", cut=False)[0]


def test_chat_logprobs_and_tool_calls(texts):
    plan = tool_plan([{"type": "function", "function": {"name": "f"}}], "auto")
    c = Choices(chat=True, prompts=[[1]], per_prompt=2, n=2, max_tokens=40, logprobs=True, texts=texts, plan=plan)
    call = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    feed(c, [token(0, 70, "hi", -0.1, [(70, -0.1), (71, -2.5)]), token(1, 71, call, -0.2, [(71, -0.2)])])
    a, b = c.answer("stop", cut=False)
    assert a["message"] == {"role": "assistant", "content": "hi"} and a["finish_reason"] == "stop"
    entry = a["logprobs"]["content"][0]
    assert entry["logprob"] == -0.1 and entry["bytes"] == list(texts.get(70)[1])
    assert [t["logprob"] for t in entry["top_logprobs"]] == [-0.1, -2.5]
    assert b["finish_reason"] == "tool_calls" and b["message"]["content"] is None
    assert b["message"]["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}


def test_a_stop_reason_is_only_of_a_choice_a_stop_ended(texts):
    """A stop id's sequence the node says ended at "length" has no stop_reason (review). A stop string named for a
    sequence its end token ended is its stop_reason: the engine's end token may let go of held text that completes
    one (a later review: the name not taken, an honest node was disputed); a false name is disputed at the end
    (tests/gateway/test_text_check.py)."""
    c = Choices(
        chat=False,
        prompts=[[1]],
        per_prompt=2,
        n=2,
        max_tokens=4,
        eos_ids=frozenset({EOS}),
        stop_ids=frozenset({300}),
        stops=("###",),
    )
    feed(
        c,
        [
            token(0, 7, "a"),
            token(0, EOS, ""),
            {"type": "finish", "index": 0, "finish_reason": "stop", "stop_string": "###"},
        ],
    )
    feed(c, [token(1, 300, ""), {"type": "finish", "index": 1, "finish_reason": "length"}])
    assert [(ch["finish_reason"], ch["stop_reason"]) for ch in c.answer(None, False)] == [
        ("stop", "###"),
        ("length", None),
    ]


def test_stream_chunks_name_their_choice_and_skip_empty_tokens(texts):
    b = ChunkBuilder(chat=False, rid=RID, created=1, model="m", include_usage=False)
    c = Choices(chat=False, prompts=[[1]], per_prompt=2, n=2, max_tokens=4)
    assert c.open_all(b) == b""
    out = c.chunk(b, 1, "x", None) + c.chunk(b, 0, "", None)  # an EOS: no empty chunk
    out += c.close(b, 1, None, False) + c.close(b, 1, None, False) + c.close_all(b, "stop", False)
    got = [(f["choices"][0]["index"], f["choices"][0]["text"], f["choices"][0]["finish_reason"]) for f in frames(out)]
    assert got == [(1, "x", None), (1, "", "stop"), (0, "", "stop")]


def test_streamed_chat_roles_tool_deltas_and_logprobs(texts):
    plan = tool_plan([{"type": "function", "function": {"name": "f"}}], "required")
    b = ChunkBuilder(chat=True, rid=RID, created=1, model="m", include_usage=False)
    c = Choices(chat=True, prompts=[[1]], per_prompt=2, n=2, max_tokens=40, logprobs=True, texts=texts, plan=plan)
    out = c.open_all(b)
    for k in (0, 1):
        for piece in ('[{"name": "f", ', '"arguments": {}}]'):
            _, scored = c.take_token(k, token(k, 70, piece, -0.3, [(70, -0.3)]))
            out += c.chunk(b, k, piece, scored)
    out += c.close_all(b, "stop", False)
    chunks = [f["choices"][0] for f in frames(out)]
    assert [x["delta"] for x in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    # the constrained answer is held whole; its tokens' logprobs still stream
    assert all(x["delta"] == {} and x["logprobs"]["content"][0]["logprob"] == -0.3 for x in chunks[2:6])
    calls = [x for x in chunks if x["delta"].get("tool_calls")]
    assert [x["index"] for x in calls] == [0, 1]
    assert calls[0]["delta"]["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}
    assert [x["finish_reason"] for x in chunks if x["finish_reason"]] == ["tool_calls", "tool_calls"]


def test_streamed_echo_comes_first_with_the_prompt_logprobs(tok, texts):
    prompt = tok.encode("Paris")
    entries = [None] + [{"token_id": t, "logprob": -1.0, "top_logprobs": []} for t in prompt[1:]]
    b = ChunkBuilder(chat=False, rid=RID, created=1, model="m", include_usage=False)
    c = Choices(
        chat=False, prompts=[prompt], per_prompt=1, n=1, max_tokens=4, logprobs=True, echo=True,
        prompt_texts=["Paris"], texts=texts,
    )  # fmt: skip
    opening = c.open_all(b)  # as the gateway streams: before the node's first event is read
    feed(c, [{"type": "prompt_logprobs", "prompt_index": 0, "entries": entries}])
    _, scored = c.take_token(0, token(0, 70, " is", -0.25, []))
    first, second = (f["choices"][0] for f in frames(opening + c.chunk(b, 0, " is", scored)))
    assert first["text"] == "Paris" and len(first["logprobs"]["tokens"]) == len(prompt)
    assert second["text"] == " is" and second["logprobs"]["text_offset"] == [5]


def test_rogue_events_are_refused_not_trusted():
    c = Choices(chat=False, prompts=[[1, 2]], per_prompt=1, n=1, max_tokens=2)
    assert c.index_of({"index": 1}) is None and c.index_of({"index": True}) is None and c.index_of({}) == 0
    assert not c.take_prompt({"prompt_index": 3, "entries": []})
    assert c.take_prompt({"prompt_index": 0, "entries": [None, "junk"]})  # kept, read as nothing
    assert c.prompt_scored[0] == []
    c.prompt_scored[0] = None
    assert c.take_prompt({"prompt_index": 0, "entries": [None, {"logprob": "x"}]})
    assert [s.logprob for s in c.prompt_scored[0]] == [None, None]  # a number that is not one: unscored
    assert c.take_finish(0, {"finish_reason": "exploded"}) and not c.take_finish(0, {"finish_reason": "stop"})
    assert c.seqs[0].reason == "stop"


def test_node_body_leaves_defaults_out():
    t = Target("m", None, "0x" + "11" * 32)
    plain = parse_body(CompletionRequest, json.dumps({"model": "m", "prompt": "x"}).encode())
    body = to_node_request(plain, t, [[1, 2]], max_tokens=16, request_id=RID)
    assert set(body) == {
        "adapter_id", "prompt_token_ids", "max_tokens", "temperature", "top_p", "seed", "stop", "request_id",
    }  # fmt: skip
    assert body["prompt_token_ids"] == [1, 2]
    raw = {
        "model": "m",
        "prompt": [[1], [2]],
        "n": 2,
        "best_of": 3,
        "seed": -1,
        "top_k": 1,
        "min_p": 0.5,
        "presence_penalty": 1,
        "frequency_penalty": -1,
        "repetition_penalty": 1.3,
        "logit_bias": {"7": -100},
        "min_tokens": 1,
        "stop_token_ids": [9],
        "ignore_eos": True,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    }
    body = to_node_request(
        parse_body(CompletionRequest, json.dumps(raw).encode()), t, [[1], [2]], max_tokens=4, request_id=RID
    )
    assert body["prompt_token_ids"] == [[1], [2]] and body["n"] == 3 and body["seed"] == 2**64 - 1
    assert body["logprobs"] == 0  # best_of ranks by them
    assert body["guided"] == {"type": "json_schema", "schema": {"type": "object"}}
    for k in ("top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens"):
        assert body[k] == raw[k], k
    assert body["logit_bias"] == {"7": -100} and body["stop_token_ids"] == [9] and body["ignore_eos"] is True
    chat = {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "logprobs": True,
    }
    body = to_node_request(parse_body(ChatRequest, json.dumps(chat).encode()), t, [[1]], max_tokens=4, request_id=RID)
    assert body["logprobs"] == 0 and body["guided"]["type"] == "json_schema"


def test_held_tool_text_reaches_the_client_when_the_stream_fails(texts):
    """A constrained tool answer is held until its end; when the node fails first, what was held (and is
    billed) goes out as content before the error, once (attack review: it was billed and never delivered)."""
    plan = tool_plan([{"type": "function", "function": {"name": "f"}}], "required")
    b = ChunkBuilder(chat=True, rid=RID, created=1, model="m", include_usage=False)
    c = Choices(chat=True, prompts=[[1]], per_prompt=2, n=2, max_tokens=40, logprobs=False, texts=texts, plan=plan)
    out = c.open_all(b)
    for k, piece in ((0, '[{"name": "f", '), (1, '[{"na')):
        c.take_token(k, token(k, 70, piece))
        out += c.chunk(b, k, piece, None)
    assert not [f for f in frames(out) if f["choices"][0]["delta"].get("content")]  # all held so far
    released = frames(c.release_held(b))
    assert [(f["choices"][0]["index"], f["choices"][0]["delta"]["content"]) for f in released] == [
        (0, '[{"name": "f", '),
        (1, '[{"na'),
    ]
    assert c.release_held(b) == b""


@pytest.mark.parametrize(
    "choice, stop, cut",
    [
        ({"type": "function", "function": {"name": "f"}}, "stop", "length"),
        ("required", "tool_calls", "length"),
        # OpenAI's: an answer cut short says so, calls or not (vLLM's said "tool_calls", and code looking for a cut
        # answer never saw one; compat audit)
        ("auto", "tool_calls", "length"),
    ],
)
def test_a_call_cut_short_by_max_tokens_ends_length_whole_and_streamed(texts, choice, stop, cut):
    # a constrained call cut short streamed its partial arguments and ended "stop" or "tool_calls", while the
    # whole answer for the same tokens ended "length"
    plan = tool_plan([{"type": "function", "function": {"name": "f"}}], choice)
    calls = {
        "auto": '<tool_call>{"name": "f", "arguments": {}}</tool_call>',
        "required": '[{"name":"f","arguments":{}}]',
    }
    whole = calls[choice] if isinstance(choice, str) else "{}"
    for overall, want in (("stop", stop), ("length", cut)):
        b = ChunkBuilder(chat=True, rid=RID, created=1, model="m", include_usage=False)
        c = Choices(chat=True, prompts=[[1]], per_prompt=1, n=1, max_tokens=40, plan=plan)
        streamed = c.open_all(b)
        feed(c, [token(0, 70, whole)])
        streamed += c.chunk(b, 0, whole, None) + c.close_all(b, overall, False)
        assert [f["choices"][0]["finish_reason"] for f in frames(streamed) if f["choices"][0]["finish_reason"]] == [
            want
        ]
        whole_answer = Choices(chat=True, prompts=[[1]], per_prompt=1, n=1, max_tokens=40, plan=plan)
        feed(whole_answer, [token(0, 70, whole)])
        assert whole_answer.answer(overall, cut=False)[0]["finish_reason"] == want


@pytest.mark.parametrize(
    "named,names_stops", [(True, True), (False, False), (False, True)], ids=["named", "older", "none"]
)
def test_the_stop_string_that_ended_a_choice_ends_its_text_when_kept(tok, texts, named, names_stops):
    """vLLM's include_stop_str_in_output: the node leaves the stop string out of the text and names it in its
    finish event; a node of an older release names none, and the gateway reads it back from the tokens (the
    decoding goes on past the text relayed with it). A node that names stop strings and named none met none (its
    tokens are not decoded again). Whole and streamed, with its stop_reason."""
    from node.adapters.detokenizer import TextStream

    stops = ("again", " world")
    ids, stream, events = tok.encode("hello world again", add_special_tokens=False), TextStream(tok, stops), []
    for tid in ids:  # as the node's detokenizer relays them, up to the token that completes a stop string
        text, hit = stream.push(tid)
        events.append(token(0, tid, text))
        if hit:
            break
    assert stream.stopped == " world" and len(events) < len(ids)
    before = "".join(e["text"] for e in events)
    finish = {"type": "finish", "index": 0, "finish_reason": "stop"} | ({"stop_string": " world"} if named else {})
    kept = []
    for keep in (False, True):
        c = Choices(
            chat=False, prompts=[[1]], per_prompt=1, n=1, max_tokens=len(ids), texts=texts, stops=stops, keep_stop=keep
        )
        c.names_stops = names_stops
        feed(c, [*events, finish])
        (whole,) = c.answer(None, False)
        b = ChunkBuilder(chat=False, rid=RID, created=1, model="m", include_usage=False)
        streamed = c.chunk(b, 0, before, None) + c.close(b, 0, None, False)
        assert "".join(f["choices"][0]["text"] for f in frames(streamed)) == whole["text"]
        assert whole["stop_reason"] == (" world" if named else None)
        kept.append(whole["text"])
    assert kept == [before, before + ("" if names_stops and not named else " world")]
