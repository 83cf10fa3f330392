"""OpenAI wire models (requests we accept) and response/chunk builders (what we send back).

Every field OpenAI's or vLLM's completions and chat endpoints define is either honoured or refused by name
(400, `param` = the field); a field neither defines is refused the same way, never silently ignored. Fields
accepted without effect, because the gateway already behaves as they ask: `user`, `safety_identifier`,
`prompt_cache_key` (identifiers the gateway keeps no use for), `metadata`, `store` (false only: nothing is kept
for later), `modalities` (["text"]),
`stream_options.include_obfuscation` (nothing is padded), and in the messages a client sends back what the
openai SDK gives it of an answer (`annotations`, `audio: null`, `parsed`, a tool call's `parsed_arguments`).
`service_tier` ("auto" / "default") is answered with the tier that served it, "default", as OpenAI answers."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from common.http import parse_off_loop
from common.wire import (
    MAX_ALLOWED_TOKEN_IDS,
    MAX_BAD_WORD_CHARS,
    MAX_BAD_WORDS,
    MAX_BIAS,
    MAX_CACHE_SALT,
    MAX_GUIDED_CHOICE_CHARS,
    MAX_GUIDED_CHOICES,
    MAX_GUIDED_GRAMMAR_CHARS,
    MAX_GUIDED_PATTERN_CHARS,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_N,
    MAX_PENALTY,
    MAX_PROMPTS,
    MAX_REPETITION_PENALTY,
    MAX_SCHEMA_BYTES,
    MAX_SEQUENCES,
    MAX_STOP_CHARS,
    MAX_STOP_TOKEN_IDS,
    MAX_STOPS,
    MAX_TOP_K,
    SEED_LIMIT,
    SSE_DONE,
    TOKEN_ID_LIMIT,
    compact_json,
    error_body,
    grammar_problem,
    guided_shape,
    nested_deeper,
    parse_json,
    sse_frame,
)
from gateway.errors import BadRequest, GrammarFailed
from gateway.settings import DEFAULT_MAX_BODY_BYTES
from gateway.tools import NAME, ToolPlan, template_messages, tool_plan
from node.adapters.ensemble import MAX_ENSEMBLE_ADAPTERS, MAX_ENSEMBLE_WEIGHT

if TYPE_CHECKING:
    from gateway.router import Target

COMPLETION_LOGPROBS = 5  # OpenAI's most for completions' `logprobs`

StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None

# Strict types, as OpenAI's API: "16" is not a max_tokens, 1 is not a stream flag (a number where a float
# is expected is still one). A field this gateway does not know is refused by name.
STRICT = ConfigDict(extra="forbid", strict=True)
# a seed is 64 bits: OpenAI's are signed, the node's unsigned (a negative seed is taken modulo 2^64)
Seed = Annotated[int, Field(ge=-(2**63), lt=SEED_LIMIT)]
TokenId = Annotated[int, Field(ge=0, lt=TOKEN_ID_LIMIT)]
Identifier = Annotated[str, Field(max_length=256)]
Penalty = Annotated[float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY, allow_inf_nan=False)]
# an ensemble's weights, one per adapter named in `model` ("alice/a+bob/b"), in that order
AdapterWeights = Annotated[
    list[Annotated[float, Field(gt=0, le=MAX_ENSEMBLE_WEIGHT, allow_inf_nan=False)]],
    Field(min_length=2, max_length=MAX_ENSEMBLE_ADAPTERS),
]
Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
RepetitionPenalty = Annotated[float, Field(gt=0, le=MAX_REPETITION_PENALTY, allow_inf_nan=False)]


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # OpenAI pads chunks against length side channels; nothing to pad here
    # vLLM's: the usage so far on every chunk (its include_usage defaults to true beside it)
    continuous_usage_stats: bool | None = None

    @property
    def usage(self) -> bool:
        """A usage chunk at the end (and "usage": null on the others, as OpenAI's)."""
        return bool(self.include_usage) or (self.include_usage is None and bool(self.continuous_usage_stats))

    @property
    def continuous(self) -> bool:
        return self.usage and bool(self.continuous_usage_stats)


def json_object(raw: bytes | str, *, max_bytes: int, what: str) -> dict:
    """Untrusted JSON that must be an object (common.wire.parse_json's bounds); a ValueError saying why."""
    data = parse_json(raw, max_bytes=max_bytes, what=what)
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a JSON object")
    return data


def _schema(v: dict | str) -> dict:
    """A JSON schema within MAX_SCHEMA_BYTES; vLLM's fields take one as a JSON string too."""
    if isinstance(v, str):
        v = json_object(v, max_bytes=MAX_SCHEMA_BYTES, what="the schema")
    if len(compact_json(v)) > MAX_SCHEMA_BYTES:
        raise ValueError(f"the schema is more than {MAX_SCHEMA_BYTES} bytes of compact JSON")
    return v


Schema = Annotated[dict, AfterValidator(_schema)]
SchemaOrText = Annotated[dict | str, AfterValidator(_schema)]
Pattern = Annotated[str, Field(min_length=1, max_length=MAX_GUIDED_PATTERN_CHARS)]


def _not_blank(word: str) -> str:
    # Python's idea of blank, as bad_word_ids strips the word (pydantic's `\S` pattern took "\x1c" for text)
    if not word.strip():
        raise ValueError("a bad word must hold more than whitespace")
    return word


# one of vLLM's bad_words: text, not blank (the gateway makes it token ids: node.adapters.prompts.bad_word_ids)
BadWord = Annotated[str, Field(min_length=1, max_length=MAX_BAD_WORD_CHARS), AfterValidator(_not_blank)]


def _grammar(text: str) -> str:
    """A grammar within its dialect's bound (common.wire.grammar_problem), here as on the node."""
    if (problem := grammar_problem(text)) is not None:
        raise ValueError(problem)
    return text


# a context-free grammar, Lark or GBNF (as vLLM's guided_grammar takes it); the node compiles it under its bounds
Grammar = Annotated[str, Field(min_length=1, max_length=MAX_GUIDED_GRAMMAR_CHARS), AfterValidator(_grammar)]
Choices = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=MAX_GUIDED_CHOICE_CHARS)]],
    Field(min_length=1, max_length=MAX_GUIDED_CHOICES),
]


class JsonSchemaFormat(BaseModel):
    model_config = STRICT | ConfigDict(populate_by_name=True)
    name: Annotated[str, Field(pattern=NAME.pattern)] | None = None
    description: str | None = None
    schema_: Schema = Field(alias="schema")
    strict: bool | None = None  # every schema is enforced exactly (the node's grammar), strict or not


class ResponseFormat(BaseModel):
    model_config = STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema is required with type "json_schema", and only with it')
        return self

    def guided(self) -> dict | None:
        """The node's `guided` value."""
        if self.type == "json_object":
            return guided_shape("json_object")
        if self.type == "json_schema":
            return guided_shape("json_schema", self.json_schema.schema_)
        return None


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: one of a JSON schema, any JSON object, a regular expression the whole answer
    matches, a list of strings the answer is one of, or a context-free grammar the answer is derived by (Lark or
    GBNF, as vLLM's llguidance backend takes it). Its `structural_tag` is refused by name."""

    model_config = STRICT | ConfigDict(populate_by_name=True)
    json_: SchemaOrText | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: Pattern | None = None
    choice: Choices | None = None
    grammar: Grammar | None = None

    @model_validator(mode="after")
    def _one(self) -> StructuredOutputs:
        # given: as vLLM counts them, a field that is not null (json_object: true)
        fields = {
            "json": self.json_,
            "json_object": self.json_object or None,
            "regex": self.regex,
            "choice": self.choice,
            "grammar": self.grammar,
        }
        given = [f for f, v in fields.items() if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(fields)}; got {', '.join(given) or 'none'}")
        return self

    def guided(self) -> dict:
        """The node's `guided` value."""
        if self.json_ is not None:
            return guided_shape("json_schema", self.json_)
        if self.regex is not None:
            return guided_shape("regex", self.regex)
        if self.choice is not None:
            return guided_shape("choice", self.choice)
        if self.grammar is not None:
            return guided_shape("grammar", self.grammar)
        return guided_shape("json_object")


def special_tokens_as_encoded(given: bool | None, adds: bool) -> None:
    """vLLM's add_special_tokens, taken only at the value a prompt of this kind is encoded with (`adds`: the
    tokenizer's special tokens added, as to a completion's; not, as to a chat's, whose template writes them)."""
    if given not in (None, adds):
        raise BadRequest(
            f"add_special_tokens {str(given).lower()} is not supported here: this prompt is encoded "
            f"{'with' if adds else 'without'} the tokenizer's special tokens",
            param="add_special_tokens",
        )


class _Sampling(BaseModel):
    """Fields both endpoints share."""

    model_config = STRICT

    model: Annotated[str, Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: (
        Annotated[dict[str, Annotated[float, Field(ge=-MAX_BIAS, le=MAX_BIAS, allow_inf_nan=False)]], Field()] | None
    ) = None
    response_format: ResponseFormat | None = None
    # vLLM's structured outputs: its current field, and the guided_* fields it had before (one constraint a request)
    structured_outputs: StructuredOutputs | None = None
    guided_json: SchemaOrText | None = None
    guided_regex: Pattern | None = None
    guided_choice: Choices | None = None
    guided_grammar: Grammar | None = None
    # vLLM's sampling extras
    top_k: Annotated[int, Field(ge=-1, le=MAX_TOP_K)] | None = None  # -1 and 0: all tokens
    min_p: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    repetition_penalty: RepetitionPenalty | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    ignore_eos: bool | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1, max_length=MAX_ALLOWED_TOKEN_IDS)] | None = None
    bad_words: Annotated[list[BadWord], Field(max_length=MAX_BAD_WORDS)] | None = None
    # vLLM's cache_salt: requests share cached prompt KV only under one salt. Joined to the key's own
    # (gateway.keys.node_cache_salt), it keeps an application's users apart within its key, never joins two keys
    cache_salt: Annotated[str, Field(min_length=1, max_length=MAX_CACHE_SALT)] | None = None
    # an ensemble's weights, one per adapter named in `model` ("alice/a+bob/b"), in that order
    adapter_weights: AdapterWeights | None = None
    # vLLM's: the stop string that ended a choice ends its text (the node leaves it out of the text, and names it)
    include_stop_str_in_output: bool | None = None
    # vLLM's: the logprobs' tokens named "token_id:<id>" (what a text cannot say, the id does)
    return_tokens_as_token_ids: bool | None = None
    # vLLM's: each prompt's last k tokens only (-1: as many as the context holds), cut once the gateway tokenized it
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = None
    # vLLM's: each prompt position's log-probability and its k most likely tokens, in a whole answer (-1, the whole
    # vocabulary, is refused: a node sends at most MAX_LOGPROBS a position)
    prompt_logprobs: Annotated[int, Field(ge=-1)] | None = None
    # vLLM's: false writes special tokens' text into the answer, as any token's (the end token's excepted, as
    # vLLM's); sent only to nodes that list it (common.wire.SKIP_SPECIAL_TOKENS_FEATURE)
    skip_special_tokens: bool | None = None
    # vLLM's, taken and with no effect: the bases' tokenizers are fast ones, whose decoding has no such choice
    spaces_between_special_tokens: bool | None = None
    # vLLM's, taken at the value vLLM serves by default and refused by name at any other (check): a priority of 0
    # (vLLM refuses any other unless started with priority scheduling), and special tokens added to the prompt as
    # the endpoint adds them (ADDS_SPECIAL_TOKENS)
    priority: int | None = None
    add_special_tokens: bool | None = None
    # accepted, no effect (see the module's docstring)
    user: Identifier | None = None
    safety_identifier: Identifier | None = None
    prompt_cache_key: Identifier | None = None

    # whether the prompt is encoded with the tokenizer's special tokens: a completion's is (its BOS, where it has
    # one), a chat's is not (its template writes them), as vLLM's add_special_tokens defaults (node.adapters.prompts)
    ADDS_SPECIAL_TOKENS: ClassVar[bool] = True

    def needs_token_texts(self) -> bool:
        """Whether the answer is written with the base's token texts (loaded before dispatch): a stop string kept in
        the text is read back from the tokens of a node of an older release, which does not name it."""
        return bool(self.include_stop_str_in_output and self.stop) or self.prompt_scores() is not None

    def prompt_scores(self) -> int | None:
        """The alternatives each prompt position lists in the answer's prompt_logprobs; None when it has none: not
        asked, or streamed (vLLM streams none, and refuses more than 0 with a stream: check)."""
        return None if self.stream else self.prompt_logprobs

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict | None) -> dict | None:
        if v is None:
            return v
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
        seen: dict[int, str] = {}
        for k in v:
            if not (k.isascii() and k.isdigit() and len(k) <= 10):
                raise ValueError(f"keys are token ids as decimal strings; {k[:20]!r} is not one")
            if (other := seen.setdefault(int(k), k)) != k:  # "2" and "02": which bias the token gets is unsaid
                raise ValueError(f"{other!r} and {k!r} name the same token, {int(k)}")
        return v

    def check(self) -> None:
        """What one field's type cannot say: fields that are only meaningful together (BadRequest naming the
        field)."""
        if self.stream_options is not None and not self.stream:
            raise BadRequest("stream_options is only allowed when stream is true", param="stream_options")
        if self.priority not in (None, 0):
            raise BadRequest(
                f"priority {self.priority} needs priority scheduling, which this gateway does not do: send 0",
                param="priority",
            )
        special_tokens_as_encoded(self.add_special_tokens, self.ADDS_SPECIAL_TOKENS)
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise BadRequest(
                f"prompt_logprobs {self.prompt_logprobs} is not supported: at most {MAX_LOGPROBS} tokens a position "
                "(-1, the whole vocabulary, is not served here)",
                param="prompt_logprobs",
            )
        if self.prompt_logprobs and self.stream:
            raise BadRequest("`prompt_logprobs` are not available when `stream=True`.", param="prompt_logprobs")
        if self.truncate_prompt_tokens == 0:
            raise BadRequest(
                f"{self.truncate_field()} keeps a prompt's last tokens: at least 1, or -1 for as many as the context "
                "holds",
                param=self.truncate_field(),
            )
        shapes = self._shapes()
        if len(shapes) > 1:
            raise BadRequest(
                f"{shapes[0][0]} and {shapes[1][0]} both constrain the answer: give one", param=shapes[1][0]
            )

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous

    @property
    def choices(self) -> int:
        """Choices per prompt."""
        return self.n or 1

    def wanted_tokens(self) -> int | None:
        return self.max_tokens

    def tokens_field(self) -> str:
        """The field `wanted_tokens` came from (what an error about it names)."""
        return "max_tokens"

    def truncate_field(self) -> str:
        """The field truncate_prompt_tokens came from (what an error about it names)."""
        return "truncate_prompt_tokens"

    def truncated(self, prompts: list[list[int]], context: int | None) -> list[list[int]]:
        """The prompts cut to their last truncate_prompt_tokens tokens (-1: the context's length; None: as they
        are), as vLLM cuts them; more than the context is refused, as vLLM refuses it."""
        keep = self.truncate_prompt_tokens
        if keep is None or (keep == -1 and context is None):
            return prompts
        if keep == -1:
            keep = context
        elif context is not None and keep > context:
            raise BadRequest(
                f"{self.truncate_field()} ({keep}) is more than this model's maximum context length ({context} tokens)",
                param=self.truncate_field(),
            )
        return [ids[-keep:] for ids in prompts]

    def _shapes(self) -> list[tuple[str, dict]]:
        """(field, the node's `guided` value) of each field that constrains the answer's shape."""
        out = []
        if self.response_format is not None and (g := self.response_format.guided()) is not None:
            out.append(("response_format", g))
        if self.structured_outputs is not None:
            out.append(("structured_outputs", self.structured_outputs.guided()))
        if self.guided_json is not None:
            out.append(("guided_json", guided_shape("json_schema", self.guided_json)))
        if self.guided_regex is not None:
            out.append(("guided_regex", guided_shape("regex", self.guided_regex)))
        if self.guided_choice is not None:
            out.append(("guided_choice", guided_shape("choice", self.guided_choice)))
        if self.guided_grammar is not None:
            out.append(("guided_grammar", guided_shape("grammar", self.guided_grammar)))
        return out

    def guided(self) -> dict | None:
        shapes = self._shapes()
        return shapes[0][1] if shapes else None

    def guided_field(self) -> str | None:
        """The field the node's `guided` value comes from (what a grammar the node refuses is about)."""
        shapes = self._shapes()
        return shapes[0][0] if shapes else None

    def bias_ids(self) -> list[int]:
        return [int(k) for k in self.logit_bias or ()]


# a completion's prompt: text, texts, token ids, or lists of token ids (OpenAI's four forms)
Prompt = (
    str
    | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
    | Annotated[list[TokenId], Field(min_length=1)]
    | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)]
)


class CompletionRequest(_Sampling):
    PROMPT_FIELD: ClassVar[str] = "prompt"

    prompt: Prompt
    # 0 with echo: the prompt alone, scored with logprobs (OpenAI's legacy API and vLLM's; lm-evaluation-harness
    # asks so for log-likelihoods)
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    echo: bool | None = False
    logprobs: Annotated[int, Field(ge=0, le=COMPLETION_LOGPROBS)] | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    suffix: str | None = None

    def check(self) -> None:
        super().check()
        if self.max_tokens == 0 and not self.echo:
            raise BadRequest("max_tokens 0 is only for echo (the prompt alone); ask for at least 1", param="max_tokens")
        if self.max_tokens == 0 and self.min_tokens:
            raise BadRequest(f"min_tokens ({self.min_tokens}) is more than max_tokens (0)", param="min_tokens")
        if self.suffix:
            raise BadRequest("suffix is not supported (no insertion model is served here)", param="suffix")
        if self.best_of is not None:
            if self.best_of < self.choices:
                raise BadRequest(f"best_of ({self.best_of}) must be at least n ({self.choices})", param="best_of")
            if self.stream and self.best_of > self.choices:  # equal to n, it ranks nothing: streamed as n (vLLM)
                raise BadRequest("best_of greater than n cannot be used with stream", param="best_of")
        seqs = self.prompt_count() * self.sequences_per_prompt()
        if seqs > MAX_SEQUENCES:
            raise BadRequest(
                f"{self.prompt_count()} prompts x {self.sequences_per_prompt()} choices is more than the "
                f"{MAX_SEQUENCES} sequences one request may ask for",
                param="best_of" if self.best_of else "n",
            )

    def prompt_count(self) -> int:
        return len(self.prompt_list())

    def prompt_list(self) -> list[str] | list[list[int]]:
        """The prompts as a list of texts or a list of token id lists."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if isinstance(self.prompt[0], int):
            return [list(self.prompt)]
        return list(self.prompt)

    @property
    def echo_only(self) -> bool:
        """The prompt alone is answered (echo with max_tokens 0): the node still makes one token, as vLLM's, which
        is billed and never shown."""
        return bool(self.echo) and self.max_tokens == 0

    def sequences_per_prompt(self) -> int:
        """What the node generates per prompt: best_of sequences (the best n are returned), else n."""
        return self.best_of or self.choices

    def node_logprobs(self) -> int | None:
        # best_of ranks the sequences by their summed log-probabilities: it needs each token's
        if self.best_of is not None and self.best_of > self.choices:
            return self.logprobs or 0
        return self.logprobs

    def needs_token_texts(self) -> bool:
        """Whether the answer is written with the base's token texts (logprobs, echo, a kept stop string)."""
        return super().needs_token_texts() or self.node_logprobs() is not None or bool(self.echo)


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ToolCallFunction(BaseModel):
    model_config = STRICT
    name: Annotated[str, Field(max_length=64)]
    arguments: str
    parsed_arguments: object | None = None  # the openai SDK's .parse() result sent back in history: not used


class ToolCall(BaseModel):
    model_config = STRICT
    id: Identifier
    type: Literal["function"]
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: Identifier | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls (history)
    tool_call_id: Identifier | None = None  # a tool's result answers this call
    refusal: str | None = None  # an assistant's refusal (history; the template is not shown it)
    function_call: None = None  # OpenAI's legacy field, null in assistant messages the client sends back
    # what the openai SDK sends back of an answer it got (a message's model_dump(), or .parse()'s message): not
    # shown to the template, as OpenAI and vLLM take them
    annotations: list | None = None
    audio: None = None
    parsed: object | None = None

    @model_validator(mode="after")
    def _roles(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError('a "tool" message needs the tool_call_id it answers')
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError('only "tool" messages carry a tool_call_id')
        if self.content is None and self.role != "assistant":
            # OpenAI's 400 too: an app that lost its user's text gets an error, not a billed answer to nothing
            raise ValueError(f'a "{self.role}" message needs its content (null only in an assistant\'s message)')
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def template_chars(self) -> int:
        """The characters of this message a chat template is given: its text, name, tool call ids, names and
        arguments (a template renders some or all of them, with markup around each message)."""
        calls = sum(len(c.id) + len(c.function.name) + len(c.function.arguments) for c in self.tool_calls or ())
        return len(self.text()) + len(self.name or "") + len(self.tool_call_id or "") + calls

    def as_dict(self) -> dict:
        out: dict = {"role": self.role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:  # without what the SDK parsed of them: the template sees what the model wrote
            out["tool_calls"] = [c.model_dump(exclude={"function": {"parsed_arguments"}}) for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


# what a chat template is given beside the messages and the tools. Refused: the names apply_chat_template and the
# render under it take as their own arguments (a client's value would clash with the gateway's: a TypeError, or
# make it return ids or a dict), and the template's globals (jinja's, transformers' raise_exception and
# strftime_now: shadowed, a template that calls them fails on every request)
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation", "conversations", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
        "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
        "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "kwargs", "self",
        "sanitize_control_tokens", "range", "dict", "lipsum", "cycler", "joiner", "namespace", "raise_exception",
        "strftime_now",
    }
)  # fmt: skip
MAX_TEMPLATE_KWARGS = 16
# the variables' JSON: small, and shallow. A template may write a variable out indented (Llama 3's tojson(indent=4)
# of custom_tools): 600 kB nested 60 deep rendered as 49 million characters before the rendered text's length
# could be checked (attack review)
MAX_TEMPLATE_KWARGS_BYTES = 16 << 10
MAX_TEMPLATE_KWARGS_DEPTH = 8
TEMPLATE_KWARG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")


def _template_kwargs(v: dict | None) -> dict | None:
    """vLLM's chat_template_kwargs (Qwen3's enable_thinking, say): variables the base's template may read."""
    if v is None:
        return v
    if len(v) > MAX_TEMPLATE_KWARGS:
        raise ValueError(f"at most {MAX_TEMPLATE_KWARGS} variables")
    for k in v:
        if not TEMPLATE_KWARG_NAME.fullmatch(k):
            raise ValueError(f"{k[:70]!r} is not a template variable's name ({TEMPLATE_KWARG_NAME.pattern})")
        if k in RESERVED_TEMPLATE_KWARGS:
            raise ValueError(f"{k!r} is set by the gateway or the template, not by the request")
    text = json.dumps(v)
    if len(text) > MAX_TEMPLATE_KWARGS_BYTES:
        raise ValueError(f"the variables are more than {MAX_TEMPLATE_KWARGS_BYTES} bytes of JSON")
    if nested_deeper(text, MAX_TEMPLATE_KWARGS_DEPTH):
        raise ValueError(f"the variables are nested more than {MAX_TEMPLATE_KWARGS_DEPTH} deep")
    return v


TemplateKwargs = Annotated[dict[str, object], AfterValidator(_template_kwargs)]


class _Rendered(BaseModel):
    """A request whose prompt the base's chat template renders (gateway.prompts.chat_prompt): its `messages` (each
    request's own field), its tools as the plan shows them (`_plan`, built by _check_rendering), its template
    variables, and vLLM's add_generation_prompt / continue_final_message (an assistant message the answer goes on
    from: a prefill)."""

    model_config = STRICT
    PROMPT_FIELD: ClassVar[str] = "messages"  # the field that holds the prompt (what an error about it names)

    tools: list | None = None
    tool_choice: object | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: TemplateKwargs | None = None
    add_generation_prompt: bool | None = None  # default: true, unless the final message is continued
    continue_final_message: bool | None = None

    _plan: ToolPlan | None = PrivateAttr(default=None)

    def _check_rendering(self) -> None:
        self._plan = tool_plan(self.tools, self.tool_choice, parallel=self.parallel_tool_calls is not False)
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise BadRequest(
                    "continue_final_message goes on with the final message: add_generation_prompt cannot be true",
                    param="add_generation_prompt",
                )
            last = self.messages[-1]
            if last.role != "assistant" or last.tool_calls or not last.text():
                raise BadRequest(
                    "continue_final_message needs an assistant message of text last (the answer it goes on with; "
                    "a message of tool calls cannot be continued)",
                    param="continue_final_message",
                )

    def chat_messages(self) -> list[dict]:
        """The messages as the chat template takes them (gateway.tools.template_messages)."""
        return template_messages([m.as_dict() for m in self.messages])

    def template_tools(self) -> list[dict] | None:
        return self._plan.template_tools if self._plan is not None else None

    def generation_prompt(self) -> bool:
        """Whether the template opens the assistant's turn after the messages."""
        if self.add_generation_prompt is not None:
            return self.add_generation_prompt
        return not self.continue_final_message


# messages in one chat: 245,000 empty ones (3.9 MB) held the event loop seconds to parse and to count (attack
# review); a conversation's context holds far fewer
MAX_MESSAGES = 2048
Messages = Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]


class ChatRequest(_Rendered, _Sampling):
    ADDS_SPECIAL_TOKENS: ClassVar[bool] = False

    messages: Messages
    _guided: tuple[dict | None] | None = PrivateAttr(default=None)  # (guided(),) once check() built it
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    functions: object | None = None
    function_call: object | None = None
    # accepted, no effect (see the module's docstring)
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None = None
    store: bool | None = None
    modalities: list[Literal["text"]] | None = None
    # answered with the tier that served it (chat_response, ChunkBuilder)
    service_tier: Literal["auto", "default"] | None = None

    def check(self) -> None:
        super().check()
        for field in ("functions", "function_call"):
            if getattr(self, field) is not None:
                raise BadRequest(f"{field} is OpenAI's deprecated form: use tools and tool_choice", param=field)
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest("top_logprobs is only allowed when logprobs is true", param="top_logprobs")
        if self.store:
            raise BadRequest("store is not supported: this gateway keeps no completions", param="store")
        self._check_rendering()
        formatted = super().guided_field()
        if formatted and self._plan is not None and self._plan.guided() is not None:
            raise BadRequest(
                f"{formatted} cannot be combined with tool_choice required or a named function (both "
                "constrain the answer)",
                param=formatted,
            )
        self._guided = (self._constraint(),)  # built once, and refused here when its calls' schema is too large

    @property
    def plan(self) -> ToolPlan | None:
        """How the request's tools are served (None: no tools)."""
        return self._plan

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"

    def guided(self) -> dict | None:
        """The node's `guided` value: the tools' constraint, or the format's, or with tool_choice auto and a JSON
        format, either of the format's JSON and the model's calls (ToolPlan.either). Built by check()."""
        return self._guided[0] if self._guided is not None else self._constraint()

    def _constraint(self) -> dict | None:
        if self._plan is None:
            return super().guided()
        if self._plan.guided() is not None:
            return self._plan.guided()
        answer = super().guided()
        either = self._plan.either(answer, super().guided_field()) if answer is not None else None
        return either if either is not None else answer

    def guided_field(self) -> str | None:
        if self._plan is not None and self._plan.guided() is not None:
            return "tools"
        return super().guided_field()

    def node_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def needs_token_texts(self) -> bool:
        return super().needs_token_texts() or self.node_logprobs() is not None


class TokenizeRequest(_Rendered):
    """vLLM's /tokenize: a completion's `prompt` (text) or a chat's `messages` (with what a chat renders them with:
    tools, tool_choice, template variables, add_generation_prompt, continue_final_message), counted as the
    gateway counts the prompt it bills. vLLM's add_special_tokens is taken at the value the ids are sent with (a
    completion's prompt with the tokenizer's special tokens, a chat's without), and refused at the other."""

    model: Annotated[str, Field(min_length=1)]
    prompt: str | None = None
    messages: Messages | None = None
    return_token_strs: bool | None = False
    add_special_tokens: bool | None = None

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise BadRequest("send either prompt (a completion's) or messages (a chat's)", param="prompt")
        special_tokens_as_encoded(self.add_special_tokens, self.messages is None)
        if self.messages is None:
            for field in _Rendered.model_fields:
                if getattr(self, field) is not None:
                    raise BadRequest(f"{field} is only allowed with messages", param=field)
            return
        self._check_rendering()


class DetokenizeRequest(BaseModel):
    """vLLM's /detokenize: token ids as text."""

    model_config = STRICT

    model: Annotated[str, Field(min_length=1)]
    tokens: list[TokenId]


def parse_body(model: type[BaseModel], raw: bytes, *, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> BaseModel:
    """Validate a request body; BadRequest naming the offending field (OpenAI's `param`) otherwise."""
    try:
        data = json_object(raw, max_bytes=max_bytes, what="request body")
    except ValueError as e:  # UntrustedJSONError is one
        raise BadRequest(str(e)) from e
    try:
        req = model.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        # a union field reports one error per branch; the one that is not a plain type mismatch says most
        err = next((x for x in errors if not x.get("type", "").endswith("_type")), errors[0])
        loc = [str(p) for p in err.get("loc", ())]
        param = loc[0] if loc else None
        # pydantic's loc for a union names the branch type ("str", "list[int]"); keep the field path only
        path = ".".join(p for p in loc if not any(c in p for c in "[]") and p not in ("str", "int"))
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        if err.get("type") == "missing":
            msg = "is required"
        elif err.get("type") == "extra_forbidden":
            msg = "is not a field this API supports"
        raise BadRequest(f"{path or 'body'}: {msg}", param=param) from e
    check = getattr(req, "check", None)
    if check is not None:
        check()
    return req


async def parse_request(model: type[BaseModel], raw: bytes, max_bytes: int) -> BaseModel:
    """parse_body, off the event loop when the body is large."""
    return await parse_off_loop(raw, parse_body, model, raw, max_bytes=max_bytes)


def to_node_request(
    req: CompletionRequest | ChatRequest,
    target: Target,
    prompts: list[list[int]],
    *,
    max_tokens: int,
    request_id: str,
    prompt_logprobs: int | None = None,
    bad_words: list[list[int]] | None = None,
) -> dict:
    """The node API's generate body for an OpenAI request: the prompts as the token ids the gateway made (their
    number is the prompt count billed), OpenAI's sampling defaults made explicit; `bad_words`: the request's, as
    the gateway tokenized them. Fields at the node's defaults are left out."""
    body = {
        "adapter_id": target.adapter_id,
        "prompt_token_ids": prompts[0] if len(prompts) == 1 else prompts,
        "max_tokens": max_tokens,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "seed": None if req.seed is None else req.seed % SEED_LIMIT,
        "stop": req.stop_list(),
        "request_id": request_id,
    }
    per_prompt = req.sequences_per_prompt() if isinstance(req, CompletionRequest) else req.choices
    optional = {
        "n": (per_prompt, 1),
        "top_k": (max(0, req.top_k or 0), 0),
        "presence_penalty": (req.presence_penalty or 0.0, 0.0),
        "frequency_penalty": (req.frequency_penalty or 0.0, 0.0),
        "repetition_penalty": (1.0 if req.repetition_penalty is None else req.repetition_penalty, 1.0),
        "logit_bias": (req.logit_bias or None, None),
        "min_p": (req.min_p or 0.0, 0.0),
        "min_tokens": (req.min_tokens or 0, 0),
        "stop_token_ids": (req.stop_token_ids or None, None),
        "allowed_token_ids": (req.allowed_token_ids, None),
        "bad_words_token_ids": (bad_words or None, None),
        "ignore_eos": (bool(req.ignore_eos), False),
        "logprobs": (req.node_logprobs(), None),
        "prompt_logprobs": (prompt_logprobs, None),
        "guided": (req.guided(), None),
        "skip_special_tokens": (req.skip_special_tokens is not False, True),
    }
    body.update({k: v for k, (v, default) in optional.items() if v != default})
    if target.ensemble is not None:
        body["ensemble"] = [{"adapter_id": aid, "weight": w} for aid, w in target.ensemble]
    return body


def usage_dict(
    prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = 0, cache_write_tokens: int | None = None
) -> dict:
    """OpenAI's usage object; cached_tokens: of the prompt, the tokens the node's prefix cache held (None: not
    known yet, so no prompt_tokens_details, as vLLM's usage so far has none: a 0 there would be false);
    cache_write_tokens: those this request wrote into it (None: a node of before the count did not say, and the
    field, optional in Chat's and Completions' usage, is left out rather than shown as a false 0)."""
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
        if cache_write_tokens is not None:
            usage["prompt_tokens_details"]["cache_write_tokens"] = cache_write_tokens
    return usage


# the only tier there is: what OpenAI answers a request of "auto" or "default" served at standard priority
SERVED_TIER = "default"


def finish_reason(node_reason: str | None) -> str:
    return "length" if node_reason == "length" else "stop"


def completion_response(rid: str, created: int, model: str, choices: list[dict], usage: dict) -> dict:
    """choices: {"index", "text", "logprobs", "finish_reason", "stop_reason"} each."""
    return {
        "id": "cmpl-" + rid[2:],
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
    }


def chat_response(
    rid: str,
    created: int,
    model: str,
    choices: list[dict],
    usage: dict,
    service_tier: str | None = None,
    prompt_logprobs: list | None = None,
) -> dict:
    """choices: {"index", "message", "logprobs", "finish_reason", "stop_reason"} each. `service_tier`: the
    request's, answered with the tier that served it (OpenAI's body names it where the request did);
    `prompt_logprobs`: vLLM's, where the request asked (the answer's, not a choice's: a chat has one prompt)."""
    body = {
        "id": "chatcmpl-" + rid[2:],
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
    }
    if service_tier is not None:
        body["service_tier"] = SERVED_TIER
    if prompt_logprobs is not None:
        body["prompt_logprobs"] = prompt_logprobs
    return body


def chat_message(content: str | None, tool_calls: list[dict]) -> dict:
    msg = {"role": "assistant", "content": content}
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return msg


class ChunkBuilder:
    """SSE chunks of one streamed response, in OpenAI's shapes for completions or chat; each names its choice."""

    def __init__(
        self,
        *,
        chat: bool,
        rid: str,
        created: int,
        model: str,
        include_usage: bool,
        usage_so_far: Callable[[], dict] | None = None,
        service_tier: str | None = None,
    ) -> None:
        """`usage_so_far`: vLLM's continuous_usage_stats, the usage of what was relayed so far on every chunk;
        `service_tier`: the request's (every chunk then names the tier that served it, as chat_response)."""
        self.chat, self.created, self.model, self.include_usage = chat, created, model, include_usage
        self.usage_so_far = usage_so_far
        self.tier = None if service_tier is None else SERVED_TIER
        self.id = ("chatcmpl-" if chat else "cmpl-") + rid[2:]
        self.object = "chat.completion.chunk" if chat else "text_completion"

    def _chunk(self, choices: list, usage: dict | None = None) -> bytes:
        obj = {"id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": choices}
        if self.tier is not None:
            obj["service_tier"] = self.tier
        if self.include_usage:
            obj["usage"] = usage if usage is not None or self.usage_so_far is None else self.usage_so_far()
        return sse_frame(obj)

    def role(self, index: int = 0) -> bytes:
        """A chat choice opens with the assistant role."""
        return self._chunk(
            [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
        )

    def token(self, text: str, index: int = 0, logprobs: dict | None = None) -> bytes:
        """Text of one choice (chat: a content delta), with its positions' logprobs object when asked."""
        if self.chat:
            return self.delta({"content": text}, index, logprobs)
        return self._chunk([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}])

    def delta(self, delta: dict, index: int = 0, logprobs: dict | None = None) -> bytes:
        """A chat delta ({"content"} or {"tool_calls"}, or {} carrying logprobs alone)."""
        return self._chunk([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}])

    def finish(self, reason: str, index: int = 0, *, cut: bool = False, stop_reason: str | int | None = None) -> bytes:
        """A choice's end (`cut`: it reached max_tokens, which a chat's finish_reason of calls does not say), with
        vLLM's stop_reason (the stop token id or string that ended it)."""
        end = {"finish_reason": reason, "stop_reason": stop_reason}
        if self.chat:
            return self._chunk([{"index": index, "delta": {}, "logprobs": None} | end])
        return self._chunk([{"index": index, "text": "", "logprobs": None} | end])

    def usage(self, usage: dict) -> bytes:
        return self._chunk([], usage)

    def end(self, usage: dict) -> bytes:
        """The stream's last frames once every choice closed: the usage chunk when asked, then [DONE]."""
        return (self.usage(usage) if self.include_usage else b"") + SSE_DONE

    def failed(self, message: str, usage: dict | None = None, *, param: str | None = None) -> bytes:
        """The frame that ends a stream the node broke off (the openai SDK raises it as an APIError); the usage of
        what was relayed is not sent (OpenAI's error frame has none). `param`: the request's field at fault (its
        grammar failed it), as a whole answer's 400 names it."""
        if param is not None:
            return sse_frame(error_body(message, type=GrammarFailed.type, param=param, code=GrammarFailed.code))
        return sse_frame(error_body(message, type="upstream_error", code="node_failed"))
