"""LoRAX's native REST API (`POST /generate`, `POST /generate_stream`, and `POST /`, the compat route lorax-client
posts to), served by the completions path.

A request is checked in its own shape (each field refused by its own name), then turned into the completion it is
(`LoraxCompletion`: the prompt's tokens, the bounds, the limits, the billing and the attribution are
/v1/completions', not a second copy of them); its answer is written back as LoRAX writes it: `{"generated_text",
"details"}` (a list of one on `POST /`, as api-inference answers), or events of one token each, each sent as its
token is relayed, the last carrying `generated_text` (and `details` when asked): the last token's event when that
token is known to be the last (max_new_tokens reached, an end token), else one of a special token of no text (of
the stop sequence's text, not special, when one ended it).
Errors are LoRAX's `{"error", "error_type"}` on these paths (`error_body`), which lorax-client raises as its own
classes (400 -> ValidationError, 429 and 503 -> OverloadedError, 502 -> GenerationError, 404 -> NotFoundError).

Served: `adapter_id` (an adapter's name or 0x id, or a base's; absent: the one base this gateway serves),
`adapter_source` "hub" or absent (both mean this gateway's registry), `merged_adapters` (merge_strategy "linear":
the ensemble of those adapters with those weights, `density` unused as LoRAX's linear merge leaves it),
`api_token` (taken, never used nor logged: access is the API key's), `max_new_tokens` (absent: the room the
context leaves, at most the gateway's max_max_tokens, as a chat's max_tokens), `do_sample`, `temperature`, `top_k`,
`top_p` (LoRAX's rule: greedy unless do_sample or a warper is set), `repetition_penalty`, `frequency_penalty`,
`presence_penalty`, `stop`, `seed`, `ignore_eos_token`, `best_of` (sampled, not streamed; LoRAX's check: do_sample
or a warper given, whatever its value), `details` (the tokens with their logprobs, finish_reason "length" /
"eos_token" / "stop_sequence"), `return_full_text`, `decoder_input_details` (the prompt's positions: echo with
logprobs), `return_k_alternatives` (up to 5, the completions' logprobs bound), `response_format` (json_object,
with or without a schema, or json_schema: structured output), `truncate` (the inputs' last tokens only, once the
gateway tokenized them). Refused by name: `typical_p`, `watermark`, other adapter sources, other merge strategies
and sign methods, an adapter_id with a '+' (adapters are combined in merged_adapters), a temperature of 0 when sampled
(do_sample, best_of), and any field LoRAX does not define. As in LoRAX (whose text is the decoding of every token
generated), the stop sequence that ended a generation is part of its text, where /v1/completions leaves it out
(OpenAI's way, as the node sends it) unless asked to keep it: the node names it (`Choices.stop_text`). The seed
in details is the one an answer was sampled with: given by the client, or drawn by the gateway when none was (none
when the answer is greedy, a temperature of 0 included, or one of best_of's)."""

from __future__ import annotations

import secrets
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, Field, PrivateAttr

from common.wire import MAX_N, MAX_STOPS, MAX_TOP_K, SEED_LIMIT, TOKEN_ID_LIMIT, sse_frame
from gateway.catalog import ENSEMBLE_SEPARATOR
from gateway.choices import Choices, Sequence
from gateway.errors import BadRequest
from gateway.logprobs import FLOOR, Scored, TokenTexts
from gateway.openai_api import (
    COMPLETION_LOGPROBS,
    STRICT,
    AdapterWeights,
    CompletionRequest,
    Penalty,
    RepetitionPenalty,
    Schema,
    StopString,
    Temperature,
    TopP,
)
from node.adapters.ensemble import MAX_ENSEMBLE_ADAPTERS

# the paths whose errors are in LoRAX's shape (gateway/main.py's handlers, the body limit)
LORAX_PATHS = frozenset({"/", "/generate", "/generate_stream"})
# an error's status -> LoRAX's error_type, which lorax-client reads before the status (lorax/errors.py:
# "validation", "overloaded", "generation", "incomplete_generation"); other statuses keep the gateway's type and
# the client reads their status (401 UnknownError, 403 ShardNotReadyError, 404 NotFoundError)
ERROR_TYPES = {400: "validation", 413: "validation", 429: "overloaded", 502: "generation", 503: "overloaded"}
# the documented shape of those errors (OpenAPI)
ERROR_JSON = {
    "application/json": {
        "schema": {
            "type": "object",
            "required": ["error", "error_type"],
            "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}},
        }
    }
}


def error_body(error: dict, status: int) -> dict:
    """LoRAX's error body of an error in OpenAI's shape ({"message", "type", "param", "code"}): the field it is
    about named in its one line (LoRAX's shape has no `param`), its error_type the one lorax-client reads for its
    status (else the gateway's type)."""
    message, param = error["message"], error.get("param")
    if param and param not in message:
        message = f"{param}: {message}"
    return {"error": message, "error_type": ERROR_TYPES.get(status, error["type"])}


class MergedAdapters(BaseModel):
    model_config = STRICT
    ids: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=256)]], Field(min_length=2, max_length=MAX_ENSEMBLE_ADAPTERS)
    ]
    weights: AdapterWeights
    merge_strategy: Annotated[str, Field(max_length=64)] | None = None  # LoRAX's default: linear
    density: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None  # ties/dare only
    majority_sign_method: Annotated[str, Field(max_length=64)] | None = None  # ties only

    def check(self) -> None:
        where = "merged_adapters"
        if len(self.weights) != len(self.ids):
            raise BadRequest(f"{where}: {len(self.weights)} weights for {len(self.ids)} ids", param=where)
        if any(ENSEMBLE_SEPARATOR in i for i in self.ids):
            raise BadRequest(f"{where}.ids: an adapter's name or id has no {ENSEMBLE_SEPARATOR!r}", param=where)
        if self.merge_strategy not in (None, "linear"):
            raise BadRequest(
                f"{where}.merge_strategy {self.merge_strategy[:40]!r} is not served: only 'linear' (the adapters' "
                "weighted sum)",
                param=where,
            )
        if self.majority_sign_method is not None:
            raise BadRequest(f"{where}.majority_sign_method goes with ties merging, which is not served", param=where)


class ResponseFormat(BaseModel):
    """LoRAX's response_format: a JSON object (of `schema` when given), or json_schema with its schema."""

    model_config = STRICT
    type: Literal["json_object", "json_schema"]
    schema_: Schema | None = Field(default=None, alias="schema")

    def completion_format(self) -> dict:
        """The completions' response_format of this one."""
        if self.schema_ is None:
            if self.type == "json_schema":
                raise BadRequest("response_format: type json_schema needs a schema", param="response_format")
            return {"type": "json_object"}
        return {"type": "json_schema", "json_schema": {"schema": self.schema_}}


class LoraxParameters(BaseModel):
    """LoRAX's `parameters` (lorax-client sends every one of them, at its default when not given)."""

    model_config = STRICT
    adapter_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    adapter_source: Annotated[str, Field(max_length=64)] | None = None
    merged_adapters: MergedAdapters | None = None
    api_token: Annotated[str, Field(max_length=4096)] | None = Field(default=None, repr=False)  # never used
    do_sample: bool = False
    max_new_tokens: Annotated[int, Field(ge=1)] | None = None
    ignore_eos_token: bool = False
    repetition_penalty: RepetitionPenalty | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    return_full_text: bool = False
    stop: Annotated[list[StopString], Field(max_length=MAX_STOPS)] = []
    seed: Annotated[int, Field(ge=0, lt=SEED_LIMIT)] | None = None
    temperature: Temperature | None = None
    top_k: Annotated[int, Field(ge=1, le=MAX_TOP_K)] | None = None
    top_p: TopP | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    details: bool = False
    decoder_input_details: bool = False
    return_k_alternatives: Annotated[int, Field(ge=1, le=COMPLETION_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    truncate: Annotated[int, Field(ge=1)] | None = None  # the inputs' last tokens only (vLLM's truncate_prompt_tokens)
    # refused unless at their defaults (check)
    typical_p: float | None = None
    watermark: bool = False

    @property
    def sampling_asked(self) -> bool:
        """LoRAX's router's check of best_of: do_sample, or a warper given (whatever its value)."""
        return self.do_sample or any(v is not None for v in (self.temperature, self.top_k, self.top_p))

    @property
    def sampling(self) -> bool:
        """LoRAX's rule: sampled when do_sample is set or a warper changes the distribution, else greedy; best_of's
        sequences are sampled (their check: sampling_asked)."""
        warped = self.temperature not in (None, 1.0) or self.top_k is not None or self.top_p not in (None, 1.0)
        return self.do_sample or warped or (self.best_of or 1) > 1

    @property
    def sampled(self) -> bool:
        """Whether the answer is drawn at random (sampling at a temperature of 0 is greedy): its seed is shown."""
        return self.sampling and self.temperature != 0

    def check(self, stream: bool) -> None:
        refused = {
            "typical_p": "typical decoding is not one of this gateway's samplers",
            "watermark": "answers are not watermarked here",
        }
        for field, why in refused.items():
            if getattr(self, field) is not None and getattr(self, field) is not False:
                raise BadRequest(f"parameters.{field} is not supported: {why}", param=field)
        if self.adapter_source not in (None, "hub"):
            raise BadRequest(
                f"parameters.adapter_source {self.adapter_source[:40]!r} is not served: adapters come from this "
                "gateway's registry (adapter_source 'hub' or none)",
                param="adapter_source",
            )
        if self.adapter_id is not None and self.merged_adapters is not None:
            raise BadRequest("parameters: give at most one of adapter_id and merged_adapters", param="adapter_id")
        if self.adapter_id is not None and ENSEMBLE_SEPARATOR in self.adapter_id:
            raise BadRequest(
                f"parameters.adapter_id names one adapter, and no adapter's name or id has a {ENSEMBLE_SEPARATOR!r}; "
                "to combine adapters, give them in merged_adapters (ids and weights)",
                param="adapter_id",
            )
        if self.temperature is not None and self.temperature <= 0 and (self.do_sample or (self.best_of or 1) > 1):
            raise BadRequest(
                "parameters.temperature must be strictly positive when sampling (do_sample, best_of > 1); for greedy "
                "decoding leave do_sample false and best_of 1",
                param="temperature",
            )
        if self.merged_adapters is not None:
            self.merged_adapters.check()
        if self.best_of is not None and self.best_of > 1:
            if not self.sampling_asked:
                raise BadRequest(
                    "parameters.best_of > 1 needs sampling: set do_sample, or give a temperature, top_k or top_p",
                    param="best_of",
                )
            if self.seed is not None:
                raise BadRequest("parameters.seed must not be set when best_of > 1", param="seed")
            if stream:
                raise BadRequest("parameters.best_of > 1 is not served when streaming", param="best_of")
        if stream and self.decoder_input_details:
            raise BadRequest(
                "parameters.decoder_input_details is not served when streaming", param="decoder_input_details"
            )


class LoraxCompletion(CompletionRequest):
    """The completion a LoRAX request is: errors about its prompt and its length name LoRAX's fields."""

    PROMPT_FIELD: ClassVar[str] = "inputs"

    def tokens_field(self) -> str:
        return "max_new_tokens"

    def truncate_field(self) -> str:
        return "truncate"

    def needs_token_texts(self) -> bool:
        # with stop sequences, a node of an older release does not name the one it cut from the text: the base's
        # tokenizer reads it back (Choices.stop_text)
        return super().needs_token_texts() or bool(self.stop)


class LoraxRequest(BaseModel):
    """A LoRAX request; STREAM is the route's answer (None: `POST /`, where the body's `stream` says)."""

    model_config = STRICT
    STREAM: ClassVar[bool | None] = None

    inputs: Annotated[str, Field(min_length=1)]
    parameters: LoraxParameters | None = None
    stream: bool | None = None

    _params: LoraxParameters = PrivateAttr(default_factory=LoraxParameters)

    @property
    def streamed(self) -> bool:
        return self.STREAM if self.STREAM is not None else bool(self.stream)

    @property
    def params(self) -> LoraxParameters:
        return self._params

    def check(self) -> None:
        if self.STREAM is not None and self.stream is not None and self.stream != self.STREAM:
            where = "/generate_stream" if self.stream else "/generate"
            raise BadRequest(
                f"stream: {str(self.stream).lower()} is not this route's answer; post to {where} or /", param="stream"
            )
        if self.parameters is not None:
            self._params = self.parameters
        self._params.check(self.streamed)

    def as_completion(self, base: str | None) -> LoraxCompletion:
        """The completion this request is; `base`: the model of the one base this gateway serves (None: none or
        several, and a request must then name its adapter or base)."""
        p = self._params
        weights = None
        if p.merged_adapters is not None:
            model, weights = ENSEMBLE_SEPARATOR.join(p.merged_adapters.ids), p.merged_adapters.weights
        elif p.adapter_id is not None:
            model = p.adapter_id
        elif base is not None:
            model = base
        else:
            raise BadRequest(
                "parameters.adapter_id is needed here: this gateway serves more than one base model (or none yet); "
                "name an adapter, or a base model's name or id",
                param="adapter_id",
            )
        sampling, shown = p.sampling, self.streamed or p.details  # shown: each token's logprob is written
        if p.sampled and p.seed is None and (p.best_of or 1) == 1:
            # LoRAX says in details.seed the seed it drew, so that an answer can be sampled again: drawn here, where
            # the node drew it unseen (best_of's sequences take none, as in LoRAX)
            p.seed = secrets.randbelow(SEED_LIMIT)
        body = {
            "model": model,
            "prompt": self.inputs,
            "stream": self.streamed,
            "max_tokens": p.max_new_tokens,
            "temperature": (1.0 if p.temperature is None else p.temperature) if sampling else 0.0,
            "top_p": p.top_p if sampling else None,
            "top_k": p.top_k if sampling else None,
            "seed": p.seed,
            "stop": p.stop or None,
            "repetition_penalty": p.repetition_penalty,
            "frequency_penalty": p.frequency_penalty,
            "presence_penalty": p.presence_penalty,
            "ignore_eos": p.ignore_eos_token or None,
            "best_of": p.best_of,
            "logprobs": (p.return_k_alternatives or 0) if shown else None,
            "echo": (p.details and p.decoder_input_details) or None,  # the prompt's positions, from the node
            "response_format": p.response_format.completion_format() if p.response_format else None,
            "adapter_weights": weights,
            "truncate_prompt_tokens": p.truncate,
        }
        # each value is within its completion field's type (LoRAX's fields are typed as narrowly), so this
        # validation cannot fail (tests/gateway/test_lorax_api.py tries every field at its bounds)
        req = LoraxCompletion.model_validate({k: v for k, v in body.items() if v is not None})
        req.check()
        return req


class LoraxGenerate(LoraxRequest):
    STREAM: ClassVar[bool | None] = False


class LoraxGenerateStream(LoraxRequest):
    STREAM: ClassVar[bool | None] = True


# ---------------------------------------------------------------------------------------------- the answer


def finish_reason(reason: str, stop: str) -> str:
    """LoRAX's finish reason of a sequence whose OpenAI one is `reason` and which ended on the stop sequence `stop`
    ("": none, LoraxAnswer._stop): a stop is that stop sequence where there is one, else its end token (a node that
    says it stopped on neither is taken at its word that it stopped, as OpenAI's "stop" does)."""
    if reason == "length":
        return "length"
    return "stop_sequence" if stop else "eos_token"


def _valid(tid: int) -> bool:
    return 0 <= tid < TOKEN_ID_LIMIT


def _token(texts: TokenTexts, tid: int, text: str, scored: Scored | None, k: int) -> dict:
    """One generated token: the text it added to the answer (the node's, so the tokens' texts make the answer),
    its log-probability and, with return_k_alternatives, the k most likely."""
    lp = scored.logprob if scored is not None else None
    token = {"id": tid, "text": text, "logprob": FLOOR if lp is None else lp, "special": tid in texts.special}
    if k:
        top = scored.top[:k] if scored is not None else ()
        token["alternative_tokens"] = [{"id": i, "text": texts.text(i), "logprob": v} for i, v in top]
    return token


class LoraxAnswer:
    """A LoRAX answer from the sequences the completions path gathered (gateway.choices.Choices): whole, or as the
    stream writer the path drives as it drives a ChunkBuilder (one sequence: LoRAX streams no best_of)."""

    def __init__(self, req: LoraxRequest, choices: Choices, prompt_tokens: int) -> None:
        self.req, self.p, self.c, self.prompt_tokens = req, req.params, choices, prompt_tokens
        self.prefix = req.inputs if self.p.return_full_text else ""
        self.k = self.p.return_k_alternatives or 0
        self._last: dict | None = None  # the frame of a token known to be the last, held for the finish
        self._stops: dict[int, str] = {}  # sequence -> the stop sequence it ended on (Choices.stop_text)

    def _seed(self) -> int | None:
        return self.p.seed if self.p.sampled else None

    def _stop(self, k: int, reason: str) -> str:
        """The stop sequence sequence k ended on, which LoRAX keeps in its text ("": it ended otherwise)."""
        if k not in self._stops:
            self._stops[k] = self.c.stop_text(k, reason)
        return self._stops[k]

    def _text(self, k: int, reason: str) -> str:
        return self.prefix + "".join(self.c.seqs[k].texts) + self._stop(k, reason)

    def _tokens(self, s: Sequence, stop: str) -> list[dict]:
        scored = iter(s.scored)  # one per token the node named by a valid id (Choices.take_token)
        texts = s.texts[:-1] + [s.texts[-1] + stop] if stop else s.texts  # the stop's text is its last token's
        return [
            _token(self.c.texts, tid, text, next(scored, None) if _valid(tid) else None, self.k)
            for tid, text in zip(s.ids, texts)
        ]

    def _prefill(self, p: int) -> list[dict]:
        if not (self.p.decoder_input_details and self.c.echo):
            return []
        scored = self.c.prompt_scored[p] or [Scored(tid, None) for tid in self.c.prompts[p]]
        return [{"id": s.token_id, "text": self.c.texts.text(s.token_id), "logprob": s.logprob} for s in scored]

    def _sequence(self, k: int, overall: str | None, cut: bool) -> dict:
        s, reason = self.c.seqs[k], self.c.reason(k, overall, cut)
        return {
            "generated_text": self._text(k, reason),
            "finish_reason": finish_reason(reason, self._stop(k, reason)),
            "generated_tokens": s.count,
            "seed": self._seed(),
            "prefill": self._prefill(s.prompt),
            "tokens": self._tokens(s, self._stop(k, reason)),
        }

    def whole(self, overall: str | None, cut: bool) -> dict | list[dict]:
        """The answer of /generate (a list of one on POST /, as api-inference answers)."""
        [best] = self.c.picked()  # best_of's best (by the sum of its log-probabilities), or the one sequence
        out = {"generated_text": self._text(best, self.c.reason(best, overall, cut))}
        if self.p.details:
            # best_of's others come in details, best first
            others = sorted(set(range(len(self.c.seqs))) - {best}, key=lambda k: -self.c.seqs[k].score())
            seq = self._sequence(best, overall, cut)
            del seq["generated_text"]
            rest = [self._sequence(k, overall, cut) for k in others]
            out["details"] = seq | {"prompt_tokens": self.prompt_tokens, "best_of_sequences": rest or None}
        return out if self.req.STREAM is False else [out]

    # the calls the completions path makes of a ChunkBuilder (gateway.choices.Choices)

    def role(self, index: int = 0) -> bytes:
        return b""

    def token(self, text: str, index: int = 0, logprobs: dict | None = None) -> bytes:
        """One token's frame, sent as it is relayed. A token known to be its sequence's last (its max_new_tokens-th,
        or its end token) is held for the finish that follows it: LoRAX's last frame is its last token's, carrying
        generated_text (and details)."""
        s = self.c.seqs[index]
        tid = s.ids[-1]
        scored = s.scored[-1] if _valid(tid) and s.scored else None
        frame = {"token": _token(self.c.texts, tid, text, scored, self.k), "generated_text": None, "details": None}
        if s.ended or s.count >= self.c.max_tokens:
            self._last = frame
            return b""
        return sse_frame(frame)

    def held(self) -> int:
        """Tokens relayed whose frame has not gone out: the last one, held for the finish (`token`)."""
        return 1 if self._last is not None else 0

    def finish(self, reason: str, index: int = 0, *, cut: bool = False, stop_reason: str | int | None = None) -> bytes:
        """The last frame: the held last token's, or where the sequence ended on a token not known to be its last
        (a stop sequence, the node stopped) or on none, a special token of no text, carrying generated_text and
        details. The stop sequence it ended on (kept in the text, as LoRAX keeps it) is the held token's text's
        end, else the text of that last token (id 0, not special: the token that completed it was sent with the
        text before it), so that the tokens' texts still make generated_text."""
        s = self.c.seqs[index]
        stop = self._stop(index, reason)
        frame, self._last = self._last, None
        if frame is not None:
            frame["token"]["text"] += stop
        else:
            frame = {"token": {"id": 0, "text": stop, "logprob": 0.0, "special": not stop}}
            if self.k:
                frame["token"]["alternative_tokens"] = []
        frame["generated_text"] = self._text(index, reason)
        frame["details"] = None
        if self.p.details:
            frame["details"] = {
                "finish_reason": finish_reason(reason, stop),
                "prompt_tokens": self.prompt_tokens,
                "generated_tokens": s.count,
                "seed": self._seed(),
            }
        return sse_frame(frame)

    def end(self, usage: dict) -> bytes:
        return b""  # LoRAX's stream ends with its last token's frame

    def failed(self, message: str, usage: dict | None = None, *, param: str | None = None) -> bytes:
        """The node broke off: the tokens relayed (billed) reach the client, a held last one included, then the
        error lorax-client raises as IncompleteGenerationError (as ValidationError where the request's own grammar
        failed it: `param`, its field)."""
        frame, self._last = self._last, None
        held = sse_frame(frame) if frame is not None else b""
        kind = "incomplete_generation" if param is None else "validation"
        return held + sse_frame({"error": message, "error_type": kind})
