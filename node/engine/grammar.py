"""Guided decoding: a request's `guided` value (a JSON schema, any JSON object, a regular expression, a choice
of strings held as the regular expression of them, or a context-free grammar in Lark or GBNF) -> a grammar
compiled once per spec and cache salt, with its first mask -> per sequence a matcher that writes each step's
allowed tokens into one bitmask row -> the rows' logits masked in place.

The grammar library is llguidance, chosen over xgrammar by bench/grammar.py (CPU, 2 shared cores, 2026-12-03;
both libraries given the same byte-level BPE tokenizers of 320, 32,000 and 76,357 tokens; compile = compile + first
mask, ms; fill and accept = median per token, us; per-token figures vary ~2x between runs on this machine):

    vocab   schema          compile xgr / llg     fill xgr / llg     accept xgr / llg
    320     nested          1.5 / 0.7             1.3 / 4.7          0.9 / 1.1
    32000   nested          11.1 / 0.9            3.3 / 4.2          4.6 / 1.9
    76357   nested          47.6 / 1.0            2.0 / 4.1          2.9 / 2.7
    76357   json_object     88.1 / 0.4            46.6 / 3.9         51.6 / 2.1
    76357   hostile regex   574 / 0.6             ^(a{1,100}){1,100}$

- Compile: llguidance builds its lexer lazily, so a new schema costs ~1 ms whatever the vocabulary; xgrammar
  precomputes masks over the whole vocabulary, 10-100 ms at real sizes and growing with the schema. Compiles run
  on the node's one compile thread (node.engine.async_engine), and every schema comes from the network.
- Bounded work: llguidance meters compiles and masks with fuel (LLParserLimits, the lexer's initial fuel cut to
  INITIAL_LEXER_FUEL), and the grammar's size is bounded (MAX_GRAMMAR_SIZE); a schema that needs more is an
  error, not a stalled engine, and a matcher that runs out partway fails its request (llm_engine._emit). Fuel
  did not bound every case (a 15-character regex: 140 ms a mask), so a mask's CPU time is checked too
  (MAX_MASK_CPU_S), and so is the time a request's sequences spend in their grammars together (GRAMMAR_BURST_CPU_S
  at once, GRAMMAR_STEP_CPU_S a step after that): both after the time is paid, so a request costs at most its
  budget and one mask more.
  xgrammar has no such bound (the hostile regex above: 0.6 s).
- Per step both cost microseconds (a 16-row batch's masks: 40-75 us with llguidance, 12-400 us with xgrammar),
  far below a decode step; xgrammar's fill is faster on schemas, llguidance's on json_object at real vocabularies.
- llguidance imports in 35 ms with no dependency (xgrammar: 1.6 s, with triton and tvm-ffi). Its own
  `llguidance.torch` helper is not used: it imports torch.compile machinery (2.4 s) for what apply_bitmask does.

JSON Schema as llguidance enforces it (strict: a keyword it cannot enforce is an error, not ignored; a schema's
additionalProperties is honoured as written, as OpenAI's strict mode has it). The text is JSON with at most
WHITESPACE_MAX whitespace characters between tokens (enough to pretty-print 15 levels at indent 4, few enough
that a model stuck on newlines is pushed on) and none before or after the value, so an object's grammar is
complete exactly at its closing brace.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from common.wire import (
    COMPACT_GUIDANCE,
    GUIDED_WIRE_FIELDS,
    MAX_GUIDED_CALLS,
    MAX_GUIDED_CHOICE_CHARS,
    MAX_GUIDED_CHOICES,
    MAX_GUIDED_GRAMMAR_CHARS,
    MAX_GUIDED_PATTERN_CHARS,
    MAX_SCHEMA_BYTES,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    compact_json,
    grammar_problem,
    is_lark,
)
from node.engine.request import GUIDED_TYPES, RequestError

log = logging.getLogger(__name__)

# on the wire: GUIDED_TYPES, and one of a list of strings (held as the regular expression matching exactly them)
WIRE_TYPES = tuple(GUIDED_WIRE_FIELDS)
# the characters regex syntax gives a meaning (llguidance's is Rust's regex crate's): a choice's are escaped
_REGEX_META = frozenset("\\.+*?()|[]{}^$#&-~")
WHITESPACE_MAX = 64
_JSON_OPTIONS = {"whitespace_pattern": rf"[\x20\x0A\x0D\x09]{{0,{WHITESPACE_MAX}}}"}
# Fewer lexer states than llguidance's default (250,000 at 1-2 kB each): a schema needing more is refused
MAX_LEXER_STATES = 50_000
# A cached grammar is compiled again once its copies have made this many masks. They grow the lexer they share
# with it, and llguidance says nothing of its size: one key's regexes built to grow it (a new state at every byte,
# each state's row 256 wide) held 37 MiB a grammar after their requests ended, 2.4 GiB in a cache of 64 (red team;
# up to 76 MiB at MAX_LEXER_STATES, measured). A compile costs about a millisecond and its first mask; an honest
# schema's JSON answers of a few hundred tokens reuse one for a few requests.
RETIRE_MASKS = 1024
# Compiled grammars kept (LRU): with RETIRE_MASKS, what the cache can hold after its requests ended
GRAMMAR_CACHE_SIZE = 16
# A smaller grammar than llguidance's default (500,000 symbols). Compiles run one at a time on the node's
# compile thread, where a schema of products (allOf of anyOfs: 2 kB of JSON for thousands of alternatives)
# took 1.3 s to be refused at the default, and one just under it 0.5 s plus 0.5 s for its first mask: six such
# requests, free to their sender, held every guided request (and, past the gateway's first-byte timeout, the
# node) for seconds (attack review). At 20,000 (tiny tokenizer, 2 shared cores) such schemas are refused in
# under 45 ms, the slowest accepted one compiled with its first mask in about 70 ms, and the largest tool plans
# the gateway builds (128 tools; 16 tools of 32 parameters) need under 10,000.
MAX_GRAMMAR_SIZE = 20_000
# Less fuel than llguidance's default (1,000,000) for building a lexeme's regex before the first mask: a counted
# repetition nested in another (`(x{1000}){1000}`, 15 characters of guided_regex) took 0.8 s to compile at the
# default and then 140 ms for every step's mask, on the engine thread, for every request batched beside it.
# At 100,000 it is refused in about 30 ms (its first mask allows nothing), and `(x{100}){100}` still compiles.
INITIAL_LEXER_FUEL = 100_000
# The CPU time one token's mask may take: a backstop where fuel does not bound the work (a grammar of two nested
# counted repetitions, tried for vLLM's guided_grammar, compiled and then took 48 ms of the engine thread for every
# token). A mask past this fails its request (CPU time of the thread, not wall time: a busy machine does not make
# an honest schema fail), and a spec whose first mask is past it is refused when compiled. Honest masks take
# microseconds to a few milliseconds.
MAX_MASK_CPU_S = 0.02
# The grammar CPU time one request may spend, its sequences together (every mask, every token accepted): at most
# GRAMMAR_BURST_CPU_S at once, and GRAMMAR_STEP_CPU_S for each engine step after that (a bucket of credit, filled
# a step at a time). One slow mask a sequence was the bound before: a request of MAX_SEQUENCES (64) sequences each
# just under MAX_MASK_CPU_S could hold every other request's step for up to 1.3 s (64 masks of 4.5 ms: 0.3 s a step,
# measured), and one of 48 sequences at 1.7 ms a mask took 78 ms of every step for 39 s (red team). Past it the
# request fails, and its sequences' masks are not computed again. Honest requests of 64 sequences measured 0.2-2.5 ms
# a step (median) and 8 ms at most on a 32,000-token vocabulary. The budget is a request's: N guided requests may
# still take N times GRAMMAR_STEP_CPU_S of a step together.
GRAMMAR_BURST_CPU_S = 0.1
GRAMMAR_STEP_CPU_S = 0.01
_ERROR_CHARS = 200


class GrammarError(RequestError):
    """A `guided` value the engine cannot serve: a bad shape, a schema too big, or one the library refuses."""


class NotCompiled(LookupError):
    """A grammar asked for without compiling it (Grammars.matcher(compile=False)) is not in the cache."""


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _ERROR_CHARS else line[: _ERROR_CHARS - 3] + "..."


@dataclass(frozen=True, slots=True)
class GuidedSpec:
    """What a sequence's text must be: any JSON object, JSON valid against a schema, text a regular expression
    matches whole, or text a grammar derives. Hashable: the cache key."""

    type: str  # "json_object" | "json_schema" | "regex" | "json_or_tool_calls" | "grammar"
    # the schema as compact JSON, keys in the client's order (json_schema; json_or_tool_calls' answer, or None)
    schema: str | None = None
    pattern: str | None = None  # the regular expression (regex only)
    calls: str | None = None  # json_or_tool_calls: the schema of one call object, as compact JSON
    max_calls: int = 0  # json_or_tool_calls: the most calls
    # grammar: Lark or GBNF text, as the client wrote it (made Lark on the compile thread, see Grammars._compile).
    # Lark's token references (`<[id]>`, a special token's name) let it ask for any id, as logit_bias can
    grammar: str | None = None

    def __post_init__(self) -> None:
        if self.type not in GUIDED_TYPES:
            raise GrammarError(f"guided.type must be one of {', '.join(GUIDED_TYPES)}, got {self.type!r}")
        if self.type == "json_schema" and not isinstance(self.schema, str):
            raise GrammarError("guided.schema is required with type json_schema")
        if self.schema is not None and self.type not in ("json_schema", "json_or_tool_calls"):
            raise GrammarError(f"guided.schema does not go with type {self.type}")
        if (self.type == "regex") != isinstance(self.pattern, str):
            raise GrammarError("guided.pattern is required with type regex, and only with it")
        if (self.type == "grammar") != isinstance(self.grammar, str):
            raise GrammarError("guided.grammar is required with type grammar, and only with it")
        if self.grammar is not None and not 0 < len(self.grammar) <= MAX_GUIDED_GRAMMAR_CHARS:
            raise GrammarError(f"guided.grammar must be a grammar of 1 to {MAX_GUIDED_GRAMMAR_CHARS} characters")
        calling = self.type == "json_or_tool_calls"
        if calling != isinstance(self.calls, str) or calling != (1 <= self.max_calls <= MAX_GUIDED_CALLS):
            raise GrammarError(
                f"guided.calls and guided.max_calls (1 to {MAX_GUIDED_CALLS}) go with type json_or_tool_calls, "
                "and only with it"
            )
        for field in ("schema", "calls"):
            text = getattr(self, field)
            if text is not None and len(text.encode()) > MAX_SCHEMA_BYTES:
                raise GrammarError(f"guided.{field} is {len(text.encode())} bytes of JSON; at most {MAX_SCHEMA_BYTES}")

    @classmethod
    def from_wire(cls, obj) -> GuidedSpec | None:
        """The node body's `guided` value (parsed JSON) -> a spec; None for null; GrammarError when bad."""
        if obj is None:
            return None
        if not isinstance(obj, dict):
            raise GrammarError(f"guided must be an object or null, got {type(obj).__name__}")
        kind = obj.get("type")
        if kind not in WIRE_TYPES:
            raise GrammarError(f"guided.type must be one of {', '.join(WIRE_TYPES)}, got {kind!r}")
        fields = GUIDED_WIRE_FIELDS[kind]
        extra = sorted(str(k) for k in obj if k != "type" and k not in fields)
        if extra:
            raise GrammarError(f"guided has unknown field(s) {', '.join(map(repr, extra))} for type {kind}")
        if kind == "json_object":
            return cls("json_object")
        if kind == "regex":
            return cls("regex", pattern=_pattern(obj.get("pattern")))
        if kind == "choice":
            return cls("regex", pattern=_choice_pattern(obj.get("choices")))
        if kind == "grammar":
            text = obj.get("grammar")
            if not isinstance(text, str):
                raise GrammarError(f"guided.grammar must be a string, got {type(text).__name__}")
            return cls("grammar", grammar=text)
        if kind == "json_or_tool_calls":
            n = obj.get("max_calls")
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_GUIDED_CALLS:
                raise GrammarError(f"guided.max_calls must be an integer in [1, {MAX_GUIDED_CALLS}]")
            answer = obj.get("schema")
            schema = None if answer is None else _schema_text(answer, "schema")
            return cls(kind, schema=schema, calls=_schema_text(obj.get("calls"), "calls"), max_calls=n)
        return cls("json_schema", _schema_text(obj.get("schema"), "schema"))

    def grammar_source(self) -> str:
        """The JSON schema the grammar is built from (any object for json_object, as vLLM's backends do)."""
        return self.schema if self.schema is not None else '{"type":"object"}'

    def lark(self) -> str:
        """json_or_tool_calls' grammar (llguidance's Lark, schemas inline): the answer's JSON, with the whitespace
        any JSON answer may hold, or 1 to max_calls compact call objects, each between the call tags (a newline
        beside a tag, and between calls, as templates write them)."""
        answer = json.loads(self.grammar_source())
        answer.setdefault("x-guidance", _JSON_OPTIONS)
        call = json.loads(self.calls) | {"x-guidance": COMPACT_GUIDANCE}
        more = f' ("\\n"? call){{0,{self.max_calls - 1}}}' if self.max_calls > 1 else ""
        open_tag, close_tag = json.dumps(TOOL_CALL_OPEN), json.dumps(TOOL_CALL_CLOSE)
        return "\n".join(
            (
                "start: answer | calls",
                f"answer: %json {json.dumps(answer)}",
                f"calls: call{more}",
                f'call: {open_tag} "\\n"? %json {json.dumps(call)} "\\n"? {close_tag}',
            )
        )


def _schema_text(schema, field: str) -> str:
    """A schema from the wire as GuidedSpec holds it: an object, its one allowed x-guidance, within the bound."""
    if not isinstance(schema, dict):
        raise GrammarError(f"guided.{field} must be a JSON object, got {type(schema).__name__}")
    if "x-guidance" in schema and schema["x-guidance"] != COMPACT_GUIDANCE:
        # llguidance's own options would let a schema loosen what the node enforces (lenient: keywords
        # ignored, not refused; its own whitespace limits); the one form taken only tightens whitespace
        raise GrammarError(f"guided.{field} x-guidance may only be {json.dumps(COMPACT_GUIDANCE)} (no whitespace)")
    try:
        text = schema_json(schema)
    except (TypeError, ValueError, RecursionError) as e:
        raise GrammarError(f"guided.{field} is not JSON: {_one_line(str(e))}") from e
    if len(text) > MAX_SCHEMA_BYTES:
        raise GrammarError(f"guided.{field} is {len(text)} bytes of JSON; at most {MAX_SCHEMA_BYTES}")
    return text.decode()


def _pattern(pattern) -> str:
    if not isinstance(pattern, str) or not 0 < len(pattern) <= MAX_GUIDED_PATTERN_CHARS:
        raise GrammarError(f"guided.pattern must be a regular expression of 1 to {MAX_GUIDED_PATTERN_CHARS} characters")
    return pattern


def _choice_pattern(choices) -> str:
    """The regular expression matching exactly one of `choices` (vLLM's guided choice), each taken literally."""
    if not isinstance(choices, list) or not 0 < len(choices) <= MAX_GUIDED_CHOICES:
        raise GrammarError(f"guided.choices must be a list of 1 to {MAX_GUIDED_CHOICES} strings")
    for c in choices:
        if not isinstance(c, str) or not 0 < len(c) <= MAX_GUIDED_CHOICE_CHARS:
            raise GrammarError(f"guided.choices must be strings of 1 to {MAX_GUIDED_CHOICE_CHARS} characters")
    return "|".join("(" + "".join("\\" + ch if ch in _REGEX_META else ch for ch in c) + ")" for c in choices)


def schema_json(schema: dict) -> bytes:
    """A schema as GuidedSpec holds it: common.wire.compact_json. Not canonical_json: keys keep their order, as the
    grammar writes an object's properties in the order the schema lists them (OpenAI's strict mode does too, and
    a client may put "reasoning" before "answer" on purpose)."""
    return compact_json(schema)


class GrammarBudget:
    """The grammar CPU time a request's sequences may still spend (GRAMMAR_BURST_CPU_S, then GRAMMAR_STEP_CPU_S a
    step), shared by their matchers. Used by one thread at a time (the engine's)."""

    __slots__ = ("step", "credit", "slow")

    def __init__(self) -> None:
        self.step = -1  # the engine step counted last
        self.credit = GRAMMAR_BURST_CPU_S  # CPU seconds the request may still spend
        self.slow = ""  # why the request spent too much, once it did

    def charge(self, seconds: float, step: int | None = None) -> None:
        """Count `seconds` in engine step `step` (None: the step counted last, where a token accepted belongs);
        each step since the last adds GRAMMAR_STEP_CPU_S of credit, up to GRAMMAR_BURST_CPU_S."""
        if step is not None and step != self.step:
            if self.step >= 0:
                self.credit = min(GRAMMAR_BURST_CPU_S, self.credit + GRAMMAR_STEP_CPU_S * max(0, step - self.step))
            self.step = step
        self.credit -= seconds
        if self.credit < 0 and not self.slow:
            self.slow = (
                "its sequences' grammars took more CPU than this node allows a request "
                f"({GRAMMAR_BURST_CPU_S * 1000:.0f} ms at once, {GRAMMAR_STEP_CPU_S * 1000:.0f} ms a step after that)"
            )


class Matcher:
    """One sequence's place in its grammar. Used by one thread at a time (the engine's)."""

    __slots__ = ("_m", "_words", "_vocab", "_slow", "_budget", "_end_row", "_named_row", "_of")

    def __init__(
        self,
        inner,
        vocab_size: int,
        budget: GrammarBudget | None = None,
        end_row: torch.Tensor | None = None,
        named_row: torch.Tensor | None = None,
        of: _Cached | None = None,
    ) -> None:
        self._m = inner  # llguidance.LLMatcher
        self._of = of  # the cached grammar it is a copy of: its masks are counted there (RETIRE_MASKS)
        self._vocab = vocab_size
        self._words = (vocab_size + 31) // 32
        self._end_row = end_row  # a mask row allowing only the end tokens (Grammars.end_row)
        self._named_row = named_row  # the tokenizer's ids alone, where the logits have more rows (Grammars)
        self._slow = ""  # why a mask or a token took too long (MAX_MASK_CPU_S), once one did
        self._budget = budget if budget is not None else GrammarBudget()  # shared by a request's sequences

    def _charge(self, started: float, step: int | None, what: str) -> None:
        spent = time.thread_time() - started
        if spent > MAX_MASK_CPU_S and not self._slow:
            self._slow = (
                f"{what} took {spent * 1000:.0f} ms of CPU, more than the {MAX_MASK_CPU_S * 1000:.0f} ms "
                "this node allows"
            )
        self._budget.charge(spent, step)

    def fill(self, bitmask: torch.Tensor, row: int, step: int = 0) -> None:
        """Write the allowed next tokens into bitmask[row] (bit t of the row: token t may come next) in engine
        step `step` (the engine's step number, which refills the request's budget; 0 outside the engine, as for
        the first mask at compile). A matcher already too slow (a mask, or its request's budget) is not asked
        again: the row allows only the end tokens, as llguidance's own does once it fails, and the request fails
        on this step's token."""
        # checked on every call: the library writes through a raw pointer
        if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or bitmask.dim() != 2:
            raise ValueError(f"bitmask must be a 2-D int32 CPU tensor, got {bitmask.dtype} {tuple(bitmask.shape)}")
        if bitmask.shape[1] != self._words or not 0 <= row < bitmask.shape[0] or bitmask.stride(1) != 1:
            raise ValueError(f"bitmask {tuple(bitmask.shape)} has no contiguous row {row} of {self._words} words")
        # out of fuel (a schema whose alternatives outgrow the parser's bounds a few tokens in), the library allows
        # only EOS and says why in `error`: the engine fails the request on it (llm_engine._emit)
        if (self._slow or self._budget.slow) and self._end_row is not None:
            bitmask[row] = self._end_row
            return
        if self._of is not None:
            self._of.masks += 1  # one thread per matcher, and a count off by a few under a race does no harm
        started = time.thread_time()
        self._m.unsafe_compute_mask_ptr(bitmask.data_ptr() + row * bitmask.stride(0) * 4, self._words * 4)
        if self._named_row is not None:
            bitmask[row] &= self._named_row
        self._charge(started, step, "a token's mask")

    def accept(self, token_id: int) -> bool:
        """Advance past `token_id` (counted in the step of the last mask); False (and the matcher stopped) when
        the grammar did not allow it."""
        if not 0 <= token_id < self._vocab:
            return False
        started = time.thread_time()
        ok = self._m.consume_token(token_id)
        self._charge(started, None, "accepting a token")
        return ok

    @property
    def error(self) -> str:
        """Why the matcher stopped: out of fuel, a token it refused, a mask or a token past MAX_MASK_CPU_S, or its
        request's sequences past their GrammarBudget (one line; empty while none of these happened)."""
        return _one_line(self._m.get_error()) if self._m.is_error() else self._slow or self._budget.slow

    @property
    def library_failed(self) -> bool:
        """The library itself stopped the matcher (out of fuel, the lexer's states spent, a token refused, a panic
        it caught), not the node's CPU bounds. Where it broke on a mask or on a token its mask allowed, what it
        learned is shared with the compiled grammar and every copy, which the engine then forgets
        (Grammars.forget)."""
        return self._m.is_error()

    @property
    def terminated(self) -> bool:
        """The grammar is complete (or the matcher failed): only EOS may follow."""
        return self._m.is_stopped()

    @property
    def accepting(self) -> bool:
        """The text so far is a whole value: EOS is allowed (with a top-level object, only at its end)."""
        return self._m.is_accepting()


class _Cached:
    """A compiled grammar in the cache, and the masks its copies have made."""

    __slots__ = ("proto", "masks")

    def __init__(self, proto) -> None:
        self.proto, self.masks = proto, 0

    @property
    def retired(self) -> bool:
        return self.masks >= RETIRE_MASKS


class Grammars:
    """The engine's grammar compiler: one per tokenizer. matcher() may run on any thread; the compiled grammars
    are cached (LRU, `cache_size` of them, each a spec's for one cache salt: more clients of one spec than that
    compile it again, about a millisecond each; each compiled again after RETIRE_MASKS masks of its copies) and
    each sequence gets its own copy of one."""

    def __init__(self, tokenizer, vocab_size: int, *, cache_size: int = GRAMMAR_CACHE_SIZE, eos_ids=None) -> None:
        import llguidance
        import llguidance.gbnf_to_lark
        import llguidance.hf

        if vocab_size < len(tokenizer):
            raise ValueError(f"vocab_size {vocab_size} is below the tokenizer's {len(tokenizer)} tokens")
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self._llg = llguidance
        self.vocab_size = vocab_size
        # ids from len(tokenizer) up to vocab_size (a padded embedding) are tokens with no bytes: never allowed
        eos = list(eos_ids) if eos_ids else None
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        self._limits = llguidance.LLParserLimits(
            max_lexer_states=MAX_LEXER_STATES,
            max_grammar_size=MAX_GRAMMAR_SIZE,
            initial_lexer_fuel=INITIAL_LEXER_FUEL,
            verbose_errors=False,
        )
        self.end_row = torch.zeros((self.vocab_size + 31) // 32, dtype=torch.int32)  # the end tokens alone
        for t in self._tokenizer.eos_tokens:
            self.end_row[t // 32] |= _bit(t % 32)
        # The tokenizer's ids alone, where the logits have rows past it (a padded embedding: Qwen2.5's 151,936 rows
        # over 151,665 tokens). llguidance never allows those ids on its own, but a Lark grammar names any id
        # (`<[151900]>`): forced, such an id has no text, and a node's detokenizer and a gateway's disagreed over
        # it (red team: an honest node disputed). None where the two agree.
        self.named_row = None
        if len(tokenizer) < vocab_size:
            self.named_row = torch.zeros_like(self.end_row)
            full, rest = divmod(len(tokenizer), 32)
            self.named_row[:full] = -1
            for k in range(rest):
                self.named_row[full] |= _bit(k)
        # (spec, share) -> prototype: copies of one prototype share its lexer's states (below), so requests share one
        # only under one cache salt, as they share cached prompt KV (GenerationRequest.cache_salt)
        self._cache: OrderedDict[tuple[GuidedSpec, str | None], _Cached] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def cached(self, spec: GuidedSpec, share: str | None = None) -> bool:
        """Whether the spec's grammar is compiled already for requests of cache salt `share` (a matcher of it
        costs a copy, not a compile)."""
        with self._lock:
            hit = self._cache.get((spec, share))
            return hit is not None and not hit.retired

    def forget(self, spec: GuidedSpec, share: str | None = None) -> None:
        """Drop the spec's compiled grammar of cache salt `share`: a matcher of it failed in the library
        (Matcher.library_failed). Its copies share the lexer's states and the parser's locks with it: one hostile
        walk spent the lexer's states, or a panic the library caught poisoned a lock, and every later request of
        that grammar failed at its first token (red team). The next request compiles it afresh."""
        with self._lock:
            self._cache.pop((spec, share), None)

    def compiled(self, spec: GuidedSpec, share: str | None = None, *, compile: bool = True):
        """The spec's compiled grammar (an llguidance matcher never advanced) for requests of cache salt `share`,
        from the cache or compiled now (`compile` False: NotCompiled instead, for a caller that must not compile).

        Its copies share the lexer it builds as they go (llguidance's deep_copy), and the lexer's states are
        bounded (MAX_LEXER_STATES): a stranger's requests of another's grammar, sampling freely through a regex
        whose lexer grows with every token, spent them, and the other's request already running failed on its
        next mask, billed (red team). A salt's requests share a prototype of their own: one client's walks spend
        no other client's lexer (the gateway gives each key its own salt)."""
        return self._cached(spec, share, compile).proto

    def _cached(self, spec: GuidedSpec, share: str | None, compile: bool) -> _Cached:
        key = (spec, share)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit.retired:  # its lexer has grown for long enough: freed once its copies end
                del self._cache[key]
            elif hit is not None:
                self._cache.move_to_end(key)
                return hit
        if not compile:
            raise NotCompiled(f"the grammar of {spec.type} is not compiled")
        made = _Cached(self._compile(spec))  # outside the lock: llguidance releases the GIL while it compiles
        with self._lock:
            made = self._cache.setdefault(key, made)
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return made

    def _compile(self, spec: GuidedSpec):
        LLMatcher = self._llg.LLMatcher
        field = {"regex": "pattern", "json_or_tool_calls": "calls", "grammar": "grammar"}.get(spec.type, "schema")
        if spec.type == "grammar" and (problem := grammar_problem(spec.grammar)) is not None:
            raise GrammarError(f"guided.grammar: {problem}")
        try:
            if spec.type == "regex":
                grammar = LLMatcher.grammar_from_regex(spec.pattern)
            elif spec.type == "grammar":
                grammar = LLMatcher.grammar_from_lark(self._lark(spec.grammar))
            elif spec.type == "json_or_tool_calls":
                grammar = LLMatcher.grammar_from_lark(spec.lark())
            else:
                grammar = LLMatcher.grammar_from_json_schema(spec.grammar_source(), defaults=_JSON_OPTIONS)
        except ValueError as e:
            self._blame_part(spec)
            raise GrammarError(f"guided.{field} cannot be read: {_one_line(str(e))}") from e
        proto = LLMatcher(self._tokenizer, grammar, log_level=0, limits=self._limits)
        if proto.is_error():
            if spec.type == "json_or_tool_calls":
                self._blame_part(spec)  # each part compiles alone: together they are too much
                raise GrammarError(
                    f"guided.calls and guided.schema together cannot be compiled: {_one_line(proto.get_error())}"
                )
            raise GrammarError(f"guided.{field} cannot be compiled: {_one_line(proto.get_error())}")
        # the first mask here, on the compile thread: it can cost as much as the compile (a schema of products:
        # 0.5 s), and every copy of the prototype starts from it (a copy's first mask then costs 0.1 ms, where each
        # of a request's sequences paid it on the engine thread, one after another, holding every client's step)
        first, mask = Matcher(proto, self.vocab_size, named_row=self.named_row), self.new_bitmask(1)
        first.fill(mask, 0)
        if first.error:
            raise GrammarError(f"guided.{field} cannot be enforced: {first.error}")
        if not mask.any():  # not even an end token: a lexeme past the lexer's fuel
            raise GrammarError(f"guided.{field} cannot be enforced: it is too complex (it allows no first token)")
        return proto

    def _lark(self, grammar: str) -> str:
        """A guided grammar as Lark: GBNF made Lark by llguidance's converter (Python, here on the compile thread),
        as vLLM's llguidance backend does; ValueError when it cannot be (a RecursionError of a deep one included)."""
        if is_lark(grammar):
            return grammar
        try:
            return self._llg.gbnf_to_lark.gbnf_to_lark(grammar)
        except Exception as e:  # the converter's own errors, and whatever its parser raises on what it did not expect
            raise ValueError(f"the GBNF grammar cannot be made Lark: {e}") from e

    def _blame_part(self, spec: GuidedSpec) -> None:
        """json_or_tool_calls' grammar failed: the part at fault (the answer's format or the tools' calls), checked
        alone under the same bounds, named in the schema's own terms rather than in the Lark grammar that holds
        both (only then: a grammar that compiles is not compiled twice)."""
        if spec.type != "json_or_tool_calls":
            return
        LLMatcher = self._llg.LLMatcher
        for part, text in (("schema", spec.grammar_source()), ("calls", spec.calls)):
            try:
                alone = LLMatcher.grammar_from_json_schema(text, defaults=_JSON_OPTIONS)
                problem = LLMatcher.validate_grammar(alone, self._tokenizer, limits=self._limits)
            except ValueError as e:
                problem = str(e)
            if problem:
                raise GrammarError(f"guided.{part} cannot be compiled: {_one_line(problem)}")

    def matcher(
        self, spec: GuidedSpec, budget: GrammarBudget | None = None, share: str | None = None, *, compile: bool = True
    ) -> Matcher:
        """A fresh matcher at the start of the spec's grammar, a copy of cache salt `share`'s prototype (compiled),
        counting its CPU in `budget` (one per request, shared by its sequences; None: its own); GrammarError when
        the schema cannot be compiled, NotCompiled when it is not compiled and `compile` is False."""
        cached = self._cached(spec, share, compile)
        return Matcher(cached.proto.deep_copy(), self.vocab_size, budget, self.end_row, self.named_row, of=cached)

    def new_bitmask(self, rows: int) -> torch.Tensor:
        """[rows, ceil(vocab_size / 32)] int32 on the CPU, every token allowed (Matcher.fill overwrites a row)."""
        return torch.full((rows, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)


def _bit(k: int) -> int:
    """Bit k of an int32 word, as the signed value torch holds it."""
    return (1 << k) - (1 << 32 if k == 31 else 0)


def _allowed_host(bitmask: torch.Tensor) -> torch.Tensor:
    """uint8 [R, 32 W]: 1 where bit t of the row is set. numpy's unpackbits is one C pass (the int32 words read as
    bytes, low byte first: little-endian hosts); torch's shift-and-compare takes ~10x longer on CPU."""
    return torch.from_numpy(np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little"))


def _allowed_device(bitmask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The same (int32) on `device`: the [R, W] words travel, not [R, V] flags."""
    words = bitmask.to(device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    return ((words.unsqueeze(-1) >> shifts) & 1).flatten(1)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """Disallowed tokens' logits -> -inf, in place.

    logits [B, V] (any device, float); bitmask [R, W] int32 on the CPU (bit t % 32 of word t // 32 set: token t
    allowed); rows [R] int64, distinct: the logits row each bitmask row belongs to (None: R == B, in order). Tokens
    at or past 32 * W are disallowed. Rows not named are untouched."""
    if logits.dim() != 2 or bitmask.dim() != 2 or bitmask.dtype != torch.int32 or bitmask.device.type != "cpu":
        raise ValueError(f"logits [B, V] and an int32 CPU bitmask [R, W], got {tuple(logits.shape)} {bitmask.dtype}")
    n = rows.numel() if rows is not None else logits.shape[0]
    if bitmask.shape[0] != n:
        raise ValueError(f"bitmask has {bitmask.shape[0]} rows for {n} logits rows")
    bitmask, vocab, device = bitmask.contiguous(), logits.shape[1], logits.device
    allowed = _allowed_host(bitmask) if device.type == "cpu" else _allowed_device(bitmask, device)  # [R, 32 W]
    # added, not masked_fill_'ed: 1 - 1/1 = 0 and 1 - 1/0 = -inf (IEEE), four cheap passes where a boolean
    # masked_fill_ takes ~9x longer on CPU (16 x 32,000: 0.1 ms against 0.9 ms)
    penalty = allowed[:, :vocab].to(logits.dtype).reciprocal_().neg_().add_(1)  # [R, <= V]
    if penalty.shape[1] < vocab:
        penalty = torch.nn.functional.pad(penalty, (0, vocab - penalty.shape[1]), value=float("-inf"))
    if rows is None:
        logits.add_(penalty)
    else:
        logits.index_add_(0, rows.to(device, non_blocking=True), penalty)
