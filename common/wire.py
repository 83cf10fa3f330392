"""The formats every part of loramesh speaks: ids, hex, canonical JSON, SSE frames, error bodies, and the
one parser of untrusted JSON.

This module is the leaf of the project: it imports nothing from node, ledger, gateway or devnet, and
each of them takes these formats from here rather than writing its own. A format that two packages
share is defined here once; a format one package owns stays in that package.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import operator
import re
import sys
from typing import Any

# ---- ids and hex -------------------------------------------------------------------------------------
# An id (adapter, dataset, base model, node, request, batch) is a bytes32 written "0x" + 64 lowercase hex
# digits: one spelling per id, so ids compare as strings and hash the same everywhere.

HEX_ID_PATTERN = r"0x[0-9a-f]{64}"
_HEX64_RE = re.compile("[0-9a-f]{64}")
_ID_RE = re.compile(HEX_ID_PATTERN)
ZERO_ID = "0x" + "00" * 32


def is_id(value: object) -> bool:
    """True when `value` is a 0x-prefixed 64-hex-digit lowercase id string (one spelling per id: int(x, 16)
    would also take "_", signs, whitespace and non-ASCII digits)."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def to_id(value: str | bytes) -> str:
    """Normalise a bytes32 id to "0x"+64 lowercase hex; ValueError when it is not 32 bytes."""
    if isinstance(value, (bytes, bytearray)):
        if len(value) != 32:
            raise ValueError(f"id must be 32 bytes, got {len(value)}")
        return hex0x(value)
    if not isinstance(value, str):
        raise ValueError(f"id must be a hex string or bytes, got {type(value).__name__}")
    if _ID_RE.fullmatch(value) is not None:
        return value  # already in its one spelling: the settler normalises ~1,500 ids a batch of 500
    text = value.lower()
    body = text[2:] if text.startswith("0x") else text
    # a regex, not a loop over characters: this runs for every id of every record the explorer proves
    if _HEX64_RE.fullmatch(body) is None:
        raise ValueError(f"id must be 0x followed by 64 hex digits, got {value!r}")
    return "0x" + body


def id_bytes(value: str | bytes) -> bytes:
    """A bytes32 id as 32 raw bytes."""
    return bytes.fromhex(to_id(value)[2:])


def hex0x(data: bytes | bytearray | memoryview) -> str:
    """Bytes as "0x" + lowercase hex, the way ids, hashes and signatures are written."""
    return "0x" + bytes(data).hex()


def node_id_of(public_key: bytes) -> str:
    """A node's id: sha256 of its raw 32-byte Ed25519 public key."""
    if len(public_key) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(public_key)}")
    return sha256_hex(public_key)


# ---- canonical JSON and hashing: the byte forms ids and signatures are computed over ----------------


def canonical_json(obj: Any) -> bytes:
    """Serialise `obj` as canonical JSON: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    """Return sha256 of `data` as a 0x-prefixed lowercase hex string (a bytes32 id)."""
    return hex0x(hashlib.sha256(data).digest())


# ---- the generate call's bounds ----------------------------------------------------------------------
# What one gateway -> node generate call may ask for (node/api/models.py GenerateBody holds them; the
# gateway's OpenAI models refuse more before a node is asked, gateway/openai_api.py).

MAX_PROMPTS = 16  # prompts in one request (OpenAI's list of prompts)
MAX_N = 16  # sequences per prompt
MAX_SEQUENCES = 64  # prompts x n
MAX_STOPS = 4  # stop strings (OpenAI's bound)
# characters in one stop string: the node checks each against every token's text (and holds back text that
# could begin one), at a cost that grows with the square of its length
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 16
MAX_LOGIT_BIAS = 300  # logit_bias entries (OpenAI's bound)
MAX_LOGPROBS = 20  # top log-probabilities per position (OpenAI's top_logprobs bound)
MAX_CACHE_SALT = 256  # characters of a request's prefix-cache salt
# Generate fields that came after the first release, named as a node's status lists them in "features" when its
# generate body takes them (an older node refuses a body with a field it does not know): a gateway leaves
# cache_salt out for a node that does not list it, and sends the others only to nodes that do (features_needed)
CACHE_SALT_FEATURE = "cache_salt"
ALLOWED_TOKEN_IDS_FEATURE = "allowed_token_ids"
BAD_WORDS_FEATURE = "bad_words_token_ids"
GUIDED_GRAMMAR_FEATURE = "guided_grammar"  # guided {"type": "grammar"}: an older node refuses the type
# not a field: the node names, in a sequence's finish event, the stop string that ended it (an older node's are
# read back from its tokens: gateway.choices.Choices.stop_text)
STOP_STRING_FEATURE = "stop_string"
# vLLM's skip_special_tokens (false: special tokens' text in the answer): sent only to a node that lists it
SKIP_SPECIAL_TOKENS_FEATURE = "skip_special_tokens"
GENERATE_FEATURES = (
    CACHE_SALT_FEATURE,
    ALLOWED_TOKEN_IDS_FEATURE,
    BAD_WORDS_FEATURE,
    GUIDED_GRAMMAR_FEATURE,
    STOP_STRING_FEATURE,
    SKIP_SPECIAL_TOKENS_FEATURE,
)
# vLLM's allowed_token_ids: the only ids a sequence may draw, at most this many (made a mask on the device once a
# request; the bound keeps the body and that making small)
MAX_ALLOWED_TOKEN_IDS = 4096
# vLLM's bad_words: at most MAX_BAD_WORDS words of at most MAX_BAD_WORD_CHARS characters, which the gateway makes
# token id sequences (node/adapters/prompts.py:bad_word_ids: two a word at most); the node takes at most
# MAX_BAD_WORD_TOKENS ids in all (each step compares a row's last tokens with the words that could end there)
MAX_BAD_WORDS = 64
MAX_BAD_WORD_CHARS = 128
MAX_BAD_WORD_TOKENS = 4096
MAX_BAD_WORD_SEQUENCES = 2 * MAX_BAD_WORDS  # the sequences the node takes: two a word at most
# the sampling fields' ranges (OpenAI's and vLLM's): presence / frequency penalties in [-MAX_PENALTY, MAX_PENALTY],
# a repetition penalty in (0, MAX_REPETITION_PENALTY], a logit bias in [-MAX_BIAS, MAX_BIAS]
MAX_PENALTY = 2.0
MAX_REPETITION_PENALTY = 2.0
MAX_BIAS = 100.0
# A float32 holds no temperature past 3.4e38: 1e39 became inf on the way to a node's sampler, and a row's -inf
# logit (a banned token) over it NaN, which failed the draw (red team). Far below this bound every token is about
# as likely already: logits span some tens. (The gateway's clients are held to OpenAI's 2.)
MAX_TEMPERATURE = 1e6
SEED_LIMIT = 1 << 64  # seeds are unsigned 64-bit: the device sampler hashes both 32-bit halves
# top_k past the vocabulary keeps every token; bounded so the samplers' float32 and int64 tensors hold it (a
# larger one failed the whole engine step, every request batched beside it too)
MAX_TOP_K = 2**31 - 1
TOKEN_ID_LIMIT = 2**31  # token ids are below it (int32 on the device), whatever a client or a node writes
# a guided answer's shape: a JSON schema of at most this many bytes (compact JSON: it bounds what the grammar
# compiler reads before its own bounds take over), a regular expression of at most this many characters, or
# one of at most MAX_GUIDED_CHOICES strings of at most MAX_GUIDED_CHOICE_CHARS each, or a grammar of at most
# MAX_GUIDED_GRAMMAR_CHARS characters (Lark), or MAX_GBNF_CHARS (GBNF: llguidance makes it Lark in pure Python on the
# node's compile thread, holding the GIL, in time growing with the square of the rules: rules chained in the wrong
# order took 0.5-0.7 s at 32 kB, and 16 such requests held the compile thread past the gateway's first-byte
# timeout, red team; the slowest found at 8 kB takes 48 ms). Grammars written by hand for SQL, JSON or a small
# language are 1-10 kB; llama.cpp's own GBNF grammars are under 2 kB.
MAX_SCHEMA_BYTES = 64 << 10
MAX_GUIDED_PATTERN_CHARS = 4096
MAX_GUIDED_GRAMMAR_CHARS = 32 << 10
MAX_GBNF_CHARS = 8 << 10
MAX_GUIDED_CHOICES = 256
MAX_GUIDED_CHOICE_CHARS = 1024
# a guided answer's shape as the node's generate call takes it: {"type": kind} and the kind's one field
# grammar: a context-free grammar in Lark (llguidance's dialect) or GBNF (llama.cpp's, which vLLM's guided_grammar
# takes too), told apart as llguidance does: Lark has a `start:` rule
# json_or_tool_calls: JSON the schema validates (null: any JSON object), or 1 to max_calls tool calls, each a call
# object `calls` validates between TOOL_CALL_OPEN and TOOL_CALL_CLOSE (an answer with tools the model may call, and a
# response format for the answer it gives instead)
GUIDED_WIRE_FIELDS = {
    "json_object": (),
    "json_schema": ("schema",),
    "regex": ("pattern",),
    "choice": ("choices",),
    "json_or_tool_calls": ("schema", "calls", "max_calls"),
    "grammar": ("grammar",),
}
# the code of a node's error event (after tokens, on the generate stream) when the request failed on its own grammar
# (a mask past the node's CPU bounds, the parser out of fuel, a token the grammar refused): other engine errors are
# "engine_error"
GUIDED_FAILED = "guided_failed"  # (node.engine.request.GUIDED_ERROR_PREFIX begins such an error's text)
# how a model writes a tool call in text (the Hermes / Qwen format, which the tiny bases' template writes too)
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
MAX_GUIDED_CALLS = 8  # tool calls one constrained answer may make


def guided_shape(kind: str, *values: object) -> dict:
    """The generate call's `guided` value: guided_shape("json_schema", schema), guided_shape("regex", pattern),
    guided_shape("choice", strings), guided_shape("json_object"), guided_shape("json_or_tool_calls", schema,
    calls, max_calls), guided_shape("grammar", text)."""
    return {"type": kind} | dict(zip(GUIDED_WIRE_FIELDS[kind], values, strict=True))


# Lark as llguidance tells it from GBNF (a line that starts with `start:` or `%llguidance`), written to run in one
# pass: llguidance's own pattern (`^\s*` in multi-line mode) rescans from every line start across blank lines, 0.38 s
# of the GIL for 8 kB of newlines (review), on the gateway's loop and the node's compile thread alike
_LARK_LINE = re.compile(r"^[^\S\n]*(?:%llguidance\b|start\s*:)", re.MULTILINE)


def features_needed(body: dict) -> frozenset[str]:
    """The generate features a node must list to be sent this generate body: those of fields an older node refuses
    (cache_salt is not one: it is left out for a node that does not list it). Sent to one that refuses it while
    another serves it, the refusing node was taken for one that refuses what it can serve."""
    needed = {f for f in (ALLOWED_TOKEN_IDS_FEATURE, BAD_WORDS_FEATURE, SKIP_SPECIAL_TOKENS_FEATURE) if f in body}
    guided = body.get("guided")
    if isinstance(guided, dict) and guided.get("type") == "grammar":
        needed.add(GUIDED_GRAMMAR_FEATURE)
    return frozenset(needed)


def is_lark(grammar: str) -> bool:
    """Whether a guided grammar is Lark (else GBNF)."""
    return _LARK_LINE.search(grammar) is not None


def grammar_problem(grammar: str) -> str | None:
    """Why a guided grammar is past its bound (None: it is not): Lark of at most MAX_GUIDED_GRAMMAR_CHARS, GBNF of at
    most MAX_GBNF_CHARS. The gateway refuses it before a node is asked, the node as it compiles it: a grammar this
    release's nodes refuse, served by an older node, would have the refusing ones taken for liars."""
    if len(grammar) > MAX_GUIDED_GRAMMAR_CHARS:
        return f"a grammar is at most {MAX_GUIDED_GRAMMAR_CHARS} characters, got {len(grammar)}"
    if len(grammar) > MAX_GBNF_CHARS and not is_lark(grammar):
        return (
            f"a GBNF grammar is at most {MAX_GBNF_CHARS} characters (Lark: {MAX_GUIDED_GRAMMAR_CHARS}), "
            f"got {len(grammar)}"
        )
    return None


# the one llguidance option set a guided schema may carry (as "x-guidance"): JSON with no whitespace at all, which
# the gateway asks for tool calls and the node refuses any other (node/engine/grammar.py)
COMPACT_GUIDANCE = {"whitespace_flexible": False, "whitespace_pattern": None}


# ---- HTTP bodies: server-sent events and the error object -------------------------------------------


def sse_frame(obj: Any, *, event: str | None = None) -> bytes:
    """One server-sent event carrying `obj` as compact JSON; `event`: its name (the Responses API names each
    event: one of our own constants, never a client's text)."""
    data = b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
    return b"event: " + event.encode() + b"\n" + data if event else data


SSE_DONE = b"data: [DONE]\n\n"  # the OpenAI stream's last event


def error_body(
    message: str, *, type: str = "invalid_request_error", code: str | None = None, param: str | None = None
) -> dict:
    """The error object every loramesh HTTP API answers with (OpenAI's shape, also on the node API)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def read_error(raw: bytes | str, *, max_bytes: int) -> tuple[object, str | None] | None:
    """(message, code) of an answer in error_body's shape, from a stranger (parsed with parse_json, below):
    the message as it is (None when absent), the code when it is a string; None when `raw` is no error body."""
    try:
        err = parse_json(raw, max_bytes=max_bytes, what="error answer")
    except UntrustedJSONError:
        return None
    err = err.get("error") if isinstance(err, dict) else None
    if not isinstance(err, dict):
        return None
    code = err.get("code")
    return err.get("message"), code if isinstance(code, str) else None


# ---- the one parser of untrusted JSON ---------------------------------------------------------------
# Bytes from the network, from uploaded packages and from files a stranger may have written are parsed
# here and nowhere else. Python's C decoder recurses once per nesting level and checks only the
# interpreter's recursion limit, which py_ecc (imported by the Ethereum libraries) raises to 100,000:
# 100 KB of "[" then overflows the C stack and the process dies with SIGSEGV before any exception.
# So nesting depth is counted on the raw text first (strings blanked out), and the limit is restored.

MAX_JSON_DEPTH = 64
# the longest integer untrusted JSON may hold: a uint256 is 78 digits; Python's own bound is 4,300, and a number
# that long reached a tensor constructor once (top_k) and failed the engine step of every request beside it
MAX_JSON_INT_DIGITS = 80
# a string, or one never closed, blanked through to the end: the decoder fails there, reading nothing after it. Unrolled
# and possessive, it never backtracks (a pattern that needed the closing quote scanned to the end from every quote of
# an unclosed string: 52 s for 120 kB of \" with none, review)
_STRINGS = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")  # deleted by bytes.translate, in one C pass
_OPENS_CLOSES = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")
_DEPTH_CHUNK = 4096  # brackets followed at a time past the balanced ones: a refusal stops within a chunk of its cause
# each digit read as 0, each exponent mark as e and each sign as -: a long integer is then a long run of 0s, and a
# number out of a double's range holds an exponent of 3 digits or more ("e000", "e-000") or a run of 81 digits (with at
# most 80 digits before the point and an exponent under 100, a number is below 1e181); bytes.find looks for each in C
_NUMBER_SHAPES = bytes.maketrans(b"0123456789eE+-", b"0000000000ee--")
_BIG_EXPONENTS = (b"e000", b"e-000")
# how a JSON string spells a UTF-16 surrogate (a literal prefix: found fast)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")  # one as it is, in a str given to the parser (bytes decoded hold none)
SANE_RECURSION_LIMIT = 1000


class UntrustedJSONError(ValueError):
    """Untrusted bytes that are not acceptable JSON: too big, too deep, malformed, or not as required."""


def _no_constant(name: str) -> Any:
    raise UntrustedJSONError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    # Python turns a number too big for a double (1e400) into inf, which no canonical form can hold.
    value = float(text)
    if math.isinf(value):
        raise UntrustedJSONError(f"number {text[:32]} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise UntrustedJSONError(f"duplicate key {dup[:64]!r}")
    return obj


def nested_deeper(text: str, limit: int) -> bool:
    """Whether arrays and objects in JSON `text` nest deeper than `limit` (brackets inside strings do not count; in
    text that is no JSON, only up to where a bracket closes what is not open, where a decoder would stop)."""
    return _too_deep(_outside_brackets(_STRINGS.sub('""', text)), limit)


def _too_deep(brackets: bytes, limit: int) -> bool:
    # `brackets`: those outside the text's strings, nothing else. A regular expression of `limit` nested possessive
    # groups reads, in one linear pass of C, the brackets that balance within the limit; after them (depth 0) the
    # depth is followed a chunk at a time, and stops where it passes the limit, or where a bracket closes what is
    # not open (the decoder fails there, reading no further). Each opening bracket steps 2 and each closing one 0,
    # so after i brackets the depth is the running sum less i
    done = _nesting(limit).match(brackets).end() if limit <= MAX_JSON_DEPTH else 0
    steps = brackets.translate(_OPENS_CLOSES)
    depth = 0
    for start in range(done, len(steps), _DEPTH_CHUNK):
        chunk = steps[start : start + _DEPTH_CHUNK]
        running = list(map(operator.sub, itertools.accumulate(chunk), itertools.count(1)))
        if depth + max(running) > limit:
            return True
        if depth + min(running) < 0:
            return False
        depth += running[-1]
    return False


def _outside_brackets(outside: str) -> bytes:
    return outside.encode("utf-8", "surrogatepass").translate(None, _NOT_BRACKETS)


@functools.lru_cache(maxsize=16)
def _nesting(limit: int) -> re.Pattern:
    pattern = b""
    for _ in range(limit):
        pattern = rb"(?:[\[{]" + pattern + rb"[\]}])*+"
    return re.compile(pattern)


def compact_json(value: Any) -> bytes:
    """JSON as UTF-8 with no whitespace, keys in their order: how a guided schema is measured against
    MAX_SCHEMA_BYTES (the gateway before a node is asked, the node as it holds it) and what the grammar is
    built from."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def parse_json(
    data: bytes | bytearray | memoryview | str,
    *,
    max_bytes: int,
    max_depth: int = MAX_JSON_DEPTH,
    max_int_digits: int | None = MAX_JSON_INT_DIGITS,
    finite_floats: bool = True,
    max_containers: int | None = None,
    max_separators: int | None = None,
    what: str = "JSON",
) -> Any:
    """Parse untrusted JSON within limits, or raise UntrustedJSONError with one clear line.

    Refused: more than `max_bytes` bytes, nesting deeper than `max_depth`, invalid UTF-8 or JSON,
    NaN/Infinity (also 1e400, unless finite_floats is False: text passed on as written, its shape alone
    checked), integers of more than `max_int_digits` digits (None: Python's own bound), duplicate object keys,
    and lone surrogates in strings (they cannot be encoded back); with `max_containers`, more objects and arrays
    than that: an object costs a Python call (its duplicate keys checked), and allocating arrays by the ten thousand
    sets the garbage collector off over the whole heap (90 kB of `[{},{},...]` held the GIL 12 ms, of `[[],[],...]`
    up to 175 ms in a gateway's process); with `max_separators`, more commas and colons than that (one object of
    12,000 keys, or an array of 24,000 numbers, held the GIL as long: re-attack).
    """
    size = len(data.encode("utf-8", "surrogatepass")) if isinstance(data, str) else len(data)
    if size > max_bytes:
        raise UntrustedJSONError(f"{what} is {size} bytes, more than the limit of {max_bytes}")
    if isinstance(data, str):
        text = data
    else:
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise UntrustedJSONError(f"{what} is not valid UTF-8 (byte {e.start})") from None
    # what follows reads the text outside its strings, each check in one pass of C: a Python call per number or per
    # value (how it was) cost 10 times the decoder's own time, 1 s of the gateway's CPU for a 4 MB body of empty objects
    outside = _STRINGS.sub('""', text)
    outside_bytes = outside.encode("utf-8", "surrogatepass")
    if _too_deep(outside_bytes.translate(None, _NOT_BRACKETS), max_depth):
        raise UntrustedJSONError(f"{what} is nested deeper than {max_depth} levels")
    if max_containers is not None and (n := outside_bytes.count(b"{") + outside_bytes.count(b"[")) > max_containers:
        raise UntrustedJSONError(f"{what} holds {n} objects and arrays, more than {max_containers}")
    if max_separators is not None and (n := outside_bytes.count(b",") + outside_bytes.count(b":")) > max_separators:
        raise UntrustedJSONError(f"{what} holds {n} values, more than {max_separators}")
    shapes = outside_bytes.translate(_NUMBER_SHAPES)
    if max_int_digits is not None and max_int_digits < len(shapes) and b"0" * (max_int_digits + 1) in shapes:
        _check_int_digits(outside, max_int_digits)
    # a number out of a double's range is looked for number by number only where the text may hold one
    big = b"0" * 81 in shapes or any(e in shapes for e in _BIG_EXPONENTS)
    parse_float = _finite_float if finite_floats and big else None
    try:
        obj = json.loads(text, parse_constant=_no_constant, parse_float=parse_float, object_pairs_hook=_unique_keys)
    except UntrustedJSONError as e:
        raise UntrustedJSONError(f"{what}: {e}") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise UntrustedJSONError(
            f"{what} is not valid JSON: {getattr(e, 'msg', e)} at position {getattr(e, 'pos', '?')}"
        ) from None
    except ValueError as e:  # an integer of more than sys.get_int_max_str_digits() digits
        raise UntrustedJSONError(f"{what}: {str(e).split(';')[0]}") from None
    # only an escape, or a str given as it is, can hold a lone surrogate (two searches: one pattern for both read every
    # character, 3 times the decoder's time on a long prompt)
    if _SURROGATE_ESCAPE.search(text) is not None or (isinstance(data, str) and _SURROGATE.search(text) is not None):
        _check_strings(obj, what)
    return obj


@functools.lru_cache(maxsize=8)
def _long_integer(limit: int) -> re.Pattern:
    # an integer token (no point or exponent next to it) of more than `limit` digits, in text outside strings
    return re.compile(r"(?<![0-9.eE+\-])-?[0-9]{" + str(limit + 1) + r",}+(?![.eE])")


def _check_int_digits(outside: str, limit: int) -> None:
    # before the decoder (Python's own int() of 4,301 digits or more is a ValueError saying less); run where the text
    # holds a long run of digits, which may also be a float's
    found = _long_integer(limit).search(outside)
    if found is not None:
        digits = len(found.group()) - found.group().startswith("-")
        raise UntrustedJSONError(f"an integer of {digits} digits is out of range (at most {limit})")


def _check_strings(obj: Any, what: str) -> None:
    # A "\ud800" escape decodes to a lone surrogate, which no later encode("utf-8") accepts: refuse it here,
    # where the error can say what it is, instead of as a 500 deep inside a handler.
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, str):
            _check_text(o, what)
        elif isinstance(o, dict):
            for k, v in o.items():
                _check_text(k, what)
                stack.append(v)
        elif isinstance(o, list):
            stack.extend(o)


def _check_text(s: str, what: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise UntrustedJSONError(f"{what} holds a lone UTF-16 surrogate in a string") from None


def restore_recursion_limit() -> None:
    """Undo py_ecc's import-time sys.setrecursionlimit(100000), which lets deep recursion crash the process."""
    if sys.getrecursionlimit() > SANE_RECURSION_LIMIT * 4:
        sys.setrecursionlimit(SANE_RECURSION_LIMIT * 4)
