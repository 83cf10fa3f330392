"""OpenAI tools on chat completions: the request's `tools` and `tool_choice` checked, the tools handed to the
base's chat template, and the model's answer read back as `tool_calls`.

How each `tool_choice` is served (as vLLM serves them):
- "none": the template is not shown the tools; the answer is text.
- "auto": the template lists the tools; the model may answer with `<tool_call>{"name": ..., "arguments": {...}}
  </tool_call>` blocks (the Hermes/Qwen format, which the tiny bases' template writes too), which are parsed
  into `tool_calls`; text outside them is the content, and whitespace beside a call is not content (as a whole
  answer's content is stripped, a stream holds whitespace until text follows it). Nothing constrains it: a
  block that does not parse stays text. A block ends at its first `</tool_call>`, or, when that one is inside
  a JSON string (a call whose string arguments hold the tag) and what it closes is no call, at the first one
  outside a string. With `parallel_tool_calls: false`, calls after the first are left out (vLLM's way); an
  answer cut short by max_tokens ends "length", and a block it left open is content.
- "required": the answer is constrained by the node's grammar to a JSON array of at least one
  `{"name": <one of the tools>, "arguments": <that tool's parameters>}`, so it always parses and matches the
  schemas (unless cut short by max_tokens: the calls it finished, and the rest as content).
- a named function: constrained to that function's `parameters` schema; the answer is its arguments.
A constrained call's arguments are the text the model wrote (compact JSON), streamed as they come. A function's
parameters are an object schema (OpenAI's rule). A whole answer is read through the same stream (ToolPlan.answer):
whole or streamed, an answer is the same calls and content.
"""

from __future__ import annotations

import functools
import json
import re
import secrets

from common.wire import (
    COMPACT_GUIDANCE,
    MAX_GUIDED_CALLS,
    MAX_SCHEMA_BYTES,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    UntrustedJSONError,
    compact_json,
    guided_shape,
    nested_deeper,
    parse_json,
)
from gateway.errors import BadRequest

MAX_TOOLS = 128
# what the chat template is given of the tools: bounded in size and nesting, as a template may write them out
# indented (Llama 3's tojson(indent=4)), each level of nesting adding its indent to every line beneath it
MAX_TOOLS_BYTES = 1 << 20
MAX_TOOL_DEPTH = 24
# The most calls one constrained answer may make: the grammar ends there, so a model that keeps listing calls
# (random weights do) is closed off instead of running to max_tokens.
MAX_CALLS = MAX_GUIDED_CALLS
# `<tool_call>` blocks read in one answer; what follows the last is text. Each is parsed as a call would be: a node's
# answer of 4,096 tokens of short blocks was 17,000 parses, a third of a second of the gateway's event loop a choice
# at the answer's end (complexity red team). No model calls 256 tools in one answer
MAX_BLOCKS = 256
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for a function's (and a response format's) name
OPEN, CLOSE = TOOL_CALL_OPEN, TOOL_CALL_CLOSE
# what a model writes is untrusted JSON like any other: its size and nesting are bounded before it is parsed
# (a deeply nested "call" used to raise RecursionError, a 500 for a request already billed)
MAX_CALL_TEXT_BYTES = 16 << 20
MAX_CALL_DEPTH = 64
# Tool calls are written compactly: the node's grammar allows no whitespace between JSON tokens in them
# (llguidance's per-schema options; a free answer may pretty-print), so a model cannot spend its tokens on
# whitespace before the call closes.
COMPACT = {"x-guidance": COMPACT_GUIDANCE}
# A function without parameters takes none: an empty object.
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def tool_plan(tools: list | None, tool_choice: object | None, *, parallel: bool = True) -> ToolPlan | None:
    """The request's tools and choice, checked (BadRequest naming the field); None when it names no tools.
    parallel=False (OpenAI's `parallel_tool_calls: false`): an answer makes one call at most."""
    if not tools:
        if tool_choice is not None:
            raise BadRequest("tool_choice is only allowed when tools are given", param="tool_choice")
        if tools is not None and not isinstance(tools, list):
            raise BadRequest("tools must be a list of function tools", param="tools")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise BadRequest(f"tools must be a list of at most {MAX_TOOLS} function tools", param="tools")
    text = json.dumps(tools, ensure_ascii=False)
    if len(text.encode()) > MAX_TOOLS_BYTES:
        raise BadRequest(f"tools are more than {MAX_TOOLS_BYTES} bytes of JSON", param="tools")
    if nested_deeper(text, MAX_TOOL_DEPTH):
        raise BadRequest(f"tools are nested more than {MAX_TOOL_DEPTH} deep", param="tools")
    functions: dict[str, dict] = {}
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict):
            raise BadRequest(f'tools[{i}] must be {{"type": "function", "function": {{...}}}}', param="tools")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise BadRequest(f"tools[{i}].function.name must match {NAME.pattern}", param="tools")
        if name in functions:
            raise BadRequest(f"tools[{i}]: two tools are named {name!r}", param="tools")
        params = fn.get("parameters", NO_PARAMETERS)
        if not isinstance(params, dict):
            raise BadRequest(f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
        if params.get("type", "object") != "object":
            # as OpenAI refuses them: a call's arguments are an object (a string schema made the grammar write
            # arguments no call could carry, and the answer's calls after it were dropped, billed: red team)
            raise BadRequest(
                f'tools[{i}].function.parameters must be a JSON schema of type "object", not {params["type"]!r}',
                param="tools",
            )
        params = {"type": "object"} | params  # one without a type takes an object alone (anyOf a string and one)
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise BadRequest(f"tools[{i}].function.description must be a string", param="tools")
        functions[name] = {"name": name, "parameters": params} | ({"description": desc} if desc else {})
    plan = ToolPlan(functions, *_choice(tool_choice, functions), max_calls=MAX_CALLS if parallel else 1)
    guided = plan.guided()
    if guided is not None:
        _bounded(guided["schema"], f"for tool_choice {plan.choice}")
    return plan


def _bounded(schema: dict, where: str) -> None:
    """The schema the calls are constrained by is held to the bound a node holds every schema to: refused here,
    before a node is asked."""
    if len(compact_json(schema)) > MAX_SCHEMA_BYTES:
        raise BadRequest(
            f"the tools' schema {where} is more than {MAX_SCHEMA_BYTES} bytes of compact JSON", param="tools"
        )


def _choice(tool_choice: object, functions: dict[str, dict]) -> tuple[str, str | None]:
    if tool_choice is None:
        return "auto", None
    if tool_choice in ("none", "auto", "required"):
        return tool_choice, None
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not (isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and isinstance(fn, dict)):
        raise BadRequest(
            'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    name = fn.get("name")
    if name not in functions:
        raise BadRequest(f"tool_choice names {name!r}, which is not one of the tools", param="tool_choice")
    return "function", name


class ToolPlan:
    """How one request's tools are served: what the template sees, the node's grammar, how answers parse."""

    def __init__(self, functions: dict[str, dict], choice: str, name: str | None, *, max_calls: int = MAX_CALLS):
        self.functions, self.choice, self.name, self.max_calls = functions, choice, name, max_calls

    @property
    def template_tools(self) -> list[dict] | None:
        if self.choice == "none":
            return None
        if self.choice == "function":
            return [{"type": "function", "function": self.functions[self.name]}]
        return [{"type": "function", "function": f} for f in self.functions.values()]

    @property
    def free_calls(self) -> float:
        """How many of the calls an `auto` answer writes are taken: one without parallel calls, else all (the
        grammar bounds a constrained answer's to max_calls; nothing bounds a free one's but max_tokens)."""
        return 1 if self.max_calls == 1 else float("inf")

    def called_reason(self, reason: str) -> str:
        """The finish_reason of an answer that calls tools, which ended with `reason`: "tool_calls", but "stop"
        for a function the request named (OpenAI's answer, and vLLM's: the client asked for that call, the model
        did not choose it). An answer cut short by max_tokens keeps "length", as OpenAI's does, whatever the
        choice: code that looks for "length" to know an answer is cut must find it (an `auto` answer cut in its
        second call said "tool_calls", its unclosed block sent as content; compat audit)."""
        if reason != "stop":
            return reason
        return "stop" if self.choice == "function" else "tool_calls"

    def guided(self) -> dict | None:
        """The node's `guided` value: the answer's shape for "required" and a named function (built once: a
        request asks for it several times, and the tools may be a megabyte)."""
        return self._constraint

    @functools.cached_property
    def _constraint(self) -> dict | None:
        if self.choice == "function":
            return guided_shape("json_schema", self.functions[self.name]["parameters"] | COMPACT)
        if self.choice == "required":
            calls, defs = self._calls()
            schema = {"type": "array", "minItems": 1, "maxItems": self.max_calls, "items": calls} | COMPACT
            return guided_shape("json_schema", schema | ({"$defs": defs} if defs else {}))
        return None

    def either(self, answer: dict, field: str) -> dict | None:
        """With tool_choice auto beside a JSON response format (`answer`: its guided value, json_schema or
        json_object, from the request's `field`), the node's `guided` value for an answer that is that JSON or the
        model's calls (between the tags, as it writes them free): an agent with tools and an output type gets both.
        None for another choice or format; BadRequest when the calls' schema is past the node's bound."""
        if self.choice != "auto" or answer["type"] not in ("json_schema", "json_object"):
            return None
        calls, defs = self._calls()
        schema = calls | ({"$defs": defs} if defs else {})
        _bounded(schema, f"beside {field}")
        return guided_shape("json_or_tool_calls", answer.get("schema"), schema, self.max_calls)

    def _calls(self) -> tuple[dict, dict]:
        """(the schema of one call of any of the tools, the $defs its references point into)."""
        calls, defs = [], {}
        for i, f in enumerate(self.functions.values()):
            arguments = f["parameters"]
            # a tool's parameters that refer to themselves ("#/$defs/Unit", as pydantic writes them) are moved under
            # the combined schema's $defs, their references with them: nested in the combined schema, "#" would be
            # its root, and the grammar refused them
            rooted = _rooted(arguments, f"#/$defs/tool{i}")
            if rooted != arguments:
                defs[f"tool{i}"], arguments = rooted, {"$ref": f"#/$defs/tool{i}"}
            calls.append(
                {
                    "type": "object",
                    "properties": {"name": {"const": f["name"]}, "arguments": arguments},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
            )
        return {"anyOf": calls}, defs

    def answer(self, text: str) -> tuple[str | None, list[dict]]:
        """A whole answer -> (content, tool_calls): the text through this plan's stream (ToolStream), its deltas
        gathered, so a whole answer is what the same answer streamed sends (read back apart, a named function
        cut short was content whole and a call streamed; red team); content beside calls is stripped, or None."""
        stream = self.stream()
        content: list[str] = []
        calls: list[dict] = []
        for delta in stream.push(text) + stream.close():
            content.append(delta.get("content", ""))
            for c in delta.get("tool_calls", ()):
                if c["index"] == len(calls):  # a call's first delta: whole but for what its arguments add later
                    calls.append({k: c[k] for k in ("id", "type")} | {"function": dict(c["function"])})
                else:
                    calls[c["index"]]["function"]["arguments"] += c["function"]["arguments"]
        text = "".join(content)
        # beside calls, no whitespace: what the stream sent before the first call, not knowing one would come
        return (text.strip() or None) if calls else text, calls

    def _constrained(self, text: str) -> list[dict]:
        """A "required" answer's calls, parsed whole (CallArrayReader could not follow it as it came); [] when it
        is not a whole array of calls. (A named function's answer is its arguments as written, 2E59048 and all:
        ToolStream sends them as they come.)"""
        doc = _parsed(text)
        if doc is None:
            return []
        if not isinstance(doc, list):
            return []
        calls = [self._call_from(item) for item in doc]
        if not calls or None in calls:
            return []
        reader = CallArrayReader(self.functions)
        reader.feed(text)
        if reader.state == "done" and len(reader.arguments) == len(calls):  # as written, as streamed
            for call, written in zip(calls, reader.arguments, strict=True):
                call["function"]["arguments"] = written
        return calls

    def _call(self, block: str) -> dict | None:
        doc = _parsed(block)
        return None if doc is None else self._call_from(doc)

    def _call_from(self, doc: object) -> dict | None:
        if not isinstance(doc, dict) or doc.get("name") not in self.functions:
            return None
        args = doc.get("arguments", {})
        if isinstance(args, str):  # some models write the arguments as a JSON string, as OpenAI sends them
            args = _parsed(args)
        return _tool_call(doc["name"], args) if isinstance(args, dict) else None

    def stream(self) -> ToolStream:
        return ToolStream(self)


# keywords whose values are data, not schemas: a "$ref" key in them is a value the client wrote, left as it is
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})
# keywords whose values map names to schemas: a name there ("default", "$ref") is a name, not a keyword
_SCHEMA_MAPS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies"}
)


def _rooted(schema: object, at: str, *, names: bool = False) -> object:
    """A schema to be placed at the JSON pointer `at` of a larger one: its local references ("#", "#/...") made to
    point under `at` (an equal copy when it has none). names: `schema` maps names to schemas."""
    if isinstance(schema, list):
        return [_rooted(v, at) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if names:
            out[k] = _rooted(v, at)
        elif k == "$ref" and isinstance(v, str) and v.startswith("#"):
            out[k] = at + v[1:]
        else:
            out[k] = v if k in _DATA_KEYWORDS else _rooted(v, at, names=k in _SCHEMA_MAPS)
    return out


def _parsed(text: str) -> object | None:
    """The JSON a model wrote, within bounds; None when it is not JSON (or too large, or too deep)."""
    try:
        # a model's arguments are passed on as text: a long integer in them is the model's, not refused
        return parse_json(
            text,
            max_bytes=MAX_CALL_TEXT_BYTES,
            max_depth=MAX_CALL_DEPTH,
            max_int_digits=None,
            finite_floats=True,
            what="tool call",
        )
    except UntrustedJSONError:
        return None


# what decides where a JSON string starts and ends, and where a block may end: a `<` (a tag) or a backslash
_JSON_TOKEN = re.compile(r'\\.|"|<', re.S)


class _Block:
    """A `<tool_call>` block opening at `start` of a text that may still grow (a stream): where it ends and the call
    it holds. It ends at the first CLOSE after the OPEN when that closes a call, or is outside a JSON string;
    else (a call whose string arguments hold the tag itself) at the first CLOSE outside a string, if that closes a
    call; else, at the first CLOSE, as text. The search for a CLOSE outside a string stops at the first `<` or
    backslash outside one, where the text is no JSON and no later tag can close a call: each block reads at most
    up to there, however the text arrives (searching on to the end made a text of many blocks quadratic)."""

    def __init__(self, plan: ToolPlan, start: int) -> None:
        self.plan, self.body = plan, start + len(OPEN)
        self.first = self.outside = -1  # the first CLOSE, the first outside a string: -1 while not seen
        self._first_call: dict | None = None
        self._plain = self._pos = self.body  # where each search goes on when more text comes
        self._in_string = False
        self._no_json = False  # a `<` or a backslash outside a string: no later CLOSE closes a call

    def shift(self, n: int) -> None:
        """The text it reads lost its first `n` characters (decided before the block opened)."""
        self.body, self._plain, self._pos = self.body - n, self._plain - n, self._pos - n
        if self.first >= 0:
            self.first -= n
        if self.outside >= 0:
            self.outside -= n

    def end(self, text: str, *, final: bool) -> tuple[int, dict | None] | None:
        """(where the block ends, its call or None for text), or None while undecided (final: no more text comes;
        then None only when no CLOSE follows the OPEN)."""
        if self.first < 0:
            self.first = text.find(CLOSE, self._plain)
            if self.first < 0:
                self._plain = max(self._plain, len(text) - len(CLOSE) + 1)
                return None
            self._first_call = self.plan._call(text[self.body : self.first])
        if self._first_call is not None:
            return self.first + len(CLOSE), self._first_call
        self._scan(text, final)
        if self.outside == self.first:
            return self.first + len(CLOSE), None
        if self.outside > self.first:
            call = self.plan._call(text[self.body : self.outside])
            if call is not None:
                return self.outside + len(CLOSE), call
        elif not (final or self._no_json):
            return None  # the first CLOSE is inside a string: a call's argument may go on past it
        return self.first + len(CLOSE), None

    def _scan(self, text: str, final: bool) -> None:
        pos = self._pos
        while self.outside < 0 and not self._no_json and (m := _JSON_TOKEN.search(text, pos)):
            token, at = m.group(), m.start()
            if token == '"':
                self._in_string = not self._in_string
            elif self._in_string:
                pass  # an escape, or a `<`, inside a string
            elif text.startswith(CLOSE, at):
                self.outside = at
            elif not final and len(text) - at < len(CLOSE) and CLOSE.startswith(text[at:]):
                self._pos = at  # a tag cut short: read again when more comes
                return
            else:
                self._no_json = True
            pos = m.end()
        self._pos = max(pos, len(text) - 1)  # what is left is no token but a string's backslash cut short


def _tool_call(name: str, arguments: dict | str) -> dict:
    """An OpenAI tool call; `arguments` a parsed object, or the JSON text a grammar made the model write."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": "call_" + secrets.token_hex(12), "type": "function", "function": {"name": name, "arguments": text}}


class CallArrayReader:
    """A "required" answer read as it comes: the grammar makes it a compact JSON array of `{"name": ...,
    "arguments": {...}}` objects, keys in the schema's order. `feed` returns ("name", name) once a call's name
    is whole, then ("arguments", text) as its arguments come. Anything else (another key order, a name that is
    no tool's) stops the reader (`state` "stopped"): the caller holds the rest and parses it whole at the end.
    `arguments` keeps each call's text so far."""

    _HEAD, _MID = '{"name":"', '","arguments":'

    def __init__(self, names) -> None:
        self.names = names
        self.text = ""
        self.pos = 0  # text[:pos] is read
        self.state = "open"  # open -> call -> arguments -> close -> after -> (call ... | done); or stopped
        self.arguments: list[str] = []
        self._depth, self._in_string, self._escaped = 0, False, False

    def feed(self, text: str) -> list[tuple[str, str]]:
        grow(self.__dict__, "text", text)
        out: list[tuple[str, str]] = []
        while self.pos < len(self.text) and self.state not in ("done", "stopped"):
            if getattr(self, "_" + self.state)(out) is None:
                break  # waits for more text
        return out

    def _expect(self, chars: str, then: str) -> bool:
        c = self.text[self.pos]
        if c not in chars:
            self.state = "stopped"
            return True
        self.pos += 1
        self.state = then if c != "]" else "done"
        return True

    def _open(self, out) -> bool:
        return self._expect("[", "call")

    def _close(self, out) -> bool:
        return self._expect("}", "after")

    def _after(self, out) -> bool:
        return self._expect(",]", "call")

    def _call(self, out) -> bool | None:
        rest = self.text[self.pos :]
        if not rest.startswith(self._HEAD):
            if self._HEAD.startswith(rest):
                return None
            self.state = "stopped"
            return True
        end = rest.find(self._MID, len(self._HEAD))
        if end < 0:  # a name is at most 64 characters: past that the call is not one this reader knows
            if len(rest) <= len(self._HEAD) + 64 + len(self._MID):
                return None
            self.state = "stopped"
            return True
        name, value = rest[len(self._HEAD) : end], end + len(self._MID)
        if len(rest) == value:
            return None
        if name not in self.names or rest[value] != "{":  # parameters are an object
            self.state = "stopped"
            return True
        out.append(("name", name))
        self.arguments.append("")
        self.pos += value
        self.state = "arguments"
        return True

    def _arguments(self, out) -> bool | None:
        t, start = self.text, self.pos
        end = None
        for i in range(start, len(t)):
            c = t[i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    end = i + 1
                    break
        chunk = t[start : end if end is not None else len(t)]
        out.append(("arguments", chunk))
        grow(self.arguments, -1, chunk)
        self.pos = start + len(chunk)
        if end is None:
            return None
        self.state = "close"
        return True


class ToolStream:
    """A streamed chat answer: text in, OpenAI chat deltas out. Free text passes through as it comes, except
    what could be the start of a `<tool_call>` block, which is held until it is decided, and whitespace, which is
    held until text follows it (whitespace beside a call is no content: a whole answer's is stripped). A
    constrained answer's calls stream as they come: a first delta names each call, later ones carry its
    arguments' text (a named function's whole answer is its arguments; a "required" answer is read by
    CallArrayReader, and what it cannot read is held and sent at the end)."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.held = ""
        self.called = False
        self._index = 0
        self._block: _Block | None = None  # the block `held` opens with, while it is undecided
        self._space = ""  # whitespace that ended the content sent so far: sent when text follows it
        self._sent = False  # some content was sent
        # a call was taken out just after whitespace: the whitespace after it is dropped, one run standing for both
        # sides ("hi <call> there" was "hi  there"; review)
        self._cut = False
        self._blocks_read = 0  # of MAX_BLOCKS
        self._reader = CallArrayReader(plan.functions) if plan.choice == "required" else None

    def held_chars(self) -> int:
        """The characters at the end of what was pushed in that were not sent out: what `release` would send (the
        whitespace before a call taken out is not at the end, and a call's text went out as the call)."""
        if self._reader is not None:
            return len(self.held) - (self._reader.pos if self.called else 0)
        return len(self.held) + (0 if self._cut else len(self._space))

    def push(self, text: str) -> list[dict]:
        if self.plan.choice == "none":
            return [{"content": text}] if text else []
        if self.plan.choice == "function":
            if not text:
                return []
            if self.called:
                return [{"tool_calls": [{"index": 0, "function": {"arguments": text}}]}]
            return [self._delta([_tool_call(self.plan.name, text)])]
        grow(self.__dict__, "held", text)
        if self._reader is not None:
            return self._read(text)
        return self._blocks(final=False)

    def _blocks(self, *, final: bool) -> list[dict]:
        """Deltas for what `held` decides: text, and each block that has ended, as a call or as text. What is decided
        is cut from `held` once, on the way out, and text side by side goes out as one delta: cut at each block, a
        text of many blocks was copied once per block, and sent as a chunk per block (a node's answer opening a
        string in its first block, then 4,096 tokens of tags, held the gateway's event loop 0.4 s a choice at its
        end, 9 s with n=16; complexity red team)."""
        out: list[dict] = []
        held, pos = self.held, 0
        try:
            while True:
                if self._block is None and self._blocks_read >= MAX_BLOCKS:  # the rest is text
                    self._text(out, held[pos:])
                    pos = len(held)
                    return _joined(out)
                if self._block is None:
                    start = held.find(OPEN, pos)
                    if start < 0:
                        keep = 0 if final else min(_partial_open(held), len(held) - pos)
                        self._text(out, held[pos : len(held) - keep])
                        pos = len(held) - keep
                        return _joined(out)
                    self._text(out, held[pos:start])
                    pos = start
                    self._block = _Block(self.plan, start)
                    self._blocks_read += 1
                got = self._block.end(held, final=final)
                if got is None:
                    return _joined(out)  # undecided, or (final) an OPEN never closed: close() sends it as text
                end, call = got
                block, pos, self._block = held[pos:end], end, None
                if call is None:
                    self._text(out, block)
                    continue
                self._cut = self._cut or bool(self._space)
                if self._index < self.plan.free_calls:
                    out.append(self._delta([call]))
                # else a call past what the request allows (`parallel_tool_calls: false`): left out, as vLLM leaves
                # it, not sent as its markup in the content (compat audit)
        finally:
            if pos:
                self.held = held[pos:]
                if self._block is not None:
                    self._block.shift(pos)

    def _text(self, out: list[dict], text: str) -> None:
        """Content: sent up to its trailing whitespace, which waits for the text after it. The first content after
        a call starts at its first non-whitespace character, as a whole answer's does (whitespace that came
        before any call was sent, unknowing, with the text after it); so does content after a call that followed
        whitespace (`_cut`)."""
        if self._cut:
            if not text.strip():
                return
            text, self._cut = text.lstrip(), False
        body = text.rstrip()
        if not body:
            self._space += text
            return
        if self.called and not self._sent:
            self._space, body = "", body.lstrip()
        out.append({"content": self._space + body})
        self._space, self._sent = text[len(text.rstrip()) :], True

    def _read(self, text: str) -> list[dict]:
        out = []
        for kind, value in self._reader.feed(text):
            if kind == "name":
                out.append(self._delta([_tool_call(value, "")]))
            else:
                out.append({"tool_calls": [{"index": self._index - 1, "function": {"arguments": value}}]})
        return out

    def release(self) -> list[dict]:
        """What is held back, as plain content, now: the stream failed, and text the client is billed for must
        reach it (a held call that never closes is text; calls already streamed reached it as calls)."""
        if self._reader is not None:  # the text the reader has not sent as calls
            held, self.held = self.held[self._reader.pos :] if self.called else self.held, ""
            return [{"content": held}] if held else []
        held, self.held, self._block = self._space + self.held, "", None
        self._space = ""
        return [{"content": held}] if held else []

    def close(self) -> list[dict]:
        if self._reader is not None:
            held, self.held = self.held, ""
            streamed = len(self._reader.arguments)
            calls = self.plan._constrained(held) if not streamed or self._reader.state == "stopped" else []
            if calls:
                return [self._delta(calls[streamed:])] if calls[streamed:] else []
            # no more calls read: what the reader did not send as calls (it stopped, or the answer was cut short
            # before a call's arguments began) is content, as billed text must reach the client
            rest = held[self._reader.pos :] if streamed else held
            return [{"content": rest}] if rest else []
        out = self._blocks(final=True)
        if self._block is not None and self._index >= self.plan.free_calls:
            self.held = ""  # a call cut short where no more are taken: left out as a whole one is (review)
        self._text(out, self.held)
        self.held, self._block = "", None
        if self._space and not self.called:  # an answer without calls is all content, as a whole one is
            out.append({"content": self._space})
        self._space = ""
        return _joined(out)

    def _delta(self, calls: list[dict]) -> dict:
        self.called = True
        out = []
        for c in calls:
            out.append({"index": self._index} | c)
            self._index += 1
        return {"tool_calls": out}


def _joined(deltas: list[dict]) -> list[dict]:
    """`deltas` with content deltas side by side made one (joined once: no text copied per delta)."""
    out: list[dict] = []
    texts: list[str] = []
    for d in deltas:
        if d.keys() == {"content"}:
            texts.append(d["content"])
            continue
        if texts:
            out.append({"content": "".join(texts)})
            texts = []
        out.append(d)
    if texts:
        out.append({"content": "".join(texts)})
    return out


def grow(holder: dict | list, key: object, more: str) -> None:
    """holder[key] += more, without copying what it holds: the text is taken out first, so that the one reference
    left is this function's, which CPython extends in place. A model's answer grows so a token at a time, and
    `+=` on an attribute or an item copied the whole answer so far at each (quadratic: 17 s of event loop for a
    1 MB call streamed in 200,000 pieces, 0.1 s so)."""
    text, holder[key] = holder[key], ""
    text += more
    holder[key] = text


def _partial_open(text: str) -> int:
    """How many characters at the end of `text` could begin a `<tool_call>` tag."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages -> what chat templates expect: "developer" is "system" (base templates know only
    the older role), and assistant tool calls carry their arguments as objects (OpenAI sends JSON strings)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("role") == "developer":
            m["role"] = "system"
        if m.get("tool_calls"):
            m["tool_calls"] = [_template_call(c) for c in m["tool_calls"]]
        out.append(m)
    return out


def _template_call(call: dict) -> dict:
    fn = dict(call.get("function") or {})
    args = fn.get("arguments")
    if isinstance(args, str) and (parsed := _parsed(args)) is not None:
        fn["arguments"] = parsed  # not JSON (or too deep): the template writes it as the string it is
    return {**call, "function": fn}
