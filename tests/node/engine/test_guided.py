"""Guided decoding in the engine: every json_schema / json_object answer parses and validates, even from random
weights, in a batch that mixes guided rows with free rows whose tokens stay those of an unconstrained run."""

from __future__ import annotations

import json

import jsonschema
import pytest

from node.engine import GenerationRequest, RequestError, SamplingParams, grammar
from node.engine.grammar import GuidedSpec

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def _req(rid: str, prompt: list[int], *, guided=None, seed: int = 0, temperature: float = 1.0) -> GenerationRequest:
    params = SamplingParams(max_tokens=200, temperature=temperature, seed=seed, guided=guided)
    return GenerationRequest(rid, None, prompt_token_ids=prompt, params=params)


def test_every_guided_answer_parses_and_validates_beside_free_rows(llama_world):
    engine = llama_world.engine(num_kv_blocks=600)
    tok = engine.tokenizer
    try:
        schema = GuidedSpec.from_wire({"type": "json_schema", "schema": SCHEMA})
        obj = GuidedSpec.from_wire({"type": "json_object"})
        prompts = [[1, 10 + i, 20 + i, 30] for i in range(12)]
        free = {f"free{i}": _req(f"free{i}", prompts[i], seed=100 + i, temperature=[0, 0.8][i % 2]) for i in range(4)}
        guided = {f"schema{i}": _req(f"schema{i}", prompts[4 + i], guided=schema, seed=i) for i in range(6)}
        guided |= {f"obj{i}": _req(f"obj{i}", prompts[10 + i], guided=obj, seed=50 + i) for i in range(2)}
        mixed = engine.generate([*guided.values(), *free.values()])
        alone = engine.generate(
            [
                _req(f"{rid}-alone", r.prompt_token_ids, seed=r.params.seed, temperature=r.params.temperature)
                for rid, r in free.items()
            ]
        )
        for rid in free:
            assert mixed[rid].token_ids == alone[f"{rid}-alone"].token_ids, rid
        for rid in guided:
            fin = mixed[rid]
            if rid.startswith("obj"):  # any object: random weights may write one string for ever, but as JSON
                assert fin.text.startswith("{")
                if fin.finish_reason == "stop":
                    assert isinstance(json.loads(fin.text), dict)
                continue
            assert fin.finish_reason == "stop", (rid, fin.text)
            value = json.loads(tok.decode(list(fin.token_ids), skip_special_tokens=True))
            assert json.loads(fin.text) == value
            jsonschema.validate(value, SCHEMA)
    finally:
        engine.close()


def test_a_schema_the_grammar_cannot_compile_is_refused_before_it_runs(llama_world):
    engine = llama_world.engine()
    try:
        bad = GuidedSpec.from_wire(
            {"type": "json_schema", "schema": {"type": "object", "properties": {"x": {"type": "nope"}}}}
        )
        with pytest.raises(RequestError, match="guided"):
            engine.add_request(_req("bad", [1, 2, 3], guided=bad))
        assert not engine.has_work() and "bad" not in engine.requests
    finally:
        engine.close()


def test_a_schema_the_parser_cannot_follow_fails_the_request_not_as_a_match(llama_world):
    """allOf of 3 anyOfs of 5 objects compiles, then outgrows the parser's bounds a couple of tokens in: the request
    fails with the reason (every one of its sequences), where its text ended "stop", cut short, as if it matched;
    a request beside it is served."""
    products = {
        "allOf": [
            {"anyOf": [{"type": "object", "properties": {f"p{j}_{i}": {"type": "integer"}}} for i in range(5)]}
            for j in range(3)
        ]
    }
    engine = llama_world.engine()
    try:
        spec = GuidedSpec.from_wire({"type": "json_schema", "schema": products})
        hard = GenerationRequest(
            "hard", None, prompt_token_ids=[1, 5, 6], params=SamplingParams(max_tokens=32, n=2, seed=3, guided=spec)
        )
        done = engine.generate([hard, _req("plain", [1, 7, 8], seed=4)])
        assert done["hard"].finish_reason == "error", (done["hard"].finish_reason, done["hard"].text)
        assert "could not be enforced" in done["hard"].error
        assert done["plain"].finish_reason in ("stop", "length") and done["plain"].completion_tokens > 0
    finally:
        engine.close()


def test_choice_and_regex_answers_from_random_weights(llama_world):
    """vLLM's guided choice and regex through the engine: every answer, sampled from random weights, is exactly
    one of the choices, or text the regular expression matches whole, and ends "stop" there."""
    import re

    engine = llama_world.engine(num_kv_blocks=600)
    try:
        choices = ["positive", "negative", "neutral (unsure)"]
        choice = GuidedSpec.from_wire({"type": "choice", "choices": choices})
        regex = GuidedSpec.from_wire({"type": "regex", "pattern": "[A-Z][a-z]{2,6} [0-9]{1,3}"})
        reqs = [_req(f"c{i}", [1, 10 + i, 20], guided=choice, seed=i) for i in range(4)]
        reqs += [_req(f"r{i}", [1, 30 + i, 40], guided=regex, seed=10 + i) for i in range(4)]
        done = engine.generate(reqs)
        for i in range(4):
            assert done[f"c{i}"].text in choices and done[f"c{i}"].finish_reason == "stop", done[f"c{i}"]
            r = done[f"r{i}"]
            assert r.finish_reason == "stop" and re.fullmatch("[A-Z][a-z]{2,6} [0-9]{1,3}", r.text), r.text
    finally:
        engine.close()


@pytest.mark.parametrize("drafting", [False, True], ids=["plain step", "beside a drafting row"])
def test_a_request_failing_on_its_grammar_ends_once_and_alone(llama_world, monkeypatch, drafting):
    """n=2 under a schema the parser cannot follow, its sequences failing in one step: the request ends once (one
    FinishEvent, nothing after it), its siblings are not emitted after it ended, and a request beside it, in a
    plain step or in a speculative one (where emitting a finished sibling committed freed blocks: IndexError for
    the whole batch, review), is served."""
    import node.engine.llm_engine as llm_engine
    from node.engine import FinishEvent, TokenEvent

    if drafting:  # the free row always drafts: the step is a speculative one
        monkeypatch.setattr(llm_engine, "propose", lambda ids, room, lo, hi: [5])
    products = {
        "allOf": [
            {"anyOf": [{"type": "object", "properties": {f"p{j}_{i}": {"type": "integer"}}} for i in range(5)]}
            for j in range(3)
        ]
    }
    schema = {"type": "object", "properties": {"x": products}, "required": ["x"], "additionalProperties": False}
    spec = GuidedSpec.from_wire({"type": "json_schema", "schema": schema})
    engine = llama_world.engine(speculative="ngram" if drafting else "off")
    try:
        guided = GenerationRequest(
            "g",
            None,
            prompt_token_ids=[1, 2, 3, 4, 5, 6, 7],
            params=SamplingParams(max_tokens=32, n=2, seed=3, guided=spec),
        )
        engine.add_request(guided)
        engine.add_request(_req("free", [1, 7, 8, 9], seed=2, temperature=0))
        events = []
        for _ in range(200):
            if not engine.has_work():
                break
            events += engine.step()[0]
        finishes = {
            rid: [e for e in events if isinstance(e, FinishEvent) and e.request_id == rid] for rid in ("g", "free")
        }
        assert [f.finish_reason for f in finishes["g"]] == ["error"], finishes["g"]
        assert "could not be enforced" in finishes["g"][0].error
        after = events[events.index(finishes["g"][0]) + 1 :]
        assert not [e for e in after if isinstance(e, TokenEvent) and e.request_id == "g"]
        assert [f.finish_reason for f in finishes["free"]] in (["stop"], ["length"]), finishes["free"]
        assert engine.usage["requests"] == 2  # each request counted once
    finally:
        engine.close()


def test_a_request_past_its_grammar_cpu_fails_and_the_one_beside_it_is_served(llama_world, monkeypatch):
    """A request's sequences share one grammar budget (grammar.GrammarBudget): with every mask and token costing
    2 ms, sixteen sequences of one request (64 ms a step) spend their 100 ms in their second step and the request
    fails, saying why, while two sequences of another (8 ms a step, under the 10 ms a step that follows the burst)
    are served to the end. The failing request names one of the model's end tokens in stop_token_ids: once its
    budget was spent its masks allowed only those, and it ended "stop", cut short, as if it matched."""
    from node.engine import grammar
    from tests.node.engine.test_grammar import CpuClock

    monkeypatch.setattr(grammar.time, "thread_time", CpuClock(0.002))
    engine = llama_world.engine()
    try:
        regex = GuidedSpec.from_wire({"type": "regex", "pattern": "[a-z]{1,40}"})
        end = sorted(engine.eos_ids)

        def req(rid: str, n: int, **kw) -> GenerationRequest:
            params = SamplingParams(max_tokens=30, n=n, seed=5, guided=regex, **kw)
            return GenerationRequest(rid, None, prompt_token_ids=[1, 9, 12], params=params)

        done = engine.generate([req("wide", 16, stop_token_ids=end), req("narrow", 2)])
        assert done["wide"].finish_reason == "error" and "allows a request" in done["wide"].error, done["wide"]
        assert done["narrow"].finish_reason in ("stop", "length") and done["narrow"].completion_tokens > 2
    finally:
        engine.close()


def test_a_budget_spent_on_a_token_fails_the_request_even_where_its_end_token_is_a_stop_token(llama_world, monkeypatch):
    """Spent by the token accepted last in a step, a request's budget left its next masks allowing only the end
    tokens; one of them in stop_token_ids ended the sequence "stop" before the failed matcher was read: its text
    cut short, as if it matched (red team). It fails now."""
    from node.engine import grammar
    from tests.node.engine.test_grammar import CpuClock

    monkeypatch.setattr(grammar.time, "thread_time", CpuClock(0.002))
    monkeypatch.setattr(grammar, "GRAMMAR_BURST_CPU_S", 0.003)  # a mask (2 ms), then the token crosses it
    monkeypatch.setattr(grammar, "GRAMMAR_STEP_CPU_S", 0.0)
    engine = llama_world.engine()
    try:
        regex = GuidedSpec.from_wire({"type": "regex", "pattern": "[a-z]{1,40}"})
        params = SamplingParams(max_tokens=30, seed=5, guided=regex, stop_token_ids=sorted(engine.eos_ids))
        done = engine.generate([GenerationRequest("lone", None, prompt_token_ids=[1, 9, 12], params=params)])
        assert done["lone"].finish_reason == "error" and "allows a request" in done["lone"].error, done["lone"]
        assert done["lone"].completion_tokens == 2
    finally:
        engine.close()


def test_a_grammar_that_broke_in_the_library_is_forgotten_and_compiled_afresh(llama_world):
    """What a matcher learns is shared with its compiled grammar and every copy (the lexer's states, the parser's
    locks): one request that spent a grammar's lexer states, or had the library panic and poison a lock (a lexeme
    with a multi-byte stop=, in llguidance 1.9.1), made every later request of that grammar fail at its first
    token, another client's too (red team). A request whose matcher breaks in the library has its grammar
    forgotten, and the next request of it compiles it afresh. One that fails because the request's own bans left
    only the end token (here allowed_token_ids against the grammar's next token) breaks nothing shared: its grammar
    stays compiled (forgotten on it, any client could evict any grammar it can name)."""
    engine = llama_world.engine()
    try:
        grammars = engine.grammars()
        panics = GuidedSpec.from_wire({"type": "grammar", "grammar": 'start: foo "b"\nfoo[stop="zz"]: /[a-y]*/'})
        reqs = [_req(f"p{i}", [1, 5, 6], guided=panics, seed=i) for i in range(4)]
        done = engine.generate(reqs)
        failed = [r for r in done.values() if r.finish_reason == "error"]
        assert failed and all("could not be enforced" in r.error for r in failed), done
        assert not grammars.cached(panics)

        (x,) = engine.tokenizer.encode("x", add_special_tokens=False)
        eos = sorted(engine.eos_ids)[0]
        spec = GuidedSpec.from_wire({"type": "grammar", "grammar": 'start: "x" "y"'})
        trapped = SamplingParams(max_tokens=8, temperature=0, guided=spec, allowed_token_ids=(x, eos))
        done = engine.generate([GenerationRequest("trapped", None, prompt_token_ids=[1, 5, 6], params=trapped)])
        assert done["trapped"].finish_reason == "error" and "could not be enforced" in done["trapped"].error
        assert grammars.cached(spec)
        fine = engine.generate([_req("fine", [1, 5, 6], guided=spec, temperature=0)])["fine"]
        assert (fine.text, fine.finish_reason) == ("xy", "stop")
    finally:
        engine.close()


# a regex whose lexer, built as the text goes, gains states with every letter drawn freely (red team)
HUNGRY = "[a-z]*(" + "|".join(f"{c}[a-z]{{16}}{c}" for c in "abcdefghijklmnopqrstuvwxyz") + ")[a-z]*"


def test_a_clients_walks_spend_no_other_clients_lexer(llama_world, monkeypatch):
    """Red team: the copies of a compiled grammar share the lexer it builds as they go, whose states are bounded
    (MAX_LEXER_STATES). A stranger's requests of another client's grammar, sampling freely through a regex whose
    lexer grows with every letter, spent them: the other's greedy request, already running, failed on its next
    mask, its tokens billed. Requests share a compiled grammar only under one cache salt (the gateway gives each
    key its own), as they share cached prompt KV; a salt's own requests still share one."""
    monkeypatch.setattr(grammar, "MAX_LEXER_STATES", 5_000)  # read when the engine's grammars are built
    engine = llama_world.engine(num_kv_blocks=600)
    try:
        spec = GuidedSpec.from_wire({"type": "regex", "pattern": HUNGRY})
        eos = sorted(engine.eos_ids)

        def honest(rid: str) -> GenerationRequest:
            params = SamplingParams(max_tokens=120, temperature=0, guided=spec)
            return GenerationRequest(rid, None, prompt_token_ids=[1, 9, 12, 40], params=params, cache_salt="honest")

        alone = engine.generate([honest("alone")])["alone"]
        assert alone.error is None
        free = {"temperature": 2.0, "min_tokens": 120, "logit_bias": dict.fromkeys(eos, -100.0), "guided": spec}
        strangers = [
            GenerationRequest(
                f"stranger{i}",
                None,
                prompt_token_ids=[1, 9, 12, 41 + i],
                params=SamplingParams(max_tokens=120, seed=i, **free),
                cache_salt="stranger",
            )
            for i in range(6)
        ]
        done = engine.generate([honest("beside"), *strangers])
        assert any("too many states" in (done[r.request_id].error or "") for r in strangers)  # they spent theirs
        assert done["beside"].error is None and done["beside"].token_ids == alone.token_ids
        assert engine.grammars().cached(spec, "honest")
    finally:
        engine.close()
