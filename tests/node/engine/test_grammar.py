"""Guided decoding (node/engine/grammar.py) with the tiny base's byte-level tokenizer: random logits driven through
fill -> apply_bitmask -> pick -> accept always give text that parses and validates; the wire value is checked;
the cache, the mask's rows and its bounds (padding ids, EOS) hold exactly."""

from __future__ import annotations

import json
import re
import sys
import threading

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from common.wire import MAX_GUIDED_CHOICES, MAX_GUIDED_GRAMMAR_CHARS, MAX_GUIDED_PATTERN_CHARS, restore_recursion_limit
from node.engine import grammar
from node.engine.grammar import (
    MAX_SCHEMA_BYTES,
    WHITESPACE_MAX,
    GrammarBudget,
    GrammarError,
    Grammars,
    GuidedSpec,
    apply_bitmask,
    schema_json,
)
from node.engine.request import RequestError

WIDTH = 352  # the model's logits width: past the tokenizer's 320 tokens, as padded embeddings are
EOS = 2

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "owner": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 8},
                "score": {"type": "number", "minimum": -10, "maximum": 10},
                "active": {"type": "boolean"},
                "note": {"type": ["string", "null"], "maxLength": 4},
            },
            "required": ["name", "active"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[a-z]{2}-[0-9]{2,3}$"},
                    "qty": {"type": "integer"},
                },
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 2,
        },
    },
    "required": ["id", "owner", "items"],
    "additionalProperties": False,
}
# the shape gateway/tools.py asks for with tool_choice "required": one of the tools' calls
TOOL_CALL = {
    "anyOf": [
        {
            "type": "object",
            "properties": {
                "name": {"const": "get_weather"},
                "arguments": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
                    "required": ["city", "unit"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {
                "name": {"const": "now"},
                "arguments": {"type": "object", "properties": {}, "additionalProperties": False},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        },
    ]
}
SCHEMAS = {"person": PERSON, "nested": NESTED, "tool_call": TOOL_CALL}


@pytest.fixture(scope="module")
def tok(tiny_base):
    return AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture(scope="module")
def grammars(tok):
    return Grammars(tok, WIDTH)


def PRODUCTS(factors: int, alternatives: int) -> dict:  # noqa: N802 - reads as the schema it builds
    """allOf of `factors` anyOfs of `alternatives` one-property objects: alternatives ** factors object shapes."""
    return {
        "allOf": [
            {
                "anyOf": [
                    {"type": "object", "properties": {f"p{j}_{i}": {"type": "integer"}}} for i in range(alternatives)
                ]
            }
            for j in range(factors)
        ]
    }


def spec(schema: dict | None) -> GuidedSpec:
    return GuidedSpec.from_wire(
        {"type": "json_object"} if schema is None else {"type": "json_schema", "schema": schema}
    )


def allowed(mask_row: torch.Tensor) -> torch.Tensor:
    """bool [WIDTH]: bit t of the row, read the plain way (not apply_bitmask's)."""
    words = mask_row.tolist()
    return torch.tensor([(words[t // 32] >> (t % 32)) & 1 == 1 for t in range(WIDTH)])


def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable bytes stand for themselves, the rest for chr(256 + k)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(rest)}


BYTE_OF_CHAR = _byte_of_char()


def text_of(tok, ids: list[int]) -> str:
    """The exact bytes of a byte-level BPE's tokens, decoded strictly (invalid UTF-8 raises)."""
    return b"".join(bytes(BYTE_OF_CHAR[c] for c in tok.convert_ids_to_tokens(i)) for i in ids).decode("utf-8")


def generate(tok, grammars, guided: GuidedSpec, seed: int, *, sample: bool, bias=None, cap: int = 600) -> list[int]:
    """Random logits through the grammar until it is complete; every step's mask checked against the matcher."""
    m = grammars.matcher(guided)
    gen = torch.Generator().manual_seed(seed)
    mask = grammars.new_bitmask(1)
    ids = []
    while not m.terminated:
        assert len(ids) < cap, f"no end after {cap} tokens: {text_of(tok, ids)!r}"
        m.fill(mask, 0)
        ok = allowed(mask[0])
        assert not ok[len(tok) :].any(), "an id past the tokenizer's vocabulary was allowed"
        assert ok[EOS].item() is False, "EOS allowed before the object is complete"
        logits = torch.randn(1, WIDTH, generator=gen) * 3
        if bias is not None:
            logits += bias
        apply_bitmask(logits, mask)
        t = int(torch.multinomial(logits.softmax(-1), 1, generator=gen)) if sample else int(logits.argmax())
        assert ok[t]
        assert m.accept(t)
        ids.append(t)
    m.fill(mask, 0)  # complete: EOS and nothing else
    assert allowed(mask[0]).nonzero().flatten().tolist() == [EOS]
    return ids


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_random_logits_always_give_valid_json(tok, grammars, name):
    schema = SCHEMAS[name]
    validator = jsonschema.Draft202012Validator(schema)
    texts = set()
    for seed in range(12):
        text = text_of(tok, generate(tok, grammars, spec(schema), seed, sample=seed % 2 == 1))
        validator.validate(json.loads(text))
        texts.add(text)
    assert len(texts) >= 10  # the draws differ: the grammar constrains, it does not dictate


def test_json_object_gives_an_object(tok, grammars):
    # any JSON allows unbounded strings, which random logits over ~300 string tokens rarely close: favour the
    # closing characters so documents end within the cap (the grammar, not the bias, makes them valid)
    bias = torch.zeros(WIDTH)
    bias[tok.convert_tokens_to_ids(['"', "}", "]", "0", "1"])] = 4.0
    for seed in range(10):
        value = json.loads(text_of(tok, generate(tok, grammars, spec(None), seed, sample=True, bias=bias)))
        assert isinstance(value, dict)


def test_a_matcher_is_done_at_the_closing_brace_and_refuses_what_the_grammar_does_not_allow(tok, grammars):
    m = grammars.matcher(spec(PERSON))
    ids = tok.encode('{"name": "Ann", "age": 7, "role": "user", "tags": []}', add_special_tokens=False)
    for t in ids[:-1]:
        assert m.accept(t) and not m.terminated and not m.accepting
    assert m.accept(ids[-1]) and m.terminated and m.accepting

    m = grammars.matcher(spec(PERSON))
    assert m.accept(tok.convert_tokens_to_ids("{"))
    assert not m.accept(WIDTH) and not m.accept(-1)  # outside the logits: refused without touching the matcher
    assert not m.accept(tok.convert_tokens_to_ids("}"))  # "name" is required
    assert m.terminated  # a matcher that refused a token stops: EOS only
    mask = grammars.new_bitmask(1)
    m.fill(mask, 0)
    assert allowed(mask[0]).nonzero().flatten().tolist() == [EOS]


def test_properties_come_in_the_order_the_schema_lists_them(tok, grammars):
    # keys are not sorted on the way in: the order is the client's ("reasoning" before "answer")
    for order in (["b", "a"], ["a", "b"]):
        schema = {
            "type": "object",
            "properties": {k: {"enum": [1]} for k in order},
            "required": order,
            "additionalProperties": False,
        }
        text = text_of(tok, generate(tok, grammars, spec(schema), 0, sample=True))
        assert list(json.loads(text)) == order


def test_whitespace_between_tokens_is_bounded(tok, grammars):
    space = tok.convert_tokens_to_ids("Ġ")
    m = grammars.matcher(spec(None))
    assert m.accept(tok.convert_tokens_to_ids("{"))
    for _ in range(WHITESPACE_MAX):
        assert m.accept(space)
    assert not m.accept(space)
    m = grammars.matcher(spec(None))
    assert not m.accept(space)  # nothing before the value, so EOS comes exactly at the end of an object


def takes(tok, grammars, spec_: GuidedSpec, text: str) -> bool:
    """Whether the spec's grammar takes `text` whole (its tokens one by one, then the end)."""
    m = grammars.matcher(spec_)
    return all(m.accept(t) for t in tok.encode(text, add_special_tokens=False)) and m.accepting


def test_a_choice_is_one_of_its_strings_taken_literally_and_a_regex_matches_whole(tok, grammars):
    """vLLM's guided choice and regex: the text is exactly one choice (regex syntax in a choice is just text), or
    text the whole regular expression matches; EOS comes only where it is complete."""
    choice = GuidedSpec.from_wire({"type": "choice", "choices": ["yes", "no", "a.b*c", "x|y", "(z)\\"]})
    for text in ("yes", "no", "a.b*c", "x|y", "(z)\\"):
        assert takes(tok, grammars, choice, text), text
    for text in ("ye", "yess", "aXbbc", "x", "z"):
        assert not takes(tok, grammars, choice, text), text
    regex = GuidedSpec.from_wire({"type": "regex", "pattern": "[0-9]{3}-[a-z]+"})
    assert takes(tok, grammars, regex, "123-abc")
    assert not takes(tok, grammars, regex, "12-abc") and not takes(tok, grammars, regex, "123-")
    with pytest.raises(GrammarError, match="guided.pattern"):
        grammars.matcher(GuidedSpec.from_wire({"type": "regex", "pattern": "(unclosed"}))


# one language in the two dialects vLLM's guided_grammar takes: llguidance's Lark and llama.cpp's GBNF
SQL_LARK = """
start: "SELECT " cols " FROM " table (" WHERE " cond)?
cols: col (", " col)*
col: "id" | "name" | "age"
table: "users" | "orders"
cond: col " = " /[0-9]{1,4}/
"""
SQL_GBNF = """
root ::= "SELECT " cols " FROM " table (" WHERE " cond)?
cols ::= col (", " col)*
col ::= "id" | "name" | "age"
table ::= "users" | "orders"
cond ::= col " = " [0-9] [0-9]? [0-9]? [0-9]?
"""
SQL = re.compile(r"SELECT (id|name|age)(, (id|name|age))* FROM (users|orders)( WHERE (id|name|age) = [0-9]{1,4})?")


def sample_answer(tok, grammars, guided: GuidedSpec, seed: int, cap: int = 300) -> str:
    """Random logits through the grammar until an end token is drawn where the grammar allows one, or it is
    complete."""
    m, gen, mask, ids = grammars.matcher(guided), torch.Generator().manual_seed(seed), grammars.new_bitmask(1), []
    while not m.terminated:
        assert len(ids) < cap, f"no end after {cap} tokens: {text_of(tok, ids)!r}"
        m.fill(mask, 0)
        logits = torch.randn(1, WIDTH, generator=gen) * 3
        apply_bitmask(logits, mask)
        t = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
        if t == EOS:
            assert m.accepting, "EOS allowed before the text is complete"
            break
        assert m.accept(t)
        ids.append(t)
    return text_of(tok, ids)


@pytest.mark.parametrize("text", [SQL_LARK, SQL_GBNF], ids=["lark", "gbnf"])
def test_a_grammar_in_lark_or_gbnf_is_the_language_of_the_answer(tok, grammars, text):
    """vLLM's guided_grammar: the answer is text the grammar derives, whichever of the two dialects it is in."""
    g = GuidedSpec.from_wire({"type": "grammar", "grammar": text})
    for good in ("SELECT id FROM users", "SELECT name, age, id FROM orders WHERE age = 42"):
        assert takes(tok, grammars, g, good), good
    for bad in ("SELECT id FROM people", "SELECT id  FROM users", "SELECT id FROM users WHERE id = 12345", "SELECT"):
        assert not takes(tok, grammars, g, bad), bad
    answers = {sample_answer(tok, grammars, g, seed) for seed in range(10)}
    assert all(SQL.fullmatch(a) for a in answers), answers
    assert len(answers) >= 5  # the draws differ: the grammar constrains, it does not dictate


def test_a_grammar_cannot_name_an_id_past_the_tokenizer(tok, grammars):
    """Lark names any id (`<[351]>`), and llguidance's own masks would allow it; past the tokenizer's 320 ids (a
    padded embedding's rows) an id has no text, and the node's detokenizer and the gateway's check disagreed over
    one (red team: an honest node disputed). Masks never allow them; a grammar that starts with one is refused."""
    g = GuidedSpec.from_wire({"type": "grammar", "grammar": 'start: "a" (<[351]> | <[330]> | "b")'})
    m, mask = grammars.matcher(g), grammars.new_bitmask(1)
    (a,) = tok.encode("a", add_special_tokens=False)
    assert m.accept(a)
    m.fill(mask, 0)
    assert allowed(mask[0]).nonzero().flatten().tolist() == tok.encode("b", add_special_tokens=False)
    with pytest.raises(GrammarError, match="allows no first token"):
        grammars.matcher(GuidedSpec.from_wire({"type": "grammar", "grammar": "start: <[351]> | <[340]>"}))


def _compact_names(n: int) -> list[str]:
    """n distinct short rule names: a .. z, aa .. zz, ... (lower case: Lark's rules, not its terminals)."""
    out = []
    for i in range(1, n + 1):
        name = ""
        while i:
            i, r = divmod(i - 1, 26)
            name = chr(ord("a") + r) + name
        out.append(name)
    return out


@pytest.mark.parametrize(
    "text, words",
    [
        ("start: (unclosed", "guided.grammar cannot be compiled"),
        ("start: nowhere", "guided.grammar cannot be compiled"),
        # llguidance's GBNF converter recurses per level: Python's recursion bound (the node's), not a dead thread
        ("root ::= " + "(" * 4000 + '"x"' + ")" * 4000, "guided.grammar cannot be read"),
        # GBNF is made Lark in Python, in time growing with the square of its rules: 3,400 rules chained in the
        # wrong order (32 kB) took 0.5 s of the compile thread (red team); GBNF is bounded at MAX_GBNF_CHARS
        (
            "root ::= r0\n" + "".join(f"r{i} ::= r{i + 1}\n" for i in range(2000)) + 'r2000 ::= "x"',
            "a GBNF grammar is at most 8192 characters",
        ),
        ("start: " + "(" * 2000 + '"x"' + ")" * 2000, "guided.grammar cannot be compiled"),
        # 2,000 rules, each two of the next, in 30 kB: the first mask took 46 ms on the compile thread, and each
        # would on the engine's; refused there, past MAX_MASK_CPU_S, in 80 ms
        (
            "\n".join(
                ["start: a"]
                + [f'{a}:{b} {b}|"a"' for a, b in zip(_compact_names(2000), _compact_names(2001)[1:])]
                + [f'{_compact_names(2001)[-1]}:"b"']
            ),
            "guided.grammar cannot be enforced",
        ),
    ],
    ids=["syntax", "unknown-rule", "deep-gbnf", "long-gbnf", "deep-lark", "slow-first-mask"],
)
def test_a_grammar_that_cannot_be_served_is_a_one_line_grammar_error(grammars, text, words):
    assert len(text) <= MAX_GUIDED_GRAMMAR_CHARS
    old = sys.getrecursionlimit()
    restore_recursion_limit()  # the node's bound (node.daemon), whatever py_ecc, imported by other tests, made it
    try:
        refused_when_compiled(grammars, text, words)
    finally:
        sys.setrecursionlimit(old)


def refused_when_compiled(grammars, text: str, words: str) -> None:
    g = GuidedSpec.from_wire({"type": "grammar", "grammar": text})
    with pytest.raises(GrammarError, match=words) as e:
        grammars.matcher(g)
    assert "\n" not in str(e.value) and len(str(e.value)) < 300
    assert not grammars.cached(g)


@pytest.mark.parametrize("pattern", ["(x{1000}){1000}", "((xy){300}){300}"])
def test_a_regex_whose_masks_cost_too_much_is_refused_when_compiled(grammars, pattern):
    """15 characters of guided_regex took 0.8 s to compile on the node's one compile thread, then 140 ms of the
    engine thread for every token's mask, every request batched beside it waiting."""
    with pytest.raises(GrammarError, match="guided.pattern cannot be enforced") as e:
        grammars.matcher(GuidedSpec.from_wire({"type": "regex", "pattern": pattern}))
    assert "\n" not in str(e.value)


def test_a_mask_past_its_cpu_budget_stops_the_matcher(grammars, monkeypatch):
    """Past MAX_MASK_CPU_S a matcher says why in `error`, which fails its request (llm_engine._emit)."""
    m = grammars.matcher(GuidedSpec.from_wire({"type": "regex", "pattern": "[a-z]+"}))
    mask = grammars.new_bitmask(1)
    m.fill(mask, 0)
    assert m.error == ""
    monkeypatch.setattr(grammar, "MAX_MASK_CPU_S", -1.0)
    m.fill(mask, 0)
    assert "mask took" in m.error and "\n" not in m.error


class CpuClock:
    """time.thread_time for the grammar module: every reading `cost` seconds after the last, so each mask and each
    token accepted (a reading before, one after) costs `cost`."""

    def __init__(self, cost: float) -> None:
        self.now, self.cost, self.readings = 0.0, cost, 0

    def __call__(self) -> float:
        self.now += self.cost
        self.readings += 1
        return self.now


def test_a_requests_sequences_share_one_cpu_budget(grammars, monkeypatch):
    """Each mask alone was held to MAX_MASK_CPU_S: a request of 64 sequences whose masks each took just under it
    held every request's step for about 1.3 s. A request's sequences now share one budget, masks and tokens
    accepted together; past it each of them says why in `error` (which fails the request) and their masks are not
    computed again (a row allowing only the end token). Another request's budget is its own."""
    regex = GuidedSpec.from_wire({"type": "regex", "pattern": "[a-z]+"})
    budget = GrammarBudget()
    wide = [grammars.matcher(regex, budget) for _ in range(64)]
    other = grammars.matcher(regex)
    clock = CpuClock(0.006)  # under MAX_MASK_CPU_S (0.02): 17 of them pass GRAMMAR_BURST_CPU_S (0.1)
    monkeypatch.setattr(grammar.time, "thread_time", clock)
    mask = grammars.new_bitmask(64)
    for j, m in enumerate(wide):
        m.fill(mask, j, 1)
    assert clock.readings == 2 * 17
    assert all("more CPU than this node allows a request" in m.error and "\n" not in m.error for m in wide)
    for j in (17, 63):
        assert allowed(mask[j]).nonzero().flatten().tolist() == [EOS]
    assert allowed(mask[0]).sum() > 26  # computed: the letters, and tokens starting with them
    other.fill(mask, 0, 1)
    assert other.error == ""


@pytest.mark.parametrize(("cost", "fails_at"), [(0.004, None), (0.006, range(40, 50))])
def test_a_request_under_the_budget_each_step_is_still_bounded_over_its_life(grammars, monkeypatch, cost, fails_at):
    """A budget a step let a request stay just under it for ever: 48 sequences of 1.7 ms masks took 78 ms of every
    step for 39 s (red team). After GRAMMAR_BURST_CPU_S a request gets GRAMMAR_STEP_CPU_S a step: a sequence whose
    mask and token cost 8 ms a step runs on; one at 12 ms a step spends its burst in about 45 steps and fails."""
    regex = GuidedSpec.from_wire({"type": "regex", "pattern": "[a-z]+"})
    m = grammars.matcher(regex, GrammarBudget())
    monkeypatch.setattr(grammar.time, "thread_time", CpuClock(cost))
    mask, a = grammars.new_bitmask(1), grammars_token(grammars, "a")
    failed = None
    for step in range(1, 201):
        m.fill(mask, 0, step)
        m.accept(a)
        if m.error and failed is None:
            failed = step
    assert (failed is None) if fails_at is None else (failed in fails_at), (failed, m.error)


def grammars_token(grammars, text: str) -> int:
    (t,) = grammars._tokenizer.tokenize_str(text)
    return t


def test_from_wire_accepts_the_two_shapes():
    assert GuidedSpec.from_wire(None) is None
    assert GuidedSpec.from_wire({"type": "json_object"}) == GuidedSpec("json_object")
    got = GuidedSpec.from_wire({"type": "json_schema", "schema": {"type": "object", "required": ["b", "é"]}})
    assert got == GuidedSpec("json_schema", '{"type":"object","required":["b","é"]}')
    pad = MAX_SCHEMA_BYTES - len(schema_json({"description": ""}))
    assert GuidedSpec.from_wire({"type": "json_schema", "schema": {"description": "x" * pad}}) is not None
    longest = "start: /x*/ " + "#" * (MAX_GUIDED_GRAMMAR_CHARS - 12)
    assert GuidedSpec.from_wire({"type": "grammar", "grammar": longest}) == GuidedSpec("grammar", grammar=longest)


@pytest.mark.parametrize(
    "wire, words",
    [
        ("json_object", "must be an object"),
        ([{"type": "json_object"}], "must be an object"),
        ({}, "guided.type"),
        ({"type": "lark", "grammar": "start: x"}, "guided.type"),  # a grammar's dialect is no type
        ({"type": "grammar"}, "guided.grammar must be a string"),
        ({"type": "grammar", "grammar": ["start: x"]}, "guided.grammar must be a string"),
        ({"type": "grammar", "grammar": ""}, "guided.grammar must be a grammar of 1 to"),
        ({"type": "grammar", "grammar": "x" * (MAX_GUIDED_GRAMMAR_CHARS + 1)}, "guided.grammar must be a grammar of"),
        ({"type": "grammar", "grammar": "start: x", "pattern": "x"}, "unknown field"),
        ({"type": "regex", "schema": {}}, "unknown field"),
        ({"type": "regex"}, "guided.pattern must be"),
        ({"type": "regex", "pattern": "x" * (MAX_GUIDED_PATTERN_CHARS + 1)}, "guided.pattern must be"),
        ({"type": "choice", "choices": []}, "guided.choices must be a list"),
        ({"type": "choice", "choices": ["a"] * (MAX_GUIDED_CHOICES + 1)}, "guided.choices must be a list"),
        ({"type": "choice", "choices": ["a", 1]}, "guided.choices must be strings"),
        ({"type": "choice", "choices": [""]}, "guided.choices must be strings"),
        ({"type": "json_object", "schema": {}}, "unknown field"),
        ({"type": "json_schema", "schema": {}, "strict": True}, "unknown field"),
        ({"type": "json_schema"}, "guided.schema must be a JSON object"),
        ({"type": "json_schema", "schema": None}, "guided.schema must be a JSON object"),
        ({"type": "json_schema", "schema": [{"type": "object"}]}, "guided.schema must be a JSON object"),
        ({"type": "json_schema", "schema": True}, "guided.schema must be a JSON object"),
        ({"type": "json_schema", "schema": {"maximum": float("nan")}}, "not JSON"),
        ({"type": "json_schema", "schema": {"description": "x" * MAX_SCHEMA_BYTES}}, f"at most {MAX_SCHEMA_BYTES}"),
        # llguidance's options may not loosen what the node enforces (attack review)
        ({"type": "json_schema", "schema": {"x-guidance": {"lenient": True}}}, "x-guidance may only be"),
        ({"type": "json_schema", "schema": {"x-guidance": {"whitespace_pattern": " *"}}}, "x-guidance may only be"),
    ],
)
def test_from_wire_refuses_bad_shapes(wire, words):
    with pytest.raises(GrammarError, match=words) as e:
        GuidedSpec.from_wire(wire)
    assert isinstance(e.value, RequestError) and "\n" not in str(e.value)


def test_a_spec_is_checked_when_made():
    for bad in (
        ("json_schema", None),
        ("json_object", "{}"),
        ("regex", None),
        ("json_schema", " " * 70000),
        ("grammar",),
        ("regex", None, "x", None, 0, "start: x"),
    ):
        with pytest.raises(GrammarError):
            GuidedSpec(*bad)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "nonsense"},
        {"type": "string", "pattern": "(unclosed"},
        {"$ref": "#/definitions/missing"},
        {"not": {"type": "string"}},  # a keyword llguidance cannot enforce: refused, not ignored
        json.loads('{"type":"object","properties":{"a":' * 300 + "{}" + "}}" * 300),
        {"type": "integer", "minimum": 5, "maximum": 1},
        PRODUCTS(4, 7),  # 2 kB for 2,401 alternatives: refused at MAX_GRAMMAR_SIZE, where it took 0.5 s + 0.5 s
        # compiles, but its first mask fails: refused here, on the compile thread, not on the engine's
        {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    ],
    ids=["type", "regex", "ref", "not", "deep", "empty-range", "products", "first-mask"],
)
def test_a_schema_the_library_refuses_is_a_one_line_grammar_error(grammars, schema):
    with pytest.raises(GrammarError) as e:
        grammars.matcher(spec(schema))
    msg = str(e.value)
    assert msg.startswith("guided") and "\n" not in msg and len(msg) < 300
    assert not grammars.cached(spec(schema))


def test_a_matcher_out_of_fuel_says_so_rather_than_ending_as_if_it_matched(tok, grammars):
    """A schema of products within the grammar's bound: its alternatives outgrow the parser's row a couple of tokens
    in; the library then allows only EOS, and the text would have ended "stop", cut short, as if it matched. The
    matcher says why in `error` (after the mask that ran out, or on the token its mask allowed), and the engine
    fails the request on it (test_guided.py)."""
    m = grammars.matcher(spec(PRODUCTS(3, 5)))
    mask = grammars.new_bitmask(1)
    for _ in range(16):
        m.fill(mask, 0)
        if m.error:
            return
        allowed_ids = allowed(mask[0]).nonzero().flatten().tolist()
        assert allowed_ids != [EOS], "the matcher stopped without saying so"
        if not m.accept(allowed_ids[len(allowed_ids) // 2]):
            assert m.error, "a token its own mask allowed was refused with no reason"
            return
    pytest.fail("the schema of products never ran the parser out of fuel: the test no longer shows anything")


def test_the_cache_returns_one_compiled_grammar_per_spec_and_forgets_the_oldest(tok):
    g = Grammars(tok, WIDTH, cache_size=2)
    a = spec({"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]})
    a_again = spec({"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]})
    b, c = spec(None), spec({"type": "array"})
    assert a == a_again and hash(a) == hash(a_again) and a is not a_again
    first = g.compiled(a)
    assert g.compiled(a_again) is first
    g.compiled(b)
    assert g.compiled(a) is first  # a hit: now the newest
    g.compiled(c)  # evicts b, the least recently used
    assert g.compiled(a) is first
    assert list(g._cache) == [(c, None), (a, None)]
    # another cache salt's requests share no prototype with these (its lexer is theirs alone)
    assert g.compiled(a, "another salt") is not first and g.compiled(a) is first
    # matchers from one compiled grammar are independent
    m1, m2 = g.matcher(a), g.matcher(a)
    assert m1.accept(tok.convert_tokens_to_ids("{"))
    assert not m2.accept(tok.convert_tokens_to_ids('"'))


def test_a_cached_grammar_is_compiled_again_once_its_copies_made_its_share_of_masks(tok, monkeypatch):
    """Copies of a cached grammar grow the lexer they share with it, and nothing in llguidance says how large: one
    key's regexes built to grow it (new lexer states at every byte, each state's row 256 wide) held 37 MiB a grammar
    after their requests ended, 2.4 GiB in a cache of 64 (red team). A prototype whose copies made RETIRE_MASKS
    masks is dropped, and freed once they end; the next request compiles it afresh."""
    monkeypatch.setattr(grammar, "RETIRE_MASKS", 6)
    g = Grammars(tok, WIDTH)
    a = spec({"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]})
    first, mask = g.compiled(a), g.new_bitmask(1)
    m1, m2 = g.matcher(a), g.matcher(a)
    for _ in range(3):
        m1.fill(mask, 0)
        m2.fill(mask, 0)
    assert g.compiled(a, "another salt") is not first  # its own count
    assert not g.cached(a)  # retired: a request must wait for a compile again
    fresh = g.compiled(a)
    assert fresh is not first and g.cached(a)
    m1.fill(mask, 0)  # a copy of the retired one runs on, counted against nothing kept
    assert g.compiled(a) is fresh


def test_matchers_are_made_on_one_thread_and_used_on_another(tok, grammars):
    made = [grammars.matcher(spec(PERSON)) for _ in range(4)]
    errors = []

    def engine_thread():
        try:
            mask = grammars.new_bitmask(len(made))
            for i, m in enumerate(made):
                m.fill(mask, i)
                assert m.accept(tok.convert_tokens_to_ids("{"))
        except Exception as e:  # noqa: BLE001  (re-raised on the test's thread)
            errors.append(e)

    threads = [threading.Thread(target=engine_thread)] + [
        threading.Thread(target=lambda: [grammars.matcher(spec(NESTED)) for _ in range(20)]) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_fill_checks_the_bitmask_it_writes_through(grammars):
    m = grammars.matcher(spec(None))
    with pytest.raises(ValueError):
        m.fill(torch.zeros(2, (WIDTH + 31) // 32, dtype=torch.int64), 0)
    with pytest.raises(ValueError):
        m.fill(grammars.new_bitmask(2), 2)
    with pytest.raises(ValueError):
        m.fill(torch.zeros(1, 4, dtype=torch.int32), 0)
    mask = grammars.new_bitmask(3)
    m.fill(mask, 1)
    assert (mask[0] == -1).all() and (mask[2] == -1).all() and not (mask[1] == -1).all()


def test_apply_bitmask_touches_only_the_named_rows():
    gen = torch.Generator().manual_seed(0)
    words = (WIDTH + 31) // 32
    mask = torch.randint(-(2**31), 2**31, (2, words), dtype=torch.int32, generator=gen)
    logits = torch.randn(5, WIDTH, generator=gen)
    before = logits.clone()
    apply_bitmask(logits, mask, torch.tensor([3, 1]))
    for row in (0, 2, 4):
        assert torch.equal(logits[row], before[row])
    for j, row in enumerate((3, 1)):
        ok = allowed(mask[j])
        assert torch.equal(logits[row][ok], before[row][ok])
        assert torch.isneginf(logits[row][~ok]).all()

    whole = before[[3, 1]].clone()
    apply_bitmask(whole, mask)
    assert torch.equal(whole, logits[[3, 1]])

    low = torch.full((2, WIDTH), float("-inf"), dtype=torch.bfloat16)  # masks already applied stay, never NaN
    low[:, 0] = 1.5
    apply_bitmask(low, torch.full((2, words), -1, dtype=torch.int32))
    assert low.dtype == torch.bfloat16 and low[:, 0].eq(1.5).all() and torch.isneginf(low[:, 1:]).all()

    wide = torch.zeros(1, 32 * words + 7)  # logits wider than the mask: the extra ids are disallowed
    apply_bitmask(wide, torch.full((1, words), -1, dtype=torch.int32))
    assert (wide[0, : 32 * words] == 0).all() and torch.isneginf(wide[0, 32 * words :]).all()
    with pytest.raises(ValueError):
        apply_bitmask(logits, mask, torch.tensor([0, 1, 2]))
    # the unpacking a GPU runs (on its own device) reads the bits as the host's does
    host, device = grammar._allowed_host(mask), grammar._allowed_device(mask, torch.device("cpu"))
    assert torch.equal(host.bool(), device.bool())


def test_grammars_refuse_a_logits_width_below_the_tokenizer(tok):
    with pytest.raises(ValueError, match="vocab_size"):
        Grammars(tok, len(tok) - 1)


def test_every_end_of_sequence_id_ends_a_complete_text(tok):
    # a model with several EOS ids (Llama 3's <|eot_id|> and <|end_of_text|>): each may close the text
    g = Grammars(tok, WIDTH, eos_ids=[EOS, 1])
    m = g.matcher(spec({"enum": [{"a": 1}]}))
    for t in tok.encode('{"a":1}', add_special_tokens=False):
        assert m.accept(t)
    mask = g.new_bitmask(1)
    m.fill(mask, 0)
    assert m.terminated and allowed(mask[0]).nonzero().flatten().tolist() == [1, EOS]


def test_the_one_x_guidance_taken_is_the_gateways_compact_tool_calls():
    from common.wire import COMPACT_GUIDANCE
    from gateway.tools import COMPACT

    assert COMPACT == {"x-guidance": COMPACT_GUIDANCE}
    spec = GuidedSpec.from_wire({"type": "json_schema", "schema": {"type": "object"} | COMPACT})
    assert spec is not None and "x-guidance" in spec.schema


def _calls_spec(max_calls: int = 2, schema: dict | None = PERSON) -> GuidedSpec:
    return GuidedSpec.from_wire(
        {"type": "json_or_tool_calls", "schema": schema, "calls": TOOL_CALL, "max_calls": max_calls}
    )


def _feed(grammars, spec: GuidedSpec, tok, text: str) -> tuple[bool, bool]:
    """(every token of `text` accepted, the text a whole answer: EOS may follow)."""
    m = grammars.matcher(spec)
    ok = all(m.accept(t) for t in tok.encode(text, add_special_tokens=False))
    return ok, ok and m.accepting


def test_json_or_tool_calls_takes_the_answer_or_calls_and_nothing_else(tok, grammars):
    """Tools the model may call beside a response format (an agent with tools and an output type): the answer is
    the format's JSON, or 1 to max_calls calls between the tags, compact, a newline allowed beside each tag."""
    s = _calls_spec()
    call = '{"name":"get_weather","arguments":{"city":"Paris","unit":"c"}}'
    person = '{"name": "Ada", "age": 36, "role": "admin", "tags": []}'
    assert _feed(grammars, s, tok, person) == (True, True)
    assert _feed(grammars, s, tok, f"<tool_call>\n{call}\n</tool_call>") == (True, True)
    two = f'<tool_call>{call}</tool_call>\n<tool_call>{{"name":"now","arguments":{{}}}}</tool_call>'
    assert _feed(grammars, s, tok, two) == (True, True)
    assert _feed(grammars, _calls_spec(max_calls=1), tok, two)[0] is False  # one call at most
    assert _feed(grammars, s, tok, "Paris")[0] is False  # free text is neither
    assert _feed(grammars, s, tok, '<tool_call>{"name": "get_weather"')[0] is False  # calls are compact
    assert _feed(grammars, s, tok, '{"name": "Ada"}')[0] is False  # the answer is the format's, whole
    assert _feed(grammars, s, tok, '{"name": "Ada", "age": 3') == (True, False)
    assert _feed(grammars, _calls_spec(schema=None), tok, '{"any": [1]}') == (True, True)  # null: any object


def test_random_logits_give_an_answer_or_valid_calls(tok, grammars):
    person, call = jsonschema.Draft202012Validator(PERSON), jsonschema.Draft202012Validator(TOOL_CALL)
    s, kinds = _calls_spec(), set()
    mask = grammars.new_bitmask(1)
    for seed in range(16):
        m, gen, ids = grammars.matcher(s), torch.Generator().manual_seed(seed), []
        while not m.terminated and len(ids) < 600:
            m.fill(mask, 0)
            logits = torch.randn(1, WIDTH, generator=gen) * 3
            apply_bitmask(logits, mask)
            t = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
            if t == EOS:
                break
            assert m.accept(t)
            ids.append(t)
        text = text_of(tok, ids)
        if text.startswith("<tool_call>"):
            blocks = re.findall(r"<tool_call>\n?(.*?)\n?</tool_call>", text, re.S)
            assert 1 <= len(blocks) <= 2
            for b in blocks:
                call.validate(json.loads(b))
            kinds.add("calls")
        else:
            person.validate(json.loads(text))
            kinds.add("answer")
    assert kinds == {"answer", "calls"}  # both happen: the grammar allows either, it does not pick


@pytest.mark.parametrize(
    "wire",
    [
        {"type": "json_or_tool_calls", "schema": None, "calls": TOOL_CALL, "max_calls": 0},
        {"type": "json_or_tool_calls", "schema": None, "calls": TOOL_CALL, "max_calls": 9},
        {"type": "json_or_tool_calls", "schema": None, "calls": TOOL_CALL, "max_calls": True},
        {"type": "json_or_tool_calls", "schema": None, "max_calls": 1},
        {"type": "json_or_tool_calls", "schema": None, "calls": TOOL_CALL, "max_calls": 1, "pattern": "x"},
        {"type": "json_or_tool_calls", "schema": [], "calls": TOOL_CALL, "max_calls": 1},
        {"type": "json_or_tool_calls", "calls": TOOL_CALL | {"x-guidance": {"lenient": True}}, "max_calls": 1},
        {"type": "json_or_tool_calls", "calls": {"description": "x" * MAX_SCHEMA_BYTES}, "max_calls": 1},
    ],
)
def test_json_or_tool_calls_is_checked_off_the_wire(wire):
    with pytest.raises(GrammarError):
        GuidedSpec.from_wire(wire)


def test_json_or_tool_calls_names_the_part_it_cannot_compile(grammars):
    """A tool's parameters or the format the grammar cannot enforce is named as itself, in the schema's terms (it
    was always "guided.calls", quoting the Lark grammar that holds both: red team)."""
    unenforceable = {"type": "array", "uniqueItems": True}
    bad_call = TOOL_CALL | {"anyOf": [*TOOL_CALL["anyOf"], unenforceable]}
    for wire, part in (
        ({"type": "json_or_tool_calls", "schema": PERSON, "calls": bad_call, "max_calls": 1}, "guided.calls"),
        ({"type": "json_or_tool_calls", "schema": unenforceable, "calls": TOOL_CALL, "max_calls": 1}, "guided.schema"),
    ):
        with pytest.raises(GrammarError) as e:
            grammars.compiled(GuidedSpec.from_wire(wire))
        assert str(e.value).startswith(part) and "uniqueItems" in str(e.value) and "%json" not in str(e.value)


def test_json_or_tool_calls_holds_each_part_to_the_grammar_bound(grammars):
    """A format whose grammar is past MAX_GRAMMAR_SIZE beside tools is refused as quickly as alone and named as the
    format (its per-part check ran without the bound: 0.46 s, then blamed on the calls: review); two parts each
    within the bound but not together are named together."""
    for wire, part in (
        ({"type": "json_or_tool_calls", "schema": PRODUCTS(4, 9), "calls": TOOL_CALL, "max_calls": 1}, "guided.schema"),
        (
            {
                "type": "json_or_tool_calls",
                "schema": PRODUCTS(3, 8),
                "calls": {"anyOf": [TOOL_CALL, PRODUCTS(3, 8)]},
                "max_calls": 1,
            },
            "guided.calls and guided.schema together",
        ),
    ):
        with pytest.raises(GrammarError) as e:
            grammars.compiled(GuidedSpec.from_wire(wire))
        assert str(e.value).startswith(part), str(e.value)[:200]


@pytest.mark.parametrize(
    "text",
    [
        'start: "a"',
        '  start : "a"',
        '\n\n   \n  start:"a"',
        '%llguidance {}\nstart: x\nx: "a"',
        'root ::= "a"',
        'root ::= "start: a"',
        '# start: in a comment\nroot ::= "a"',
        "\n" * 8000 + 'root ::= "a"',
        "\r\n \tstart: x",
        "restart: x",
    ],
)
def test_lark_is_told_from_gbnf_as_llguidance_tells_it(text):
    """common.wire.is_lark answers as llguidance's own check, in one pass (llguidance's rescans from every line
    start across blank lines: 0.38 s of the GIL for 8 kB of newlines, on the gateway's loop and the compile
    thread)."""
    from llguidance.gbnf_to_lark import is_lark_syntax

    from common.wire import is_lark

    assert is_lark(text) == is_lark_syntax(text)
